"""Knowledge attribution: exact categories on a synthetic table, orderings, bootstrap CIs, plots,
and the whole chain on a real (tiny) memory run."""

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis import (CATEGORIES, accuracy_by_frequency, attribute_knowledge, attribution_shares, blocking_effect,
                      bucket_order, level_contribution, load_probe_results, memory_gain, plot_accuracy_by_frequency,
                      plot_attribution, plot_blocking, plot_level_contribution, plot_memory_gain)
from analysis.attribution import MODE_ORDER

BUCKETS = ["b0-rarest", "b1", "b2-frequent"]
EXPOSURES = {"b0-rarest": 1, "b1": 4, "b2-frequent": 16}


def _rows(run: str, probe: str, bucket: str, scores: dict[str, bool], relation: str = "capital") -> list[dict]:
    return [{"run": run, "probe_id": probe, "relation": relation, "subject": probe, "bucket": bucket,
             "group": "CK" if bucket.endswith("frequent") or bucket == "cloze" else "SK",
             "exposures": EXPOSURES.get(bucket, 0), "mode": mode, "correct": ok, "mc_correct": not ok,
             "answer_logprob": -1.0 if ok else -5.0} for mode, ok in scores.items()]


@pytest.fixture
def known_table() -> tuple[pd.DataFrame, dict[tuple[str, str], str]]:
    """Every (none, fetched, generic) combination in every bucket, in a shuffled order, plus a dense run."""
    expected = {}
    rows = []
    for bucket in BUCKETS:
        for i, (a, f, g) in enumerate(itertools.product([False, True], repeat=3)):
            probe = f"{bucket}:{i}"
            rows += _rows("mem", probe, bucket, {"none": a, "fetched": f, "generic": g,
                                                 "drop-level1": a and f, "drop-level2": f})
            expected[("mem", probe)] = ("anchor" if a and f else "lost" if a else "generic-only" if g
                                        else "memory-only" if f else "neither")
    rows += _rows("dense", "b0-rarest:0", "b0-rarest", {"none": True})
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)
    return table, expected


def test_categories_are_exact_and_dense_runs_are_left_out(known_table):
    table, expected = known_table
    attributed = attribute_knowledge(table)
    assert set(attributed["run"]) == {"mem"}
    got = {(r.run, r.probe_id): r.category for r in attributed.itertuples()}
    assert got == expected
    # 8 combinations: anchor 2 (a&f, g either), lost 2, generic-only 2, memory-only 1, neither 1
    counts = attributed["category"].value_counts().to_dict()
    assert counts == {"anchor": 6, "lost": 6, "generic-only": 6, "memory-only": 3, "neither": 3}
    assert list(attributed["bucket"].drop_duplicates()) == BUCKETS


def test_shares_cover_every_category_and_sum_to_one(known_table):
    shares = attribution_shares(attribute_knowledge(known_table[0]), by="bucket")
    assert list(shares["bucket"].drop_duplicates()) == BUCKETS
    assert len(shares) == len(BUCKETS) * len(CATEGORIES)
    np.testing.assert_allclose(shares.groupby("bucket")["share"].sum(), 1.0)
    one = shares[(shares["bucket"] == "b1")].set_index("category")
    assert one.loc["memory-only", "count"] == 1 and one.loc["memory-only", "share"] == pytest.approx(1 / 8)
    overall = attribution_shares(attribute_knowledge(known_table[0]), by=None)
    assert overall.set_index("category")["count"].to_dict()["anchor"] == 6


def test_generic_missing_means_not_known_by_generic(known_table):
    table = known_table[0]
    attributed = attribute_knowledge(table[table["mode"] != "generic"])
    assert "generic-only" not in set(attributed["category"])
    assert (attributed["category"] == "memory-only").sum() == 6  # ~a & f, now regardless of g


def test_metric_validation(known_table):
    with pytest.raises(ValueError, match="metric"):
        attribute_knowledge(known_table[0], metric="answer_logprob")  # not a yes/no score
    with pytest.raises(ValueError, match="no run has both"):
        attribute_knowledge(known_table[0], memory_mode="oracle-path")


