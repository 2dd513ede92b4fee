"""Claims with confidence intervals, decided by stated rules: the main job's verdict table.

Input: the probe tables of several runs (`load_probe_results`, one row per run, probe and mode, with
the greedy exact-match column `correct`, the paper's metric). Every claim is a statistic of those
tables; its 95% confidence interval comes from a paired bootstrap over probes, stratified by
relation, group and exposure bucket (each resample draws, within every such cell, as many probes as
it has, with replacement, and the same draw is used for every run and mode, so differences are
paired).

Avg-SK / Avg-CK are macro averages over relations of the per-relation accuracy (as `hiermem eval`
reports them), in points. A claim `holds` when its value meets its target and, where the rule says
so, its CI excludes zero (`ci_low > 0`). Claims of `demo_claims` (memory = the frozen-anchor model
unless named):

    fetched_vs_none_sk       fetched - none on Avg-SK                       >= +20, ci_low > 0
    fetched_vs_generic_sk    fetched - generic on Avg-SK                    >= +15, ci_low > 0
    gain_rare_vs_common      (fetched - none) on the rarer half of exposure
                             buckets (below the middle one; pooled probes)
                             - the same on the most exposed bucket          > 0
    ck_kept                  fetched - none on Avg-CK                       >= -3
    memory_vs_continued_sk   memory fetched - anchor continued dense, Avg-SK >= +10, ci_low > 0
    memory_vs_dense2x_sk     memory fetched - 2x dense, Avg-SK               >= 0
    blocking_removes_gain    (fetched - blocked-reroute) / (fetched - none)
                             on Avg-SK: the share of the gain removed        >= 0.7, and the gain
                                                                             itself has ci_low > 0
    anchor_competent         the anchor's Avg-CK                             >= 60
    routing_consistency_sk   % of SK probes routed to their fact's
                             majority leaf                                   >= 60

Every claim but routing is computed twice, on greedy exact match (which decides) and on answer
ranking (`rank_correct`; the `metric` column says which). A claim whose runs, modes or probes are
missing gets NaN values and `holds` False, with the reason in `note`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import numpy as np
import pandas as pd

CLAIM_COLUMNS = ("claim", "model", "metric", "value", "ci_low", "ci_high", "target", "holds", "note")
_BUCKET = re.compile(r"^b(\d+)")


@dataclasses.dataclass(frozen=True)
class Rule:
    """value >= target (or > target when strict), and ci_low > 0 when `ci_above_zero`."""

    target: float
    strict: bool = False
    ci_above_zero: bool = False

    def holds(self, value: float, ci_low: float) -> bool:
        if not np.isfinite(value):
            return False
        ok = value > self.target if self.strict else value >= self.target
        return bool(ok and (not self.ci_above_zero or (np.isfinite(ci_low) and ci_low > 0)))

    def describe(self) -> str:
        text = f"{'>' if self.strict else '>='} {self.target:g}"
        return text + (" and ci_low > 0" if self.ci_above_zero else "")


class Table:
    """Scores of every (run, mode) series aligned on the same probes, and their bootstrap draws."""

    def __init__(self, results: pd.DataFrame, metric: str = "correct", n_boot: int = 1000, seed: int = 0):
        if metric not in results.columns:
            raise ValueError(f"probe results have no column {metric!r}")
        wide = results.pivot_table(index="probe_id", columns=["run", "mode"], values=metric, aggfunc="first")
        info = results.drop_duplicates("probe_id").set_index("probe_id").loc[wide.index]
        self.wide = wide.astype(float)
        self.info = info
        self.relation = info["relation"].to_numpy()
        self.group = info["group"].to_numpy()
        self.bucket = info["bucket"].to_numpy()
        rng = np.random.default_rng(seed)
        n = len(wide)
        draws = np.empty((n_boot, n), dtype=np.int64)
        strata = pd.Series(list(zip(self.relation, self.group, self.bucket))).groupby(
            lambda i: (self.relation[i], self.group[i], self.bucket[i])).indices
        for members in strata.values():
            members = np.asarray(members)
            draws[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        self.draws = draws  # position j of every draw keeps the relation, group and bucket of probe j

    def has(self, run: str, mode: str) -> bool:
        return (run, mode) in self.wide.columns

    def series(self, run: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """(point values (n,), bootstrap values (B, n)) of one run and mode."""
        if not self.has(run, mode):
            raise KeyError(f"{run}/{mode}")
        x = self.wide[(run, mode)].to_numpy()
        return x, x[self.draws]

    def macro(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Macro average over the relations of the probes in `mask` (last axis), in points."""
        rels = [r for r in np.unique(self.relation[mask])]
        if not rels:
            return np.full(values.shape[:-1], np.nan)
        per = [np.nanmean(values[..., (self.relation == r) & mask], axis=-1) for r in rels]
        return 100.0 * np.mean(per, axis=0)

    def micro(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if not mask.any():
            return np.full(values.shape[:-1], np.nan)
        return 100.0 * np.nanmean(values[..., mask], axis=-1)

    def bucket_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(rarer half of the exposure buckets, most exposed bucket) over the fact probes."""
        index = np.array([int(m.group(1)) if (m := _BUCKET.match(str(b))) else -1 for b in self.bucket])
        if (index < 0).all():
            return np.zeros(len(index), bool), np.zeros(len(index), bool)
        n_buckets = index.max() + 1
        rare = (index >= 0) & (index < max(1, n_buckets // 2))  # 5 buckets: b0, b1 (the middle one is out)
        return rare, index == n_buckets - 1


def _row(claim: str, model: str, metric: str, rule: Rule, point: float | None = None,
         boot: np.ndarray | None = None, note: str = "") -> dict:
    if point is None:
        return {"claim": claim, "model": model, "metric": metric, "value": np.nan, "ci_low": np.nan,
                "ci_high": np.nan, "target": rule.describe(), "holds": False, "note": note}
    finite = boot[np.isfinite(boot)] if boot is not None else np.zeros(0)
    lo, hi = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan))
    return {"claim": claim, "model": model, "metric": metric, "value": float(point), "ci_low": float(lo),
            "ci_high": float(hi), "target": rule.describe(), "holds": rule.holds(float(point), float(lo)),
            "note": note}


def _claim(rows: list, claim: str, model: str, metric: str, rule: Rule,
           compute: Callable[[], tuple[float, np.ndarray]]) -> None:
    try:
        point, boot = compute()
    except KeyError as e:
        rows.append(_row(claim, model, metric, rule, note=f"missing run/mode {e.args[0]}"))
        return
    note = "" if np.isfinite(point) else "no probes for this statistic"
    rows.append(_row(claim, model, metric, rule, point if np.isfinite(point) else None, boot, note))


METRIC_NAMES = {"correct": "greedy exact match", "rank_correct": "answer ranking", "mc_correct": "4-way choice"}


def demo_claims(results: pd.DataFrame, runs: Mapping[str, str], n_boot: int = 1000, seed: int = 0,
                metrics: tuple[str, ...] = ("correct", "rank_correct")) -> pd.DataFrame:
    """The main job's claims table (see the module docstring), one block of rows per metric: greedy
    exact match (the paper's metric, which decides the claims) and answer ranking beside it (the same
    rules on knowledge that a format failure cannot hide); routing consistency once.

    runs: role -> run name in `results["run"]`, for the roles "memory" (frozen anchor + memory),
    "anchor", "continued" (anchor continued dense) and "dense2x"; a role may be absent.
    """
    frames = [_metric_claims(results, runs, n_boot, seed, metric) for metric in metrics]
    routing = pd.DataFrame([routing_claim(results, runs.get("memory", ""), sk_only=True, n_boot=n_boot, seed=seed)])
    return pd.concat(frames + [routing], ignore_index=True)[list(CLAIM_COLUMNS)]


def _metric_claims(results: pd.DataFrame, runs: Mapping[str, str], n_boot: int, seed: int, metric: str) -> pd.DataFrame:
    t = Table(results, metric, n_boot, seed)
    name = METRIC_NAMES.get(metric, metric)
    sk, ck = t.group == "SK", t.group == "CK"
    mem, rows = runs.get("memory", ""), []

    def diff(a: tuple[str, str], b: tuple[str, str], mask: np.ndarray, avg=t.macro):
        (xa, ba), (xb, bb) = t.series(*a), t.series(*b)
        return float(avg(xa, mask) - avg(xb, mask)), avg(ba, mask) - avg(bb, mask)

    _claim(rows, "fetched_vs_none_sk", mem, f"avg_sk fetched - none (points, {name})", Rule(20, ci_above_zero=True),
           lambda: diff((mem, "fetched"), (mem, "none"), sk))
    _claim(rows, "fetched_vs_generic_sk", mem, f"avg_sk fetched - generic (points, {name})", Rule(15, ci_above_zero=True),
           lambda: diff((mem, "fetched"), (mem, "generic"), sk))

    def rare_vs_common():
        rare, common = t.bucket_masks()
        (f, fb), (n, nb) = t.series(mem, "fetched"), t.series(mem, "none")
        gain = lambda a, b, m: t.micro(a, m) - t.micro(b, m)  # noqa: E731
        return float(gain(f, n, rare) - gain(f, n, common)), gain(fb, nb, rare) - gain(fb, nb, common)

    _claim(rows, "gain_rare_vs_common", mem, f"gain on rarer half of buckets - on most exposed (points, {name})",
           Rule(0, strict=True), rare_vs_common)
    _claim(rows, "ck_kept", mem, f"avg_ck fetched - none (points, {name})", Rule(-3),
           lambda: diff((mem, "fetched"), (mem, "none"), ck))
    _claim(rows, "memory_vs_continued_sk", mem, f"avg_sk memory fetched - anchor continued (points, {name})",
           Rule(10, ci_above_zero=True), lambda: diff((mem, "fetched"), (runs.get("continued", ""), "none"), sk))
    _claim(rows, "memory_vs_dense2x_sk", mem, f"avg_sk memory fetched - dense 2x (points, {name})", Rule(0),
           lambda: diff((mem, "fetched"), (runs.get("dense2x", ""), "none"), sk))

    def blocking():
        (f, fb), (n, nb), (b, bb) = t.series(mem, "fetched"), t.series(mem, "none"), t.series(mem, "blocked-reroute")
        gain, gain_b = t.macro(f, sk) - t.macro(n, sk), t.macro(fb, sk) - t.macro(nb, sk)
        removed, removed_b = t.macro(f, sk) - t.macro(b, sk), t.macro(fb, sk) - t.macro(bb, sk)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_b = np.where(gain_b > 0, removed_b / gain_b, np.nan)
        return (float(removed / gain) if gain > 0 else np.nan), ratio_b

    _claim(rows, "blocking_removes_gain", mem, f"share of the SK gain removed by blocked-reroute ({name})", Rule(0.7), blocking)
    gain_row = next(r for r in rows if r["claim"] == "fetched_vs_none_sk")
    if rows[-1]["holds"] and not gain_row["ci_low"] > 0:
        rows[-1].update(holds=False, note="the fetched - none gain is not above zero: no gain to remove")

    def competent():
        x, b = t.series(runs.get("anchor", ""), "none")
        return float(t.macro(x, ck)), t.macro(b, ck)

    _claim(rows, "anchor_competent", runs.get("anchor", ""), f"avg_ck (points, {name})", Rule(60), competent)
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def routing_claim(results: pd.DataFrame, run: str, sk_only: bool = True, n_boot: int = 1000, seed: int = 0) -> dict:
    """% of (SK) probes whose prompt routes to their fact's majority leaf, with a bootstrap CI."""
    rule = Rule(60)
    part = results[(results["run"] == run) & (results["mode"] == "fetched")] if "run" in results else results
    if sk_only:
        part = part[part["group"] == "SK"]
    if part.empty or "oracle_path" not in part:
        return _row("routing_consistency_sk", run, "% SK probes routed to majority leaf", rule,
                    note="no fetched-mode probe rows with oracle paths")
    hit = (part["routed_path"] == part["oracle_path"]).to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    boot = 100.0 * hit[rng.integers(0, len(hit), size=(n_boot, len(hit)))].mean(axis=1)
    return _row("routing_consistency_sk", run, "% SK probes routed to majority leaf", rule, 100.0 * hit.mean(), boot)


def format_claims(claims: pd.DataFrame) -> str:
    """The claims table as text (values and CIs to one decimal)."""
    shown = claims.copy()
    for col in ("value", "ci_low", "ci_high"):
        shown[col] = shown[col].map(lambda v: f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}")
    shown["holds"] = shown["holds"].map({True: "yes", False: "NO"})
    return shown.drop(columns=["note"]).to_string(index=False)


__all__ = ["CLAIM_COLUMNS", "METRIC_NAMES", "Rule", "Table", "demo_claims", "routing_claim", "format_claims"]
