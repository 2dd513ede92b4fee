"""Sweeps: a YAML spec expands into a plan of training runs; the plan runs resumably on an executor.

    name: memory-size
    base: {data: {preset: smoke}, batch_size: 4}        # TrainConfig fields shared by every run
    anchor_stage: {tokens: 20000}                       # overrides for the anchor pretraining runs
    memory_stage: {stage: memory-cotrain, tokens: 10000, memory: {type: ffn}}
    axes:                                               # cartesian product, in this order
      anchor: [tiny-d1, tiny-d2]
      memory.multipliers: [[8, 2], [16, 4]]
      seed: [0, 1]
    dense_ladder: {anchors: [tiny-d1, tiny-d2, tiny-d3], tokens: [20000, 40000]}
    eval: {max_probes_per_relation: 20}                 # hiermem.evaluate.EvalConfig

Axis keys are dotted TrainConfig paths (`memory.type`, `data.tree.depth`, `optim.lr`, `model.n_layers`)
or shortcuts (`SHORTCUTS`). `memory...` and `data.tree...` axes apply to memory runs only (anchors
train on plain-packed sequences, which do not depend on the tree, so one anchor serves every tree);
other keys apply to both stages (a `seed` or `anchor` axis gives each memory run its own anchor);
prefix a key with `anchor_stage.` or `memory_stage.` to vary one stage only (`memory_stage.tokens`,
`memory_stage.stage`). Values are replaced whole, except mappings, which merge: an axis `memory:` whose
values are mappings varies several fields together (e.g. a memory type with its own multipliers). The
axis `cases:` pairs any keys: each value is a mapping {axis key: value} applied together, e.g.
`cases: [{model.ffn_dim: 448, memory.multipliers: [0, 16]}, {model.ffn_dim: 256, memory.multipliers: [0, 64]}]`
(a smaller anchor with a larger memory at fixed runtime parameters).
Anchor and dense runs are stage `pretrain`; memory runs default to `memory-cotrain`; `init_from` is
always derived: memory-cotrain/frozen runs start from their anchor run. A memory config without
`branching` takes the data tree's.

Each run is a fully resolved TrainConfig whose id is a hash of `cfg.to_dict()`, so identical configs
are one run: every memory run on the same anchor reuses that anchor's run. Run directories:
`<out>/<name>/runs/<role>-<id>/` (out defaults to results/sweeps; relative paths resolve against the
working directory, so resume a sweep from where it was started).

`run_sweep` skips runs whose result.json says ok (and that were evaluated with the same eval
settings), retries failed ones unless `retry_failed=False`, marks the dependents of a failed anchor
failed without running them, and rebuilds `<out>/<name>/results.parquet` after every run (see
hiermem.results). Killing it at any moment and starting it again loses and duplicates nothing:
training resumes from its checkpoint and the table is rebuilt from the per-run records. The driver
builds each distinct data bundle once before any run starts, so parallel workers never race to build it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from hiermem.accounting import Accounting, count
from hiermem.config import MemoryConfig, ModelConfig
from hiermem.configbase import Config, plain, require
from hiermem.evaluate import EvalConfig
from hiermem.executors import Executor, LocalExecutor, Task, error_info
from hiermem.fmt import human, human_seconds
from hiermem.io import atomic_write_json
from hiermem.results import (RunPayload, build_table, execute_run, failure_record, is_done,
                             read_result, table_from_records, write_result, write_table)
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig

DEFAULT_OUT = "results/sweeps"
MEMORY_STAGES = ("memory-cotrain", "memory-frozen", "memory-scratch")
SHORTCUTS: dict[str, tuple[str, ...]] = {
    "memory_type": ("memory.type",),
    "multipliers": ("memory.multipliers",),
    "placement": ("memory.placement",),
    "tree_depth": ("data.tree.depth",),                      # hierarchy depth (a new tree for memory runs)
    "branching": ("data.tree.branching",),  # blocks per node: the tree's, which the bank follows
    "anchor_tokens": ("anchor_stage.tokens",),
    "memory_tokens": ("memory_stage.tokens",),
}
STAGE_PREFIXES = ("anchor_stage.", "memory_stage.")
CASES = "cases"  # an axis whose values are mappings {axis key: value}: several keys varied together (paired)
# Measured with `calibrate` on this project's 2-core CPU machine (busy with other jobs), one torch
# thread: tiny-d1 25, tiny-d2 37, tiny-d3 44 GFLOP/s at batch 4-16. Use --calibrate or
# --flops-per-second for other hardware. SECONDS_PER_RUN covers start-up, data loading, checkpoints
# and a small evaluation (smoke runs: 1-3 s).
CPU_FLOPS_PER_SECOND = 30e9
SECONDS_PER_RUN = 3.0


# ------------------------------------------------------------------------------------------ axes
def _config_class(tp: Any) -> type[Config] | None:
    if isinstance(tp, type) and issubclass(tp, Config):
        return tp
    for arg in typing.get_args(tp):
        found = _config_class(arg)
        if found:
            return found
    return None


def config_paths(cls: type[Config], prefix: str = "") -> list[str]:
    """Every dotted field path of a config class, nested configs included (`data.tree.depth`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        out.append(path)
        sub = _config_class(hints[f.name])
        if sub is not None:
            out += config_paths(sub, path + ".")
    return out


def _train_paths() -> list[str]:
    paths = [p for p in config_paths(TrainConfig) if p not in ("init_from", "stage")]
    return paths + [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]  # `model:` overrides the preset


def _is_memory_path(path: str) -> bool:
    """Paths only memory runs use: the memory itself and the k-means tree (anchors and dense runs train
    on plain-packed sequences, which do not depend on the tree, so one anchor serves every tree)."""
    return path in ("memory", "data.tree") or path.startswith(("memory.", "data.tree."))


def allowed_axes() -> list[str]:
    """Shortcuts, TrainConfig paths, and stage-prefixed paths (`memory_stage.stage` included)."""
    train = _train_paths()
    return (sorted(SHORTCUTS) + train + [f"anchor_stage.{p}" for p in train if not _is_memory_path(p)]
            + [f"memory_stage.{p}" for p in train + ["stage"]])


def _axis_error(name: str) -> str:
    close = difflib.get_close_matches(name, allowed_axes(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown sweep axis {name!r}{hint}; allowed: shortcuts {', '.join(sorted(SHORTCUTS))}; "
            f"TrainConfig paths {', '.join(_train_paths())}; each path may be prefixed with anchor_stage. or "
            f"memory_stage. to vary one stage only (memory_stage.stage too)")


def expand_axis(name: str) -> tuple[str, ...]:
    """An axis key -> the dotted paths it sets (a shortcut may set several)."""
    if name in SHORTCUTS:
        return SHORTCUTS[name]
    if name not in set(allowed_axes()):
        raise ValueError(_axis_error(name))
    return (name,)


# ------------------------------------------------------------------------------------------ spec
@dataclasses.dataclass(frozen=True)
class DenseLadder(Config):
    """Dense baselines (stage pretrain): every anchor preset x token budget x seed."""

    anchors: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()                                       # empty: the base seed
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig fields for these runs

    def validate(self) -> None:
        require(bool(self.anchors) == bool(self.tokens), "dense_ladder", "both anchors and tokens (or neither)",
                {"anchors": self.anchors, "tokens": self.tokens})
        for t in self.tokens:
            require(t > 0, "dense_ladder.tokens", "positive token budgets", self.tokens)
        for key in ("stage", "init_from", "memory"):
            require(key not in self.overrides, f"dense_ladder.overrides.{key}", "not set (dense runs are "
                    "stage pretrain, from scratch, without memory)", self.overrides.get(key))


@dataclasses.dataclass(frozen=True)
class SweepSpec(Config):
    """A sweep: shared settings, per-stage overrides, axes (cartesian product), dense ladder, eval."""

    name: str = ""
    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    anchor_stage: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory_stage: dict[str, Any] | None = None
    axes: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    dense_ladder: DenseLadder | None = None
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> None:
        require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or "") is not None, "name",
                "a directory-safe sweep name (letters, digits, . _ -)", self.name)
        for section in ("base", "anchor_stage", "memory_stage"):
            value = getattr(self, section) or {}
            require("init_from" not in value, f"{section}.init_from", "not set: the sweep derives it from the "
                    "anchor run", value.get("init_from"))
        require("stage" not in self.base, "base.stage", "not set: anchor and dense runs are pretrain; set "
                "memory_stage.stage for memory runs", self.base.get("stage"))
        require(self.anchor_stage.get("stage", "pretrain") == "pretrain", "anchor_stage.stage", "'pretrain'",
                self.anchor_stage.get("stage"))
        require("memory" not in self.anchor_stage, "anchor_stage.memory", "not set (anchors have no memory)",
                self.anchor_stage.get("memory"))
        if self.memory_stage is not None:
            stage = self.memory_stage.get("stage", "memory-cotrain")
            require(stage in MEMORY_STAGES, "memory_stage.stage", f"one of {list(MEMORY_STAGES)}", stage)
        for name, values in self.axes.items():
            require(isinstance(values, (list, tuple)) and len(values) > 0, f"axes.{name}", "a non-empty list of values",
                    values)
            if name == CASES:
                for case in values:
                    require(isinstance(case, dict) and len(case) > 0, f"axes.{CASES}",
                            "mappings of axis keys to values, one per paired setting", case)
                    for key in case:
                        require(key != CASES, f"axes.{CASES}", "axis keys other than cases", key)
                        self._check_axis(key, [case[key]])
                continue
            self._check_axis(name, values)

    def _check_axis(self, name: str, values: list) -> None:
        paths = expand_axis(name)
        if any(_is_memory_path(p) or p.startswith("memory_stage.") for p in paths):
            require(self.memory_stage is not None, f"axes.{name}", "a memory_stage (it varies memory runs)", values)
        if name == "memory_stage.stage":
            for v in values:
                require(v in MEMORY_STAGES, f"axes.{name}", f"values among {list(MEMORY_STAGES)}", v)