def test_bucket_and_mode_ordering():
    assert bucket_order(["cloze", "b10-frequent", "b2", "unseen", "b0-rarest"]) == \
        ["unseen", "b0-rarest", "b2", "b10-frequent", "cloze"]
    rows = []
    for bucket in ["b2-frequent", "cloze", "b0-rarest", "b1"]:
        rows += _rows("r", bucket, bucket, {"fetched": True, "none": False, "drop-level2": True, "drop-level1": False})
    table = accuracy_by_frequency(pd.DataFrame(rows))
    assert list(table["bucket"].drop_duplicates()) == BUCKETS  # cloze is not a frequency bucket
    assert list(table["mode"].drop_duplicates()) == ["none", "fetched", "drop-level1", "drop-level2"]
    assert list(accuracy_by_frequency(pd.DataFrame(rows), frequency_only=False)["bucket"].drop_duplicates()) == \
        BUCKETS + ["cloze"]


def test_mode_order_matches_the_evaluator():
    from hiermem.evaluate import BASE_MODES
    assert MODE_ORDER == BASE_MODES


def test_accuracy_values_and_intervals(known_table):
    table = accuracy_by_frequency(known_table[0], modes=["none", "fetched"])
    row = table[(table["run"] == "mem") & (table["mode"] == "fetched") & (table["bucket"] == "b1")].iloc[0]
    assert row["n"] == 8 and row["mean"] == pytest.approx(0.5)
    assert 0 <= row["lo"] < 0.5 < row["hi"] <= 1
    dense = table[table["run"] == "dense"].iloc[0]
    assert dense["mean"] == 1.0 and dense["hi"] == pytest.approx(1.0) and dense["lo"] < 1.0  # Wilson, not empty
    logprob = accuracy_by_frequency(known_table[0], metric="answer_logprob", modes=["none"])
    assert logprob.loc[logprob["run"] == "mem", "mean"].iloc[0] == pytest.approx(-3.0)


