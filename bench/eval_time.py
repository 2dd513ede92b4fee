"""Evaluation time: `hiermem eval`'s fast path against the plain path, on the same run, in one process.

The fast path (`HierMemLM.fast`, the default) scores each distinct (probe, memory) pair of all modes
once -- `fetched` and `oracle-path` agree wherever a probe is routed to its fact's cluster, `none`
and `blocked-drop` wherever the whole path is blocked -- in shared batches, and computes held-out
perplexity with the output head and cross-entropy in chunks on the counted positions only. The
plain path evaluates every mode on its own. Both write the same tables: this benchmark checks the
summaries agree (accuracies exactly, perplexities to 1e-4 relative) before it reports a time.

By default it trains the smoke demo's anchor and frozen memory (about a minute, kept in
runs/bench-eval for the next call) and evaluates the memory run in every mode with the main job's
evaluation settings (every probe of the split, 100 ranking candidates, 100 held-out documents per
source); `--run DIR` times an existing run instead (e.g. runs/demo/memory-frozen, the main job's).
Paths alternate (plain, fast, plain, fast, ...) and the medians are compared; the last line is JSON
with `speedup_vs_plain` (target >= 2).

    python bench/eval_time.py [--run DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from hiermem.demo import SCALES, run_demo
from hiermem.evaluate import EvalConfig, evaluate_run
from hiermem.rundir import RunDir


def _same_summary(a, b) -> float:
    """Largest difference between two summaries: accuracies (points) exactly, perplexities relative."""
    assert list(a["mode"]) == list(b["mode"]), "the two paths evaluated different modes"
    worst = 0.0
    for column in a.columns:
        if column in ("model", "mode"):
            continue
        x, y = a[column].to_numpy(dtype=float), b[column].to_numpy(dtype=float)
        if column.startswith("ppl"):
            diff = np.nanmax(np.abs(x - y) / np.abs(x)) if len(x) else 0.0
            assert diff < 1e-4, f"perplexity {column} differs between the paths: {x} vs {y}"
        else:
            diff = np.nanmax(np.abs(x - y)) if len(x) else 0.0
            assert diff == 0 or np.isnan(diff), f"{column} differs between the paths: {x} vs {y}"
        worst = max(worst, float(np.nan_to_num(diff)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="an existing run directory (default: train the smoke demo's)")
    parser.add_argument("--runs-dir", default="runs/bench-eval", help="where the smoke runs are trained and kept")
    parser.add_argument("--repeats", type=int, default=2, help="evaluations per path (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main_job_eval = SCALES["small"].eval
    if args.run is None:
        smoke = dataclasses.replace(SCALES["smoke"], runs=("anchor", "memory-frozen"))
        run_demo(smoke, args.runs_dir, f"{args.runs_dir}/out", progress=False)
        run_dir = f"{args.runs_dir}/memory-frozen"
        cfg = dataclasses.replace(main_job_eval, max_probes_per_relation=0)
    else:
        run_dir = args.run
        saved = RunDir.open(run_dir).eval_config_path
        cfg = EvalConfig.load(saved) if saved.is_file() else main_job_eval
    times: dict[str, list[float]] = {"plain": [], "fast": []}
    summaries = {}
    for rep in range(args.repeats):
        for path in ("plain", "fast") if rep % 2 == 0 else ("fast", "plain"):
            start = time.perf_counter()
            summaries[path] = evaluate_run(run_dir, cfg, fast=path == "fast")
            times[path].append(time.perf_counter() - start)
            print(f"  {path:5s} evaluation {times[path][-1]:7.1f} s")
    worst = _same_summary(summaries["plain"], summaries["fast"])
    median = {k: statistics.median(v) for k, v in times.items()}
    speedup = median["plain"] / median["fast"]
    modes = list(summaries["fast"]["mode"])
    print(f"{run_dir}: {len(modes)} modes ({', '.join(modes)}); same summary on both paths (largest "
          f"difference {worst:.2g}); plain {median['plain']:.1f} s, fast {median['fast']:.1f} s: "
          f"{speedup:.2f}x (target >= 2)")
    print(json.dumps({"speedup_vs_plain": round(speedup, 3), "plain_s": round(median["plain"], 2),
                      "fast_s": round(median["fast"], 2), "modes": len(modes), "run": str(run_dir),
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
