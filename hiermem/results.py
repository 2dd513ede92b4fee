"""One run's result record (`result.json`) and the tidy results table of a sweep.

`execute_run(payload)` is the task every executor runs for a planned run: under a per-run file lock
it trains (`hiermem.train.train`, which resumes from its checkpoint or skips a finished run),
evaluates (`hiermem.evaluate.evaluate_run`) and writes RUN_DIR/result.json atomically:

    status        "ok" or "failed";  error: {type, message, traceback (tail)} or null
    config        the resolved TrainConfig;  eval_config: the EvalConfig used
    accounting    hiermem.accounting.Accounting.to_dict() as the run recorded it (real vocabulary)
    tokens, steps, train_flops, train_seconds, eval_seconds, finished_at
    total_tokens  tokens + the parent run's total tokens (a memory run: anchor pretraining + memory stage)
    parent_run_id the run it was initialised from (recorded by training in provenance.json), or null
    provenance    git SHA, library versions, device, host (from the run's provenance.json)
    rows          the evaluation summary, one dict per memory mode (RUN_DIR/eval/summary.csv)

The table has one row per (run, eval mode); a failed run has one row with status "failed" and NaN
metrics. Columns: identity (sweep, run_id, role, roles, label, status, error, mode), every metric of
the evaluation summary plus `loss` = log(ppl) (held-out nats, for scaling fits), the accounting
(`anchor_params`, `fetched_params`, `bank_params`, `embedding_params`, `flops_per_token`, ...; lists
as comma strings), `tokens`, `train_flops`, provenance (`git_sha`, `torch`, `device`, `seed`,
`train_seconds`, `eval_seconds`), `total_tokens`, `parent_run_id` and every TrainConfig field as `cfg.<dotted path>` (tuples as comma
strings: `cfg.memory.multipliers`, `cfg.data.tree.depth`, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import glob
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd

from hiermem.executors import error_info
from hiermem.io import atomic_path, atomic_write_json, atomic_write_text
from hiermem.rundir import RunDir

if TYPE_CHECKING:  # the workers import this module before their thread settings; data imports torch
    from hiermem.data.pipeline import DataBundle

RESULT_FILE = RunDir.RESULT
TABLE_FILE = "results.parquet"
CSV_FILE = "results.csv"
IDENTITY = ["sweep", "run_id", "parent_run_id", "role", "roles", "label", "status", "error", "mode"]
PROVENANCE = ["git_sha", "torch", "python", "device", "host", "seed", "train_seconds", "eval_seconds", "finished_at"]


@dataclasses.dataclass(frozen=True)
class RunPayload:
    """Everything a worker needs to run one planned run (plain data: it crosses process boundaries)."""

    sweep: str
    run_id: str
    role: str
    roles: tuple[str, ...]
    label: str
    run_dir: str          # absolute
    config: dict          # TrainConfig.to_dict()
    eval_config: dict     # EvalConfig.to_dict()
    cwd: str              # the driver's working directory: relative data roots and init_from resolve there
    planned: dict         # accounting, tokens and train_flops from the plan (kept if the run fails)
    data: "DataBundle | None" = None  # built by the driver (pickles as its config and directories)


# ------------------------------------------------------------------------------------------ records
def read_result(run_dir: str | Path) -> dict | None:
    """The run's result record, or None when it has none (never run, or killed before the end)."""
    return RunDir(run_dir).record()


def is_done(record: dict | None, eval_config: dict) -> bool:
    """A run is done when it finished ok and was evaluated with the same settings as now (records from
    before `total_tokens` was recorded are refreshed)."""
    return bool(record) and record.get("status") == "ok" and record.get("eval_config") == eval_config \
        and "total_tokens" in record


def write_result(run_dir: str | Path, record: dict) -> Path:
    return atomic_write_json(RunDir(run_dir).result_path, record)


def _base_record(p: RunPayload) -> dict:
    return {"sweep": p.sweep, "run_id": p.run_id, "role": p.role, "roles": list(p.roles), "label": p.label,
            "config": p.config, "eval_config": p.eval_config, "accounting": p.planned.get("accounting", {}),
            "tokens": p.planned.get("tokens"), "train_flops": p.planned.get("train_flops"), "steps": None,
            "seed": p.config.get("seed"), "provenance": {}, "train_seconds": None, "eval_seconds": None,
            "rows": []}


