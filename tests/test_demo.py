"""The main job end to end at smoke scale: five runs, every mode, the summary table."""

import pandas as pd

from hiermem.cli import main


def test_demo_smoke_writes_summary(tmp_path, capsys):
    args = ["demo", "--scale", "smoke", "--data-root", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
            "--out-dir", str(tmp_path / "results"), "--quiet"]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "results" / "summary.csv")
    assert {"model", "mode", "avg_sk", "avg_ck", "ppl"} <= set(table.columns)
    assert any(c.startswith("atomic_b0") for c in table.columns)
    models = table.groupby("model")["mode"].apply(list).to_dict()
    assert set(models) == {"anchor", "memory-frozen", "memory-cotrain", "dense-same-active", "dense-2x"}
    assert models["anchor"] == ["none"] and models["dense-2x"] == ["none"]
    assert {"none", "generic", "fetched", "fetched+blocked", "wrong-path", "oracle-path"} <= set(models["memory-cotrain"])
    runtime = table.drop_duplicates("model").set_index("model")["runtime_params"]
    assert runtime["dense-same-active"] == runtime["memory-cotrain"]  # same active parameters
    assert 1.8 < runtime["dense-2x"] / runtime["anchor"] < 2.6
    out = capsys.readouterr().out
    assert "memory-cotrain" in out and "summary.csv" in out
    # a second run reuses every finished run
    assert main(args) == 0
