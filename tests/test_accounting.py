"""Exact parameter counts and memory sizes from the paper (paper-notes §4 and §11)."""

import json

import pytest
import torch

from hiermem.accounting import count
from hiermem.cli import main
from hiermem.config import MemoryConfig, ModelConfig, model_preset, tiny_config
from hiermem.model import HierMemLM


@pytest.mark.parametrize("name,params", [
    ("openlm-160m", 163_510_016), ("openlm-410m", 411_665_408), ("openlm-1b", 1_439_893_504),
    ("d1024-l12", 257_475_584), ("d1024-l17", 321_721_344), ("d1024-l19", 347_419_648),
    ("d1024-l21", 373_117_952), ("d1024-l22", 385_967_104), ("d1024-l24", 411_665_408),
])
def test_anchor_presets_match_paper(name, params):
    assert count(model_preset(name)).anchor_params == params


@pytest.mark.parametrize("anchor,config,fetched,bank", [
    ("openlm-160m", (256, 64, 16, 0), 18_063_360, 4_624_220_160),
    ("openlm-160m", (256, 64, 16, 4), 18_278_400, 18_717_081_600),
    ("openlm-410m", (512, 128, 32, 0), 49_545_216, 12_683_575_296),
    ("openlm-1b", (768, 256, 16, 0), 153_354_240, 21_139_292_160),
    ("d1024-l12", (3840, 336, 6, 0), 154_165_248, 6_341_787_648),
    ("openlm-160m", (0, 0, 16, 0), 860_160, 3_523_215_360),  # App. D: 860,160 per memory, 3.5B bank
])
def test_ffn_memory_sizes_match_paper(anchor, config, fetched, bank):
    acc = count(model_preset(anchor), MemoryConfig(multipliers=config, branching=16))
    assert acc.fetched_params == fetched
    assert acc.bank_params == bank
    assert acc.generic_params == fetched


@pytest.mark.parametrize("memory_type,per_unit", [
    ("ffn", 53_760), ("lora-ffn", 268_800), ("lora-qk", 62_720), ("lora-vo", 62_720), ("kv", 26_880),
])
def test_memory_type_sizes_per_unit_for_160m(memory_type, per_unit):
    acc = count(model_preset("openlm-160m"), MemoryConfig(type=memory_type, multipliers=(0, 1), branching=16))
    assert acc.fetched_params == per_unit
    assert acc.bank_params == 256 * per_unit


def test_parts_sum_and_flops_split():
    acc = count(model_preset("openlm-160m"), MemoryConfig(multipliers=(256, 64, 16, 0), branching=16), seq_len=2048)
    d = acc.to_dict()
    assert d["anchor_flops_per_token"] + d["fetched_flops_per_token"] == d["flops_per_token"]
    assert d["fetched_flops_per_token"] == 6 * acc.fetched_params
    assert sum(d["fetched_per_level"]) == d["fetched_params"]
    assert acc.fetched_bytes_per_level("bfloat16")[0] == 2 * acc.fetched_per_level[0]
    with pytest.raises(ValueError, match="storage dtype"):
        acc.fetched_bytes_per_level("float7")


@pytest.mark.parametrize("memory_type", ["ffn", "lora-ffn", "lora-qk", "lora-vo", "kv"])
@pytest.mark.parametrize("placement", ["uniform", "late", "0,1"])
def test_counts_equal_real_tensor_sizes(memory_type, placement):
    cfg = tiny_config(3, vocab_size=300)
    mem = MemoryConfig(type=memory_type, multipliers=(4, 2, 1), branching=3, placement=placement)
    real = HierMemLM(cfg, mem).num_params()
    acc = count(cfg, mem)
    assert real["anchor"] == acc.anchor_params
    assert real["embedding"] == acc.embedding_params
    for level, bank in enumerate(acc.bank_per_level, start=1):
        assert real[f"bank_level{level}"] == bank
    assert real["generic"] == acc.generic_params


def test_count_does_not_allocate_a_21b_bank():
    # would need 84 GB as float32 if anything were allocated
    acc = count(model_preset("openlm-1b"), MemoryConfig(multipliers=(768, 256, 16, 0), branching=16))
    assert acc.bank_params > 2e10


