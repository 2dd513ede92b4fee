"""The Ray executor on a real local Ray cluster (2 CPUs: two runs at a time), not a mock.

A driver running `hiermem sweep run --executor ray --workers 2` is killed (SIGKILL) mid-way, then the
sweep is resumed through `RayExecutor` in this process: one row per (run, mode), all ok, nothing
retrained. Part of `make test` (marked slow); about a minute on a 2-core machine, most of it Ray
starting twice.
"""

from __future__ import annotations

import signal

import pytest
import ray

from hiermem.executors import RayExecutor, Task
from hiermem.results import load_results
from hiermem.sweep import SweepSpec, plan, run_sweep

from test_sweep import assert_complete, kill_group, start_sweep, sweep_cmd, tiny_spec, wait_for_partial, write_spec

pytestmark = pytest.mark.slow


def test_ray_sweep_killed_and_resumed(smoke_data_config, tmp_path):
    spec_dict = tiny_spec(smoke_data_config, name="ray")
    spec_path, out = write_spec(tmp_path, spec_dict), tmp_path / "out"
    sweep_plan = plan(SweepSpec.from_dict(spec_dict), out)
    runs_dir = sweep_plan.sweep_dir / "runs"

    proc = start_sweep(sweep_cmd(spec_path, out, "--executor", "ray", "--workers", "2"), tmp_path / "killed.log")
    try:
        wait_for_partial(proc, runs_dir, total=len(sweep_plan.runs), timeout=180)
    finally:
        kill_group(proc)  # the driver and the Ray processes it started (they share its session)
    assert proc.returncode == -signal.SIGKILL
    before = {p.parent: p.parent.joinpath("summary.json").stat().st_mtime_ns for p in runs_dir.glob("*/result.json")}
    assert 1 <= len(before) < len(sweep_plan.runs)

    assert not ray.is_initialized()
    executor = RayExecutor(num_cpus=2, num_cpus_per_run=1)
    table = run_sweep(SweepSpec.from_dict(spec_dict), out, executor)
    assert not ray.is_initialized()  # the local cluster it started was shut down
    assert_complete(table, sweep_plan)
    assert_complete(load_results(sweep_plan.sweep_dir), sweep_plan)
    assert {d: d.joinpath("summary.json").stat().st_mtime_ns for d in before} == before  # not retrained
    assert (table.drop_duplicates("run_id")["device"].str.startswith("cpu")).all()


def test_ray_dependencies_and_failures():
    """Failures and dependency failures inside Ray tasks, on a cluster this test starts and keeps."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 ** 2)
    try:
        tasks = [Task("a", dict, {"status": "ok"}), Task("b", dict, 5),
                 Task("c", dict, {"status": "ok", "value": 3}, depends_on=("a",)),
                 Task("d", dict, {"status": "ok"}, depends_on=("b",), name="dee"),
                 Task("e", dict, {"status": "ok"}, depends_on=("d",))]
        seen = []
        RayExecutor(num_cpus_per_run=1).run(tasks, lambda t, r: seen.append((t.id, r)))
        assert ray.is_initialized()  # a cluster it did not start is left running
        results = dict(seen)
        order = [tid for tid, _ in seen]
        assert order.index("a") < order.index("c") and order.index("b") < order.index("d") < order.index("e")
        assert results["c"] == {"status": "ok", "value": 3}
        assert results["b"]["error"]["type"] == "TypeError"
        assert results["d"]["error"]["message"] == "dependency b failed"
        assert results["e"]["error"]["message"] == "dependency dee failed"
    finally:
        ray.shutdown()
