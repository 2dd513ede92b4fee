"""The study: the paper's evaluation experiments as sweeps (configs/sweeps/study/), run and collected.

    from hiermem.study import PARTS, run_study, study_runs, study_probes, blocking_curve
    results = run_study("smoke")                     # every part; finished runs are skipped
    runs = study_runs(results)                       # one row per finished run: run, sweep (part), accounting, cfg.*
    probes = study_probes(runs)                      # their probe tables (analysis.load_probe_results), run = run id

Scales: `study` runs each spec as written (the size 2 CPU cores afford, README "Sweeps"); `smoke` applies
each spec's `smoke:` overrides (seconds per run). `blocking_curve` re-scores a finished memory run with a
growing fraction of its bank blocked (Figure 6b) without touching its evaluation tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch

from hiermem.checkpoint import load_model
from hiermem.data.pipeline import build_data
from hiermem.evaluate import EvalConfig, probe_rows, score_probes, select_probes
from hiermem.executors import Executor, LocalExecutor
from hiermem.notebooks import sweep_spec
from hiermem.results import scaling_rows
from hiermem.rundir import RunDir
from hiermem.scales import check
from hiermem.sweep import SweepSpec, load_spec, plan, run_sweep
from hiermem.train import TrainConfig

STUDY_DIR = Path("configs/sweeps/study")
PARTS = ("longtail", "memory_type", "depth_bank", "hierarchy", "ratio", "placement", "blocking", "dense_ladder")
BLOCK_FRACTIONS = (0.0, 1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def study_spec(part: str, scale: str = "study", data_root: str | None = None,
               study_dir: str | Path = STUDY_DIR) -> SweepSpec:
    """The spec of one part at a scale ("study": as written; "smoke": its `smoke:` overrides)."""
    if part not in PARTS:
        raise ValueError(f"unknown study part {part!r}; the parts: {', '.join(PARTS)}")
    check(scale, "study")
    spec = load_spec(Path(study_dir) / f"{part}.yaml", None if scale == "study" else scale)
    if data_root is None:
        return spec
    data = spec.to_dict()
    data["base"] = {**data["base"], "data": {**data["base"].get("data", {}), "root": data_root}}
    return SweepSpec.from_dict(data)


def run_study(scale: str = "study", sweeps_dir: str | Path = "results/sweeps", parts: Sequence[str] = PARTS,
              data_root: str | None = None, executor: Executor | None = None,
              study_dir: str | Path = STUDY_DIR) -> dict[str, pd.DataFrame]:
    """Run (or resume) every part; returns part -> its results table (`hiermem.results`). A part whose
    runs fail is kept with its failed rows (the figures mark what is missing)."""
    executor = executor or LocalExecutor(threads=1)
    return {part: run_sweep(study_spec(part, scale, data_root, study_dir), out=sweeps_dir, executor=executor)
            for part in parts}


def study_runs(results: Mapping[str, pd.DataFrame], sweeps_dir: str | Path = "results/sweeps",
               scale: str = "study", data_root: str | None = None, study_dir: str | Path = STUDY_DIR) -> pd.DataFrame:
    """One row per finished run across the parts: `run` (its id), `sweep` (the part), `run_dir`, its
    role, accounting (`anchor_params`, `fetched_params`, `bank_params`, `runtime_params`, ...), tokens
    and every `cfg.*` column; `memory_level` for single-level memories (else 0). A run shared by parts
    (an anchor) appears once per part."""
    frames = []
    for part, table in results.items():
        if table.empty:
            continue
        ok = table[table["status"] == "ok"].drop_duplicates("run_id")
        dirs = {r.run_id: str(r.run_dir) for r in plan(study_spec(part, scale, data_root, study_dir), sweeps_dir).runs}
        frames.append(ok.assign(sweep=part, run=ok["run_id"], run_dir=ok["run_id"].map(dirs)))
    if not frames:
        raise ValueError("no finished run in any part of the study")
    runs = pd.concat(frames, ignore_index=True).drop(columns=["mode"], errors="ignore")
    if "runtime_params" not in runs:
        runs["runtime_params"] = runs["anchor_params"] + runs["fetched_params"].fillna(0)

    def level(text) -> int:
        units = [float(x) for x in str(text).split(",") if x not in ("", "nan")]
        nonzero = [i + 1 for i, r in enumerate(units) if r > 0]
        return nonzero[0] if len(nonzero) == 1 else 0

    multipliers = runs["cfg.memory.multipliers"] if "cfg.memory.multipliers" in runs else pd.Series("", index=runs.index)
    runs["memory_level"] = multipliers.map(level)
    return runs


def study_failed(results: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The failed runs of each part, one row per run: `run`, `sweep` (the part), `label`, `error` and the
    planned accounting (`fetched_params`, `bank_params`, ...), for the figures to mark and the claims that
    depend on them to withhold a verdict."""
    frames = [table[table["status"] == "failed"].drop_duplicates("run_id").assign(sweep=part)
              for part, table in results.items() if not table.empty and "status" in table]
    frames = [f.assign(run=f["run_id"]) for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["run", "sweep", "label", "error"])
    return pd.concat(frames, ignore_index=True)


def study_probes(runs: pd.DataFrame) -> pd.DataFrame:
    """The probe tables of the runs (one row per run, probe and mode); `run` is the run id."""
    from analysis.attribution import load_probe_results
    dirs = dict(zip(runs["run"], runs["run_dir"]))
    return load_probe_results(dirs)


