"""Post-hoc memories on Hugging Face causal LMs (hiermem.hf), on tiny randomly initialised models of each
family built from their config classes (nothing is downloaded)."""

import json

import numpy as np
import yaml

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from hiermem.accounting import count  # noqa: E402
from hiermem.cli import main  # noqa: E402
from hiermem.config import MemoryConfig  # noqa: E402
from hiermem.hf import HFMemoryLM, hf_model_config, load_bank, save_bank  # noqa: E402
from hiermem.stepper import TrainStepper  # noqa: E402
from helpers import saved_hf_base  # noqa: E402

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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_evaluation_mode_runs_on_a_hugging_face_memory_model(family, smoke_data_config):
    """`hiermem.evaluate.evaluate_model` (the tables `hiermem eval` writes) on a post-hoc memory over a tiny
    model of the data's vocabulary: every mode the bank has is scored; at initialisation (down = 0) every
    mode equals `none` probe by probe; once the bank is non-zero, fetched and none differ."""
    from hiermem.data.pipeline import build_data
    from hiermem.evaluate import EvalConfig, evaluate_model
    data = build_data(smoke_data_config, progress=False)
    config = FAMILIES[family]()
    config.vocab_size = data.vocab_size
    for name in ("max_position_embeddings", "n_positions"):
        if hasattr(config, name):
            setattr(config, name, smoke_data_config.seq_len)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    memory = MemoryConfig(type="ffn", multipliers=(4, 4), branching=smoke_data_config.tree.branching, generic=True)
    model = HFMemoryLM(base, memory).eval()
    cfg = EvalConfig(heldout_docs_per_source=3, split="all", rank_candidates=10, max_probes_per_relation=2,
                     max_new_tokens=3)
    results, perplexity, summary, _ = evaluate_model(model, data, cfg, "hf")
    assert {"none", "generic", "fetched", "wrong-path", "oracle-path"} <= set(summary["mode"])
    none = results[results["mode"] == "none"].set_index("probe_id")
    for mode, table in results.groupby("mode"):
        if mode.startswith("rag"):
            continue
        np.testing.assert_allclose(table.set_index("probe_id").loc[none.index, "answer_logprob"],
                                   none["answer_logprob"], rtol=1e-5, err_msg=mode)  # zero effect at init
    with torch.no_grad():
        for p in model.bank.levels:
            p.normal_(0, 0.5)
    results = evaluate_model(model, data, cfg, "hf")[0]
    fetched = results[results["mode"] == "fetched"]["answer_logprob"].to_numpy()
    for other in ("none", "wrong-path", "generic"):  # each mode scores with its own memory, not fetched's
        assert np.abs(fetched - results[results["mode"] == other]["answer_logprob"].to_numpy()).max() > 1e-3, other


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padding_scores_like_the_prompt_alone(family):
    """Bug caught: positions counted from the padded start, which moves a short prompt's absolute position
    embeddings (GPT-2) when it shares a batch with a longer one."""
    from hiermem.probing import MemoryChoice, continuation_logprobs
    model = HFMemoryLM(_base(family), MEMORY).eval()
    with torch.no_grad():
        for p in model.bank.levels:
            p.normal_(0, 0.3)
    choice = MemoryChoice(paths=np.array([[1, 2], [0, 1]]))
    short, long_ = [5, 7, 9], [3, 4, 5, 6, 7, 8, 9, 10]
    together = continuation_logprobs(model, [short, long_], [[11, 12], [13]], choice, pad_id=0)
    alone = continuation_logprobs(model, [short], [[11, 12]], choice.take(np.array([0])), pad_id=0)
    assert together[0] == pytest.approx(alone[0], rel=1e-5)


def _saved_base(folder, vocab: int, seq_len: int, family: str = "llama"):
    return saved_hf_base(folder, FAMILIES[family](), vocab, seq_len)