SCALED_SPECS = ("smoke",)  # a spec may hold overrides for these scales under a top-level key of that name


def load_spec(path: str | Path, scale: str | None = None) -> SweepSpec:
    """Load a sweep YAML; `name` defaults to the file's stem. A top-level `smoke:` mapping holds overrides
    (deep-merged: mappings key by key, anything else replaced) that `scale="smoke"` applies, so one file
    states an experiment at its own size and at smoke size; the name then gets a `-smoke` suffix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep spec {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"sweep spec {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"sweep spec {str(path)!r}: expected a mapping at the top level")
    data.setdefault("name", path.stem.replace("_", "-"))
    scaled = {key: data.pop(key) for key in SCALED_SPECS if key in data}
    if scale is not None:
        if scale not in scaled:
            raise ValueError(f"sweep spec {str(path)!r} has no overrides for scale {scale!r} "
                             f"(it has: {', '.join(scaled) or 'none'})")
        if not isinstance(scaled[scale], dict):
            raise ValueError(f"sweep spec {str(path)!r}: '{scale}:' must be a mapping of overrides")
        data = _merge(data, scaled[scale])
        data["name"] = f"{data['name']}-{scale}"
    try:
        return SweepSpec.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# ------------------------------------------------------------------------------------------ plan
@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a plan: its resolved config, where it lives, what it needs, and what it costs."""

    run_id: str
    role: str                     # anchor | memory | dense (the first role that planned it)
    cfg: TrainConfig
    depends_on: tuple[str, ...]   # run ids that must finish first (a memory run's anchor)
    accounting: Accounting        # from the config (configured vocabulary size)
    tokens: int
    train_flops: float
    run_dir: Path
    label: str                    # the axis values that produced it
    roles: tuple[str, ...] = ()   # every role it plays (an anchor may also be a dense-ladder point)

    @property
    def name(self) -> str:
        return self.run_dir.name