def blocking_curve(run_dir: str | Path, fractions: Sequence[float] = BLOCK_FRACTIONS,
                   policies: Sequence[str] = ("drop", "reroute"), cfg: EvalConfig | None = None) -> pd.DataFrame:
    """Probe scores of a finished memory run with a fraction of its level-`cfg.blocked_level` nodes
    blocked bank-wide, best-matching first (`EvalConfig.block_choice`), for each fraction and policy,
    plus `none` and `fetched` once. One row per probe, mode and fraction (the probe table's columns plus
    `fraction`, `policy`, and `run` = the run directory's name); nothing is written to the run."""
    run = RunDir.open(run_dir)
    if cfg is None:
        cfg = EvalConfig.load(run.eval_config_path) if run.is_evaluated else EvalConfig()
    data = build_data(TrainConfig.load(run.config_path).data, progress=False)
    model = load_model(run.final).eval()
    if model.bank is None:
        raise ValueError(f"run {str(run.path)!r} has no memory bank to block")
    probes = select_probes(data.probes, cfg.max_probes_per_relation, cfg.seed, cfg.split)
    rows = probe_rows(data, probes)
    frames = []
    with torch.no_grad():
        base = score_probes(model, data, probes, cfg.replace(block_fraction=0.0), ["none", "fetched"], rows)
        frames.append(base.assign(fraction=0.0, policy=""))
        for fraction in fractions:
            if fraction <= 0:
                continue
            step = cfg.replace(block_fraction=float(fraction))
            modes = [f"blocked-{p}" for p in policies]
            scored = score_probes(model, data, probes, step, modes, rows)
            frames.append(scored.assign(fraction=float(fraction), policy=scored["mode"].str.removeprefix("blocked-")))
    out = pd.concat(frames, ignore_index=True)
    return out.assign(run=run.name)



def study_equivalence(results: Mapping[str, pd.DataFrame], bootstrap: int = 200):
    """The dense-equivalent multiplier k of the longtail part's co-trained ~10% memory runs: a Chinchilla
    fit of held-out loss on every dense run (the dense ladder and the longtail controls, by
    `total_tokens`), solved at each memory run's loss (`analysis.estimate_equivalence`; an unidentified
    dense fit gives k = NaN and the reason, not numbers)."""
    from analysis import estimate_equivalence
    frames = [results[p] for p in ("dense_ladder", "longtail") if p in results and not results[p].empty]
    if not frames:
        raise ValueError("neither the dense_ladder nor the longtail part has results")
    rows = scaling_rows(pd.concat(frames, ignore_index=True))
    dense = rows[rows["kind"] == "dense"]
    memory = rows[(rows["kind"] == "memory") & (rows.get("cfg.stage") == "memory-cotrain")]
    if memory.empty:
        raise ValueError("no co-trained memory run of the longtail part finished")
    return estimate_equivalence(dense, memory, x={"N": "anchor_params", "D": "total_tokens"}, y="loss",
                                bootstrap=bootstrap)


# ------------------------------------------------------------------------------- notebook recipes
def study_scaling_rows(results: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The scaling rows (`hiermem.results.scaling_rows`: memory runs scored `fetched`, dense runs `none`)
    of several parts in one table, each run once (an anchor or dense control shared by parts keeps the
    first part's name in `sweep`)."""
    frames = [scaling_rows(table).assign(sweep=part) for part, table in results.items()
              if not table.empty and (table["status"] == "ok").any()]
    if not frames:
        raise ValueError(f"no finished run in the study parts {', '.join(results)}")
    return pd.concat(frames, ignore_index=True).drop_duplicates("run_id").reset_index(drop=True)


def _is_study(recipe: Mapping) -> bool:
    if "parts" in recipe:
        unknown = [p for p in recipe["parts"] if p not in PARTS]
        extra = sorted(set(recipe) - {"parts", "scale"})
        if unknown or extra:
            raise ValueError(f"a study recipe has `parts` (of {', '.join(PARTS)}) and optionally `scale`; "
                             f"got unknown parts {unknown} and keys {extra}")
        return True
    if "spec" not in recipe:
        raise ValueError(f"a sweep recipe needs `spec` (a sweep YAML) or `parts` (study parts); got {dict(recipe)!r}")
    return False


def recipe_plan(recipe: Mapping, sweeps_dir: str | Path = "results/sweeps", data_root: str | None = None) -> pd.DataFrame:
    """The accounting plan of a notebook's sweep recipe: {"spec": YAML, **fields} (`sweep_spec`) or
    {"parts": [...], "scale": "study"} (those study parts at that scale, default as written), one row per
    run (`sweep` names its spec)."""
    if _is_study(recipe):
        scale = recipe.get("scale", "study")
        return pd.concat([plan(study_spec(p, scale, data_root), sweeps_dir).table().assign(sweep=p)
                          for p in recipe["parts"]], ignore_index=True)
    return plan(sweep_spec(**recipe, data_root=data_root), sweeps_dir).table()


def recipe_rows(recipe: Mapping, sweeps_dir: str | Path = "results/sweeps", data_root: str | None = None,
                executor: Executor | None = None) -> pd.DataFrame:
    """Run (or reuse) a notebook's sweep recipe and return its scaling rows: a spec's
    (`scaling_rows(run_sweep(...))`) or the study parts' (`study_scaling_rows(run_study(...))`)."""
    executor = executor or LocalExecutor(threads=1)
    if _is_study(recipe):
        results = run_study(recipe.get("scale", "study"), sweeps_dir, recipe["parts"], data_root, executor)
        return study_scaling_rows(results)
    return scaling_rows(run_sweep(sweep_spec(**recipe, data_root=data_root), out=sweeps_dir, executor=executor))
