"""Post-hoc memories on Hugging Face causal LMs (hiermem.hf), on tiny randomly initialised models of each
family built from their config classes (nothing is downloaded)."""

import json

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from hiermem.accounting import count  # noqa: E402
from hiermem.cli import main  # noqa: E402
from hiermem.config import MemoryConfig  # noqa: E402
from hiermem.hf import HFMemoryLM, hf_model_config, load_bank, save_bank  # noqa: E402
from hiermem.stepper import TrainStepper  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=48, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "gemma3": lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=48, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
}
MEMORY = MemoryConfig(type="ffn", multipliers=(4, 4), branching=3)


def _base(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_effect_at_init_and_the_fetch_follows_the_path(family):
    """Bug caught: memory units that change the model before training (down not zero, a hook adding
    the wrong tensor), or a hook reading another sequence's or another node's rows. Reference: the
    base model's own logits; then one leaf's rows made non-zero changes exactly the sequences routed
    to it."""
    base = _base(family)
    tokens = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(1))
    paths = torch.tensor([[0, 1], [2, 2], [0, 1], [1, 0]])
    with torch.no_grad():
        want = base(input_ids=tokens).logits
        model = HFMemoryLM(base, MEMORY)
        torch.testing.assert_close(model(tokens, paths=paths), want, rtol=0, atol=0)
        leaf = 0 * 3 + 1  # node (0, 1) at level 2
        model.bank.levels[1][leaf].normal_(0, 0.5)
        out = model(tokens, paths=paths)
    changed = (out - want).abs().amax(dim=(1, 2)) > 1e-4
    assert changed.tolist() == [True, False, True, False]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, rtol=0, atol=0)  # no paths: the base model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_changes_only_the_fetched_bank_rows(family):
    """Bug caught: the frozen base model receiving updates, the bank optimizer touching blocks no
    sequence fetched, or gradients not reaching the memory through the hook."""
    model = HFMemoryLM(_base(family), MEMORY)
    before = {n: p.detach().clone() for n, p in model.anchor.named_parameters()}
    banks = [p.detach().clone() for p in model.bank.levels]
    stepper = TrainStepper(model, lr=1e-3, bank_lr=1e-2, freeze_anchor=True)
    tokens = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(2))
    paths = torch.tensor([[0, 0], [0, 2]])
    for _ in range(3):
        assert stepper.step(tokens, None, paths)["finite"]
    assert all(torch.equal(p, before[n]) for n, p in model.anchor.named_parameters())
    moved = [(p - b).abs().amax(dim=1) > 0 for p, b in zip(model.bank.levels, banks)]
    assert moved[0].tolist() == [True, False, False]  # level 1: node 0 only
    assert moved[1].nonzero().flatten().tolist() == [0, 2]  # level 2: nodes (0, 0) and (0, 2)


def test_a_trained_bank_makes_a_frozen_model_answer_invented_facts():
    """Bug caught: a memory that cannot carry knowledge into a frozen model (units added after the
    output, the wrong activation, gradients cut). Six invented facts 'subject relation -> answer', one
    leaf each: after training only the bank, the frozen tiny Llama answers each with its memory and
    (nearly) none without."""
    base = _base("llama", seed=3)
    model = HFMemoryLM(base, MemoryConfig(type="ffn", multipliers=(0, 16), branching=3))
    facts = [(10 + i, 30 + i) for i in range(6)]  # (subject token, answer token); relation token 5
    tokens = torch.tensor([[1, s, 5, a] for s, a in facts])
    paths = torch.tensor([[i // 3, i % 3] for i in range(len(facts))])
    stepper = TrainStepper(model, lr=1e-3, bank_lr=3e-2, freeze_anchor=True, weight_decay=0.0, bank_weight_decay=0.0)
    for _ in range(150):
        stepper.step(tokens, None, paths)
    with torch.no_grad():
        with_memory = model(tokens[:, :3], paths=paths)[:, -1].argmax(-1)
        without = model(tokens[:, :3])[:, -1].argmax(-1)
    answers = tokens[:, 3]
    assert (with_memory == answers).all(), with_memory.tolist()
    assert int((without == answers).sum()) <= 1


def test_bank_checkpoint_round_trip_and_refusals(tmp_path):
    """Bug caught: a bank saved with the base model's weights (it must hold only the bank), a bank
    loaded onto a base model of another shape without a word, or bad configs accepted."""
    model = HFMemoryLM(_base("qwen2"), MEMORY)
    with torch.no_grad():
        model.bank.levels[1].normal_()
    save_bank(model, tmp_path / "bank")
    files = sorted(p.name for p in (tmp_path / "bank").iterdir())
    assert files == ["bank.safetensors", "hf_memory.json"]
    meta = json.loads((tmp_path / "bank" / "hf_memory.json").read_text())
    assert len(meta["config_sha256"]) == 64 and meta["memory"]["multipliers"] == [4, 4]
    again = load_bank(_base("qwen2", seed=5), tmp_path / "bank")  # other weights, same config: accepted
    assert all(torch.equal(a, b) for a, b in zip(model.bank.levels, again.bank.levels))
    other = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**{**SMALL, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="intermediate_size"):
        load_bank(other, tmp_path / "bank")
    with pytest.raises(ValueError, match="FFN memories"):
        HFMemoryLM(_base("llama"), MemoryConfig(type="lora-qk", multipliers=(2, 2), branching=3))
    with pytest.raises(ValueError, match="placement"):
        HFMemoryLM(_base("llama"), MemoryConfig(type="ffn", multipliers=(2, 2), branching=3, placement="0,5"))

    class NoMLP(nn.Module):
        config = transformers.LlamaConfig(**SMALL)
    with pytest.raises(ValueError, match="NoMLP"):
        HFMemoryLM(NoMLP(), MEMORY)


@pytest.mark.parametrize("name,config,memory,fetched,bank", [
    ("Gemma-3-270M", {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18, "num_attention_heads": 4,
                      "head_dim": 256, "intermediate_size": 2048, "vocab_size": 262144}, "512,128,32,0", 23.2e6, 5.95e9),
    ("Qwen2.5-0.5B", {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                      "intermediate_size": 4864, "vocab_size": 151936}, "512,128,32,0", 43.4e6, 11.1e9),
    ("Llama-3.2-1B", {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                      "intermediate_size": 8192, "vocab_size": 128256}, "768,256,16,0", 102.2e6, 14.09e9),
])
def test_count_hf_gives_table_2_sizes(name, config, memory, fetched, bank, tmp_path, capsys):
    """Bug caught: a unit counted with the MLP width instead of 3 d, layers miscounted, or the tree's
    nodes per level wrong. Reference: the paper's Table 2 (fetched and bank sizes, k = 16)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["count", "--hf", str(path), "--memory", memory, "--json", "--no-generic"]) == 0
    out = json.loads(capsys.readouterr().out)
    units = [int(r) for r in memory.split(",")]
    c0 = 3 * config["hidden_size"] * config["num_hidden_layers"]
    assert out["fetched_params"] == sum(units) * c0 == pytest.approx(fetched, rel=2e-3)
    assert out["bank_params"] == sum(16 ** (level + 1) * r for level, r in enumerate(units)) * c0
    assert out["bank_params"] == pytest.approx(bank, rel=2e-3)
    assert count(hf_model_config(config)).anchor_params > 0
    with pytest.raises(ValueError, match="hidden_size/n_embd"):
        hf_model_config({"model_type": "mystery", "vocab_size": 10})
