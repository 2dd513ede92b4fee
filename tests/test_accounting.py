"""Exact parameter counts and memory sizes from the paper (paper-notes §4 and §11)."""

import json

import pytest

from hiermem.accounting import count
from hiermem.cli import main
from hiermem.config import MemoryConfig, model_preset, tiny_config
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
    acc = count(model_preset(anchor), MemoryConfig(multipliers=config))
    assert acc.fetched_params == fetched
    assert acc.bank_params == bank
    assert acc.generic_params == fetched


@pytest.mark.parametrize("memory_type,per_unit", [
    ("ffn", 53_760), ("lora-ffn", 268_800), ("lora-qk", 62_720), ("lora-vo", 62_720), ("kv", 26_880),
])
def test_memory_type_sizes_per_unit_for_160m(memory_type, per_unit):
    acc = count(model_preset("openlm-160m"), MemoryConfig(type=memory_type, multipliers=(0, 1)))
    assert acc.fetched_params == per_unit
    assert acc.bank_params == 256 * per_unit


def test_parts_sum_and_flops_split():
    acc = count(model_preset("openlm-160m"), MemoryConfig(multipliers=(256, 64, 16, 0)), seq_len=2048)
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
    acc = count(model_preset("openlm-1b"), MemoryConfig(multipliers=(768, 256, 16, 0)))
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
