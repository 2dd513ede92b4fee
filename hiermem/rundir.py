"""The run directory: the one owner of its layout. Train, evaluate, results, notebooks and analysis
go through `RunDir` instead of spelling file names.

    config.yaml        the resolved TrainConfig (written first: the directory is a run)
    provenance.json    git SHA, versions, device, accounting; `parent`: the run it was initialised from
    metrics.jsonl      one line per logged step
    checkpoint/        latest model + train state while the run is unfinished (safetensors + JSON)
    final/             final model checkpoint
    summary.json       written last by training: the run is finished (`tokens`, `total_tokens`, ...)
    eval/              evaluation tables; eval/eval_config.yaml is written last (a complete evaluation)
    result.json        a sweep's record of the run (hiermem.results)

A memory run (or a continued dense run) names its parent explicitly: provenance.json holds
`parent: {run_dir, run_id}` and summary.json `total_tokens` = its tokens + the parent's total tokens,
so nobody parses a directory name to find the anchor a run started from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from hiermem.io import read_jsonl

EVAL_TABLES = {"summary": "summary.csv", "probes": "probe_results.parquet", "perplexity": "perplexity.csv",
               "routing": "routing.csv"}


class RunDir:
    """Paths and readers of one run directory (nothing is created until something writes)."""

    CONFIG = "config.yaml"
    PROVENANCE = "provenance.json"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint"
    FINAL = "final"
    SUMMARY = "summary.json"
    EVAL = "eval"
    EVAL_CONFIG = "eval_config.yaml"
    RESULT = "result.json"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """An existing run directory; anything else is refused naming the path and what is missing."""
        run = cls(path)
        if not run.path.is_dir():
            raise FileNotFoundError(f"run directory {str(run.path)!r} does not exist")
        if not run.config_path.is_file():
            raise ValueError(f"{str(run.path)!r} is not a run directory (no {cls.CONFIG}; expected a directory "
                             f"written by `hiermem train`)")
        return run

    # ------------------------------------------------------------------------------ paths
    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def provenance_path(self) -> Path:
        return self.path / self.PROVENANCE

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def final_dir(self) -> Path:
        return self.path / self.FINAL

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def eval_dir(self) -> Path:
        return self.path / self.EVAL

    @property
    def eval_config_path(self) -> Path:
        return self.eval_dir / self.EVAL_CONFIG

    @property
    def result_path(self) -> Path:
        return self.path / self.RESULT

    def eval_path(self, table: str) -> Path:
        """Path of an evaluation table: summary, probes, perplexity or routing."""
        if table not in EVAL_TABLES:
            raise ValueError(f"evaluation table must be one of {list(EVAL_TABLES)}, got {table!r}")
        return self.eval_dir / EVAL_TABLES[table]

    # ------------------------------------------------------------------------------ state
    @property
    def is_started(self) -> bool:
        return self.config_path.is_file()

    @property
    def is_finished(self) -> bool:
        return self.summary_path.is_file()

    @property
    def is_evaluated(self) -> bool:
        """A complete evaluation exists (eval_config.yaml is written last)."""
        return self.eval_config_path.is_file() and self.eval_path("probes").is_file()

    @property
    def final(self) -> Path:
        """The final checkpoint; a run without one is refused naming it."""
        if not (self.final_dir / self.CONFIG).is_file():
            raise FileNotFoundError(f"{str(self.path)!r} has no final checkpoint: the run is not finished")
        return self.final_dir

    # ------------------------------------------------------------------------------ readers
    def summary(self) -> dict:
        if not self.is_finished:
            raise FileNotFoundError(f"{str(self.path)!r} has no {self.SUMMARY}: the run is not finished")
        return json.loads(self.summary_path.read_text(encoding="utf-8"))

    def provenance(self) -> dict:
        """provenance.json, or {} for a run that has not written it."""
        try:
            return json.loads(self.provenance_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path) if self.metrics_path.is_file() else []

    def record(self) -> dict | None:
        """result.json (a sweep's record of the run), or None when it has none."""
        try:
            return json.loads(self.result_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:  # written atomically, so this is outside damage
            raise ValueError(f"result file {str(self.result_path)!r} is unreadable ({e}); delete it to re-run "
                             "the run") from e

    def eval_table(self, table: str = "summary") -> pd.DataFrame:
        """One evaluation table (summary, probes, perplexity, routing); a missing one is refused
        naming the command that writes it."""
        path = self.eval_path(table)
        if not path.is_file():
            raise FileNotFoundError(f"run {self.name!r} has no {path}; evaluate it first (`hiermem eval {self.path}`)")
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)

    @property
    def run_id(self) -> str:
        """The sweep's id of this run (its result record), else the directory name."""
        record = self.record()
        return str(record["run_id"]) if record and record.get("run_id") else self.name

    @property
    def parent(self) -> "RunDir | None":
        """The run this one was initialised from (provenance.json; for runs from before it was recorded
        there, the config's init_from), or None."""
        parent = self.provenance().get("parent")
        if parent:
            return RunDir(parent["run_dir"])
        init_from = (yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}).get("init_from") \
            if self.is_started else None
        return RunDir(init_from) if init_from else None

    def total_tokens(self) -> int:
        """Every token the model saw: this run's and, recursively, those of the run it started from."""
        summary = self.summary()
        if summary.get("total_tokens") is not None:
            return int(summary["total_tokens"])
        parent = self.parent
        return int(summary["tokens"]) + (parent.total_tokens() if parent else 0)

    def parent_record(self) -> dict[str, Any]:
        """What a child records about this run as its parent: where it is, its id and total tokens."""
        return {"run_dir": str(self.path.resolve()), "run_id": self.run_id, "total_tokens": self.total_tokens()}
