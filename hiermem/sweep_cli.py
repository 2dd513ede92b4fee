"""`hiermem sweep plan | run | results`: plan, run (resumably) and collect sweeps of training runs.

    hiermem sweep plan SPEC [--json] [--calibrate]          accounting and estimated cost of every run
    hiermem sweep plan configs/sweeps/study/ --calibrate    estimated time of each study part and in all
    hiermem sweep run SPEC [--executor local|ray] ...       run (or resume) the sweep, write its table
    hiermem sweep results DIR... [--csv OUT]                 one table across sweeps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pandas as pd

from hiermem.executors import Executor, LocalExecutor, RayExecutor
from hiermem.fmt import human
from hiermem.results import load_results
from hiermem.sweep import (CPU_FLOPS_PER_SECOND, DEFAULT_OUT, SECONDS_PER_RUN, calibrate, format_plan,
                           load_spec, plan, run_sweep)

def _executor_from_args(args: argparse.Namespace) -> Executor:
    if args.executor == "ray":
        workers = args.workers or os.cpu_count() or 1
        return RayExecutor(address=args.ray_address, num_cpus_per_run=args.cpus_per_run,
                           num_gpus_per_run=args.gpus_per_run,
                           num_cpus=None if args.ray_address else int(math.ceil(workers * args.cpus_per_run)))
    return LocalExecutor(workers=args.workers, threads=args.threads)


def _spec_files(items: list[str]) -> list[Path]:
    """SPEC arguments: YAML files, or folders of them (their *.yaml, sorted)."""
    files = []
    for item in items:
        path = Path(item)
        files += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no sweep specs (*.yaml) in {', '.join(items)}")
    return files


def _run_plan(args: argparse.Namespace) -> int:
    files = _spec_files(args.spec)
    plans = [plan(load_spec(f, args.scale), args.out) for f in files]
    fps = args.flops_per_second
    if args.calibrate:
        fps = calibrate(plans[0])
        print(f"calibrated: {human(fps, si=True)} FLOP/s", file=sys.stderr)
    if len(plans) > 1:
        return _print_parts(plans, fps, args)
    spec, sweep_plan = plans[0].spec, plans[0]
    if args.json:
        print(json.dumps({"sweep": spec.name, "sweep_dir": str(sweep_plan.sweep_dir),
                          "runs": sweep_plan.table(fps, args.seconds_per_run).to_dict(orient="records"),
                          "totals": sweep_plan.totals(fps, args.seconds_per_run)}, indent=2))
    else:
        print(format_plan(sweep_plan, fps, args.seconds_per_run))
    return 0


def _print_parts(plans: list, fps: float, args: argparse.Namespace) -> int:
    """Several specs (the study's parts): the estimated time of each and of all, one line each."""
    rows = []
    for p in plans:
        t = p.totals(fps, args.seconds_per_run)
        rows.append({"sweep": p.spec.name, "runs": t["runs"], "tokens": t["tokens"], "train_flops": t["train_flops"],
                     "est_minutes": t["est_seconds"] / 60})
    table = pd.DataFrame(rows)
    if args.json:
        print(json.dumps({"parts": rows, "total_minutes": float(table["est_minutes"].sum()),
                          "flops_per_second": fps, "seconds_per_run": args.seconds_per_run}, indent=2))
        return 0
    shown = table.assign(tokens=table["tokens"].map(lambda v: human(v, si=True)),
                         train_flops=table["train_flops"].map(lambda v: human(v, si=True)),
                         est_minutes=table["est_minutes"].map(lambda v: f"{v:.1f}"))
    print(shown.to_string(index=False))
    print(f"\n{len(plans)} parts, {int(table['runs'].sum())} runs: estimated {table['est_minutes'].sum():.0f} min "
          f"({table['est_minutes'].sum() / 60:.1f} h) on one worker at {human(fps, si=True)} FLOP/s + "
          f"{args.seconds_per_run:g} s per run; longest part {table['est_minutes'].max():.0f} min")
    return 0


def _run_run(args: argparse.Namespace) -> int:
    table = run_sweep(load_spec(args.spec, args.scale), args.out, _executor_from_args(args),
                      retry_failed=not args.no_retry_failed, csv=args.csv)
    failed = table[table["status"] == "failed"].drop_duplicates("run_id") if len(table) else table
    for row in failed.itertuples():
        print(f"failed: {row.run_id} ({row.role}): {row.error}", file=sys.stderr)
    return 1 if len(failed) else 0


def _run_results(args: argparse.Namespace) -> int:
    table = load_results(args.paths, status=args.status)
    if args.csv:
        from hiermem.io import atomic_write_text
        atomic_write_text(args.csv, table.to_csv(index=False))
        print(f"{len(table)} rows -> {args.csv}")
    compact = [c for c in ("sweep", "run_id", "role", "label", "status", "mode", "anchor_params", "fetched_params",
                           "bank_params", "tokens", "avg_sk", "avg_ck", "ppl", "loss") if c in table.columns]
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 50,
                           "display.precision", 3):
        print(table[compact].to_string(index=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="plan, run (resumably) and collect sweeps of training runs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_sub = p.add_subparsers(dest="sweep_command", metavar="plan|run|results", required=True)

    pp = sweep_sub.add_parser("plan", help="print the runs of a sweep with their accounting and estimated cost")
    pp.add_argument("spec", nargs="+", help="sweep YAML (see configs/sweeps/), or several / a folder of them "
                    "(e.g. configs/sweeps/study/): then the estimated time per sweep and in all")
    pp.add_argument("--scale", default=None, choices=["smoke"],
                    help="apply the spec's `smoke:` overrides (the same experiment in seconds)")
    pp.add_argument("--out", default=DEFAULT_OUT, help=f"sweeps root (default {DEFAULT_OUT})")
    pp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pp.add_argument("--flops-per-second", type=float, default=CPU_FLOPS_PER_SECOND,
                    help=f"throughput for the time estimate (default {CPU_FLOPS_PER_SECOND:g}, measured for tiny "
                         f"models on a 2-core CPU)")
    pp.add_argument("--seconds-per-run", type=float, default=SECONDS_PER_RUN,
                    help=f"fixed cost per run: start, data loading, evaluation (default {SECONDS_PER_RUN:g})")
    pp.add_argument("--calibrate", action="store_true", help="measure FLOP/s with a few steps of the smallest run")
    pp.set_defaults(func=_run_plan)

    pr = sweep_sub.add_parser("run", help="run a sweep; finished runs are skipped, failed ones retried")
    pr.add_argument("spec", help="sweep YAML (see configs/sweeps/)")
    pr.add_argument("--scale", default=None, choices=["smoke"], help="apply the spec's `smoke:` overrides")
    pr.add_argument("--out", default=DEFAULT_OUT, help=f"sweeps root (default {DEFAULT_OUT})")
    pr.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local: in this process or a process pool (default); ray: one Ray task per run")
    pr.add_argument("--workers", type=int, default=None,
                    help="local: parallel runs (default 1 on CPU, one per GPU); ray: size of the local cluster")
    pr.add_argument("--threads", type=int, default=None, help="local: torch threads per run (default cores/workers)")
    pr.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead of starting one")
    pr.add_argument("--cpus-per-run", type=float, default=1.0, help="ray: CPUs requested per run (default 1)")
    pr.add_argument("--gpus-per-run", type=float, default=0.0, help="ray: GPUs requested per run (default 0)")
    pr.add_argument("--csv", action="store_true", help="also write results.csv")
    pr.add_argument("--no-retry-failed", action="store_true", help="keep failed runs failed instead of retrying")
    pr.set_defaults(func=_run_run)

    ps = sweep_sub.add_parser("results", help="print (and export) the results table of one or more sweeps")
    ps.add_argument("paths", nargs="+", help="sweep directories, results.parquet files or globs")
    ps.add_argument("--csv", default=None, help="write the concatenated table to this CSV")
    ps.add_argument("--status", default=None, help="keep only rows with this status (ok, failed)")
    ps.set_defaults(func=_run_results)
