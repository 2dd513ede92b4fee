"""Multi-start Huber fitting of scaling laws in log space, with run-level bootstrap.

The objective is the SUM over points of Huber_delta(log L_pred - log L_obs), optionally
weighted. Every point of an initial grid is iterated with L-BFGS (batched over starts, see
`analysis.optimize`, using the form's analytic gradient); the best few distinct optima are
then polished with scipy's L-BFGS-B, and the best converged one wins. Summing (not
averaging) matters: a mean objective is ~n times smaller and L-BFGS-B's default tolerances
then stop early, the artefact Besiroglu et al. identify in the original Chinchilla fit.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from .data import Prepared, prepare_inputs, source_of, variable_values
from .forms import Form, get_form
from .identifiability import Identifiability, UnidentifiedFitWarning, identifiability, param_issues
from .optimize import batched_lbfgs

DEFAULT_DELTA = 1e-3
# Explicit stopping tolerances, relative to the objective's own size |f| (scipy's L-BFGS-B
# uses max(|f|, 1), which makes any objective below 1 stop early; see analysis.optimize).
DEFAULT_FTOL = 1e-9
DEFAULT_GTOL = 1e-8
DEFAULT_MAXITER = 2000
# Starts are evaluated in blocks of at most this many (start, point) pairs. The float64
# temporaries (< 128 KiB) then stay in cache and below glibc's default mmap threshold, so
# they are not mapped and unmapped (page faults) on every operation: about 3x faster than
# one pass over all starts at once.
_CHUNK_ELEMENTS = 16000


def huber(residual: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of each residual and its derivative: r^2/2 within delta, delta*(|r| - delta/2) beyond.

    Written with one clip (the derivative) instead of branches: fewer passes over the data.
    """
    grad = np.clip(residual, -delta, delta)
    return grad * (residual - 0.5 * grad), grad