def test_count_cli_json(capsys):
    assert main(["count", "--anchor", "openlm-160m", "--memory", "256,64,16,0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["anchor_params"] == 163_510_016
    assert out["fetched_params"] == 18_063_360
    assert out["bank_params"] == 4_624_220_160
    assert out["flops_per_token"] > 0
    assert out["fetched_per_level"] == [13_762_560, 3_440_640, 860_160, 0]
    assert len(out["bank_per_level"]) == 4


def test_count_cli_table_and_errors(capsys):
    assert main(["count", "--anchor", "openlm-410m", "--memory", "512,128,32,0"]) == 0
    assert "12,683,575,296" in capsys.readouterr().out
    assert main(["count", "--anchor", "openlm-999m"]) == 1
    assert "unknown anchor preset" in capsys.readouterr().err
    assert main(["count", "--memory", "256,x"]) == 1
    assert "multipliers" in capsys.readouterr().err


def test_count_cli_imports_only_its_own_command():
    """`hiermem count` must work where only torch is installed: no data/sweep stack is imported."""
    import subprocess
    import sys
    code = ("import sys; from hiermem.cli import main; "
            "main(['count', '--anchor', 'tiny-d2', '--memory', '8,4', '--json']); "
            "heavy = {'datasets', 'faiss', 'pandas', 'ray', 'scipy'} & {m.split('.')[0] for m in sys.modules}; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"fetched_params"' in done.stdout


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("memory_type", [None, "ffn", "lora-ffn", "kv"])
def test_runtime_params_equal_the_real_tensors_one_context_uses(memory_type, tie):
    """Bug caught: `runtime_params` off by the embedding parameters (or by the fetched memory).
    Independent: every anchor tensor of a real model plus one row of each bank level (a fetch)."""
    cfg = tiny_config(2, vocab_size=300).replace(tie_embeddings=tie)
    mem = MemoryConfig(type=memory_type, multipliers=(4, 2), branching=3) if memory_type else None
    model = HierMemLM(cfg, mem)
    anchor = sum(p.numel() for p in model.anchor.parameters())  # embeddings (and untied head) included
    fetched = sum(p.shape[1] for p in model.bank.levels) if mem else 0
    assert count(cfg, mem).runtime_params == anchor + fetched
    assert count(cfg, mem).to_dict()["runtime_params"] == anchor + fetched


@pytest.mark.parametrize("memory", [None, MemoryConfig(type="ffn", multipliers=(3, 2), branching=3)])
def test_forward_flops_equal_measured_matmuls_plus_hand_counted_attention(memory):
    """Bug caught: attention-score FLOPs halved (or the head, a weight matrix, the fetched memory or
    the 3x training factor miscounted). Independent: torch's FlopCounterMode on a real forward counts
    every matmul (weights, head, memory); the attention scores (fused SDPA, not counted on CPU) are
    counted by hand: Q K^T and A V each cost 2 * T * attn_dim multiply-add FLOPs per token and layer,
    over the full context."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, head_dim=8, ffn_dim=48, vocab_size=97, max_seq_len=16)
    seq, batch = 16, 2
    torch.manual_seed(0)
    model = HierMemLM(cfg, memory)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    paths = torch.zeros(batch, 2, dtype=torch.long) if memory else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens, paths=paths)
    counted = counter.get_flop_counts()["Global"]
    assert set(counted) <= {torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm}, counted  # no SDPA counted
    matmuls = counter.get_total_flops() / (batch * seq)
    attn_dim = cfg.n_heads * cfg.head_dim
    scores = cfg.n_layers * (2 * seq * attn_dim + 2 * seq * attn_dim)  # Q K^T, then A V
    assert scores == 2 * (2 * 16 * 16 + 2 * 16 * 16)  # = 2048: 2 layers, T = attn_dim = 16
    acc = count(cfg, memory, seq_len=seq)
    assert acc.attention_score_flops_per_token == scores
    assert acc.forward_flops_per_token == matmuls + scores
    assert acc.flops_per_token == 3 * (matmuls + scores)
