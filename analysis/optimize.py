"""Batched multi-start L-BFGS with box bounds, vectorised over starts with numpy.

Thousands of small problems (one per start of a grid, or per bootstrap replicate) run in
lock step: one call evaluates the objective and gradient for every start still running,
which is several times cheaper than as many scipy calls on 2 cores. Each start keeps its
own L-BFGS history, step length and stopping state. Bounds are handled by projection
(variables pinned at a bound with the gradient pushing outward are frozen for the step);
steps come from a weak-Wolfe line search that also lengthens steps (robust on the kinks
of a Huber loss). Stopping mirrors scipy's L-BFGS-B tests (relative reduction of f below
`ftol`, projected gradient below `gtol`) but both are relative to the objective's own size
|f| rather than to max(|f|, 1): an objective that is small because there are few points or
small residuals would otherwise stop the search early, the "loss scale" artefact that
Besiroglu et al. found in the original Chinchilla fit. The fitter polishes the winners with
scipy's own L-BFGS-B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# fun(theta [k, P], rows [k]) -> (f [k], grad [k, P]); rows are the starts' indices.
BatchedObjective = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]

STATUS = {0: "running", 1: "converged: relative reduction of f <= ftol",
          2: "converged: projected gradient <= gtol * |f|", 3: "stopped: line search found no decrease",
          4: "stopped: iteration limit reached", 5: "stopped: non-finite objective at the start"}
_CONVERGED = (1, 2)
_TINY = 1e-300  # floor for |f| in relative tests (an exact fit reaches f = 0)


@dataclass
class BatchResult:
    """Final point, objective, status code (see STATUS) and work done, per start."""

    x: np.ndarray
    fun: np.ndarray
    status: np.ndarray
    nit: np.ndarray
    nfev: np.ndarray

    @property
    def converged(self) -> np.ndarray:
        return np.isin(self.status, _CONVERGED)

    def message(self, i: int) -> str:
        return STATUS[int(self.status[i])]


def _project(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, lower), upper)


def _free_mask(x, g, lower, upper):
    """False where a variable sits on a bound and the gradient pushes it outward."""
    at_lo = (x <= lower) & (g > 0)
    at_hi = (x >= upper) & (g < 0)
    return ~(at_lo | at_hi)


def _two_loop(g: np.ndarray, s_hist: np.ndarray, y_hist: np.ndarray, rho: np.ndarray, newest: np.ndarray) -> np.ndarray:
    """L-BFGS direction -H g for each row; empty history slots hold zeros and rho = 0 (no-ops).

    `newest` [k, m] orders each row's slots from newest (column 0) to oldest; only as many
    slots as the fullest row has are visited.
    """
    k, m = newest.shape
    rows = np.arange(k)[:, None]
    # Slot-major copies [m, k, P]: each slot is then one contiguous block.
    s = np.ascontiguousarray(s_hist[rows, newest].swapaxes(0, 1))
    y = np.ascontiguousarray(y_hist[rows, newest].swapaxes(0, 1))
    r = np.ascontiguousarray(rho[rows, newest].T)
    q = g.copy()
    alphas = np.empty((m, k))
    for i in range(m):
        alphas[i] = r[i] * np.einsum("kp,kp->k", s[i], q)
        q -= alphas[i][:, None] * y[i]
    # Initial Hessian scale from the newest pair (1 where there is none).
    yy = np.einsum("kp,kp->k", y[0], y[0])
    sy = np.einsum("kp,kp->k", s[0], y[0])
    gamma = np.where((yy > 0) & (sy > 0), sy / np.where(yy > 0, yy, 1.0), 1.0)
    q *= gamma[:, None]
    for i in range(m - 1, -1, -1):
        beta = r[i] * np.einsum("kp,kp->k", y[i], q)
        q += s[i] * (alphas[i] - beta)[:, None]
    return -q


def _weak_wolfe(fun, act, x, f, g, d, step, lower, upper, nfev, c1, c2, max_trials):
    """Bracketing weak-Wolfe line search (Lewis & Overton 2013), vectorised over starts.

    Suited to nonsmooth objectives such as a Huber loss with a small delta: an Armijo-only
    backtracking search never lengthens a step and crawls along flat valleys. Each start
    keeps a bracket [lo, hi]: failing sufficient decrease shrinks hi, passing it while the
    slope is still steep raises lo (doubling until a hi is found). Inside a bracket the next
    t minimises the quadratic through f(lo), f'(lo) and f(hi), kept within the first half of
    the bracket (plain bisection needs more trials, and in lock step every iteration waits
    for the slowest start). A start that runs out of trials keeps its best sufficient-decrease
    point, if any.
    """
    k = len(act)
    x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
    accepted = np.zeros(k, dtype=bool)
    lo, hi, t = np.zeros(k), np.full(k, np.inf), step.copy()
    f_lo, slope_lo = f.copy(), np.einsum("kp,kp->k", g, d)
    pending = np.arange(k)
    for _ in range(max_trials):
        if pending.size == 0:
            break
        trial = _project(x[pending] + t[pending, None] * d[pending], lower, upper)
        ft, gt = fun(trial, act[pending])
        nfev[act[pending]] += 1
        move = trial - x[pending]
        finite = np.isfinite(ft) & np.all(np.isfinite(gt), axis=1)
        with np.errstate(invalid="ignore"):
            armijo = finite & (ft <= f[pending] + c1 * np.einsum("kp,kp->k", g[pending], move))
            flat_enough = np.einsum("kp,kp->k", gt, move) >= c2 * np.einsum("kp,kp->k", g[pending], move)
        # Keep the latest sufficient-decrease point: the fallback if the trials run out.
        rows = pending[armijo]
        x_new[rows], f_new[rows], g_new[rows] = trial[armijo], ft[armijo], gt[armijo]
        done = armijo & flat_enough
        accepted[pending[done]] = True
        short = pending[armijo & ~flat_enough]
        lo[short], f_lo[short] = t[short], ft[(armijo & ~flat_enough)]
        slope_lo[short] = np.einsum("kp,kp->k", gt[armijo & ~flat_enough], d[short])
        failed = ~armijo
        hi[pending[failed]] = t[pending[failed]]
        f_hi = np.where(finite, ft, np.inf)
        pending, f_hi = pending[~done], f_hi[~done]
        width = hi[pending] - lo[pending]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            curv = (f_hi - f_lo[pending] - slope_lo[pending] * width) / (width * width)
            t_quad = lo[pending] - slope_lo[pending] / (2 * curv)
        t_quad = np.where(np.isfinite(t_quad) & (curv > 0), t_quad, lo[pending] + 0.5 * width)
        inside = np.clip(t_quad, lo[pending] + 0.05 * width, lo[pending] + 0.5 * width)
        t[pending] = np.where(np.isinf(hi[pending]), np.minimum(2.0 * t[pending], 1e12), inside)
    accepted |= lo > 0  # ran out of trials after a sufficient decrease: take that point
    return x_new, f_new, g_new, accepted


def batched_lbfgs(fun: BatchedObjective, x0: np.ndarray, lower: np.ndarray | None = None,
                  upper: np.ndarray | None = None, *, history: int = 20, ftol: float = 1e-9,
                  gtol: float = 1e-8, maxiter: int = 2000, max_linesearch: int = 40,
                  c1: float = 1e-4, c2: float = 0.9) -> BatchResult:
    """Minimise `fun` from every row of `x0` [S, P] at once (see the module docstring)."""
    x = np.array(x0, dtype=float, copy=True)
    n_starts, n_par = x.shape
    lower = np.full(n_par, -np.inf) if lower is None else np.asarray(lower, dtype=float)
    upper = np.full(n_par, np.inf) if upper is None else np.asarray(upper, dtype=float)
    x = _project(x, lower, upper)
    f, g = fun(x, np.arange(n_starts))
    nfev = np.ones(n_starts, dtype=int)
    nit = np.zeros(n_starts, dtype=int)
    status = np.where(np.isfinite(f) & np.all(np.isfinite(g), axis=1), 0, 5)
    s_hist = np.zeros((n_starts, history, n_par))
    y_hist = np.zeros((n_starts, history, n_par))
    rho = np.zeros((n_starts, history))
    n_pairs = np.zeros(n_starts, dtype=int)  # pairs stored so far; slot = count % history

    for _ in range(maxiter):
        act = np.flatnonzero(status == 0)
        if act.size == 0:
            break
        xa, fa, ga = x[act], f[act], g[act]
        free = _free_mask(xa, ga, lower, upper)
        pg = np.where(free, ga, 0.0)
        small = np.max(np.abs(pg), axis=1) <= gtol * np.maximum(np.abs(fa), _TINY)
        status[act[small]] = 2
        keep = ~small
        act, xa, fa, ga, free, pg = act[keep], xa[keep], fa[keep], ga[keep], free[keep], pg[keep]
        if act.size == 0:
            break
        depth = int(min(history, n_pairs[act].max()))
        if depth:
            newest = (n_pairs[act, None] - 1 - np.arange(depth)[None, :]) % history
            d = np.where(free, _two_loop(pg, s_hist[act], y_hist[act], rho[act], newest), 0.0)
        else:
            d = -pg
        slope = np.einsum("kp,kp->k", pg, d)
        bad = ~(slope < 0)  # not a descent direction: forget the history, go down the gradient
        if bad.any():
            reset = act[bad]
            s_hist[reset] = y_hist[reset] = 0.0
            rho[reset] = 0.0
            n_pairs[reset] = 0
            d[bad] = -pg[bad]
            slope[bad] = -np.einsum("kp,kp->k", pg[bad], pg[bad])
        # First step of a start without history: unit length in the sup norm, as scipy does.
        fresh = n_pairs[act] == 0
        step = np.where(fresh, np.minimum(1.0, 1.0 / np.maximum(np.max(np.abs(d), axis=1), 1e-300)), 1.0)

        x_new, f_new, g_new, accepted = _weak_wolfe(fun, act, xa, fa, ga, d, step, lower, upper,
                                                     nfev, c1, c2, max_linesearch)
        pending = np.flatnonzero(~accepted)
        status[act[pending]] = 3
        moved = np.setdiff1d(np.arange(act.size), pending)
        rows = act[moved]
        nit[rows] += 1
        s_vec = x_new[moved] - xa[moved]
        y_vec = g_new[moved] - ga[moved]
        sy = np.einsum("kp,kp->k", s_vec, y_vec)
        yy = np.einsum("kp,kp->k", y_vec, y_vec)
        store = sy > np.finfo(float).eps * yy  # curvature condition, as in L-BFGS-B
        slot = n_pairs[rows] % history
        s_hist[rows[store], slot[store]] = s_vec[store]
        y_hist[rows[store], slot[store]] = y_vec[store]
        rho[rows[store], slot[store]] = 1.0 / sy[store]
        n_pairs[rows[store]] += 1
        f_old = f[rows]
        x[rows], f[rows], g[rows] = x_new[moved], f_new[moved], g_new[moved]
        rel = (f_old - f[rows]) / np.maximum(np.maximum(np.abs(f_old), np.abs(f[rows])), _TINY)
        status[rows[rel <= ftol]] = 1
    status[status == 0] = 4
    return BatchResult(x=x, fun=f, status=status, nit=nit, nfev=nfev)