def _batched_objective(form: Form, prepared: Mapping[str, np.ndarray], log_y: np.ndarray, weights: np.ndarray,
                       delta: float):
    """fun(theta [k, P], rows [k]) -> (sum of weighted Huber losses [k], gradient [k, P]).

    `weights` is one vector [n] shared by all starts, or one row per start [S, n] (bootstrap).
    """
    chunk = max(1, _CHUNK_ELEMENTS // max(len(log_y), 1))

    def fun(theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(theta) <= chunk:
            return one_chunk(theta, rows)
        parts = [one_chunk(theta[i:i + chunk], rows[i:i + chunk]) for i in range(0, len(theta), chunk)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def one_chunk(theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred, columns = form.log_predict_columns(theta, prepared)
        loss, dloss = huber(pred - log_y, delta)
        w = weights if weights.ndim == 1 else weights[rows]
        dloss *= w
        value = (loss * w).sum(axis=1)
        grad = np.empty((len(theta), len(columns)))
        for j, c in enumerate(columns):
            grad[:, j] = np.einsum("sn,sn->s", dloss, c) if c.shape == dloss.shape else (dloss * c).sum(axis=1)
        return value, grad
    return fun


def _objective(theta: np.ndarray, fun, scale: float = 1.0) -> tuple[float, np.ndarray]:
    """Single-start adapter of a batched objective for scipy.optimize.minimize, divided by `scale`."""
    value, grad = fun(theta[None, :], np.zeros(1, dtype=int))
    return float(value[0]) / scale, grad[0] / scale


def make_starts(form: Form, grid: Mapping[str, Sequence[float]] | np.ndarray | None = None,
                max_starts: int | None = None, seed: int = 0) -> np.ndarray:
    """Initial points [S, P] in optimisation space: the Cartesian product of `grid` (default:
    the form's grid), randomly subsampled (fixed seed) to `max_starts` when larger."""
    if max_starts is None and grid is None:
        max_starts = form.default_max_starts
    if isinstance(grid, np.ndarray):
        starts = np.atleast_2d(grid).astype(float)
        if starts.shape[1] != form.n_params:
            raise ValueError(f"starts for form {form.name!r} need {form.n_params} columns {form.params}, "
                             f"got {starts.shape[1]}")
    else:
        grid = dict(form.default_grid if grid is None else grid)
        unknown = sorted(set(grid) - set(form.params))
        missing = [p for p in form.params if p not in grid]
        if unknown or missing:
            raise ValueError(f"grid for form {form.name!r} must give values for {list(form.params)} "
                             f"(optimisation space); unknown {unknown}, missing {missing}")
        starts = np.array(list(itertools.product(*(np.atleast_1d(grid[p]) for p in form.params))), dtype=float)
    if max_starts is not None and len(starts) > max_starts:
        keep = np.sort(np.random.default_rng(seed).choice(len(starts), size=max_starts, replace=False))
        starts = starts[keep]
    # Start inside the bounds so L-BFGS-B does not begin with a projection.
    for j, (lo, hi) in enumerate(form.bounds_list()):
        starts[:, j] = np.clip(starts[:, j], -np.inf if lo is None else lo, np.inf if hi is None else hi)
    return starts


@dataclass
class FitResult:
    """A fitted law: natural parameters, objective, convergence, every start, and the data used.

    `params` are the reported parameters (e.g. A, B, E, alpha, beta); `theta` the optimisation-
    space vector. `used` marks the rows (of the original table) the fit saw. `ci` holds the
    bootstrap confidence intervals once `bootstrap_fit` has run.

    `converged` is the optimiser's verdict only. `identified` says whether the data pin the
    parameters down (see `analysis.identifiability`; recomputed whenever a result is made,
    e.g. after a bootstrap); `reasons` names each failed check. Report both: `status`.
    """

    form: Form
    params: dict[str, float]
    theta: np.ndarray
    objective: float
    converged: bool
    message: str
    x: dict[str, str]
    y_name: str
    delta: float
    values: dict[str, np.ndarray]
    y: np.ndarray
    weights: np.ndarray
    used: np.ndarray
    index: pd.Index
    starts: pd.DataFrame
    seconds: float
    source: str = ""
    bootstrap: pd.DataFrame | None = None
    ci: pd.DataFrame | None = None
    ci_level: float | None = None
    options: dict = field(default_factory=dict)
    identification: Identifiability | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.identification = identifiability(self)

    @property
    def identified(self) -> bool:
        """True when every identifiability check passes (the data determine the parameters)."""
        return self.identification.identified

    @property
    def reasons(self) -> tuple[str, ...]:
        """One reason per failed identifiability check, each starting with the check's name."""
        return self.identification.reasons

    @property
    def why(self) -> str:
        """The reasons in one line ('' when identified)."""
        return self.identification.why

    @property
    def status(self) -> str:
        """'converged=... identified=...' and, when not identified, why: print this, not `converged` alone."""
        out = f"converged={self.converged} identified={self.identified}"
        return out if self.identified else f"{out} ({self.why})"

    @property
    def n_points(self) -> int:
        return int(self.used.sum())

    @property
    def n_excluded(self) -> int:
        return int((~self.used).sum())

    @property
    def n_params(self) -> int:
        return self.form.n_params

    def predict(self, df: pd.DataFrame | None = None) -> np.ndarray:
        """Predicted target for every row of `df` (default: the fitted table, all rows)."""
        values = self.values if df is None else variable_values(df, self.form, self.x)
        return self.form.predict(self.theta, values)

    def log_residuals(self) -> np.ndarray:
        """log(predicted) - log(observed) on the rows used by the fit."""
        return np.log(self.predict()[self.used]) - np.log(self.y[self.used])

    def table(self) -> pd.DataFrame:
        """One row per table row: the variables, observed and predicted target, used flag."""
        out = pd.DataFrame({k: v for k, v in self.values.items()}, index=self.index)
        out["observed"] = self.y
        out["predicted"] = self.predict()
        out["log_residual"] = np.log(out["predicted"]) - np.log(out["observed"])
        out["used"] = self.used
        out["weight"] = self.weights
        return out

    def summary(self) -> pd.DataFrame:
        """Parameters as a table, with CI columns when bootstrapped, then whether the fit is
        identified and, per parameter, the reasons that concern it ('' when none)."""
        out = pd.DataFrame({"param": list(self.params), "estimate": list(self.params.values())})
        if self.ci is not None:
            out = out.merge(self.ci.drop(columns="estimate"), on="param", how="left")
        out["identified"] = self.identified
        out["issue"] = param_issues(self.identification, list(self.params))
        return out

    def to_dict(self) -> dict:
        """JSON-ready dictionary: parameters at the top level, CIs under 'ci', details under 'fit'."""
        out: dict = dict(self.params)
        if self.ci is not None:
            out["ci"] = {r.param: [float(r.lo), float(r.hi)] for r in self.ci.itertuples()}
            out["ci_level"] = self.ci_level
        converged_starts = int(self.starts["converged"].sum())
        out["fit"] = {
            "form": self.form.name, "formula": self.form.formula, "x": self.x, "y": self.y_name,
            "objective": self.objective, "converged": self.converged, "message": self.message,
            "n_points": self.n_points, "n_excluded": self.n_excluded, "n_starts": len(self.starts),
            "n_converged_starts": converged_starts, "delta": self.delta, "seconds": round(self.seconds, 3),
            "source": self.source, "identified": self.identified, "reasons": list(self.reasons),
        }
        if self.bootstrap is not None:
            out["fit"]["n_bootstrap"] = int(len(self.bootstrap))
            out["fit"]["n_bootstrap_converged"] = int(self.bootstrap["converged"].sum())
        return out


def _history(form: Form) -> int:
    """L-BFGS memory: twice the parameter count (close to full BFGS, which the ill-conditioned
    memory forms need), at least scipy's 10 and at most 20."""
    return min(20, max(10, 2 * form.n_params))


def _bounds(form: Form) -> tuple[np.ndarray, np.ndarray]:
    lower = np.array([-np.inf if lo is None else lo for lo, _ in form.bounds_list()])
    upper = np.array([np.inf if hi is None else hi for _, hi in form.bounds_list()])
    return lower, upper


@dataclass
class _Solution:
    theta: np.ndarray
    objective: float
    converged: bool
    message: str
    table: pd.DataFrame


def _distinct_best(x: np.ndarray, fun: np.ndarray, converged: np.ndarray, k: int, tol: float = 1e-6) -> list[int]:
    """Indices of up to k lowest-objective finite points, converged first, pairwise distinct."""
    finite = np.isfinite(fun) & np.all(np.isfinite(x), axis=1)
    order = np.lexsort((fun, ~converged))
    chosen: list[int] = []
    for i in order[finite[order]]:
        if all(np.max(np.abs(x[i] - x[j])) > tol for j in chosen):
            chosen.append(int(i))
        if len(chosen) >= k:
            break
    return chosen


def _solve(form: Form, prepared: Mapping[str, np.ndarray], log_y: np.ndarray, weights: np.ndarray, delta: float,
           starts: np.ndarray, options: Mapping, n_polish: int) -> _Solution:
    """Batched L-BFGS from every start, scipy L-BFGS-B polish of the best distinct optima."""
    fun = _batched_objective(form, prepared, log_y, weights, delta)
    lower, upper = _bounds(form)
    batch = batched_lbfgs(fun, starts, lower, upper, ftol=options["ftol"], gtol=options["gtol"],
                          maxiter=options["maxiter"], history=_history(form))
    table = pd.DataFrame(starts, columns=[f"init_{p}" for p in form.params])
    for j, p in enumerate(form.params):
        table[p] = batch.x[:, j]
    table["objective"] = batch.fun
    table["converged"] = batch.converged
    table["status"] = [batch.message(i) for i in range(len(starts))]
    table["nit"] = batch.nit
    table["nfev"] = batch.nfev
    candidates = _distinct_best(batch.x, batch.fun, batch.converged, n_polish)
    if not candidates:
        raise ValueError("no start produced a finite objective; check the data and the grid of initial values")
    bounds = None if np.all(np.isinf(lower)) and np.all(np.isinf(upper)) else list(zip(lower, upper))
    scipy_options = {"ftol": options["ftol"], "gtol": options["gtol"], "maxiter": options["maxiter"],
                     "maxfun": 10 * options["maxiter"]}
    best: _Solution | None = None
    for i in candidates:
        # Divide by the candidate's objective so that scipy's tests, relative to max(|f|, 1),
        # become relative to |f| as in the batched stage.
        scale = max(abs(float(batch.fun[i])), 1e-300)
        res = minimize(_objective, batch.x[i], args=(fun, scale), jac=True, method="L-BFGS-B", bounds=bounds,
                       options=scipy_options)
        res.fun = float(res.fun) * scale
        # The polish can only lower f; if scipy stops abnormally (a Huber kink), the batched
        # run's own convergence still stands for its point.
        if res.success and np.isfinite(res.fun):
            cand = _Solution(np.asarray(res.x, float), float(res.fun), True, f"L-BFGS-B: {res.message}", table)
        else:
            ok = bool(batch.converged[i])
            improved = np.isfinite(res.fun) and res.fun <= batch.fun[i]
            theta, obj = (np.asarray(res.x, float), float(res.fun)) if improved else (batch.x[i], float(batch.fun[i]))
            msg = (f"{batch.message(i)}; the L-BFGS-B polish found no further decrease ({res.message})" if ok
                   else f"did not converge (batched: {batch.message(i)}; L-BFGS-B: {res.message})")
            cand = _Solution(theta, obj, ok, msg, table)
        if best is None or (cand.converged, -cand.objective) > (best.converged, -best.objective):
            best = cand
    return best


def _used_rows(prepared: Prepared, exclude, exclude_highest: int, df: pd.DataFrame) -> np.ndarray:
    n = len(prepared.y)
    used = np.ones(n, dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype == bool:
            if ex.shape != (n,):
                raise ValueError(f"exclude mask has length {ex.size}, table has {n} rows")
            used &= ~ex
        else:
            unknown = [v for v in ex.tolist() if v not in prepared.index]
            if unknown:
                raise ValueError(f"exclude names rows {unknown[:5]} that are not in the table{source_of(df)}")
            used &= ~prepared.index.isin(ex)
    if exclude_highest:
        if exclude_highest < 0:
            raise ValueError(f"exclude_highest must be >= 0, got {exclude_highest}")
        candidates = np.flatnonzero(used)
        order = candidates[np.argsort(prepared.y[candidates], kind="stable")]
        used[order[len(order) - exclude_highest:] if exclude_highest < len(order) else order] = False
    return used


def _weights(df: pd.DataFrame, weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    if isinstance(weights, str):
        if weights not in df.columns:
            raise ValueError(f"weights column {weights!r} not found{source_of(df)}")
        w = pd.to_numeric(df[weights], errors="coerce").to_numpy(dtype=float)
    else:
        w = np.asarray(weights, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"weights have shape {w.shape}, expected ({n},) (one per row)")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        what = f" ({weights!r}{source_of(df)})" if isinstance(weights, str) else ""
        raise ValueError(f"weights{what} must be finite and >= 0")
    return w


def fit(df: pd.DataFrame, form: str | Form, x: Mapping[str, str], y: str, *, delta: float = DEFAULT_DELTA,
        weights: str | Sequence[float] | None = None, exclude=None, exclude_highest: int = 0,
        grid: Mapping[str, Sequence[float]] | np.ndarray | None = None, max_starts: int | None = None,
        seed: int = 0, ftol: float = DEFAULT_FTOL, gtol: float = DEFAULT_GTOL,
        maxiter: int = DEFAULT_MAXITER, n_polish: int = 5, bootstrap: int = 0, runs: str | Sequence | None = None,
        ci: float = 0.95) -> FitResult:
    """Fit `form` to `df` by multi-start L-BFGS-B on the summed Huber loss of log residuals.

    x: role -> column or expression (e.g. {"N": "Model Size", "D": "Training FLOP/(6*Model Size)"}).
    y: the target column (loss in nats, or an error rate); must be > 0.
    weights: column name or array (one per row) multiplying each point's Huber loss.
    exclude: boolean mask or row labels to leave out; exclude_highest: also drop the K rows
    with the highest target among the rest (Besiroglu et al. drop 5).
    grid: {param: values} in optimisation space (see `form.params`) or an array of starts;
    max_starts subsamples a larger grid (fixed `seed`). n_polish: how many of the best distinct
    optima scipy's L-BFGS-B polishes. ftol, gtol, maxiter: stopping tolerances, relative to the
    objective's size (so a small objective does not stop early) and an iteration cap.
    bootstrap: if > 0, run `bootstrap_fit` with that many resamples of `runs` (a column name
    or one id per row; default each row is its own run) and attach CIs at level `ci`.
    The result's `identified` / `reasons` say whether the data determine the law (see
    `analysis.identifiability`); an unidentified fit also raises an UnidentifiedFitWarning.
    """
    form = get_form(form)
    if not delta > 0:
        raise ValueError(f"Huber delta must be > 0, got {delta}")
    if isinstance(runs, str) and runs not in df.columns:
        raise ValueError(f"runs column {runs!r} not found{source_of(df)}")
    run_ids = df[runs].to_numpy() if isinstance(runs, str) else runs
    prepared = prepare_inputs(df, form, x, y)
    used = _used_rows(prepared, exclude, exclude_highest, df)
    w = _weights(df, weights, len(prepared.y))
    n_used = int((used & (w > 0)).sum())
    if n_used <= form.n_params:
        raise ValueError(f"too few points: form {form.name!r} has {form.n_params} parameters and needs more than "
                         f"{form.n_params} points, but only {n_used} remain after exclusions{source_of(df)}")
    starts = make_starts(form, grid, max_starts, seed)
    options = {"ftol": ftol, "gtol": gtol, "maxiter": maxiter}
    tic = time.perf_counter()
    fprep = form.prepare({k: v[used] for k, v in prepared.values.items()})
    sol = _solve(form, fprep, np.log(prepared.y[used]), w[used], delta, starts, options, n_polish)
    seconds = time.perf_counter() - tic
    message = sol.message if sol.converged else f"no start converged; best: {sol.message}"
    result = FitResult(
        form=form, params=form.to_natural(sol.theta), theta=sol.theta, objective=sol.objective,
        converged=sol.converged, message=message, x=dict(prepared.x), y_name=y, delta=delta,
        values=prepared.values, y=prepared.y, weights=w, used=used, index=prepared.index, starts=sol.table,
        seconds=seconds, source=df.attrs.get("source", ""), options=options,
    )
    if bootstrap:
        result = bootstrap_fit(result, n_boot=bootstrap, runs=run_ids, seed=seed, ci=ci)
    if not result.identified:
        warnings.warn(UnidentifiedFitWarning(
            f"the {form.name!r} fit is not identified (converged={result.converged}, identified=False): "
            f"{result.why}. Its parameters, and anything derived from them, are not estimates"), stacklevel=2)
    return result


def _bootstrap_starts(result: FitResult, n_starts: int) -> np.ndarray:
    """The best fit plus the next-best distinct local optima among the converged starts."""
    table = result.starts[result.starts["converged"]].sort_values("objective")
    chosen = [result.theta]
    for theta in table[list(result.form.params)].to_numpy():
        if len(chosen) >= n_starts:
            break
        if min(np.max(np.abs(theta - c)) for c in chosen) > 1e-2:
            chosen.append(theta)
    return np.array(chosen)


def bootstrap_fit(result: FitResult, n_boot: int = 200, runs: Sequence | None = None, seed: int = 0,
                  ci: float = 0.95, n_starts: int = 4) -> FitResult:
    """Run-level bootstrap: resample runs with replacement, refit, and attach percentile CIs.

    `runs` gives a run id per table row (several rows, e.g. checkpoints, may share a run);
    by default every row is its own run. Returns a copy of `result` with `bootstrap` (one row
    per replicate) and `ci` filled in. Each replicate reweights rows by how often their run
    was drawn (equivalent to refitting on the resampled table) and restarts L-BFGS from the
    best fit and up to `n_starts - 1` other local optima, all replicates in one batch.
    Replicates that fail to converge stay in `bootstrap` with converged=False and are left
    out of the CIs. The copy's identifiability includes the bootstrap check (CIs spanning
    orders of magnitude mark it unidentified).
    """
    if n_boot < 2:
        raise ValueError(f"bootstrap needs at least 2 resamples, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    run_ids = np.arange(len(result.y)) if runs is None else np.asarray(runs)
    if run_ids.shape != result.y.shape:
        raise ValueError(f"runs must give one id per table row ({len(result.y)}), got shape {run_ids.shape}")
    used_runs, inverse = np.unique(run_ids[result.used], return_inverse=True)
    rng = np.random.default_rng(seed)
    starts = _bootstrap_starts(result, n_starts)
    # Replicate b reweights each used row by how often its run was drawn; all replicates and
    # all their starts run as one batch (row b * k + j = replicate b, start j).
    counts = np.stack([np.bincount(rng.integers(0, len(used_runs), len(used_runs)), minlength=len(used_runs))
                       for _ in range(n_boot)])
    row_weights = result.weights[result.used][None, :] * counts[:, inverse]
    k = len(starts)
    form = result.form
    fprep = form.prepare({name: v[result.used] for name, v in result.values.items()})
    fun = _batched_objective(form, fprep, np.log(result.y[result.used]), np.repeat(row_weights, k, axis=0),
                             result.delta)
    lower, upper = _bounds(form)
    batch = batched_lbfgs(fun, np.tile(starts, (n_boot, 1)), lower, upper, ftol=result.options["ftol"],
                          gtol=result.options["gtol"], maxiter=result.options["maxiter"], history=_history(form))
    rows = []
    for b in range(n_boot):
        block = slice(b * k, (b + 1) * k)
        enough = int((row_weights[b] > 0).sum()) > result.n_params
        ok, fun_b = batch.converged[block] & enough, batch.fun[block]
        pick = int(np.argmin(np.where(ok, fun_b, np.inf))) if ok.any() else int(np.argmin(fun_b))
        theta = batch.x[b * k + pick]
        rows.append({**form.to_natural(theta), "objective": float(fun_b[pick]), "converged": bool(ok.any())})
    boot = pd.DataFrame(rows)
    good = boot[boot["converged"]]
    if good.empty:
        raise ValueError(f"none of the {n_boot} bootstrap refits converged; the fit is not stable enough for CIs")
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    ci_table = pd.DataFrame({
        "param": list(result.params),
        "estimate": list(result.params.values()),
        "lo": [float(good[p].quantile(lo_q)) for p in result.params],
        "hi": [float(good[p].quantile(hi_q)) for p in result.params],
        "se": [float(good[p].std(ddof=1)) for p in result.params],
    })
    return replace(result, bootstrap=boot, ci=ci_table, ci_level=ci)
