"""Parameter-equivalence of memory models: 'anchor + memory is worth a dense model k x larger'.

Given a dense law L_dense(N, D) fitted on dense runs, the equivalent dense size of a memory
model with loss L_mem is the N_equiv solving L_dense(N_equiv, D) = L_mem at the same tokens;
the multiplier is k = N_equiv / N_anchor. Uncertainty comes from a run-level bootstrap of
the dense fit (and, when the memory loss is itself a fitted law with bootstrap replicates,
of that fit too). A memory model that beats the dense curve's floor (L_mem <= E + B/D^beta,
the loss of an infinitely large dense model) has k = inf and is flagged.

For probe accuracy (higher is better) the curves are fitted to the error 1 - accuracy,
which decreases in N like a loss (`higher_is_better=True`).

k is only as good as the dense law: when the dense fit (or the memory law) is not identified
(`FitResult.identified`, e.g. a ladder of two model sizes), no k is reported: the result has
k = NaN, `identified=False` and `why`, and an UnidentifiedFitWarning says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .data import variable_values
from .expressions import evaluate
from .fitting import FitResult, bootstrap_fit, fit
from .forms import Form
from .identifiability import UnidentifiedFitWarning

_LOG_N_MIN, _LOG_N_MAX = 0.0, 700.0   # bisection range for log N_equiv (N = 1 .. ~1e304)
_BISECTIONS = 64


def solve_equivalent_n(form: Form, thetas: np.ndarray, others: Mapping[str, np.ndarray],
                       target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N_equiv [S, n] with form(N_equiv, others) = target, for each parameter row of `thetas`.

    `others` holds the form's variables except N (e.g. D) for n rows; `target` is [n] or [S, n].
    Returns (N_equiv, beyond_floor, below_range): N_equiv is inf where the target is at or below
    the law's limit as N -> inf, and 1 (flagged) where even N = 1 is not bad enough.
    """
    if "N" not in form.variable_names:
        raise ValueError(f"form {form.name!r} has no parameter-count variable N to solve for")
    thetas = np.atleast_2d(thetas)
    n_rows = len(np.atleast_1d(target if np.ndim(target) == 1 else target[0]))
    log_target = np.log(np.broadcast_to(target, (len(thetas), n_rows)))

    def log_pred(theta: np.ndarray, log_n: np.ndarray) -> np.ndarray:
        values = {**others, "N": np.exp(log_n)}
        return form.log_predict_columns(theta[None, :], form.prepare(values))[0][0]

    out = np.empty((len(thetas), n_rows))
    beyond = np.zeros_like(out, dtype=bool)
    below = np.zeros_like(out, dtype=bool)
    for s, theta in enumerate(thetas):
        at_min = log_pred(theta, np.full(n_rows, _LOG_N_MIN))
        at_max = log_pred(theta, np.full(n_rows, _LOG_N_MAX))
        if np.any(at_max > at_min):
            raise ValueError(f"the fitted {form.name!r} curve does not decrease with N (check its exponent); "
                             "an equivalent size is undefined")
        lo, hi = np.full(n_rows, _LOG_N_MIN), np.full(n_rows, _LOG_N_MAX)
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            above = log_pred(theta, mid) > log_target[s]   # still worse than the target: go bigger
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        out[s] = np.exp(0.5 * (lo + hi))
        beyond[s] = log_target[s] <= at_max
        below[s] = log_target[s] >= at_min
    out[beyond] = np.inf
    out[below] = 1.0
    return out, beyond, below


@dataclass
class EquivalenceResult:
    """Per memory row: anchor size, target, equivalent dense size and multiplier k with CI.

    `identified` is False when the dense fit or the memory law is not identified: k is then
    NaN everywhere (no numbers are derived from an undetermined law) and `why` says why.
    """

    table: pd.DataFrame
    dense_fit: FitResult
    replicates: np.ndarray | None   # k per bootstrap replicate [B, n] (None without bootstrap)
    ci_level: float | None
    groups: pd.DataFrame | None = None  # geometric-mean k per group, with CI, when `by` is given
    identified: bool = True
    why: str = ""