def failure_record(p: RunPayload, error: dict) -> dict:
    """A failed run's record: the plan's accounting, the error, no metrics."""
    return {**_base_record(p), "status": "failed", "error": error, "finished_at": _now()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so result.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _json_safe(value.item())
    return value


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on a run directory, released by the OS if the holder dies.

    A sweep killed and restarted at once may still have a pool worker finishing the same run; the
    new attempt waits here and then finds the finished result instead of training twice.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _provenance(run: RunDir) -> dict:
    """The provenance the run recorded when training started, else this process's."""
    from hiermem.provenance import provenance
    prov = run.provenance() or provenance()
    prov.pop("accounting", None)  # the record has its own accounting section
    return prov


def execute_run(payload: RunPayload) -> dict:
    """Train, evaluate and record one planned run; returns its record (status ok or failed)."""
    # imported here: the executors import this module in fresh workers, before threads are set
    from hiermem.evaluate import EvalConfig, evaluate_run
    from hiermem.train import TrainConfig, train

    if payload.cwd and os.path.isdir(payload.cwd) and os.getcwd() != payload.cwd:
        os.chdir(payload.cwd)
    run_dir = Path(payload.run_dir)
    run = RunDir(run_dir)
    with run_lock(run_dir):
        existing = run.record()
        if is_done(existing, payload.eval_config):
            return existing
        record = _base_record(payload)
        start = time.perf_counter()
        try:
            cfg = TrainConfig.from_dict(payload.config)
            train(cfg, run_dir, data=payload.data, progress=False)
            record["train_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            summary = evaluate_run(run_dir, EvalConfig.from_dict(payload.eval_config), data=payload.data)
            record["eval_seconds"] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on with the other runs
            record.update(status="failed", error=error_info(exc), finished_at=_now(), provenance=_provenance(run))
            write_result(run_dir, record)
            return record
        trained = run.summary()
        prov = _provenance(run)
        accounting_keys = set(payload.planned.get("accounting", {})) or set(trained)
        record.update(
            status="ok", error=None, finished_at=_now(), provenance=prov, steps=trained["steps"],
            tokens=trained["tokens"], total_tokens=run.total_tokens(),
            parent_run_id=run.parent.run_id if run.parent else None, accounting={k: trained[k] for k in accounting_keys if k in trained},
            train_flops=trained["flops_per_token"] * trained["tokens"],
            rows=[{k: _json_safe(v) for k, v in row.items()} for row in summary.to_dict(orient="records")])
        write_result(run_dir, record)
        return record


# ------------------------------------------------------------------------------------------ table
def _flatten(value: Any, prefix: str, out: dict) -> None:
    """Nested dicts -> dotted keys; lists/tuples -> comma strings; None configs -> no columns."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = ",".join(str(v) for v in value)
    elif value is not None:
        out[prefix] = value


def record_rows(record: dict) -> list[dict]:
    """The table rows of one run: one per evaluated mode (one NaN-metric row if it failed)."""
    error = record.get("error")
    ident = {"sweep": record.get("sweep"), "run_id": record.get("run_id"), "parent_run_id": record.get("parent_run_id"),
             "role": record.get("role"),
             "roles": ",".join(record.get("roles") or [record.get("role", "")]), "label": record.get("label"),
             "status": record.get("status"),
             "error": f"{error['type']}: {error['message']}" if isinstance(error, dict) else error}
    accounting: dict = {}
    _flatten(record.get("accounting") or {}, "", accounting)
    prov = record.get("provenance") or {}
    versions = prov.get("versions") or {}
    common = {**accounting, "tokens": record.get("tokens"), "total_tokens": record.get("total_tokens"),
              "train_flops": record.get("train_flops"),
              "steps": record.get("steps"), "git_sha": prov.get("git_sha"), "torch": versions.get("torch"),
              "python": versions.get("python"), "device": prov.get("device"), "host": prov.get("host"),
              "seed": record.get("seed"), "train_seconds": record.get("train_seconds"),
              "eval_seconds": record.get("eval_seconds"), "finished_at": record.get("finished_at")}
    cfg: dict = {}
    _flatten(record.get("config") or {}, "cfg", cfg)
    metric_rows = record.get("rows") if record.get("status") == "ok" else None
    rows = []
    for metrics in metric_rows or [{"mode": None}]:
        metrics = {k: (math.nan if v is None else v) for k, v in metrics.items() if k != "model"}
        mode = metrics.pop("mode", None)
        ppl = metrics.get("ppl", math.nan)
        metrics["loss"] = math.log(ppl) if isinstance(ppl, (int, float)) and ppl > 0 else math.nan
        rows.append({**ident, "mode": None if mode is None or mode != mode else mode, **metrics, **common, **cfg})
    return rows


def table_from_records(records: list[dict | None]) -> pd.DataFrame:
    """The table of some result records (None entries, runs without a record yet, are skipped)."""
    return _order_columns(pd.DataFrame([row for record in records if record for row in record_rows(record)]))


def build_table(sweep_dir: str | Path, run_dirs: list[Path] | None = None) -> pd.DataFrame:
    """The sweep's table from result.json files: of `run_dirs` (the current plan), else of every run."""
    sweep_dir = Path(sweep_dir)
    if run_dirs is None:
        run_dirs = sorted(p.parent for p in (sweep_dir / "runs").glob(f"*/{RESULT_FILE}"))
    return table_from_records([read_result(run_dir) for run_dir in run_dirs])


def _order_columns(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return pd.DataFrame(columns=IDENTITY)
    cfg_cols = sorted(c for c in table.columns if c.startswith("cfg."))
    front = [c for c in IDENTITY if c in table.columns]
    back = [c for c in PROVENANCE if c in table.columns] + cfg_cols
    middle = [c for c in table.columns if c not in front and c not in back]
    return table[front + middle + back]


def write_table(sweep_dir: str | Path, table: pd.DataFrame, csv: bool = False) -> Path:
    """Write results.parquet (and results.csv) atomically; returns the parquet path."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / TABLE_FILE
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    if csv:
        atomic_write_text(sweep_dir / CSV_FILE, table.to_csv(index=False))
    return path


def _expand(paths: str | Path | list) -> list[Path]:
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    out: list[Path] = []
    for item in items:
        text = str(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise FileNotFoundError(f"no results match {text!r}")
            out.extend(Path(m) for m in matches)
        else:
            out.append(Path(text))
    return out


def load_results(paths: str | Path | list, status: str | None = None) -> pd.DataFrame:
    """One DataFrame across sweeps: each path is a sweep directory, a results.parquet/.csv, or a glob.

    A sweep directory without results.parquet (killed before its first table) is read from its
    result.json files. status: keep only rows with this status (e.g. "ok").
    """
    frames = []
    for path in _expand(paths):
        if path.is_dir():
            table_path = path / TABLE_FILE
            frame = pd.read_parquet(table_path) if table_path.exists() else build_table(path)
            if frame.empty and not (path / "runs").is_dir():
                raise FileNotFoundError(f"{str(path)!r} is not a sweep directory (no {TABLE_FILE}, no runs/)")
        elif path.suffix == ".parquet" and path.exists():
            frame = pd.read_parquet(path)
        elif path.suffix == ".csv" and path.exists():
            frame = pd.read_csv(path)
        else:
            raise FileNotFoundError(f"no sweep results at {str(path)!r} (expected a sweep directory, "
                                    f"{TABLE_FILE} or {CSV_FILE})")
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=IDENTITY)
    if status is not None:
        table = table[table["status"] == status].reset_index(drop=True)
    return _order_columns(table)


def scaling_rows(results: pd.DataFrame, memory_mode: str = "fetched", dense_mode: str = "none") -> pd.DataFrame:
    """One row per finished run of a sweep results table (`hiermem.sweep.load_results`), as the
    scaling fits expect: memory runs scored with `memory_mode`, dense runs (no fetched parameters)
    with `dense_mode`; `kind` says which. `total_tokens` (recorded by each run: its tokens plus those
    of the run it was initialised from, `parent_run_id`) is the data the model has seen, which is what
    a dense model of equal training data is compared at.
    """
    ok = results[results["status"] == "ok"]
    memory = ok["fetched_params"].fillna(0) > 0
    rows = ok[ok["mode"] == memory.map({True: memory_mode, False: dense_mode})].copy()
    if rows.empty:
        raise ValueError(f"no finished run has the mode {memory_mode!r} (memory) or {dense_mode!r} (dense)")
    rows["kind"] = (rows["fetched_params"].fillna(0) > 0).map({True: "memory", False: "dense"})
    if "total_tokens" not in rows.columns or rows["total_tokens"].isna().any():
        raise ValueError("the results table lacks total_tokens for some runs (recorded since runs name their "
                         "parent run); re-run `hiermem sweep run` on the sweep to refresh its records")
    return rows.reset_index(drop=True)
