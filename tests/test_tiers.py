"""Storage tiers and fetch cost: the model's arithmetic, the paper's deployment example, `count --tiers`."""

import json

import pytest

from hiermem.accounting import count
from hiermem.cli import main
from hiermem.config import MemoryConfig, model_preset
from hiermem.tiers import PAPER_EXAMPLE, Tier, fetch_estimate, paper_example, parse_tier_spec, tiers


def test_hand_computed_case():
    known = {"a": Tier("a", 1e9, 1e-3), "b": Tier("b", 1e8, 1e-2)}
    # level 1: 2e8 B on a -> 1 ms + 200 ms; level 2: 1e7 B on b -> 10 ms + 100 ms; level 3: 5e6 B on a -> 1 + 5 ms
    est = fetch_estimate([2e8, 1e7, 5e6], known, "a,b,a", bank_bytes=[4e8, 4e9, 4e10], flat_tier="b")
    assert [r["seconds"] for r in est.levels] == pytest.approx([0.201, 0.110, 0.006])
    assert est.tier_seconds == pytest.approx({"a": 0.207, "b": 0.110})
    assert est.seconds == pytest.approx(0.207)  # tiers read concurrently, a tier's levels one after another
    assert est.fetched_bytes == 2.15e8
    # the flat bank: one block of all fetched bytes (215 MB) read from b in one piece
    assert est.flat_seconds == pytest.approx(1e-2 + 2.15e8 / 1e8)
    assert est.flat_bank_bytes == pytest.approx(4.44e10)
    seq = fetch_estimate([2e8, 1e7, 5e6], known, "1=a,2=b,3=a", flat_tier="b", overlap="sequential")
    assert seq.seconds == pytest.approx(0.317)
    # a level without blocks (r = 0) is not read
    assert fetch_estimate([1e9, 0.0], known, "a,b", flat_tier="a").seconds == pytest.approx(1.001)


def test_paper_example_reproduced():
    """Anchor 0.8 GB in RAM; levels 39 / 155 / 618 GB on flash / external disk / cloud: 38 ms vs 198 ms."""
    acc = count(model_preset(PAPER_EXAMPLE["anchor"]),
                MemoryConfig(multipliers=PAPER_EXAMPLE["memory"], branching=PAPER_EXAMPLE["k"]))
    assert round(acc.anchor_params * 2 / 1e9, 1) == 0.8
    assert [round(b / 1e9) for b in acc.bank_bytes_per_level("bfloat16")] == [39, 155, 618]
    est = paper_example()
    assert round(est.seconds * 1e3) == 38 and round(est.flat_seconds * 1e3) == 198
    assert [r["tier"] for r in est.levels] == ["flash", "disk", "network"] and est.flat_tier == "disk"
    assert est.levels[1]["seconds"] == est.seconds  # the external disk's level dominates
    laptop = paper_example("laptop")  # the same bytes on consumer devices: the cloud level dominates
    assert laptop.seconds > 1.0 and laptop.levels[2]["seconds"] == laptop.seconds


def test_count_tiers_cli(capsys, tmp_path):
    args = ["count", "--anchor", "openlm-410m", "--memory", "16384,4096,1024", "--tiers"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "37.8 ms" in out and "198.3 ms" in out and "level 2: bank 154.62 GB on disk" in out
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)["tiers"]
    assert round(data["seconds_per_document"] * 1e3) == 38 and round(data["flat_seconds_per_document"] * 1e3) == 198
    assert data["fetched_bytes_per_document"] == sum(r["fetched_bytes"] for r in data["levels"])
    # overrides: a spec on the command line and a YAML file
    spec = tmp_path / "tiers.yaml"
    spec.write_text("tiers:\n  disk: {bandwidth: 8.0e9, latency: 1.0e-4}\n")
    assert main(args + ["--tier-spec", str(spec), "--tier-spec", "flash=4e10:1e-4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["tiers"]
    assert data["tiers"]["disk"]["bandwidth"] == 8e9 and data["tiers"]["flash"]["bandwidth"] == 4e10
    assert data["levels"][1]["seconds"] == pytest.approx(1e-4 + 603979776 / 8e9)


@pytest.mark.parametrize("extra, message", [
    (["--tiers", "flash,tape,network"], "unknown tier 'tape'"),
    (["--tiers", "--tier-spec", "flash=0:1e-4"], "tier 'flash': bandwidth must be a positive"),
    (["--tiers", "--tier-spec", "disk=-3e9:1e-4"], "tier 'disk': bandwidth must be a positive"),
    (["--tiers", "--flat-tier", "moon"], "unknown tier 'moon'"),
    (["--tiers", "flash,disk"], "names 2 tier(s) for 3 memory level(s)"),
    (["--tiers", "--tier-spec", "flash"], "NAME=BANDWIDTH:LATENCY"),
])
def test_bad_tier_input_is_refused_naming_it(capsys, extra, message):
    assert main(["count", "--anchor", "openlm-410m", "--memory", "16384,4096,1024"] + extra) == 1
    assert message in capsys.readouterr().err


def test_tiers_need_memory(capsys):
    assert main(["count", "--anchor", "tiny-d2", "--tiers"]) == 1
    assert "--tiers needs a memory configuration" in capsys.readouterr().err


def test_spec_parsing():
    assert parse_tier_spec("nvme=2e9:1e-4") == {"nvme": Tier("nvme", 2e9, 1e-4, "--tier-spec nvme=2e9:1e-4")}
    assert set(tiers("server", ["nvme=2e9:1e-4"])) == {"ram", "flash", "disk", "network", "nvme"}
    with pytest.raises(ValueError, match="unknown tier preset 'phone'"):
        tiers("phone")