def test_hiermem_train_and_eval_run_on_a_hugging_face_base(smoke_data_config, tmp_path):
    """`hiermem train` with `base_model` (the run a sweep would make) trains the bank on the frozen base,
    resumes exactly after an interruption, keeps the bank files only (the base referenced by path and config
    hash), and `hiermem eval` scores every mode on it. Bugs caught: the base's weights written into or
    changed by the run, a resumed run ending elsewhere than an uninterrupted one, a checkpoint loading onto
    a base whose config changed, a base_model run accepted for a stage that has no memory."""
    from safetensors.torch import load_file

    from hiermem.checkpoint import ANCHOR_FILE, load_model, read_hf_base
    from hiermem.data.pipeline import build_data
    from hiermem.evaluate import EvalConfig, evaluate_run
    from hiermem.rundir import RunDir
    from hiermem.train import TrainConfig, train
    data = build_data(smoke_data_config, progress=False)
    base_dir = _saved_base(tmp_path / "base", data.vocab_size, smoke_data_config.seq_len)
    cfg = TrainConfig(stage="memory-frozen", base_model=str(base_dir), data=smoke_data_config, tokens=8 * 4 * 128,
                      batch_size=4, memory=MemoryConfig(type="ffn", multipliers=(4, 4), generic=True),
                      checkpoint_every=3, log_every=2, optim=TrainConfig().optim.replace(bank_lr=0.05))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and "base_model" not in TrainConfig().to_dict()
    whole = train(cfg, tmp_path / "whole", data=data, progress=False)
    train(cfg, tmp_path / "resumed", data=data, progress=False, stop_after_steps=5)  # killed after a checkpoint
    resumed = train(cfg, tmp_path / "resumed", data=data, progress=False)
    final = RunDir.open(whole).final
    assert not (final / ANCHOR_FILE).exists() and read_hf_base(final)["path"] == str(base_dir)
    for level in (1, 2):
        a = load_file(str(final / "bank" / f"level_{level}.safetensors"))["blocks"]
        b = load_file(str(RunDir.open(resumed).final / "bank" / f"level_{level}.safetensors"))["blocks"]
        assert float(a.abs().sum()) > 0 and torch.equal(a, b)  # down rows moved off zero; the same after a resume
    model = load_model(final)
    saved = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    for (name, p), (_, q) in zip(model.anchor.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(p, q), name  # the base is untouched
    summary = evaluate_run(whole, EvalConfig(heldout_docs_per_source=3, split="all", rank_candidates=10,
                                             max_probes_per_relation=2, max_new_tokens=3), data=data)
    assert {"none", "generic", "fetched", "wrong-path", "oracle-path"} <= set(summary["mode"])
    other = _saved_base(tmp_path / "other", data.vocab_size, smoke_data_config.seq_len)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.01}))  # not in ModelConfig
    meta = yaml.safe_load((final / "config.yaml").read_text())
    meta["hf_base"]["path"] = str(other)
    (final / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ValueError, match=r"config differs from LlamaForCausalLM.s in: .*rms_norm_eps"):
        load_model(final)
    with pytest.raises(ValueError, match="invalid config field 'base_model'"):
        TrainConfig(stage="pretrain", base_model=str(base_dir), data=smoke_data_config)


def test_a_co_trained_hugging_face_base_is_saved_with_its_bank(smoke_data_config, tmp_path):
    """memory-cotrain on a Hugging Face base: the base's weights move, so the checkpoint holds them beside the
    bank, and loading the run gives the trained base, not the directory's. Bug caught: a co-trained base
    dropped from the checkpoint (the run would silently evaluate the untrained base)."""
    from hiermem.checkpoint import ANCHOR_FILE, load_model
    from hiermem.data.pipeline import build_data
    from hiermem.rundir import RunDir
    from hiermem.train import TrainConfig, train
    data = build_data(smoke_data_config, progress=False)
    base_dir = _saved_base(tmp_path / "base", data.vocab_size, smoke_data_config.seq_len, family="gpt2")
    cfg = TrainConfig(stage="memory-cotrain", base_model=str(base_dir), data=smoke_data_config, tokens=3 * 4 * 128,
                      batch_size=4, memory=MemoryConfig(type="ffn", multipliers=(4, 4)), log_every=1)
    final = RunDir.open(train(cfg, tmp_path / "run", data=data, progress=False)).final
    assert (final / ANCHOR_FILE).exists()
    model = load_model(final)
    saved = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    moved = [n for (n, p), (_, q) in zip(model.anchor.state_dict().items(), saved.state_dict().items())
             if not torch.equal(p, q)]
    assert moved, "co-training must change the base, and the run must load the changed base"