def _merge(a: dict, b: dict) -> dict:
    """Deep merge: nested mappings merge key by key; anything else in `b` replaces `a`'s value."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _nested(path: str, value: Any) -> dict:
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def run_id(cfg: TrainConfig) -> str:
    """A short content hash of the whole config: identical configs are the same run."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def _fmt_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + " ".join(f"{k}={_fmt_value(x)}" for k, x in v.items()) + "}"
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _resolve(spec: SweepSpec, layers: list[dict], role: str, label: str) -> TrainConfig:
    merged: dict = {}
    for layer in layers:
        merged = _merge(merged, plain(layer))
    if role in ("anchor", "dense"):
        merged.pop("memory", None)
        merged["stage"] = "pretrain"
    else:
        merged.setdefault("stage", "memory-cotrain")
    try:
        if isinstance(merged.get("memory"), dict):
            # alone first: inside TrainConfig the Optional field would hide which memory field is wrong
            MemoryConfig.from_dict(merged["memory"], _prefix="memory.")
        return TrainConfig.from_dict(merged)
    except ValueError as e:
        raise ValueError(f"sweep {spec.name!r}, {role} run ({label or 'no axes'}): {e}") from None


@dataclasses.dataclass
class SweepPlan:
    """The runs of a sweep in dependency order (anchors, memory runs, dense baselines)."""

    spec: SweepSpec
    sweep_dir: Path
    runs: list[PlannedRun]

    def get(self, rid: str) -> PlannedRun:
        return next(r for r in self.runs if r.run_id == rid)

    def table(self, flops_per_second: float = CPU_FLOPS_PER_SECOND,
              seconds_per_run: float = SECONDS_PER_RUN) -> pd.DataFrame:
        rows = []
        for r in self.runs:
            acc = r.accounting
            mem = r.cfg.memory if r.cfg.uses_memory else None
            rows.append({"run": r.name, "role": ",".join(r.roles), "label": r.label, "stage": r.cfg.stage,
                         "anchor": r.cfg.anchor, "memory": f"{mem.type} {_fmt_value(mem.multipliers)} k={mem.branching}"
                         if mem else "", "tokens": r.tokens, "anchor_params": acc.anchor_params,
                         "fetched_params": acc.fetched_params, "bank_params": acc.bank_params,
                         "flops_per_token": acc.flops_per_token, "train_flops": r.train_flops,
                         "est_seconds": r.train_flops / flops_per_second + seconds_per_run,
                         "after": ",".join(self.get(d).name for d in r.depends_on)})
        return pd.DataFrame(rows)

    def totals(self, flops_per_second: float = CPU_FLOPS_PER_SECOND,
               seconds_per_run: float = SECONDS_PER_RUN) -> dict:
        flops = sum(r.train_flops for r in self.runs)
        roles = {role: sum(r.role == role for r in self.runs) for role in dict.fromkeys(r.role for r in self.runs)}
        return {"runs": len(self.runs), "roles": roles, "tokens": sum(r.tokens for r in self.runs),
                "train_flops": flops, "flops_per_second": flops_per_second, "seconds_per_run": seconds_per_run,
                "est_seconds": flops / flops_per_second + seconds_per_run * len(self.runs)}


