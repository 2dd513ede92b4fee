"""Model comparison (AIC/BIC across forms) and hold-out-largest-scale extrapolation checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .data import scale_groups, source_of
from .expressions import evaluate
from .fitting import FitResult, fit
from .forms import Form, get_form
from .identifiability import UnidentifiedFitWarning

LIKELIHOODS = ("laplace", "gaussian")


def information_criteria(result: FitResult, likelihood: str = "laplace") -> dict[str, float]:
    """Log-likelihood, AIC, AICc and BIC of a fit from its log residuals.

    The Huber objective with a small delta is essentially a sum of absolute log residuals, whose
    matching likelihood is Laplace (scale = mean |r|); "gaussian" uses the mean squared
    residual instead. The scale counts as one extra parameter. Weights act as multiplicities.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
    r = result.log_residuals()
    w = result.weights[result.used]
    n = float(w.sum())
    k = result.n_params + 1
    tiny = np.finfo(float).tiny  # an exact fit has zero scale; keep the criteria finite
    if likelihood == "laplace":
        scale = max(float(w @ np.abs(r)) / n, tiny)
        loglik = -n * (np.log(2 * scale) + 1)
    else:
        var = max(float(w @ (r * r)) / n, tiny)
        loglik = -0.5 * n * (np.log(2 * np.pi * var) + 1)
    aic = 2 * k - 2 * loglik
    aicc = aic + (2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else np.inf)
    return {"n": n, "k": k, "loglik": float(loglik), "aic": float(aic), "aicc": float(aicc),
            "bic": float(k * np.log(n) - 2 * loglik)}


@dataclass
class Comparison:
    """AIC/BIC table (best first) and the fits behind it, keyed by form name.

    `excluded` maps each form that may not be 'best' to why (not identified, or AICc infinite);
    `best` is None when no form qualifies, and `note` says so in one line.
    """

    table: pd.DataFrame
    fits: dict[str, FitResult]
    excluded: dict[str, str] = field(default_factory=dict)

    @property
    def best(self) -> str | None:
        eligible = self.table[self.table["eligible"]] if "eligible" in self.table else self.table
        return None if eligible.empty else str(eligible["form"].iloc[0])

    @property
    def note(self) -> str:
        """'' when every form was ranked; else which forms were not, and why."""
        if not self.excluded:
            return ""
        parts = [f"{name}: {why}" for name, why in self.excluded.items()]
        head = ("no form can be ranked best" if self.best is None
                else f"best among the identified forms: {self.best}; not eligible")
        return f"{head} - " + " | ".join(parts)


def compare_fits(fits: Sequence[FitResult], likelihood: str = "laplace") -> Comparison:
    """Rank fitted forms by AIC (ties and alternatives visible through BIC and Akaike weights).

    All fits must use the same rows of the same table, or the criteria are not comparable.
    Only identified fits (`FitResult.identified`) with a finite AICc may be best: a row with
    AICc = inf is `comparable=False` (its deltas and weight are NaN), an unidentified one is
    `eligible=False` (its deltas, relative to the best eligible form, are shown; its weight is
    NaN); `why` says which check failed. Eligible forms come first, by AIC. When a form is left
    out, an UnidentifiedFitWarning says why (also in `Comparison.note`).
    """
    if len(fits) < 2:
        raise ValueError(f"comparing forms needs at least 2 fits, got {len(fits)}")
    ref = fits[0]
    for f in fits[1:]:
        if f.used.shape != ref.used.shape or not np.array_equal(f.used, ref.used) or not np.allclose(f.y, ref.y):
            raise ValueError(f"fits {ref.form.name!r} and {f.form.name!r} were made on different rows or targets; "
                             "AIC/BIC compare only fits of the same data")
    rows = []
    for f in fits:
        ic = information_criteria(f, likelihood)
        comparable = bool(np.isfinite(ic["aicc"]))
        why = [] if comparable or "points" in f.identification.failed else [
            f"AICc is infinite ({ic['n']:g} points, {ic['k']} parameters with the noise scale)"]
        if not f.identified:
            why.append(f"not identified: {f.why}")
        if not f.converged:
            why.append(f"did not converge: {f.message}")
        rows.append({"form": f.form.name, "formula": f.form.formula, "n_params": f.n_params,
                     "objective": f.objective, "converged": f.converged, "identified": f.identified,
                     "comparable": comparable, "eligible": comparable and f.identified and f.converged,
                     "why": "; ".join(why), **ic})
    table = pd.DataFrame(rows)
    table = table.iloc[np.lexsort((table["aic"].to_numpy(), ~table["eligible"].to_numpy()))].reset_index(drop=True)
    eligible, comparable = table["eligible"].to_numpy(), table["comparable"].to_numpy()
    for crit in ("aic", "bic"):
        ref = table.loc[eligible, crit].min() if eligible.any() else np.nan
        table[f"delta_{crit}"] = np.where(comparable, table[crit] - ref, np.nan)
    rel = np.where(eligible, np.exp(-0.5 * table["delta_aic"].fillna(np.inf)), np.nan)
    table["aic_weight"] = rel / np.nansum(rel) if eligible.any() else np.nan
    excluded = {r.form: r.why for r in table.itertuples() if not r.eligible}
    comparison = Comparison(table=table, fits={f.form.name: f for f in fits}, excluded=excluded)
    if excluded:
        warnings.warn(UnidentifiedFitWarning(f"form comparison: {comparison.note}"), stacklevel=2)
    return comparison