def test_gain_ci_covers_the_true_gain():
    """Fetched is right with probability 0.7 and the anchor with 0.3: the true gain is 0.4."""
    rng = np.random.default_rng(1)
    rows = []
    n = 600
    fetched, none = rng.random(n) < 0.7, rng.random(n) < 0.3
    for i in range(n):
        rows += _rows("r", f"p{i}", BUCKETS[i % 3], {"fetched": bool(fetched[i]), "none": bool(none[i])})
    gains = memory_gain(pd.DataFrame(rows), n_boot=2000)
    assert set(gains["baseline"]) == {"none"}  # no generic mode: that baseline is skipped
    overall = gains[gains["by"] == "all"].iloc[0]
    assert overall["n"] == n
    assert overall["gain"] == pytest.approx(fetched.mean() - none.mean())
    assert overall["lo"] < 0.4 < overall["hi"]
    # the percentile interval has about the normal width: 2 * 1.96 * sd(diff) / sqrt(n)
    width = 2 * 1.96 * np.std(fetched.astype(float) - none, ddof=1) / np.sqrt(n)
    assert overall["hi"] - overall["lo"] == pytest.approx(width, rel=0.15)
    per_bucket = gains[gains["by"] == "bucket"]
    assert list(per_bucket["key"]) == BUCKETS and (per_bucket["n"] == n // 3).all()
    assert (per_bucket["lo"] < per_bucket["gain"]).all() and (per_bucket["gain"] < per_bucket["hi"]).all()


def test_blocking_and_level_contribution(known_table):
    table = known_table[0]
    blocking = blocking_effect(table)
    assert set(blocking["mode"]) == {"none", "fetched"} and set(blocking["run"]) == {"mem"}
    fetched = blocking[blocking["mode"] == "fetched"]
    np.testing.assert_allclose(fetched["vs_fetched"], 0.0)
    levels = level_contribution(table, n_boot=200)
    assert set(levels["level"]) == {1, 2}
    overall = levels[levels["by"] == "all"].set_index("level")
    # drop-level2 equals fetched: no drop; without level 1 only the anchor-held quarter stays right
    assert overall.loc[2, "drop"] == 0 and overall.loc[2, "lo"] == 0 == overall.loc[2, "hi"]
    assert overall.loc[1, "drop"] == pytest.approx(0.5 - 0.25)
    assert overall.loc[1, "lo"] < 0.25 < overall.loc[1, "hi"]
    per_bucket = levels[(levels["by"] == "bucket") & (levels["level"] == 1)]
    assert list(per_bucket["key"]) == BUCKETS and np.allclose(per_bucket["drop"], 0.25)
    with pytest.raises(ValueError, match="drop-level"):
        level_contribution(table[~table["mode"].str.startswith("drop")])


def test_plots_write_png_and_the_csv_they_plot(known_table, tmp_path):
    table = known_table[0]
    files = [
        plot_accuracy_by_frequency(accuracy_by_frequency(table), tmp_path / "acc", modes=["none", "fetched"]),
        plot_attribution(attribution_shares(attribute_knowledge(table)), tmp_path / "shares.png"),
        plot_memory_gain(memory_gain(table, n_boot=100), tmp_path / "gain"),
        plot_blocking(blocking_effect(table), tmp_path / "blocking"),
        plot_level_contribution(level_contribution(table, n_boot=100), tmp_path / "levels"),
    ]
    for f in files:
        assert f.png.stat().st_size > 1000 and f.png.read_bytes()[:4] == b"\x89PNG"
        assert len(pd.read_csv(f.csv)) > 0
    assert set(pd.read_csv(files[0].csv)["mode"]) == {"none", "fetched"}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


# --------------------------------------------------------------------------- a real smoke run
@pytest.fixture(scope="module")
def evaluated_memory_run(smoke_data_config, pretrained_anchor, tmp_path_factory):
    from hiermem.config import MemoryConfig
    from hiermem.evaluate import EvalConfig, evaluate_run
    from hiermem.train import TrainConfig, train
    cfg = TrainConfig(stage="memory-cotrain", anchor="tiny-d1", data=smoke_data_config,
                      init_from=str(pretrained_anchor), memory=MemoryConfig(multipliers=(8, 2), branching=4),
                      tokens=8 * 4 * 128, batch_size=4, optim=TrainConfig().optim.replace(bank_lr=0.05))
    run = train(cfg, tmp_path_factory.mktemp("runs") / "memory", progress=False)
    evaluate_run(run, EvalConfig(max_probes_per_relation=5, heldout_docs_per_source=5))
    return run


def test_attribution_on_a_real_smoke_run(evaluated_memory_run, tmp_path):
    results = load_probe_results({"cotrain": evaluated_memory_run})
    assert set(results["run"]) == {"cotrain"}
    n_probes = results["probe_id"].nunique()
    attributed = attribute_knowledge(results)
    assert len(attributed) == n_probes and attributed["category"].notna().all()
    # categories agree with the per-mode scores they are derived from
    wide = results.pivot(index="probe_id", columns="mode", values="correct")
    a = attributed.set_index("probe_id")
    assert (a["anchor"] == wide.loc[a.index, "none"]).all() and (a["memory"] == wide.loc[a.index, "fetched"]).all()
    shares = attribution_shares(attributed, by="relation")
    np.testing.assert_allclose(shares.groupby("relation")["share"].sum(), 1.0)
    curve = accuracy_by_frequency(results)
    assert curve.groupby("mode")["bucket_index"].apply(lambda s: s.is_monotonic_increasing).all()
    assert "cloze" not in set(curve["bucket"]) and curve["n"].sum() == len(results[results["bucket"] != "cloze"])
    assert {"blocked-reroute", "wrong-path", "oracle-path"} <= set(blocking_effect(results)["mode"])
    assert set(level_contribution(results, n_boot=50)["level"]) == {1, 2}
    gains = memory_gain(results, n_boot=50)
    assert set(gains["baseline"]) == {"none", "generic"}
    assert plot_accuracy_by_frequency(curve, tmp_path / "curve").png.is_file()
    with pytest.raises(FileNotFoundError, match="evaluate it first"):
        load_probe_results([tmp_path])
