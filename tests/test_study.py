"""The study sweeps (configs/sweeps/study/): each plans at study and smoke scale, and its accounting holds
the invariant its experiment needs (equal memory parameters across types, fixed runtime parameters
across ratios, a fixed fetch and a fixed bank in the hierarchy, ...). Also the sweep features they use:
paired `cases` axes, per-scale overrides and the knowledge data regime."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hiermem.sweep import SweepSpec, load_spec, plan

STUDY = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "study"
PARTS = ("longtail", "memory_type", "depth_bank", "hierarchy", "ratio", "placement", "blocking", "dense_ladder")


def _table(part: str, scale: str | None = None) -> pd.DataFrame:
    p = plan(load_spec(STUDY / f"{part}.yaml", scale), "/tmp/unused-sweeps")
    rows = []
    for r in p.runs:
        acc = r.accounting
        rows.append({"role": r.role, "stage": r.cfg.stage, "anchor_params": acc.anchor_params,
                     "fetched_params": acc.fetched_params, "bank_params": acc.bank_params,
                     "runtime_params": acc.runtime_params, "tokens": r.tokens, "cfg": r.cfg,
                     "type": r.cfg.memory.type if r.cfg.uses_memory else "",
                     "multipliers": r.cfg.memory.multipliers if r.cfg.uses_memory else ()})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("scale", [None, "smoke"])
def test_every_part_plans_in_the_knowledge_regime(scale):
    assert sorted(p.stem for p in STUDY.glob("*.yaml")) == sorted(PARTS)
    for part in PARTS:
        table = _table(part, scale)
        assert len(table) >= 2, part
        for cfg in table["cfg"]:
            assert cfg.data.corpus.fact_layout == "subjects" and cfg.data.corpus.exposure_law == "loguniform", part


@pytest.mark.parametrize("scale, n_sizes", [(None, 3), ("smoke", 1)])
def test_memory_types_fetch_equal_parameters_at_three_sizes(scale, n_sizes):
    mem = _table("memory_type", scale).query("role == 'memory'")
    assert set(mem["type"]) == {"ffn", "lora-ffn", "lora-qk", "lora-vo", "kv"}
    sizes = mem.groupby("fetched_params")["type"].apply(set)
    assert len(sizes) == n_sizes and all(types == set(mem["type"]) for types in sizes)
    assert (mem["multipliers"].map(lambda m: m[0]) == 0).all()  # single level: the leaves


def test_ratio_holds_runtime_parameters_fixed_from_1_40_to_1_2():
    mem = _table("ratio").query("role == 'memory'")
    runtime = mem["anchor_params"] + mem["fetched_params"]
    assert (runtime == mem["runtime_params"]).all()
    assert runtime.max() / runtime.min() - 1 < 0.01
    ratio = (mem["fetched_params"] / mem["anchor_params"]).sort_values().to_numpy()
    assert ratio[0] == pytest.approx(1 / 40, rel=0.1) and ratio[-1] == pytest.approx(1 / 2, rel=0.15)
    assert len(ratio) >= 5 and np.all(np.diff(ratio) > 0)


def test_hierarchy_has_a_fixed_fetch_and_a_fixed_bank_series():
    mem = _table("hierarchy").query("role == 'memory'")
    banks_at_fetch = mem.groupby("fetched_params")["bank_params"].nunique()
    fetches_at_bank = mem.groupby("bank_params")["fetched_params"].nunique()
    assert banks_at_fetch.max() >= 3 and fetches_at_bank.max() >= 4


def test_depth_bank_holds_the_fetch_and_grows_bank_and_tokens_with_the_level():
    mem = _table("depth_bank").query("role == 'memory'")
    mem = mem.assign(level=mem["multipliers"].map(lambda m: [i for i, r in enumerate(m) if r][0] + 1))
    mem = mem.sort_values("level")
    assert list(mem["level"]) == [1, 2, 3] and mem["fetched_params"].nunique() == 1
    assert np.all(np.diff(mem["bank_params"]) > 0) and np.all(np.diff(mem["tokens"]) > 0)


def test_longtail_spans_4x_anchors_with_10_percent_memory_and_every_stage():
    table = _table("longtail")
    mem = table.query("role == 'memory'")
    sizes = sorted(mem["anchor_params"].unique())
    assert len(sizes) == 3 and sizes[-1] >= 4 * sizes[0]
    share = mem["fetched_params"] / mem["anchor_params"]
    assert share.between(0.05, 0.15).all()
    for n in sizes:
        assert {"memory-frozen", "memory-cotrain"} <= set(mem.loc[mem["anchor_params"] == n, "stage"])
    assert (mem["stage"] == "memory-scratch").sum() == 1
    assert (table["role"] == "dense").sum() >= 2


def test_dense_ladder_has_five_sizes_by_three_budgets_and_placements_equal_parameters():
    dense = _table("dense_ladder")
    assert (dense["role"] == "dense").all()
    assert dense["anchor_params"].nunique() >= 5 and dense["tokens"].nunique() >= 3
    mem = _table("placement").query("role == 'memory'")
    assert {c.memory.placement for c in mem["cfg"]} == {"uniform", "early", "middle", "late"}
    assert mem["fetched_params"].nunique() == 1


def test_cases_pair_keys_instead_of_crossing_them(tmp_path):
    """Bug caught: `cases` expanded as a product (4 runs) or its keys dropped."""
    spec = SweepSpec.from_dict({
        "name": "pairs", "base": {"data": {"preset": "smoke"}}, "anchor_stage": {"tokens": 5120},
        "memory_stage": {"tokens": 5120, "memory": {"type": "ffn"}},
        "axes": {"cases": [{"model.ffn_dim": 96, "memory.multipliers": [8, 2]},
                           {"model.ffn_dim": 64, "memory.multipliers": [16, 4]}]}})
    runs = [r for r in plan(spec, tmp_path).runs if r.role == "memory"]
    assert sorted((r.cfg.model["ffn_dim"], r.cfg.memory.multipliers) for r in runs) == [(64, (16, 4)), (96, (8, 2))]
    with pytest.raises(ValueError, match=r"axes.cases.*mappings of axis keys"):
        SweepSpec.from_dict({"name": "bad", "axes": {"cases": [3]}})
    with pytest.raises(ValueError, match="unknown sweep axis 'memory.multiplier'"):
        SweepSpec.from_dict({"name": "bad", "memory_stage": {}, "axes": {"cases": [{"memory.multiplier": [1]}]}})


def test_scale_overrides_and_the_knowledge_regime(tmp_path):
    smoke = load_spec(STUDY / "hierarchy.yaml", "smoke")
    assert smoke.name == "study-hierarchy-smoke" and smoke.base["data"]["preset"] == "smoke"
    assert load_spec(STUDY / "hierarchy.yaml").name == "study-hierarchy"
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: plain\nbase: {data: {preset: smoke}}\n")
    with pytest.raises(ValueError, match="has no overrides for scale 'smoke'"):
        load_spec(plain, "smoke")


def test_notebook_recipes_refuse_what_they_cannot_run():
    """A recipe with both a spec and parts, an unknown part or no source is refused naming what it expected."""
    from hiermem.study import recipe_plan
    with pytest.raises(ValueError, match="unknown parts \\['longtale'\\]"):
        recipe_plan({"parts": ["longtale"]})
    with pytest.raises(ValueError, match="keys \\['spec'\\]"):
        recipe_plan({"parts": ["longtail"], "spec": "configs/sweeps/smoke.yaml"})
    with pytest.raises(ValueError, match="needs `spec`"):
        recipe_plan({"name": "x"})
    table = recipe_plan({"parts": ["hierarchy", "dense_ladder"]}, "/tmp/unused-sweeps")
    assert set(table["sweep"]) == {"hierarchy", "dense_ladder"} and len(table) == len(_table("hierarchy")) + len(_table("dense_ladder"))


def test_study_failed_lists_each_failed_run_once_with_its_part():
    """Bug caught: failed runs dropped silently (a figure missing a point would look like an absent
    experiment, and a claim would be decided on the survivors)."""
    from hiermem.study import study_failed
    ok = pd.DataFrame({"run_id": ["a", "a", "b"], "status": ["ok", "ok", "failed"], "mode": ["none", "fetched", None],
                       "label": ["x", "x", "y"], "fetched_params": [10, 10, 20]})
    table = study_failed({"hierarchy": ok, "ratio": ok.iloc[:2], "placement": ok.iloc[:0]})
    assert list(table["run"]) == ["b"] and list(table["sweep"]) == ["hierarchy"] and table["fetched_params"].tolist() == [20]
    assert study_failed({"ratio": ok.iloc[:2]}).empty
