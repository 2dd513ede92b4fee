"""The main job end to end at smoke scale: every run and control, every mode, the summary and claims tables."""

import pandas as pd
import pytest

from analysis.claims import CLAIM_COLUMNS
from hiermem.cli import main
from hiermem.demo import RUNS, DemoConfig, SCALES


def test_demo_smoke_writes_summary_and_claims(tmp_path, capsys):
    args = ["demo", "--scale", "smoke", "--data-root", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
            "--out-dir", str(tmp_path / "results"), "--quiet"]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "results" / "summary.csv")
    assert {"model", "mode", "avg_sk", "avg_sk_rank", "avg_ck", "ppl", "train_tokens"} <= set(table.columns)
    models = table.groupby("model")["mode"].apply(list).to_dict()
    assert set(models) == set(RUNS)
    assert models["anchor"] == ["none", "rag"] and models["dense-2x"] == models["continued"] == ["none"]
    assert "rag" not in models["memory-cotrain"]  # the RAG rows are the anchor's and the frozen memory's
    assert {"none", "generic", "fetched", "blocked-drop", "blocked-reroute", "wrong-path",
            "oracle-path", "rag", "rag+fetched"} <= set(models["memory-frozen"])
    # the RAG baseline's cost beside its scores: more context than the memory's extra units
    cost = table.set_index(["model", "mode"])["flops_x"]
    assert cost["anchor", "none"] == 1.0 and cost["anchor", "rag"] > cost["memory-frozen", "fetched"] > 1.0
    first = table.drop_duplicates("model").set_index("model")
    assert first.loc["dense-same-active", "runtime_params"] == first.loc["memory-cotrain", "runtime_params"]
    assert 1.8 < first.loc["dense-2x", "runtime_params"] / first.loc["anchor", "runtime_params"] < 2.6
    # the controls see the memory model's total tokens (anchor + memory stage), as the runs measured them:
    # each run rounds its budget up to whole steps of batch_size x seq_len, so two-stage runs may see one
    # step more than a one-stage dense run of the same budget
    smoke = SCALES["smoke"]
    step = smoke.batch_size * smoke.data.seq_len
    total = sum(-(-tokens // step) * step for tokens in (smoke.anchor_tokens, smoke.memory_tokens))
    assert first.loc["memory-frozen", "train_tokens"] == first.loc["continued", "train_tokens"] == total
    for model in ("dense-same-active", "dense-2x"):
        assert 0 <= total - first.loc[model, "train_tokens"] <= step, model
    claims = pd.read_csv(tmp_path / "results" / "claims.csv")
    assert list(claims.columns) == list(CLAIM_COLUMNS)
    assert {"fetched_vs_none_sk", "memory_vs_continued_sk", "blocking_removes_gain", "anchor_competent",
            "routing_consistency_sk"} <= set(claims["claim"])
    out = capsys.readouterr().out
    assert "memory-frozen" in out and "claims.csv" in out and "fetched_vs_none_sk" in out
    # a second run reuses every finished run and writes the same claims
    assert main(args) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / "claims.csv"), claims)


def test_demo_config_overrides_a_scale(tmp_path):
    path = tmp_path / "pilot.yaml"
    path.write_text("scale: smoke\nmemory_tokens: 1000\nmemory_optim: {bank_lr: 0.05}\neval: {split: val}\n")
    cfg = DemoConfig.load(path)
    assert cfg.memory_tokens == 1000 and cfg.memory_optim.bank_lr == 0.05 and cfg.eval.split == "val"
    assert cfg.memory_optim.bank_semantics == SCALES["smoke"].memory_optim.bank_semantics  # the rest kept
    assert cfg.data == SCALES["smoke"].data
    path.write_text("scale: smoke\nruns: [anchor, nonsense]\n")
    with pytest.raises(ValueError, match="runs"):
        DemoConfig.load(path)