def _add(runs: dict[str, PlannedRun], sweep_dir: Path, cfg: TrainConfig, role: str, label: str,
         depends_on: tuple[str, ...] = ()) -> PlannedRun:
    rid = run_id(cfg)
    if rid in runs:  # the same config planned again (a shared anchor, or an anchor that is also a ladder point)
        known = runs[rid]
        if role not in known.roles:
            runs[rid] = dataclasses.replace(known, roles=known.roles + (role,))
        return runs[rid]
    model_cfg = cfg.model_config(cfg.data.corpus.vocab_size)
    acc = count(model_cfg, cfg.memory if cfg.uses_memory else None, seq_len=cfg.data.seq_len)
    tokens = cfg.total_steps(acc.flops_per_token) * cfg.batch_size * cfg.data.seq_len
    runs[rid] = PlannedRun(run_id=rid, role=role, cfg=cfg, depends_on=depends_on, accounting=acc, tokens=tokens,
                           train_flops=float(acc.flops_per_token * tokens),
                           run_dir=sweep_dir / "runs" / f"{role}-{rid}", label=label, roles=(role,))
    return runs[rid]


def plan(spec: SweepSpec, out: str | Path = DEFAULT_OUT) -> SweepPlan:
    """Expand a spec into runs; raises ValueError naming the run and field of any invalid value."""
    sweep_dir = Path(os.path.normpath(str(out))) / spec.name
    anchors: dict[str, PlannedRun] = {}
    memories: dict[str, PlannedRun] = {}
    dense: dict[str, PlannedRun] = {}
    names = list(spec.axes)
    for combo in itertools.product(*(spec.axes[n] for n in names)):
        common, anchor_only, memory_only, labels = {}, {}, {}, {"anchor": [], "memory": []}
        settings = [pair for name, value in zip(names, combo)
                    for pair in (value.items() if name == CASES else [(name, value)])]
        for name, value in settings:
            touched: set[str] = set()  # the stages this axis value reaches, for the run labels
            for path in expand_axis(name):
                if path.startswith("anchor_stage."):
                    target, path, who = anchor_only, path.removeprefix("anchor_stage."), {"anchor"}
                elif path.startswith("memory_stage."):
                    target, path, who = memory_only, path.removeprefix("memory_stage."), {"memory"}
                elif _is_memory_path(path):
                    target, who = memory_only, {"memory"}
                else:
                    target, who = common, {"anchor", "memory"}
                target.update(_merge(target, _nested(path, value)))
                touched |= who
            # a memory run's label names every axis value: its anchor's values shape it too
            for w in touched | {"memory"}:
                labels[w].append(f"{name}={_fmt_value(value)}")
        memory_stage = spec.memory_stage
        stage = _merge(memory_stage or {}, memory_only).get("stage", "memory-cotrain")
        anchor = None
        if memory_stage is None or stage != "memory-scratch":
            role = "anchor" if memory_stage is not None else "dense"
            label = " ".join(dict.fromkeys(labels["anchor"]))
            cfg = _resolve(spec, [spec.base, spec.anchor_stage, common, anchor_only], role, label)
            anchor = _add(anchors if role == "anchor" else dense, sweep_dir, cfg, role, label)
        if memory_stage is not None:
            label = " ".join(dict.fromkeys(labels["memory"]))
            layers = [spec.base, memory_stage, common, memory_only]
            needs_anchor = stage in ("memory-cotrain", "memory-frozen")
            if needs_anchor:
                layers.append({"init_from": str(anchor.run_dir)})
            cfg = _resolve(spec, layers, "memory", label)
            _add(memories, sweep_dir, cfg, "memory", label, (anchor.run_id,) if needs_anchor else ())
    ladder = spec.dense_ladder
    if ladder is not None:
        seeds = ladder.seeds or (plain(spec.base).get("seed", TrainConfig.seed),)
        for preset, tokens, seed in itertools.product(ladder.anchors, ladder.tokens, seeds):
            label = f"anchor={preset} tokens={tokens} seed={seed}"
            cfg = _resolve(spec, [spec.base, ladder.overrides, {"anchor": preset, "tokens": tokens, "seed": seed}],
                           "dense", label)
            # a ladder point equal to an anchor is that run, with two roles
            _add(anchors if run_id(cfg) in anchors else dense, sweep_dir, cfg, "dense", label)
    return SweepPlan(spec, sweep_dir, list(anchors.values()) + list(memories.values()) + list(dense.values()))


