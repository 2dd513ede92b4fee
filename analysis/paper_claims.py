"""The paper's evaluation claims, each decided on the study's runs by a stated rule with a 95% CI.

Input: the probe tables of the study's runs (`load_probe_results`: one row per run, probe and mode,
with `run`, `probe_id`, `relation`, `group`, `bucket`, the score column) and a runs table (one row per
run: `run` matching the probe tables, `sweep` naming the study part, and the descriptors a claim uses:
`fetched_params`, `bank_params`, `anchor_params`, `cfg.memory.type`, `cfg.memory.placement`,
`cfg.memory.multipliers`, `cfg.stage`, ...; the sweep results table has all of them). The memory
`k` claim takes an `analysis.EquivalenceResult`.

Every statistic is computed on Avg-SK (macro over relations of greedy exact match on the SK probes, in
points, as `hiermem eval` reports it) unless its rule says otherwise, and its CI comes from the paired,
stratified bootstrap over probes of `analysis.claims.Table` (the same resample for every run and mode).

**Verdict rule** (one for every claim): a claim says "statistic > threshold" (or, for the ratio claim,
"statistic inside a window"). It `holds` when the whole 95% CI is on the claim's side, `fails` when the
whole CI is on the other side, and is `undetermined` when the CI spans the decision, or when the
statistic cannot be computed (the `note` names the missing sweep, run, mode or column).

    claim                      statistic                                                     decision
    bank_monotone              slope of Avg-SK (fetched) on log2 bank size, runs of the      > 0
                               `hierarchy` part that share the most common fetched size
    fetch_monotone             slope of Avg-SK (fetched) on log2 fetched size, `hierarchy`   > 0
                               runs that share the most common bank size
    deeper_more_efficient      slope of Avg-SK (fetched) on the memory's level, `depth_bank`  > 0
                               runs (single-level memories of equal fetched size)
    ffn_lora_kv                min(FFN - mean LoRA, mean LoRA - KV), `memory_type` runs of    > 0
                               the largest size every type has
    early_worst                min over middle/late/uniform of (it - early), `placement`      > 0
    fetched_generic_none       min(fetched - generic, generic - none), the frozen (A3) run    > 0
                               of `longtail` at its middle anchor size
    gain_rare                  (fetched - none) on the rarer half of exposure buckets minus    > 0
                               the same on the most exposed bucket (pooled probes), A3 run
    a2_a3_a4                   min(A2 - A3, A3 - A4) on fetched, `longtail` at the anchor     > 0
                               size that has all three stages
    ratio_near_1_10            log10(fetched / anchor params) of the best `ratio` run         inside
                               (argmax Avg-SK at fixed runtime params)                        [log10 1/20, log10 1/5]
    blocking_collapses         share of the fetched - none gain removed by the strongest      > 0.5
                               blocking (mode `blocking_mode` of the `blocking` runs)
    k_at_10pct                 geometric-mean dense-equivalent multiplier k of the ~10%       > 2
                               memory rows (EquivalenceResult groups / table, with its CI)
    sk_vs_dense_2x             mean over the longtail's anchor sizes of Avg-SK(A2, fetched)   > 0
                               minus Avg-SK of the smallest `dense_ladder` model with >= 2x
                               the anchor's parameters at the same total tokens (within 5%):
                               the paper's k >= 2 on its own metric (Table 1: A2 vs B1)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pandas as pd

from .claims import Table

VERDICTS = ("holds", "fails", "undetermined")
CLAIM_COLUMNS = ("claim", "paper_figure", "paper_value", "statistic", "ours", "ci_low", "ci_high", "decision",
                 "verdict", "note")
RATIO_WINDOW = (float(np.log10(1 / 20)), float(np.log10(1 / 5)))


class Missing(Exception):
    """A claim's input is absent; the message names it (the claim becomes undetermined)."""


