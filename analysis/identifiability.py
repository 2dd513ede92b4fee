"""Is a fitted law identified by its data? Named checks that turn 'converged' into a usable fit.

An optimiser can converge on data that cannot pin the law down: a Chinchilla fit on two model
sizes converges to A = 3.6e87, alpha = 17.2, E = 0, and every number derived from it (gains
over the dense law, the multiplier k, 'best' form) is noise. `identifiability(fit)` runs the
checks below on the fit and its data and returns which failed, each reason naming the check
and the parameter; `FitResult.identified` / `FitResult.reasons` hold the outcome, and the
comparison, equivalence and view functions skip unidentified fits, saying why.

Checks (each name starts its reason):

- distinct: every variable (or tuple of variables, jointly) has at least as many distinct
  values among the fitted rows as the form declares (`Form.min_distinct`; Chinchilla needs 3
  model sizes and 3 token counts: E + A/N^alpha has three parameters along N). Values within a
  factor 1 + DISTINCT_RTOL of each other count as one.
- points: at least n_params + 3 points, i.e. AICc is finite (k = n_params + 1 with the noise
  scale, AICc needs n > k + 1). With fewer the fit interpolates the data.
- bound: no parameter sits on a bound of its optimisation box (e.g. mu in [0, 1]).
- sensitivity: every parameter moves some prediction: max |d log L / d theta| over the points
  >= MIN_SENSITIVITY. A scale (E, A, ...) pushed towards 0, whose term no longer contributes,
  fails this: it is at its natural bound 0 and its term's parameters are unconstrained.
- magnitude: scale parameters within 10^+-MAX_LOG10_SCALE (A = 3.6e87 is not an estimate).
- exponent: exponents inside the form's `exponent_range` (default (0.01, 3): Chinchilla-like
  exponents are ~0.3; above 3 is absurd for loss scaling, and below 0.01 the term is a constant
  over any realistic range of sizes, confounded with E).
- bootstrap (only when a bootstrap was run): a scale's CI spans at most
  MAX_CI_ORDERS orders of magnitude (a 100x ratio), an exponent's CI is at most
  MAX_EXPONENT_CI_WIDTH wide (a third of the plausible range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .data import scale_groups

if TYPE_CHECKING:  # pragma: no cover
    from .fitting import FitResult

DISTINCT_RTOL = 0.05          # sizes within 5% are one size (as in hold-out grouping)
BOUND_TOL = 1e-6              # |theta - bound| below this (relative to max(1, |bound|)) is "at the bound"
MIN_SENSITIVITY = 1e-4        # max |d log L / d theta| below this: the parameter changes no prediction
MAX_LOG10_SCALE = 30.0        # |log10 A| above this is an absurd magnitude
MAX_CI_ORDERS = 2.0           # bootstrap CI of a scale spanning more than 100x
MAX_EXPONENT_CI_WIDTH = 1.0   # bootstrap CI of an exponent wider than this

CHECKS = ("distinct", "points", "bound", "sensitivity", "magnitude", "exponent", "bootstrap")


class UnidentifiedFitWarning(UserWarning):
    """A fit converged (or not) but its parameters are not identified by the data; derived
    quantities (gains, k, form ranking) were skipped or should not be trusted."""


@dataclass(frozen=True)
class Identifiability:
    """Outcome of the checks: identified, the reasons (one per failed check, each starting with
    the check's name), and per check the parameters it concerns (empty tuple: the whole fit)."""

    identified: bool
    reasons: tuple[str, ...]
    failed: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def why(self) -> str:
        return "; ".join(self.reasons)


def _g(v: float) -> str:
    return f"{v:.3g}"


def _distinct_count(columns: list[np.ndarray]) -> int:
    """Distinct rows of the given columns (each value grouped within DISTINCT_RTOL), among rows
    where every column is > 0 (memory sizes are 0 for dense runs)."""
    positive = np.all([c > 0 for c in columns], axis=0)
    if not positive.any():
        return 0
    ids = np.stack([scale_groups(c[positive], DISTINCT_RTOL) for c in columns], axis=1)
    return len(np.unique(ids, axis=0))


def identifiability(fit: "FitResult", *, max_log10_scale: float = MAX_LOG10_SCALE,
                    min_sensitivity: float = MIN_SENSITIVITY, max_ci_orders: float = MAX_CI_ORDERS,
                    max_exponent_ci_width: float = MAX_EXPONENT_CI_WIDTH) -> Identifiability:
    """Run every check (see the module docstring) on `fit` and the rows it used."""
    form = fit.form
    rows = fit.used & (fit.weights > 0)
    names = dict(zip(form.params, form.natural_params))
    failed: dict[str, tuple[str, ...]] = {}
    reasons: list[str] = []

    def fail(check: str, params: tuple[str, ...], text: str) -> None:
        failed[check] = params
        reasons.append(f"{check}: {text}")

    # distinct values of each variable
    short = []
    for variables, need in form.distinct_needed().items():
        have = _distinct_count([np.asarray(fit.values[v], float)[rows] for v in variables])
        if have < need:
            what, unit = ((variables[0], "value") if len(variables) == 1
                          else ("(" + ", ".join(variables) + ")", "configuration"))
            short.append(f"{what} has {have} distinct {unit}{'s' * (have != 1)}, needs {need}")
    if short:
        fail("distinct", (), f"too few distinct sizes for {form.name!r}: " + ", ".join(short))

    # points: AICc finite (n > k + 1 with k = n_params + 1)
    n = int(rows.sum())
    if n <= form.n_params + 2:
        fail("points", (), f"{n} points for {form.n_params} parameters + the noise scale: AICc is infinite "
                           f"(needs at least {form.n_params + 3} points)")

    # optimisation bounds
    at_bound = []
    for j, (p, (lo, hi)) in enumerate(zip(form.params, form.bounds_list())):
        for b in (lo, hi):
            if b is not None and abs(fit.theta[j] - b) <= BOUND_TOL * max(1.0, abs(b)):
                at_bound.append((names[p], b, lo, hi))
    if at_bound:
        fail("bound", tuple(p for p, *_ in at_bound),
             ", ".join(f"{p} = {_g(b)} is at its bound (allowed [{_g(lo)}, {_g(hi)}])" for p, b, lo, hi in at_bound)
             + ": the optimum is on the boundary, not an estimate")

    # sensitivity of the predictions to each parameter
    fprep = form.prepare({k: np.asarray(v)[rows] for k, v in fit.values.items()})
    pred, columns = form.log_predict_columns(fit.theta[None, :], fprep)
    dead = []
    for p, col in zip(form.params, columns):
        s = float(np.max(np.abs(np.broadcast_to(col, pred.shape)))) if pred.size else 0.0
        if not s >= min_sensitivity:
            dead.append((names[p], s))
    if dead:
        fail("sensitivity", tuple(p for p, _ in dead), ", ".join(
            (f"{p} = {_g(fit.params[p])} is effectively at its lower bound 0 (its term is at most {s:.1e} of the "
             f"prediction at any point)" if p in form.scales else
             f"{p} changes no prediction (|d log L/d {p}| <= {s:.1e} at every point)") for p, s in dead))

    # absurd magnitudes of scale parameters
    huge = []
    for p in form.scales:
        v = fit.params[p]
        if not (v > 0 and np.isfinite(v)) or abs(math.log10(v)) > max_log10_scale:
            huge.append((p, v))
    if huge:
        fail("magnitude", tuple(p for p, _ in huge),
             ", ".join(f"{p} = {_g(v)}" for p, v in huge) + f" (outside 1e-{max_log10_scale:g} .. 1e{max_log10_scale:g})")

    # exponents in a plausible range
    lo, hi = form.exponent_range
    odd = [(p, fit.params[p]) for p in form.exponents if not lo < fit.params[p] < hi]
    if odd:
        fail("exponent", tuple(p for p, _ in odd),
             ", ".join(f"{p} = {_g(v)}" for p, v in odd) + f" outside the plausible range ({_g(lo)}, {_g(hi)})")

    # bootstrap spreads
    if fit.ci is not None:
        ci = fit.ci.set_index("param")
        level = f"{fit.ci_level:.0%} " if fit.ci_level else ""
        wide = []
        for p in form.scales:
            if p not in ci.index:
                continue
            a, b = float(ci.loc[p, "lo"]), float(ci.loc[p, "hi"])
            if not (a > 0 and np.isfinite(b)):
                wide.append((p, f"{level}CI [{_g(a)}, {_g(b)}] is not positive and finite"))
            elif math.log10(b / a) > max_ci_orders:
                wide.append((p, f"{level}CI [{_g(a)}, {_g(b)}] spans {math.log10(b / a):.1f} orders of magnitude "
                                f"(more than {max_ci_orders:g})"))
        for p in form.exponents:
            if p not in ci.index:
                continue
            a, b = float(ci.loc[p, "lo"]), float(ci.loc[p, "hi"])
            if not b - a <= max_exponent_ci_width:
                wide.append((p, f"{level}CI [{_g(a)}, {_g(b)}] is wider than {max_exponent_ci_width:g}"))
        if wide:
            fail("bootstrap", tuple(p for p, _ in wide), ", ".join(f"{p}'s {text}" for p, text in wide))

    return Identifiability(identified=not reasons, reasons=tuple(reasons), failed=failed)


def param_issues(result: Identifiability, params) -> list[str]:
    """Per parameter: the reasons that name it, or concern the whole fit ('' when none)."""
    out = []
    for p in params:
        out.append("; ".join(r for r, (check, names) in zip(result.reasons, result.failed.items())
                             if not names or p in names))
    return out