# ------------------------------------------------------------------------------------------ cost
def calibrate(sweep_plan: SweepPlan, steps: int = 3) -> float:
    """FLOP/s measured by training the smallest from-scratch run of the plan for a few steps."""
    from hiermem.train import train
    candidates = [r for r in sweep_plan.runs if not r.cfg.init_from]
    if not candidates:
        raise ValueError("nothing to calibrate on: every run starts from an anchor")
    run = min(candidates, key=lambda r: r.accounting.flops_per_token)
    per_step = run.cfg.batch_size * run.cfg.data.seq_len
    cfg = run.cfg.replace(log_every=1, checkpoint_every=10 ** 9, tokens=per_step * (steps + 10), flops=0.0)
    with tempfile.TemporaryDirectory(prefix="hiermem-calibrate-") as tmp:
        train(cfg, tmp, progress=False, stop_after_steps=steps + 1)
        rates = [r["tokens_per_s"] for r in RunDir(tmp).metrics()][1:]  # skip the warm-up step
    if not rates:
        raise RuntimeError("calibration recorded no steps")
    return float(sorted(rates)[len(rates) // 2] * run.accounting.flops_per_token)


def format_plan(sweep_plan: SweepPlan, flops_per_second: float, seconds_per_run: float) -> str:
    table = sweep_plan.table(flops_per_second, seconds_per_run)
    shown = table.copy()
    for col in ("tokens", "anchor_params", "fetched_params", "bank_params", "flops_per_token", "train_flops"):
        shown[col] = shown[col].map(lambda v: human(v, si=True))
    shown["est_seconds"] = shown["est_seconds"].map(lambda s: f"{s:.1f}")
    t = sweep_plan.totals(flops_per_second, seconds_per_run)
    roles = ", ".join(f"{n} {role}" for role, n in t["roles"].items())
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        body = shown.to_string(index=False)
    return (f"sweep {sweep_plan.spec.name!r} -> {sweep_plan.sweep_dir}\n{body}\n\n"
            f"{t['runs']} runs ({roles}); {human(t['tokens'], si=True)} tokens; {human(t['train_flops'], si=True)} training FLOPs\n"
            f"estimated cost: {human_seconds(t['est_seconds'])} on one worker at {human(flops_per_second, si=True)} FLOP/s "
            f"+ {seconds_per_run:g} s per run (data loading, evaluation)")


# ------------------------------------------------------------------------------------------ run
class _Progress:
    """One line per finished run: status, timings, elapsed and ETA."""

    def __init__(self, total: int, stream):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()

    def report(self, name: str, record: dict) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        if record.get("status") == "ok":
            detail = f"train {record.get('train_seconds') or 0:.1f} s, eval {record.get('eval_seconds') or 0:.1f} s"
        else:
            err = record.get("error") or {}
            detail = f"{err.get('type')}: {str(err.get('message'))[:160]}"
        print(f"[{self.done}/{self.total}] {record.get('status', '?'):<6} {name}  {record.get('label') or ''}  "
              f"({detail})  elapsed {human_seconds(elapsed)}, ETA {human_seconds(eta)}", file=self.stream, flush=True)


def _payload(sweep_plan: SweepPlan, run: PlannedRun, cwd: str, data=None) -> RunPayload:
    return RunPayload(data=data, sweep=sweep_plan.spec.name, run_id=run.run_id, role=run.role, roles=run.roles, label=run.label,
                      run_dir=os.path.abspath(run.run_dir), config=run.cfg.to_dict(),
                      eval_config=sweep_plan.spec.eval.to_dict(), cwd=cwd,
                      planned={"accounting": run.accounting.to_dict(), "tokens": run.tokens,
                               "train_flops": run.train_flops})


def _prepare_data(runs: list[PlannedRun], log) -> dict[str, Any]:
    """Build each distinct data bundle once in the driver; the runs get the built bundle (workers never
    build data, so they cannot race). Returns {run_id: DataBundle, or the exception that stopped it}."""
    from hiermem.data.pipeline import build_data
    built: list[tuple[Any, Any]] = []
    out: dict[str, Any] = {}
    for r in runs:
        match = next((b for cfg, b in built if cfg == r.cfg.data), None)
        if match is not None:
            out[r.run_id] = match
            continue
        start = time.perf_counter()
        try:
            bundle = build_data(r.cfg.data, progress=False)
        except Exception as e:  # noqa: BLE001 - the runs using it fail and record the error
            log(f"data for {r.name} could not be built ({type(e).__name__}: {e}); its runs fail")
            built.append((r.cfg.data, e))
            out[r.run_id] = e
            continue
        built.append((r.cfg.data, bundle))
        out[r.run_id] = bundle
        log(f"data ready: {r.cfg.data.corpus.preset} corpus, tree {r.cfg.data.tree.branching}^"
            f"{r.cfg.data.tree.depth}, seq_len {r.cfg.data.seq_len} ({time.perf_counter() - start:.1f} s)")
    return out


def run_sweep(spec: SweepSpec, out: str | Path = DEFAULT_OUT, executor: Executor | None = None,
              retry_failed: bool = True, csv: bool = False, stream=None) -> pd.DataFrame:
    """Plan and run a sweep (resuming it); returns the results table, also written to the sweep dir.

    stream: where progress lines go (default sys.stdout at call time).
    """
    stream = stream or sys.stdout
    sweep_plan = plan(spec, out)
    executor = executor or LocalExecutor()
    sweep_dir = sweep_plan.sweep_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec.save(sweep_dir / "spec.yaml")
    atomic_write_json(sweep_dir / "plan.json", {"sweep": spec.name, "runs": [
        {"run_id": r.run_id, "name": r.name, "roles": list(r.roles), "label": r.label,
         "depends_on": list(r.depends_on), "tokens": r.tokens, "train_flops": r.train_flops} for r in sweep_plan.runs]})

    def log(message: str) -> None:
        print(f"[sweep {spec.name}] {message}", file=stream, flush=True)

    eval_dict = spec.eval.to_dict()
    records = {r.run_id: read_result(r.run_dir) for r in sweep_plan.runs}
    done = {rid for rid, rec in records.items() if is_done(rec, eval_dict)}
    failed_before = {rid for rid, rec in records.items() if rec and rec.get("status") == "failed"}
    kept_failed = set() if retry_failed else failed_before
    to_run = [r for r in sweep_plan.runs if r.run_id not in done | kept_failed]
    failed_note = f", {len(failed_before)} failed earlier ({'retried' if retry_failed else 'kept'})" \
        if failed_before else ""
    log(f"{len(sweep_plan.runs)} runs: {len(done)} finished earlier{failed_note}, {len(to_run)} to run on "
        f"{executor.describe()}")
    bundles = _prepare_data(to_run, log) if to_run else {}
    progress = _Progress(len(to_run), stream)
    cwd = os.getcwd()
    tasks = []
    for r in to_run:
        blocked = [d for d in r.depends_on if d in kept_failed]
        if blocked:  # its anchor failed earlier and is not retried: record the dependency failure now
            record = failure_record(_payload(sweep_plan, r, cwd), {
                "type": "DependencyFailed", "message": f"dependency {sweep_plan.get(blocked[0]).name} failed",
                "traceback": ""})
            write_result(r.run_dir, record)
            records[r.run_id] = record
            progress.report(r.name, record)
            continue
        data = bundles.get(r.run_id)
        if isinstance(data, Exception):  # recorded now: a worker must not try to build it again
            record = failure_record(_payload(sweep_plan, r, cwd), error_info(data))
            write_result(r.run_dir, record)
            records[r.run_id] = record
            progress.report(r.name, record)
            continue
        tasks.append(Task(id=r.run_id, fn=execute_run, payload=_payload(sweep_plan, r, cwd, data), name=r.name,
                          depends_on=tuple(d for d in r.depends_on if d not in done)))

    def on_done(task: Task, result: dict) -> None:
        payload: RunPayload = task.payload
        # the worker wrote its own record; executor-made failures (dependency, dead worker) are written here
        record = result if result.get("run_id") == payload.run_id else failure_record(payload, result["error"])
        write_result(payload.run_dir, record)
        records[payload.run_id] = record  # in memory: re-reading every record after each run is quadratic
        progress.report(task.label, record)
        write_table(sweep_dir, table_from_records(list(records.values())))

    executor.run(tasks, on_done)
    table = build_table(sweep_dir, [r.run_dir for r in sweep_plan.runs])  # the records on disk are the truth
    path = write_table(sweep_dir, table, csv=csv)
    failed = sorted(set(table.loc[table["status"] == "failed", "run_id"])) if len(table) else []
    log(f"table: {len(table)} rows ({len(set(table['run_id'])) if len(table) else 0} runs, {len(failed)} failed) "
        f"-> {path}" + (f" and {path.with_suffix('.csv')}" if csv else ""))
    return table