@dataclasses.dataclass(frozen=True)
class PaperClaim:
    claim: str
    paper_figure: str
    paper_value: str
    statistic: str
    threshold: float = 0.0
    window: tuple[float, float] | None = None

    @property
    def decision(self) -> str:
        if self.window:
            return f"CI inside [{self.window[0]:.3g}, {self.window[1]:.3g}]"
        return f"CI above {self.threshold:g}"


CLAIMS = (
    PaperClaim("bank_monotone", "Figure 3c / Table 7", "accuracy rises with bank size at fixed fetch",
               "slope of Avg-SK on log2(bank params), fixed fetch (points per doubling)"),
    PaperClaim("fetch_monotone", "Table 7 / Figure 4a", "accuracy rises with fetched size at fixed bank",
               "slope of Avg-SK on log2(fetched params), fixed bank (points per doubling)"),
    PaperClaim("deeper_more_efficient", "Figure 3c/d", "deeper levels give more per fetched parameter",
               "slope of Avg-SK on memory level at equal fetched size (points per level)"),
    PaperClaim("ffn_lora_kv", "Figure 3a/b", "FFN > LoRA > KV at equal memory parameters",
               "min(FFN - mean LoRA, mean LoRA - KV) on Avg-SK (points)"),
    PaperClaim("early_worst", "Table 9", "memories in early layers are worst",
               "min over middle/late/uniform of (placement - early) on Avg-SK (points)"),
    PaperClaim("fetched_generic_none", "Table 2 (A3)", "fetched 39.2 > generic 34.7 > none 34.1 (Avg-SK)",
               "min(fetched - generic, generic - none) on Avg-SK, frozen anchor (points)"),
    PaperClaim("gain_rare", "Figure 1 (right)", "the memory's gain is largest on the rarest facts",
               "(fetched - none) on the rarer buckets minus on the most exposed bucket (points)"),
    PaperClaim("a2_a3_a4", "Table 2", "A2 40.3 > A3 39.2 > A4 33.8 (Avg-SK, fetched)",
               "min(A2 - A3, A3 - A4) on Avg-SK fetched (points)"),
    PaperClaim("ratio_near_1_10", "Figure 4b / Table 8", "best fetched:anchor ratio about 1:10",
               "log10(fetched / anchor params) of the best run at fixed runtime params", window=RATIO_WINDOW),
    PaperClaim("blocking_collapses", "Figure 6b", "blocking the matching memories removes the gain",
               "share of the fetched - none Avg-SK gain removed by the strongest blocking", threshold=0.5),
    PaperClaim("k_at_10pct", "Figure 1 (middle) / abstract", "anchor + ~10% memory ~ dense of > 2x its size",
               "geometric-mean dense-equivalent multiplier k at ~10% memory (held-out loss, dense law)", threshold=2.0),
    PaperClaim("sk_vs_dense_2x", "Table 1 (A2 vs B1) / abstract",
               "160M + 18M fetched: Avg-SK 40.3 vs 40.9 for the 410M dense model (2.6x its size)",
               "mean over anchor sizes of Avg-SK(A2, fetched) - Avg-SK(smallest dense ladder model >= 2x the "
               "anchor, same total tokens) (points)"),
)
CLAIMS_BY_NAME = {c.claim: c for c in CLAIMS}
# the study parts each claim's statistic is computed on (a failed run there withholds its verdict)
CLAIM_PARTS = {"bank_monotone": ("hierarchy",), "fetch_monotone": ("hierarchy",), "deeper_more_efficient": ("depth_bank",),
               "ffn_lora_kv": ("memory_type",), "early_worst": ("placement",), "fetched_generic_none": ("longtail",),
               "gain_rare": ("longtail",), "a2_a3_a4": ("longtail",), "ratio_near_1_10": ("ratio",),
               "blocking_collapses": ("blocking",), "k_at_10pct": ("longtail", "dense_ladder"),
               "sk_vs_dense_2x": ("longtail", "dense_ladder")}