def compare_forms(df: pd.DataFrame, forms: Sequence[str | Form], x: Mapping[str, str], y: str, *,
                  likelihood: str = "laplace", **fit_kwargs) -> Comparison:
    """Fit every form in `forms` to the same rows and rank them by AIC/BIC.

    `x` maps all roles any of the forms needs (each form uses its own subset), e.g.
    {"N": "anchor_params", "M": "fetched_params", "Bk": "bank_params", "D": "tokens"}.
    Extra keyword arguments go to `fit` (exclusions, weights, delta, ...).
    """
    names = [get_form(f).name for f in forms]
    if len(set(names)) != len(names):
        raise ValueError(f"each form may appear once, got {names}")
    with warnings.catch_warnings():  # one warning from compare_fits, not one per fit
        warnings.simplefilter("ignore", UnidentifiedFitWarning)
        fits = [fit(df, f, x, y, **fit_kwargs) for f in forms]
    return compare_fits(fits, likelihood)


@dataclass
class HoldoutResult:
    """A fit on the smaller scales and its errors predicting the held-out largest ones."""

    fit: FitResult
    by: str
    threshold: float          # smallest held-out value of `by`
    table: pd.DataFrame       # one row per held-out point

    @property
    def mean_abs_rel_error(self) -> float:
        return float(self.table["abs_rel_error"].mean())

    @property
    def max_abs_rel_error(self) -> float:
        return float(self.table["abs_rel_error"].max())

    @property
    def rmse_log(self) -> float:
        return float(np.sqrt((self.table["log_error"] ** 2).mean()))

    def summary(self) -> dict[str, float]:
        return {"form": self.fit.form.name, "by": self.by, "threshold": self.threshold,
                "n_train": self.fit.n_points, "n_holdout": len(self.table),
                "mean_abs_rel_error": self.mean_abs_rel_error, "max_abs_rel_error": self.max_abs_rel_error,
                "rmse_log": self.rmse_log, "converged": self.fit.converged, "identified": self.fit.identified,
                "why": self.fit.why}


def holdout_largest(df: pd.DataFrame, form: str | Form, x: Mapping[str, str], y: str, *, by: str = "N",
                    n_scales: int = 1, rtol: float = 0.05, exclude=None, **fit_kwargs) -> HoldoutResult:
    """Fit on all but the `n_scales` largest scales of `by`, then predict the held-out rows.

    `by` is a role of `x` (default N, the parameter count) or any column/expression. Values
    within a factor (1 + rtol) of each other count as one scale, so runs of "the same" size
    with slightly different counts are held out together. `exclude` rows stay out of both the
    fit and the evaluation. Reports relative and log errors of the extrapolation.
    """
    form = get_form(form)
    scale = evaluate(df, x[by] if by in x else by)
    if not np.all(np.isfinite(scale)):
        raise ValueError(f"hold-out variable {by!r}{source_of(df)} has missing or non-finite values")
    user_excluded = np.zeros(len(df), dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude)
        user_excluded = ex if ex.dtype == bool else df.index.isin(ex)
    groups = scale_groups(scale, rtol)
    live = np.unique(groups[~user_excluded])
    if n_scales < 1 or len(live) <= n_scales:
        raise ValueError(f"cannot hold out the {n_scales} largest of {len(live)} distinct scales of {by!r} "
                         f"(rtol={rtol}); need at least one scale left to fit on")
    held = np.isin(groups, live[-n_scales:]) & ~user_excluded
    result = fit(df, form, x, y, exclude=held | user_excluded, **fit_kwargs)
    predicted = result.predict(df)[held]
    observed = result.y[held]
    table = pd.DataFrame({k: v[held] for k, v in result.values.items()}, index=df.index[held])
    table["observed"] = observed
    table["predicted"] = predicted
    table["rel_error"] = predicted / observed - 1
    table["abs_rel_error"] = np.abs(table["rel_error"])
    table["log_error"] = np.log(predicted) - np.log(observed)
    return HoldoutResult(fit=result, by=by, threshold=float(scale[held].min()), table=table)


def holdout_forms(df: pd.DataFrame, forms: Sequence[str | Form], x: Mapping[str, str], y: str, *, by: str = "N",
                  n_scales: int = 1, rtol: float = 0.05, **fit_kwargs) -> pd.DataFrame:
    """`holdout_largest` for each form on the same rows: one row per form with its extrapolation errors
    (`HoldoutResult.summary`), or NaN errors and the reason in `why` when the form cannot be fitted
    without the largest scales (too few scales left, a variable missing) or its fit is not identified
    (an unidentified fit's prediction is not an extrapolation of a law: its errors are left NaN)."""
    rows = []
    for form in forms:
        name = get_form(form).name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnidentifiedFitWarning)
                result = holdout_largest(df, form, x, y, by=by, n_scales=n_scales, rtol=rtol, **fit_kwargs)
        except ValueError as error:
            rows.append({"form": name, "by": by, "identified": False, "why": str(error)})
            continue
        row = result.summary()
        if not result.fit.identified:
            for key in ("mean_abs_rel_error", "max_abs_rel_error", "rmse_log"):
                row[key] = np.nan
        rows.append(row)
    columns = ["form", "by", "threshold", "n_train", "n_holdout", "mean_abs_rel_error", "max_abs_rel_error",
               "rmse_log", "converged", "identified", "why"]
    return pd.DataFrame(rows).reindex(columns=columns)
