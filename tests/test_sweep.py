"""Sweeps: planning (shared anchors, dedupe, accounting, cost), bad input, failures, kill and resume.

Helpers here (`tiny_spec`, `run_cli`, `wait_for_partial`, `assert_complete`) are also used by
test_sweep_ray.py. Every run is tiny-d1 on the smoke data for a few steps, one torch thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hiermem.accounting import count
from hiermem.cli import main
from hiermem.executors import LocalExecutor, Task, order_tasks
from hiermem.results import load_results, read_result
from hiermem.sweep import SweepSpec, load_spec, plan, run_sweep

REPO = Path(__file__).resolve().parents[1]
STEP = 4 * 128  # tokens per step at batch 4 and the smoke data's seq_len 128
EVAL = {"modes": ["none", "fetched"], "perplexity_modes": ["none", "fetched"], "level_ablation": False,
        "max_probes_per_relation": 3, "heldout_docs_per_source": 5, "max_new_tokens": 4, "mc_candidates": 2}


def tiny_spec(data, name: str = "tiny", **changes) -> dict:
    """One anchor (also a dense-ladder point), two memory runs on it, one more dense run: 4 runs, 6 rows."""
    spec = {"name": name,
            "base": {"data": data.to_dict(), "anchor": "tiny-d1", "batch_size": 4, "log_every": 2,
                     "checkpoint_every": 2},
            "anchor_stage": {"tokens": 6 * STEP},
            "memory_stage": {"stage": "memory-cotrain", "tokens": 4 * STEP, "memory": {"type": "ffn", "multipliers": [8, 2]}},
            "axes": {"memory.multipliers": [[8, 2], [4]]},
            "dense_ladder": {"anchors": ["tiny-d1"], "tokens": [6 * STEP, 8 * STEP]},
            "eval": EVAL}
    spec.update(changes)
    return spec


def expected_pairs(sweep_plan) -> set[tuple[str, str]]:
    """(run_id, mode) of a finished plan: dense runs have only 'none'."""
    modes = EVAL["modes"]
    return {(r.run_id, m) for r in sweep_plan.runs for m in (modes if r.cfg.uses_memory else ["none"])}


def assert_complete(table: pd.DataFrame, sweep_plan) -> None:
    """Exactly one row per (run, mode), all ok, with metrics, accounting and provenance."""
    pairs = list(zip(table["run_id"], table["mode"]))
    assert len(pairs) == len(set(pairs)), "duplicated (run_id, mode) rows"
    assert set(pairs) == expected_pairs(sweep_plan)
    assert (table["status"] == "ok").all(), table.loc[table["status"] != "ok", ["run_id", "error"]]
    assert table["loss"].notna().all() and (table["loss"] > 0).all()
    assert table["git_sha"].notna().all() and table["torch"].notna().all() and table["device"].notna().all()
    assert (table["tokens"] > 0).all() and (table["anchor_params"] > 0).all()


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_cmd(spec_path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hiermem.cli", "sweep", "run", str(spec_path), "--out", str(out), *extra]


def wait_for_partial(proc: subprocess.Popen, runs_dir: Path, total: int, timeout: float = 120) -> int:
    """Poll until at least one run has a result.json but not all; returns how many had one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished = len(list(runs_dir.glob("*/result.json")))
        if 1 <= finished < total:
            return finished
        assert finished < total, "the sweep finished before it could be killed"
        assert proc.poll() is None, f"sweep exited early:\n{Path(proc.log).read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"no run finished in time:\n{Path(proc.log).read_text()}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sweep driver and everything it started (its own session: pool or Ray processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def start_sweep(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a sweep driver in its own session (so it can be killed with all it starts), output to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while it runs, and a full pipe would block it
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.log = log
    return proc


# ------------------------------------------------------------------------------------------ planning
def test_plan_shares_anchor_dedupes_and_accounts(smoke_data_config, tmp_path):
    spec = SweepSpec.from_dict(tiny_spec(smoke_data_config))
    p = plan(spec, tmp_path)
    by_role = {role: [r for r in p.runs if r.role == role] for role in ("anchor", "memory", "dense")}
    assert [len(by_role[k]) for k in ("anchor", "memory", "dense")] == [1, 2, 1]
    anchor = by_role["anchor"][0]
    assert anchor.roles == ("anchor", "dense")  # the ladder point equal to the anchor is the same run
    assert anchor.run_dir == tmp_path / "tiny" / "runs" / f"anchor-{anchor.run_id}"
    for mem in by_role["memory"]:
        assert mem.depends_on == (anchor.run_id,) and mem.cfg.init_from == str(anchor.run_dir)
        assert mem.cfg.memory.branching == smoke_data_config.tree.branching  # defaulted from the tree
        acc = count(mem.cfg.model_config(smoke_data_config.corpus.vocab_size), mem.cfg.memory, seq_len=128)
        assert mem.accounting == acc and mem.train_flops == acc.flops_per_token * 4 * STEP
    assert by_role["dense"][0].tokens == 8 * STEP
    assert [r.run_id for r in plan(spec, tmp_path).runs] == [r.run_id for r in p.runs]  # stable ids
    table = p.table()
    assert list(table["after"]) == ["", anchor.name, anchor.name, ""]
    totals = p.totals(flops_per_second=1e9, seconds_per_run=2)
    assert totals["est_seconds"] == pytest.approx(sum(r.train_flops for r in p.runs) / 1e9 + 2 * 4)


def test_axes_reach_the_right_stages(smoke_data_config, tmp_path):
    both = plan(SweepSpec.from_dict(tiny_spec(smoke_data_config, axes={"seed": [0, 1]}, dense_ladder=None)), tmp_path)
    assert sorted(r.role for r in both.runs) == ["anchor", "anchor", "memory", "memory"]  # an anchor per seed
    only_memory = plan(SweepSpec.from_dict(tiny_spec(smoke_data_config, axes={"memory_stage.seed": [0, 1]},
                                                     dense_ladder=None)), tmp_path)
    assert sorted(r.role for r in only_memory.runs) == ["anchor", "memory", "memory"]  # one shared anchor
    shortcut = plan(SweepSpec.from_dict(tiny_spec(smoke_data_config, axes={"memory_tokens": [STEP, 2 * STEP],
                                                                           "memory_type": ["ffn", "kv"]},
                                                  dense_ladder=None)), tmp_path)
    memory = [r for r in shortcut.runs if r.role == "memory"]
    assert {(r.cfg.tokens, r.cfg.memory.type) for r in memory} == {(t, m) for t in (STEP, 2 * STEP)
                                                                  for m in ("ffn", "kv")}
    assert memory[0].label == "memory_tokens=512 memory_type=ffn"
    frozen = plan(SweepSpec.from_dict(tiny_spec(smoke_data_config, dense_ladder=None, axes={
        "memory_stage.stage": ["memory-frozen", "memory-scratch"]})), tmp_path)
    scratch = [r for r in frozen.runs if r.cfg.stage == "memory-scratch"][0]
    assert scratch.depends_on == () and scratch.cfg.init_from == ""


def test_example_specs_plan(tmp_path, capsys):
    specs = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"smoke", "memory_size", "anchor_ladder", "memory_type"}
    for path in specs:
        p = plan(load_spec(path), tmp_path)
        assert p.runs and len({r.run_id for r in p.runs}) == len(p.runs), path
    memory_type = plan(load_spec(REPO / "configs/sweeps/memory_type.yaml"), tmp_path)
    fetched = {(r.cfg.memory.type, r.accounting.fetched_per_level) for r in memory_type.runs if r.role == "memory"}
    assert len(fetched) == 4 and len({f for _, f in fetched}) == 1  # four types, equal fetched params per level
    memory_size = plan(load_spec(REPO / "configs/sweeps/memory_size.yaml"), tmp_path)
    assert len({r.depends_on for r in memory_size.runs if r.role == "memory"}) == 1  # one anchor for every tree
    assert main(["sweep", "plan", str(REPO / "configs/sweeps/memory_type.yaml"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fetched_params" in out and "estimated cost" in out and "lora-qk" in out


def test_cli_plan_json(smoke_data_config, tmp_path, capsys):
    path = write_spec(tmp_path, tiny_spec(smoke_data_config))
    assert main(["sweep", "plan", str(path), "--out", str(tmp_path), "--json", "--flops-per-second", "1e9"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["runs"] == 4 and data["totals"]["roles"] == {"anchor": 1, "memory": 2, "dense": 1}
    assert {"anchor_params", "fetched_params", "bank_params", "flops_per_token", "train_flops",
            "est_seconds"} <= set(data["runs"][0])


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_axis_names_it_and_lists_allowed(smoke_data_config):
    with pytest.raises(ValueError) as err:
        SweepSpec.from_dict(tiny_spec(smoke_data_config, axes={"memory.tpye": ["ffn"]}))
    message = str(err.value)
    assert "'memory.tpye'" in message and "did you mean memory.type" in message
    assert "allowed:" in message and "data.tree.depth" in message and "memory_stage." in message


@pytest.mark.parametrize("axes, field", [
    ({"memory.type": ["ffn", "bogus"]}, "invalid config field 'type'"),
    ({"batch_size": [0]}, "invalid config field 'batch_size'"),
    ({"memory.multipliers": [[8, 2, 1]]}, "invalid config field 'memory.multipliers'"),  # deeper than the tree
    ({"seed": 3}, "invalid config field 'axes.seed'"),
    ({"memory_stage.stage": ["pretrain"]}, "invalid config field 'axes.memory_stage.stage'"),
])
def test_invalid_values_name_the_field(smoke_data_config, tmp_path, axes, field):
    with pytest.raises(ValueError, match=field) as err:
        plan(SweepSpec.from_dict(tiny_spec(smoke_data_config, axes=axes)), tmp_path)
    if "memory.type" in axes:
        assert "memory run (memory.type=bogus)" in str(err.value)  # which run of the sweep


def test_cli_reports_spec_errors(smoke_data_config, tmp_path, capsys):
    spec = tiny_spec(smoke_data_config)
    spec["base"]["init_from"] = "somewhere"
    assert main(["sweep", "plan", str(write_spec(tmp_path, spec))]) == 1
    assert "base.init_from" in capsys.readouterr().err
    assert main(["sweep", "plan", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ executors
@pytest.mark.parametrize("workers", [1, 2])
def test_local_executor_dependencies_and_failures(workers):
    # builtins as task functions: spawned pool workers import them for free. dict(payload) returns the
    # payload; dict(5) raises TypeError, a task failing with an exception.
    tasks = [Task("c", dict, {"status": "ok", "value": 9}, depends_on=("a",)), Task("a", dict, {"status": "ok"}),
             Task("b", dict, 5), Task("d", dict, {"status": "ok"}, depends_on=("b",)),
             Task("e", dict, {"status": "ok"}, depends_on=("d", "a")), Task("f", dict, {"value": 1})]
    seen = []
    LocalExecutor(workers=workers, threads=1).run(tasks, lambda t, r: seen.append((t.id, r)))
    results = dict(seen)
    order = [tid for tid, _ in seen]
    assert sorted(order) == list("abcdef")
    assert order.index("a") < order.index("c") and order.index("b") < order.index("d") < order.index("e")
    assert results["c"] == {"status": "ok", "value": 9}
    assert results["b"]["status"] == "failed" and results["b"]["error"]["type"] == "TypeError"
    assert "not iterable" in results["b"]["error"]["message"] and "Traceback" in results["b"]["error"]["traceback"]
    assert results["d"]["error"] == {"type": "DependencyFailed", "message": "dependency b failed", "traceback": ""}
    assert results["e"]["error"]["message"] == "dependency d failed"  # failures propagate down the chain
    assert results["f"]["error"]["type"] == "BadTaskResult"  # a result without a status is a failure


def test_order_tasks_rejects_cycles_and_unknown_dependencies():
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        order_tasks([Task("a", dict, 1, ("b",)), Task("b", dict, 1, ("a",))])
    with pytest.raises(ValueError, match="unknown task"):
        order_tasks([Task("a", dict, 1, ("zz",))])
    with pytest.raises(ValueError, match="duplicate task id 'a'"):
        order_tasks([Task("a", dict, 1), Task("a", dict, 2)])


# ------------------------------------------------------------------------------------------ running
def test_failures_are_recorded_and_others_finish(smoke_data_config, tmp_path, monkeypatch, capsys):
    """A diverging anchor fails with its error, its memory runs fail as dependents, the rest finish;
    a run failing at evaluation is retried later without retraining."""
    spec = SweepSpec.from_dict(tiny_spec(smoke_data_config, name="failing", dense_ladder=None,
                                         axes={"anchor_stage.optim.lr": [0.003, 1e9],
                                               "memory.multipliers": [[8, 2], [4]]}))
    p = plan(spec, tmp_path)
    bad_anchor = next(r for r in p.runs if r.role == "anchor" and r.cfg.optim.lr == 1e9)
    failed_eval = next(r for r in p.runs if r.role == "memory" and r.depends_on != (bad_anchor.run_id,)
                       and r.cfg.memory.multipliers == (4,))
    import hiermem.evaluate
    real_eval = hiermem.evaluate.evaluate_run

    def flaky_eval(run_dir, cfg=None, progress=False, data=None):
        if Path(run_dir).name == failed_eval.name:
            raise RuntimeError("probe scoring crashed")
        return real_eval(run_dir, cfg, progress, data=data)

    monkeypatch.setattr(hiermem.evaluate, "evaluate_run", flaky_eval)
    table = run_sweep(spec, tmp_path, LocalExecutor(threads=1))
    runs = table.drop_duplicates("run_id").set_index("run_id")
    assert len(runs) == 6
    assert runs.loc[bad_anchor.run_id, "status"] == "failed"
    assert runs.loc[bad_anchor.run_id, "error"].startswith("TrainingDiverged: non-finite loss")
    for r in p.runs:
        if r.depends_on == (bad_anchor.run_id,):
            assert runs.loc[r.run_id, "error"] == f"DependencyFailed: dependency {bad_anchor.name} failed"
            assert not (r.run_dir / "config.yaml").exists()  # never started
    assert runs.loc[failed_eval.run_id, "error"] == "RuntimeError: probe scoring crashed"
    assert read_result(failed_eval.run_dir)["error"]["traceback"].strip().endswith("probe scoring crashed")
    ok = table[table["status"] == "ok"]
    assert set(ok["run_id"]) == {r.run_id for r in p.runs if r.run_id not in
                                 {bad_anchor.run_id, failed_eval.run_id} and r.depends_on != (bad_anchor.run_id,)}
    assert table.loc[table["status"] == "failed", "ppl"].isna().all()
    assert table.loc[table["run_id"] == bad_anchor.run_id, "git_sha"].notna().all()  # provenance of failures too
    assert (table.groupby("run_id").size()[list(runs.index[runs["status"] == "failed"])] == 1).all()
    assert "failed" in capsys.readouterr().out

    # --no-retry-failed keeps the failures; retrying re-evaluates the eval failure without retraining
    trained = (failed_eval.run_dir / "summary.json").stat().st_mtime_ns
    kept = run_sweep(spec, tmp_path, LocalExecutor(threads=1), retry_failed=False)
    assert (kept.drop_duplicates("run_id")["status"] == "failed").sum() == 4
    monkeypatch.setattr(hiermem.evaluate, "evaluate_run", real_eval)
    retried = run_sweep(spec, tmp_path, LocalExecutor(threads=1))
    assert set(retried.loc[retried["run_id"] == failed_eval.run_id, "status"]) == {"ok"}
    assert (failed_eval.run_dir / "summary.json").stat().st_mtime_ns == trained
    assert (retried.drop_duplicates("run_id")["status"] == "failed").sum() == 3  # the diverging branch again


def test_killed_sweep_resumes_without_lost_or_duplicated_rows(smoke_data_config, tmp_path):
    spec_dict = tiny_spec(smoke_data_config, name="killed")
    spec_path, out = write_spec(tmp_path, spec_dict), tmp_path / "out"
    sweep_plan = plan(SweepSpec.from_dict(spec_dict), out)
    runs_dir = sweep_plan.sweep_dir / "runs"
    proc = start_sweep(sweep_cmd(spec_path, out, "--threads", "1"), tmp_path / "killed.log")
    try:
        finished = wait_for_partial(proc, runs_dir, total=len(sweep_plan.runs))
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    before = {p.parent: p.parent.joinpath("summary.json").stat().st_mtime_ns for p in runs_dir.glob("*/result.json")}
    assert finished <= len(before) < len(sweep_plan.runs)  # killed mid-way (a run may have ended meanwhile)

    resumed = subprocess.run(sweep_cmd(spec_path, out, "--threads", "1", "--csv"), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{len(before)} finished earlier" in resumed.stdout  # exactly the recorded runs were skipped ...
    assert {d: d.joinpath("summary.json").stat().st_mtime_ns for d in before} == before  # ... and not retrained
    table = load_results(sweep_plan.sweep_dir)
    assert_complete(table, sweep_plan)
    assert len(pd.read_csv(sweep_plan.sweep_dir / "results.csv")) == len(table)
    anchor = next(r for r in sweep_plan.runs if r.role == "anchor")
    assert set(table.loc[table["run_id"] == anchor.run_id, "roles"]) == {"anchor,dense"}
    assert {"cfg.memory.multipliers", "cfg.data.tree.depth", "fetched_params", "bank_params", "embedding_params",
            "flops_per_token", "train_flops", "ppl", "avg_sk", "seed", "train_seconds"} <= set(table.columns)

    # a finished sweep is a no-op: nothing retrained or re-evaluated
    stamps = {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/summary.json")}
    results = {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/eval/summary.csv")}
    again = run_sweep(SweepSpec.from_dict(spec_dict), out, LocalExecutor(threads=1))
    assert {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/summary.json")} == stamps
    assert {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/eval/summary.csv")} == results
    assert_complete(again, sweep_plan)


def test_load_results_across_sweeps(smoke_data_config, tmp_path, capsys):
    spec = tiny_spec(smoke_data_config, name="one", dense_ladder=None, axes={"memory.multipliers": [[4]]},
                     anchor_stage={"tokens": 2 * STEP}, memory_stage={"tokens": STEP, "memory": {"type": "ffn"}})
    first = run_sweep(SweepSpec.from_dict(spec), tmp_path, LocalExecutor(threads=1))
    # the second through a process pool: spawned workers train and evaluate the same configs identically
    second = run_sweep(SweepSpec.from_dict({**spec, "name": "two"}), tmp_path, LocalExecutor(workers=2, threads=1))
    same = ["role", "mode", "loss", "avg_sk_mc", "fetched_params", "tokens"]
    assert first[same].sort_values(same).values.tolist() == second[same].sort_values(same).values.tolist()
    both = load_results([tmp_path / "one", tmp_path / "two" / "results.parquet"])
    assert len(both) == len(first) + len(second) == 6 and set(both["sweep"]) == {"one", "two"}
    assert len(load_results(str(tmp_path / "*"))) == 6
    assert len(load_results(tmp_path / "one", status="failed")) == 0
    # the same anchor config in two sweeps lives in two sweep directories: same id, separate runs
    assert set(first["run_id"]) & set(second["run_id"]) == set(first.loc[first["role"] == "anchor", "run_id"])
    with pytest.raises(FileNotFoundError, match="no sweep results"):
        load_results(tmp_path / "nope")
    assert main(["sweep", "results", str(tmp_path / "one"), str(tmp_path / "two"), "--csv",
                 str(tmp_path / "all.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "all.csv")) == 6 and "avg_sk" in capsys.readouterr().out