def verdict(ci_low: float, ci_high: float, threshold: float = 0.0, window: tuple[float, float] | None = None) -> str:
    """holds / fails / undetermined from a CI and the claim's decision (module docstring)."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "undetermined"
    if window is not None:
        lo, hi = window
        if ci_low >= lo and ci_high <= hi:
            return "holds"
        return "fails" if (ci_high < lo or ci_low > hi) else "undetermined"
    if ci_low > threshold:
        return "holds"
    return "fails" if ci_high < threshold else "undetermined"


# ------------------------------------------------------------------------------------------ selection
def _column(runs: pd.DataFrame, column: str) -> pd.Series:
    if column not in runs.columns:
        raise Missing(f"the runs table has no column {column!r}")
    return runs[column]


def _part(runs: pd.DataFrame, sweep: str, stage: str | None = None) -> pd.DataFrame:
    part = runs[_column(runs, "sweep") == sweep]
    if stage is not None and not part.empty:
        part = part[_column(part, "cfg.stage") == stage]
    if "fetched_params" in part:
        part = part[part["fetched_params"] > 0]
    if part.empty:
        raise Missing(f"no memory runs of the study part {sweep!r}" + (f" with stage {stage!r}" if stage else ""))
    return part


def _largest_group(part: pd.DataFrame, by: str, varying: str, need: int = 2) -> pd.DataFrame:
    """The runs sharing the most common value of `by` among those where `varying` takes >= need values."""
    _column(part, by), _column(part, varying)
    groups = [(g[varying].nunique(), len(g), key, g) for key, g in part.groupby(by)]
    groups = [x for x in groups if x[0] >= need]
    if not groups:
        raise Missing(f"no {by} shared by runs with >= {need} distinct {varying}")
    return max(groups, key=lambda x: (x[0], x[1], x[2]))[3]


def _stage_at_middle_anchor(runs: pd.DataFrame, stages: tuple[str, ...]) -> dict[str, str]:
    """stage -> run at the middle anchor size among those that have every stage (sweep `longtail`)."""
    part = _part(runs, "longtail")
    _column(part, "anchor_params"), _column(part, "cfg.stage")
    sizes = sorted(n for n, g in part.groupby("anchor_params") if set(stages) <= set(g["cfg.stage"]))
    if not sizes:
        raise Missing(f"no anchor size of 'longtail' has every stage {list(stages)}")
    chosen = part[part["anchor_params"] == sizes[len(sizes) // 2]]
    return {s: str(chosen.loc[chosen["cfg.stage"] == s, "run"].iloc[0]) for s in stages}


def memory_levels(part: pd.DataFrame) -> np.ndarray:
    """The level (1-based) of each run's single-level memory: `memory_level` when the table has it, else
    the one non-zero entry of `cfg.memory.multipliers` ("0,64,0" -> 2)."""
    if "memory_level" in part:
        return part["memory_level"].to_numpy(float)
    levels = []
    for text in _column(part, "cfg.memory.multipliers").astype(str):
        nonzero = [i + 1 for i, r in enumerate(text.split(",")) if float(r) > 0]
        if len(nonzero) != 1:
            raise Missing(f"multipliers {text!r} are not a single-level memory")
        levels.append(nonzero[0])
    return np.array(levels, float)


# ------------------------------------------------------------------------------------------ statistics
class _Stats:
    """Avg-SK per (run, mode), point and bootstrap, from one `Table` of every study probe."""

    def __init__(self, table: Table):
        self.t = table
        self.sk = table.group == "SK"

    def avg(self, run: str, mode: str = "fetched") -> tuple[float, np.ndarray]:
        if not self.t.has(run, mode):
            raise Missing(f"run {run!r} has no evaluation in mode {mode!r}")
        x, b = self.t.series(run, mode)
        return float(self.t.macro(x, self.sk)), self.t.macro(b, self.sk)

    def slope(self, part: pd.DataFrame, x: np.ndarray, mode: str = "fetched") -> tuple[float, np.ndarray]:
        ys = [self.avg(str(r), mode) for r in part["run"]]
        y, yb = np.array([p for p, _ in ys]), np.stack([b for _, b in ys], axis=-1)  # (n,), (B, n)
        xc = x - x.mean()
        denom = float((xc ** 2).sum())
        if denom == 0:
            raise Missing("the runs do not vary along the claim's axis")
        return float((xc * (y - y.mean())).sum() / denom), ((yb - yb.mean(-1, keepdims=True)) * xc).sum(-1) / denom

    def diff(self, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> tuple[float, np.ndarray]:
        return a[0] - b[0], a[1] - b[1]


def _minimum(*pairs: tuple[float, np.ndarray]) -> tuple[float, np.ndarray]:
    return min(p for p, _ in pairs), np.min(np.stack([b for _, b in pairs]), axis=0)


def _claim_functions(s: _Stats, runs: pd.DataFrame, equivalence, blocking_mode: str, ratio_runtime_rtol: float
                     ) -> dict[str, Callable[[], tuple[float, np.ndarray]]]:
    def bank_monotone():
        part = _largest_group(_part(runs, "hierarchy"), "fetched_params", "bank_params")
        return s.slope(part, np.log2(part["bank_params"].to_numpy(float)))

    def fetch_monotone():
        part = _largest_group(_part(runs, "hierarchy"), "bank_params", "fetched_params")
        return s.slope(part, np.log2(part["fetched_params"].to_numpy(float)))

    def deeper():
        part = _part(runs, "depth_bank")
        return s.slope(part, memory_levels(part))

    def ffn_lora_kv():
        part = _part(runs, "memory_type")
        kinds = _column(part, "cfg.memory.type")
        sizes = [n for n, g in part.groupby("fetched_params") if {"ffn", "kv"} <= set(g["cfg.memory.type"])
                 and g["cfg.memory.type"].str.startswith("lora").any()]
        if not sizes:
            raise Missing("no fetched size of 'memory_type' has ffn, a lora type and kv")
        at = part[part["fetched_params"] == max(sizes)]
        kinds = at["cfg.memory.type"]
        ffn = s.avg(str(at.loc[kinds == "ffn", "run"].iloc[0]))
        kv = s.avg(str(at.loc[kinds == "kv", "run"].iloc[0]))
        loras = [s.avg(str(r)) for r in at.loc[kinds.str.startswith("lora"), "run"]]
        lora = (float(np.mean([p for p, _ in loras])), np.mean(np.stack([b for _, b in loras]), axis=0))
        return _minimum(s.diff(ffn, lora), s.diff(lora, kv))

    def early_worst():
        part = _part(runs, "placement")
        where = _column(part, "cfg.memory.placement")
        if not (where == "early").any():
            raise Missing("no 'early' run in the 'placement' part")
        early = s.avg(str(part.loc[where == "early", "run"].iloc[0]))
        others = [s.diff(s.avg(str(r)), early) for r in part.loc[where != "early", "run"]]
        if not others:
            raise Missing("the 'placement' part has no placement besides 'early'")
        return _minimum(*others)

    def fetched_generic_none():
        run = _stage_at_middle_anchor(runs, ("memory-frozen",))["memory-frozen"]
        f, g, n = s.avg(run, "fetched"), s.avg(run, "generic"), s.avg(run, "none")
        return _minimum(s.diff(f, g), s.diff(g, n))

    def gain_rare():
        run = _stage_at_middle_anchor(runs, ("memory-frozen",))["memory-frozen"]
        t = s.t
        for mode in ("fetched", "none"):
            s.avg(run, mode)
        rare, common = t.bucket_masks()
        if not rare.any() or not common.any():
            raise Missing("the probes have no exposure buckets (b0, b1, ...)")
        (f, fb), (n, nb) = t.series(run, "fetched"), t.series(run, "none")
        gain = lambda a, b, m: t.micro(a, m) - t.micro(b, m)  # noqa: E731
        return float(gain(f, n, rare) - gain(f, n, common)), gain(fb, nb, rare) - gain(fb, nb, common)

    def a2_a3_a4():
        by = _stage_at_middle_anchor(runs, ("memory-cotrain", "memory-frozen", "memory-scratch"))
        a2, a3, a4 = (s.avg(by[k]) for k in ("memory-cotrain", "memory-frozen", "memory-scratch"))
        return _minimum(s.diff(a2, a3), s.diff(a3, a4))

    def ratio():
        part = _part(runs, "ratio")
        runtime = _column(part, "runtime_params").to_numpy(float)
        ref = np.median(runtime)
        part = part[np.abs(runtime / ref - 1) <= ratio_runtime_rtol]
        if part["run"].nunique() < 3:
            raise Missing(f"fewer than 3 'ratio' runs at fixed runtime params (within {ratio_runtime_rtol:.0%})")
        x = np.log10(part["fetched_params"].to_numpy(float) / _column(part, "anchor_params").to_numpy(float))
        ys = [s.avg(str(r)) for r in part["run"]]
        y, yb = np.array([p for p, _ in ys]), np.stack([b for _, b in ys], axis=-1)
        if (y == y.max()).sum() > 1:
            raise Missing(f"several 'ratio' runs share the best Avg-SK ({y.max():.1f}): no single best ratio")
        tied = (yb == yb.max(axis=-1, keepdims=True)).sum(axis=-1) > 1  # a replicate without a single best
        return float(x[np.argmax(y)]), np.where(tied, np.nan, x[np.argmax(yb, axis=-1)])

    def blocking():
        part = _part(runs, "blocking")
        run = str(part["run"].iloc[0])
        f, n, b = s.avg(run, "fetched"), s.avg(run, "none"), s.avg(run, blocking_mode)
        gain, removed = s.diff(f, n), s.diff(f, b)
        if not gain[0] > 0:
            raise Missing(f"no fetched - none gain to remove in run {run!r} ({gain[0]:+.1f} points)")
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = np.where(gain[1] > 0, removed[1] / gain[1], np.nan)
        return removed[0] / gain[0], boot

    def k_claim():
        if equivalence is None:
            raise Missing("no equivalence result (the dense ladder's fit) was given")
        if not equivalence.identified:
            raise Missing(f"k not identified: {equivalence.why}")
        table = equivalence.table
        k = table["k"].to_numpy(float)
        k = k[np.isfinite(k) & (k > 0)]
        if not len(k):
            raise Missing("no finite k")
        point = float(np.exp(np.log(k).mean()))
        if equivalence.replicates is None:
            raise Missing("the equivalence result has no bootstrap replicates (bootstrap=0)")
        reps = np.asarray(equivalence.replicates, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = np.exp(np.nanmean(np.where(reps > 0, np.log(reps), np.nan), axis=-1))
        return point, boot

    def sk_vs_dense_2x():
        memory = _part(runs, "longtail", "memory-cotrain")
        dense = runs[(_column(runs, "sweep") == "dense_ladder")]
        if "fetched_params" in dense:
            dense = dense[dense["fetched_params"].fillna(0) == 0]
        if dense.empty:
            raise Missing("no runs of the study part 'dense_ladder'")
        tokens = _column(dense, "total_tokens").to_numpy(float)
        diffs = []
        for r in memory.itertuples(index=False):
            row = r._asdict()
            anchor, seen = float(row["anchor_params"]), float(row["total_tokens"])
            same = dense[(np.abs(tokens / seen - 1) <= 0.05) & (dense["anchor_params"] >= 2 * anchor)]
            if same.empty:
                raise Missing(f"no dense ladder run of >= 2x {anchor:,.0f} parameters at {seen:,.0f} tokens")
            bigger = str(same.sort_values("anchor_params")["run"].iloc[0])
            diffs.append(s.diff(s.avg(str(row["run"]), "fetched"), s.avg(bigger, "none")))
        return float(np.mean([d for d, _ in diffs])), np.mean(np.stack([b for _, b in diffs]), axis=0)

    return {"bank_monotone": bank_monotone, "fetch_monotone": fetch_monotone, "deeper_more_efficient": deeper,
            "ffn_lora_kv": ffn_lora_kv, "early_worst": early_worst, "fetched_generic_none": fetched_generic_none,
            "gain_rare": gain_rare, "a2_a3_a4": a2_a3_a4, "ratio_near_1_10": ratio,
            "blocking_collapses": blocking, "k_at_10pct": k_claim, "sk_vs_dense_2x": sk_vs_dense_2x}


def _failed_in(failed: pd.DataFrame | None, parts: tuple[str, ...]) -> str:
    """'verdict withheld: ...' naming the failed runs of `parts`, or '' when none failed."""
    if failed is None or failed.empty:
        return ""
    for column in ("run", "sweep"):
        if column not in failed.columns:
            raise ValueError(f"the failed-runs table has no {column!r} column (use hiermem.study.study_failed)")
    lost = failed[failed["sweep"].isin(parts)]
    if lost.empty:
        return ""
    names = ", ".join(f"{r.sweep}/{r.run}" for r in lost.itertuples())
    return f"verdict withheld: {len(lost)} failed run(s) it depends on ({names})"


def paper_claims(probes: pd.DataFrame, runs: pd.DataFrame, equivalence=None, metric: str = "correct",
                 n_boot: int = 1000, seed: int = 0, blocking_mode: str = "blocked-drop",
                 ratio_runtime_rtol: float = 0.1, failed: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim of `CLAIMS` (columns `CLAIM_COLUMNS`): the statistic, its bootstrap 95% CI
    and the verdict by the module's rule; a claim whose input is missing is `undetermined` and its
    `note` names what is missing. `probes`: the study's probe tables with a `run` column; `runs`: one row
    per run with `run`, `sweep` and the descriptors (module docstring). `failed`: failed runs (`run`,
    `sweep`; `hiermem.study.study_failed`): a claim computed on a part with failed runs keeps its
    statistic and CI on the runs that finished, but its verdict is `undetermined` and the note names them."""
    if "run" not in probes.columns:
        raise ValueError("the probe table has no 'run' column (load it with analysis.load_probe_results)")
    runs = runs.copy()
    if "run" not in runs.columns:
        raise ValueError("the runs table has no 'run' column naming each run as the probe table does")
    if "mode" in runs.columns:  # a sweep results table: one row per (run, mode)
        runs = runs.drop_duplicates("run")
    stats = _Stats(Table(probes, metric, n_boot, seed))
    functions = _claim_functions(stats, runs, equivalence, blocking_mode, ratio_runtime_rtol)
    rows = []
    for c in CLAIMS:
        row = {"claim": c.claim, "paper_figure": c.paper_figure, "paper_value": c.paper_value,
               "statistic": c.statistic, "decision": c.decision}
        try:
            point, boot = functions[c.claim]()
        except Missing as e:
            rows.append({**row, "ours": np.nan, "ci_low": np.nan, "ci_high": np.nan, "verdict": "undetermined",
                         "note": str(e)})
            continue
        finite = np.asarray(boot, float)
        finite = finite[np.isfinite(finite)]
        lo, hi = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan))
        note = "" if len(finite) else "no finite bootstrap value"
        decided = verdict(float(lo), float(hi), c.threshold, c.window)
        lost = _failed_in(failed, CLAIM_PARTS[c.claim])
        if lost:
            decided, note = "undetermined", (note + "; " if note else "") + lost
        rows.append({**row, "ours": float(point), "ci_low": float(lo), "ci_high": float(hi),
                     "verdict": decided, "note": note})
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))