def _thetas(form: Form, replicates: pd.DataFrame) -> np.ndarray:
    """Optimisation-space parameters [B, P] of bootstrap replicates (natural-parameter rows)."""
    return np.array([form.from_natural(row) for row in replicates[list(form.natural_params)].to_dict("records")])


def _percentile(samples: np.ndarray, q: float) -> np.ndarray:
    # inverted_cdf picks actual samples, so infinite k (beyond the floor) never turns into NaN.
    return np.quantile(samples, q, axis=0, method="inverted_cdf")


def estimate_equivalence(dense: pd.DataFrame | FitResult, memory: pd.DataFrame, *,
                         x: Mapping[str, str] | None = None, y: str = "loss", target: str | None = None,
                         form: str | Form = "chinchilla", memory_fit: FitResult | None = None,
                         higher_is_better: bool = False, bootstrap: int = 200, runs: str | Sequence | None = None,
                         ci: float = 0.95, seed: int = 0, by: str | Sequence[str] | None = None,
                         **fit_kwargs) -> EquivalenceResult:
    """Multiplier k such that each memory run matches a dense model with k x its anchor params.

    dense: dense runs (fitted here with `form`, default Chinchilla) or a ready FitResult.
    memory: memory runs; x maps the dense form's roles to columns (default N=anchor_params,
      D=tokens), evaluated on both tables. Their target is column/expression `target`
      (default `y`), or, with `memory_fit`, that law's prediction at the memory rows (paired
      with its own bootstrap replicates when it has them).
    higher_is_better: the metric is an accuracy; fit and solve on 1 - value instead (a
      `memory_fit` must then have been fitted on the error 1 - accuracy too).
    bootstrap: replicates of the dense fit (resampling `runs`, a column or one id per dense row)
      for the CI at level `ci`; 0 skips the CI. Per-row CIs reflect the dense fit only (one
      measured run carries no noise estimate). by: memory columns to group rows (e.g. seeds of
      one configuration) into a geometric-mean k in `groups`, whose CI also resamples the runs.
    An unidentified dense fit or memory law (before or after the bootstrap) gives k = NaN with
    the reason in `why` (and a `why` column), not numbers; see `EquivalenceResult`.
    """
    x = {"N": "anchor_params", "D": "tokens"} if x is None else dict(x)
    target = y if target is None else target
    wrap = (lambda e: f"1-({e})") if higher_is_better else (lambda e: e)
    if isinstance(dense, FitResult):
        if isinstance(runs, str):
            raise ValueError("with a ready dense FitResult, give `runs` as one id per row of its table, "
                             "not a column name")
        dense_fit = dense
    else:
        if isinstance(runs, str):
            if runs not in dense.columns:
                raise ValueError(f"runs column {runs!r} not found in the dense table")
            runs = dense[runs].to_numpy()
        with warnings.catch_warnings():  # the refusal below says it once
            warnings.simplefilter("ignore", UnidentifiedFitWarning)
            dense_fit = fit(dense, form, x, wrap(y), **fit_kwargs)
    if not dense_fit.converged:
        raise ValueError(f"the dense {dense_fit.form.name!r} fit did not converge ({dense_fit.message}); "
                         "k would not be meaningful")
    dform = dense_fit.form
    mem_values = variable_values(memory, dform, dense_fit.x)
    others = {k: v for k, v in mem_values.items() if k != "N"}
    anchor = mem_values["N"]
    if memory_fit is not None:
        observed = memory_fit.predict(memory)
    else:
        observed = evaluate(memory, wrap(target))
        if not np.all(np.isfinite(observed)) or np.any(observed <= 0):
            what = "1 - accuracy" if higher_is_better else "the target"
            raise ValueError(f"{what} ({wrap(target)!r}) must be finite and > 0 for every memory row")

    def refused(fitted: FitResult) -> EquivalenceResult | None:
        """k = NaN with the reason when the dense fit or the memory law is not identified."""
        why = []
        if not fitted.identified:
            why.append(f"the dense {fitted.form.name!r} fit is not identified: {fitted.why}")
        if memory_fit is not None and not memory_fit.identified:
            why.append(f"the memory law {memory_fit.form.name!r} is not identified: {memory_fit.why}")
        if not why:
            return None
        reason = "k not reported: " + "; ".join(why)
        warnings.warn(UnidentifiedFitWarning(f"estimate_equivalence: {reason}"), stacklevel=3)
        table = pd.DataFrame({k: v for k, v in mem_values.items()}, index=memory.index)
        table["target"] = observed
        table["N_equiv"] = table["k"] = np.nan
        table["beyond_floor"] = table["below_range"] = False
        table["why"] = reason
        groups = None
        if by is not None:
            groups = _group_summary(memory, table, None, [by] if isinstance(by, str) else list(by), ci, seed)
            groups["why"] = reason
        return EquivalenceResult(table=table, dense_fit=fitted, replicates=None, ci_level=None, groups=groups,
                                 identified=False, why=reason)

    if (out := refused(dense_fit)) is not None:
        return out
    n_equiv, beyond, below = solve_equivalent_n(dform, dense_fit.theta, others, observed)
    table = pd.DataFrame({k: v for k, v in mem_values.items()}, index=memory.index)
    table["target"] = observed
    table["N_equiv"] = n_equiv[0]
    table["k"] = n_equiv[0] / anchor
    table["beyond_floor"] = beyond[0]
    table["below_range"] = below[0]

    replicates = None
    if bootstrap:
        if dense_fit.bootstrap is None or len(dense_fit.bootstrap) != bootstrap:
            dense_fit = bootstrap_fit(dense_fit, n_boot=bootstrap, runs=runs, seed=seed, ci=ci)
        if (out := refused(dense_fit)) is not None:   # its CIs span orders of magnitude
            return out
        boot = dense_fit.bootstrap[dense_fit.bootstrap["converged"]]
        thetas = _thetas(dform, boot)
        targets = np.broadcast_to(observed, (len(thetas), len(observed)))
        if memory_fit is not None and memory_fit.bootstrap is not None:
            # Pair dense replicate b with memory replicate b (independent resamples of different runs).
            mthetas = _thetas(memory_fit.form, memory_fit.bootstrap[memory_fit.bootstrap["converged"]])
            mvalues = variable_values(memory, memory_fit.form, memory_fit.x)
            targets = np.array([memory_fit.form.predict(mthetas[b % len(mthetas)], mvalues)
                                for b in range(len(thetas))])
        n_rep, beyond_rep, _ = solve_equivalent_n(dform, thetas, others, targets)
        replicates = n_rep / anchor[None, :]
        table["k_lo"] = _percentile(replicates, (1 - ci) / 2)
        table["k_hi"] = _percentile(replicates, 1 - (1 - ci) / 2)
        table["p_beyond_floor"] = beyond_rep.mean(axis=0)

    groups = None
    if by is not None:
        groups = _group_summary(memory, table, replicates, [by] if isinstance(by, str) else list(by), ci, seed)
    return EquivalenceResult(table=table, dense_fit=dense_fit, replicates=replicates,
                             ci_level=ci if bootstrap else None, groups=groups)


def _group_summary(memory: pd.DataFrame, table: pd.DataFrame, replicates: np.ndarray | None,
                   by: list[str], ci: float, seed: int) -> pd.DataFrame:
    """Geometric-mean k per group. Its CI resamples the group's runs within each dense
    replicate, so run-to-run noise of the memory models counts as well as the dense fit's."""
    missing = [c for c in by if c not in memory.columns]
    if missing:
        raise ValueError(f"group-by columns {missing} not in the memory table")
    rng = np.random.default_rng(seed)
    log_k = np.log(table["k"].to_numpy())
    rows = []
    for key, idx in memory.groupby(by, sort=True).indices.items():
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(by, key)), "n_runs": len(idx), "k": float(np.exp(np.mean(log_k[idx])))}
        if replicates is not None:
            draws = rng.integers(0, len(idx), size=(len(replicates), len(idx)))
            picked = np.take_along_axis(replicates[:, idx], draws, axis=1)
            per_rep = np.exp(np.mean(np.log(picked), axis=1))
            row["k_lo"] = float(_percentile(per_rep, (1 - ci) / 2))
            row["k_hi"] = float(_percentile(per_rep, 1 - (1 - ci) / 2))
        rows.append(row)
    return pd.DataFrame(rows)
