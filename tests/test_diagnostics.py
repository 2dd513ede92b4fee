"""Routing diagnostics on a tiny example with known answers."""

import numpy as np
import pandas as pd
import pytest

from hiermem.diagnostics import majority_path, routing_diagnostics, summarize_routing

FACT_DOCS = {
    "A": np.array([[0, 1], [0, 1], [0, 1]]),           # all in leaf (0, 1)
    "B": np.array([[1, 0], [1, 0], [1, 2]]),           # node 1; leaf (1, 0) is modal
    "D": np.array([[2, 0], [2, 1]]),                   # tie between (2, 0) and (2, 1)
}
PROBES = pd.DataFrame({
    "probe_id": ["p1", "p2", "p3", "p4", "p5"],
    "relation": ["r"] * 5,
    "subject": ["s1", "s2", "s3", "s4", "s5"],
    "prompt": ["q"] * 5,
    "answer": ["a"] * 5,
    "group": ["SK", "SK", "CK", "SK", "CK"],
    "exposures": [1, 1, 8, 8, 8],
    "bucket": ["rare", "rare", "common", "common", "common"],
    "fact_id": ["A", "B", "C", "A", "D"],            # C has no documents
})
PROBE_PATHS = np.array([[0, 1], [1, 2], [0, 0], [2, 1], [2, 1]])


def test_per_probe_matches():
    df = routing_diagnostics(PROBE_PATHS, FACT_DOCS, PROBES)
    assert list(df["probe_id"]) == ["p1", "p2", "p3", "p4", "p5"]
    assert list(df["n_fact_docs"]) == [3, 3, 0, 3, 2]
    assert df["match_l1"].tolist()[:2] == [True, True] and df["match_l2"].tolist()[:2] == [True, False]
    assert pd.isna(df.loc[2, "match_l1"]) and pd.isna(df.loc[2, "match_l2"])
    assert df.loc[3, "match_l1"] == False and df.loc[3, "match_l2"] == False  # noqa: E712
    assert df.loc[4, "match_l2"] == True  # noqa: E712  (one of the tied modal leaves)
    assert df.loc[1, "doc_share_l2"] == pytest.approx(1 / 3)
    assert df.loc[1, "doc_share_l1"] == pytest.approx(1.0)
    assert df.loc[4, "doc_share_l2"] == pytest.approx(0.5)
    # the same input given as a list aligned with the probes
    aligned = [FACT_DOCS.get(f) for f in PROBES["fact_id"]]
    pd.testing.assert_frame_equal(routing_diagnostics(PROBE_PATHS, aligned, PROBES), df)


def test_summary_per_bucket_and_level():
    s = summarize_routing(routing_diagnostics(PROBE_PATHS, FACT_DOCS, PROBES))
    assert list(s["bucket"]) == ["rare", "common", "all"]  # ordered by exposures, then the total
    rare, common, total = (s.iloc[i] for i in range(3))
    assert rare["n_probes"] == 2 and rare["match_l1"] == 1.0 and rare["match_l2"] == 0.5
    assert common["n_probes"] == 3 and common["n_with_docs"] == 2
    assert common["match_l1"] == 0.5 and common["match_l2"] == 0.5
    assert total["match_l2"] == pytest.approx(2 / 4)
    by_group = summarize_routing(routing_diagnostics(PROBE_PATHS, FACT_DOCS, PROBES), by=("group", "bucket"))
    assert len(by_group) == 4  # (SK, rare), (SK, common), (CK, common), all


def test_majority_path_and_errors():
    np.testing.assert_array_equal(majority_path(FACT_DOCS["B"]), [1, 0])
    np.testing.assert_array_equal(majority_path(FACT_DOCS["D"]), [2, 0])  # tie -> smallest
    with pytest.raises(ValueError):
        majority_path(np.zeros((0, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="probe paths"):
        routing_diagnostics(PROBE_PATHS[:3], FACT_DOCS, PROBES)
    with pytest.raises(ValueError, match="shape"):
        routing_diagnostics(PROBE_PATHS, {"A": np.zeros((2, 3), dtype=np.int64)}, PROBES)
