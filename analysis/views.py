"""IsoFLOP and iso-runtime-parameter views of a results table (tidy DataFrames, no plotting).

IsoFLOP: runs grouped by training-FLOP budget (nearby budgets in log space share a group),
loss against parameters within each budget, and the loss-minimising size per budget from a
parabola in log N (Chinchilla's Approach 2) and, when given, from a fitted law L(N, D) with
D = C / (6 N). Parabola optima are biased when a budget's sizes are off-centre (see
Open-Athena's analysis in the anchors); the `interior` flag marks vertices inside the
sampled range, and the law-based optimum avoids the issue.

Iso-runtime: loss against runtime parameters (anchor + fetched memory) for dense and memory
models, the comparison behind "memory matches a dense model with more runtime parameters".

A fitted law that is not identified (`FitResult.identified`) is not used: its columns are
left out (IsoFLOP; the reason in `IsoFlopView.skipped`) or NaN (iso-runtime gains; the
reason in the frame's `attrs["skipped"]`), and an UnidentifiedFitWarning says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .data import scale_groups, source_of, variable_values
from .expressions import evaluate
from .fitting import FitResult
from .identifiability import UnidentifiedFitWarning


@dataclass
class IsoFlopView:
    """Rows with their budget group, per-budget optima, and (optional) fitted-law curves."""

    points: pd.DataFrame   # params, tokens, flops, loss, budget_group, budget
    optima: pd.DataFrame   # per budget: n_points, parabola optimum (+ interior flag), law optimum
    curves: pd.DataFrame   # per budget: params grid, parabola and law predictions
    skipped: str = ""      # why the law was not used ('' when it was, or none was given)


def _unidentified(law: FitResult | None, what: str) -> str:
    """'' for no law or an identified one; else the reason, also raised as a warning."""
    if law is None or law.identified:
        return ""
    reason = f"{what} not computed: the {law.form.name!r} fit is not identified ({law.why})"
    warnings.warn(UnidentifiedFitWarning(reason), stacklevel=3)
    return reason


def _positive(df: pd.DataFrame, expr: str, what: str) -> np.ndarray:
    values = evaluate(df, expr)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{what} ({expr!r}){source_of(df)} must be finite and > 0 for every row")
    return values


def _law_at(law: FitResult, params: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    if set(law.form.variable_names) != {"N", "D"}:
        raise ValueError(f"the IsoFLOP law optimum needs a form over (N, D), got {law.form.name!r}")
    return law.form.predict(law.theta, {"N": params, "D": tokens})


def isoflop_view(df: pd.DataFrame, *, params: str = "anchor_params", tokens: str = "tokens", y: str = "loss",
                 flops: str | None = None, flops_per_token: str | None = None, rtol: float = 0.1,
                 bins: int | None = None, law: FitResult | None = None, grid_points: int = 200) -> IsoFlopView:
    """Group runs by FLOP budget and find the compute-optimal size per budget.

    FLOPs come from `flops` (a column/expression), else `flops_per_token` * tokens (training
    FLOPs per token), else 6 * params * tokens. Budgets within a factor (1 + rtol) are one
    group, or, with `bins`, equal-width bins in log FLOPs. `law` (a fitted form over N, D)
    adds the law's optimum and curve per budget along C = 6 N D, unless it is not identified
    (then `skipped` says why and only the parabolas are given).
    """
    skipped = _unidentified(law, "law-based IsoFLOP optima")
    if skipped:
        law = None
    n = _positive(df, params, "params")
    d = _positive(df, tokens, "tokens")
    loss = _positive(df, y, "target")
    if flops is not None:
        c = _positive(df, flops, "flops")
    elif flops_per_token is not None:
        c = _positive(df, flops_per_token, "flops_per_token") * d
    else:
        c = 6.0 * n * d
    if bins is not None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        edges = np.linspace(np.log(c).min(), np.log(c).max(), bins + 1)
        group = np.clip(np.digitize(np.log(c), edges[1:-1]), 0, bins - 1)
        group = np.unique(group, return_inverse=True)[1]
    else:
        group = scale_groups(c, rtol)
    points = pd.DataFrame({"params": n, "tokens": d, "flops": c, "loss": loss, "budget_group": group},
                          index=df.index)
    points["budget"] = points.groupby("budget_group")["flops"].transform(lambda v: float(np.exp(np.log(v).mean())))

    optima, curves = [], []
    for g, sub in points.groupby("budget_group", sort=True):
        budget = float(sub["budget"].iloc[0])
        row = {"budget_group": int(g), "budget": budget, "n_points": len(sub),
               "params_opt_parabola": np.nan, "loss_opt_parabola": np.nan, "interior": False}
        log_n = np.log(sub["params"].to_numpy())
        grid = np.exp(np.linspace(log_n.min() - 0.5, log_n.max() + 0.5, grid_points))
        curve = pd.DataFrame({"budget_group": int(g), "budget": budget, "params": grid})
        if len(np.unique(log_n)) >= 3:
            a2, a1, a0 = np.polyfit(log_n, sub["loss"].to_numpy(), 2)
            curve["loss_parabola"] = np.polyval([a2, a1, a0], np.log(grid))
            if a2 > 0:  # a minimum exists
                vertex = -a1 / (2 * a2)
                row.update(params_opt_parabola=float(np.exp(vertex)),
                           loss_opt_parabola=float(np.polyval([a2, a1, a0], vertex)),
                           interior=bool(log_n.min() <= vertex <= log_n.max()))
        if law is not None:
            wide = np.exp(np.linspace(log_n.min() - 3, log_n.max() + 3, 4 * grid_points))
            wide_loss = _law_at(law, wide, budget / (6 * wide))
            best = int(np.argmin(wide_loss))
            row.update(params_opt_law=float(wide[best]), tokens_opt_law=float(budget / (6 * wide[best])),
                       loss_opt_law=float(wide_loss[best]), law_opt_at_edge=best in (0, len(wide) - 1))
            curve["loss_law"] = _law_at(law, grid, budget / (6 * grid))
        optima.append(row)
        curves.append(curve)
    return IsoFlopView(points=points, optima=pd.DataFrame(optima), curves=pd.concat(curves, ignore_index=True),
                       skipped=skipped)


def iso_runtime_view(df: pd.DataFrame, *, anchor: str = "anchor_params", fetched: str = "fetched_params",
                     y: str = "loss", tokens: str | None = "tokens", hue: str | None = None,
                     dense_fit: FitResult | None = None) -> pd.DataFrame:
    """Loss against runtime parameters (anchor + fetched) with a dense/memory label per run.

    `tokens` (a column, carried along when the table has it; None to skip) lets plots join
    dense runs of equal training length. `hue` (a column) is carried along for plotting (e.g.
    bank size). With `dense_fit` (a dense law whose N is the anchor size), adds the dense law's
    loss at the same runtime parameters and tokens, and the memory model's gain over it; when
    that fit is not identified both columns are NaN, `attrs["skipped"]` says why and an
    UnidentifiedFitWarning is raised.
    """
    a = _positive(df, anchor, "anchor params")
    m = evaluate(df, fetched)
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"fetched params ({fetched!r}){source_of(df)} must be finite and >= 0 (0 for dense runs)")
    out = pd.DataFrame({"anchor_params": a, "fetched_params": m, "runtime_params": a + m,
                        "loss": _positive(df, y, "target"),
                        "kind": np.where(m > 0, "memory", "dense")}, index=df.index)
    if tokens is not None and (tokens != "tokens" or "tokens" in df.columns):
        out["tokens"] = _positive(df, tokens, "tokens")
    if hue is not None:
        if hue not in df.columns:
            raise ValueError(f"hue column {hue!r} not found{source_of(df)}")
        out[hue] = df[hue].to_numpy()
    skipped = _unidentified(dense_fit, "iso-runtime gains over the dense law")
    if skipped:
        out["dense_loss_at_runtime"] = out["gain_vs_dense"] = np.nan
        out.attrs["skipped"] = skipped
    elif dense_fit is not None:
        values = variable_values(df, dense_fit.form, dense_fit.x)
        values["N"] = out["runtime_params"].to_numpy()
        out["dense_loss_at_runtime"] = dense_fit.form.predict(dense_fit.theta, values)
        out["gain_vs_dense"] = out["dense_loss_at_runtime"] - out["loss"]
    return out
