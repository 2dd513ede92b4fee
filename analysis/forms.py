"""Functional forms for scaling laws, fitted in log space with analytic gradients.

Every form writes log L as a log-sum-exp of terms that are linear in the optimisation
parameters (or close to it), as in Besiroglu et al.'s Chinchilla replication:

    log L = LSE(a - alpha log N, b - beta log D, e)   <=>   L = E + A/N^alpha + B/D^beta

with A = exp(a), B = exp(b), E = exp(e). The LSE keeps every evaluation finite whatever
the parameters, so the optimiser can wander without overflow.

A form maps optimisation-space parameters `theta` (shape [S, P], S = number of starts,
evaluated together) and prepared variables to log predictions [S, n] and their Jacobian.
It names its variables by role (N anchor params, M fetched params, Bk bank params,
D tokens) and says which of them may be zero (memory sizes are zero for dense baselines).

Memory sizes enter through an effective memory size

    M_eff = eta * M^mu * Bk^(1 - mu),   0 <= mu <= 1,

a geometric interpolation between "only the fetched parameters matter" (mu = 1) and "only
the bank matters" (mu = 0). Both are plausible (the paper reports monotone gains in fetch
size at a fixed bank and in bank size at a fixed fetch), so the data choose. M_eff is zero
exactly when the model has no memory, so dense rows reduce to the dense law with no
log(0) anywhere: its log is -inf and enters only through logaddexp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

Array = np.ndarray


@dataclass(frozen=True)
class Variable:
    """One input of a form: its role name, meaning, and whether zero is a valid value."""

    name: str
    meaning: str
    allow_zero: bool = False


@dataclass(frozen=True)
class Form:
    """A scaling-law functional form (see the module docstring for the conventions).

    To add a form, subclass and implement `_log_predict(theta [S, P], prepared)` returning
    log predictions [S, n] and one Jacobian column d(log L)/d(theta_j) per parameter (each
    [S, n] or broadcastable), plus `_to_natural` / `_from_natural`; then instantiate it with its
    names, default grid and bounds, and pass it to `register_form` (or directly to `fit`).
    Validation, natural-parameter dictionaries and predictions are shared.

    Identifiability (see `analysis.identifiability`) uses three optional declarations:
    `min_distinct` maps a variable (or a tuple of variables, counted jointly over rows where all
    are > 0) to how many distinct values the form needs (default: 2 of each variable);
    `exponents` names the natural parameters that are exponents, expected inside
    `exponent_range`; `scales` names the positive scale parameters (fitted as logs), whose
    magnitudes and bootstrap spreads are checked. `natural_params[j]` reports `params[j]`.
    """

    name: str
    formula: str
    variables: tuple[Variable, ...]
    params: tuple[str, ...]                 # optimisation-space names, in theta order
    natural_params: tuple[str, ...]         # reported names (A = exp(a), ...)
    default_grid: Mapping[str, tuple[float, ...]]
    bounds: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    default_max_starts: int | None = None   # subsample the default grid above this size
    min_distinct: Mapping[str | tuple[str, ...], int] = field(default_factory=dict)
    exponents: tuple[str, ...] = ()         # natural names of exponents (checked against exponent_range)
    scales: tuple[str, ...] = ()            # natural names of positive scale parameters (A, B, E, eta)
    exponent_range: tuple[float, float] = (0.01, 3.0)

    # ----- shared API ---------------------------------------------------------------
    @property
    def variable_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    @property
    def n_params(self) -> int:
        return len(self.params)

    def prepare(self, values: Mapping[str, Array]) -> dict[str, Array]:
        """Precompute logs and masks from raw variable arrays (validated by the caller)."""
        out: dict[str, Array] = {}
        for v in self.variables:
            x = np.asarray(values[v.name], dtype=float)
            with np.errstate(divide="ignore"):
                out["log" + v.name] = np.log(x)  # -inf for allowed zeros, masked below
        return out

    def log_predict(self, theta: Array, prepared: Mapping[str, Array]) -> tuple[Array, Array]:
        """Log predictions [S, n] and Jacobian d(log L)/d(theta) [S, n, P] for theta [S, P]."""
        pred, columns = self.log_predict_columns(theta, prepared)
        return pred, np.stack(np.broadcast_arrays(*columns), axis=-1)

    def log_predict_columns(self, theta: Array, prepared: Mapping[str, Array]) -> tuple[Array, list[Array]]:
        """Like `log_predict`, but the Jacobian as one [S, n] array per parameter (no [S, n, P]
        copy; the fitter contracts each column with the loss derivative)."""
        theta = np.atleast_2d(np.asarray(theta, dtype=float))
        if theta.shape[-1] != self.n_params:
            raise ValueError(f"form {self.name!r} takes {self.n_params} parameters {self.params}, "
                             f"got theta with last dimension {theta.shape[-1]}")
        return self._log_predict(theta, prepared)

    def predict(self, theta: Array, values: Mapping[str, Array]) -> Array:
        """Predictions in natural units (L, not log L) for one parameter vector."""
        logp, _ = self.log_predict(np.asarray(theta, dtype=float)[None, :], self.prepare(values))
        return np.exp(logp[0])

    def to_natural(self, theta: Array) -> dict[str, float]:
        """Reported parameters (A, B, E, ...) from optimisation-space theta [P]."""
        t = dict(zip(self.params, np.asarray(theta, dtype=float)))
        return {k: float(v) for k, v in self._to_natural(t).items()}

    def from_natural(self, natural: Mapping[str, float]) -> Array:
        """Optimisation-space theta [P] from reported parameters; inverse of `to_natural`."""
        missing = [k for k in self.natural_params if k not in natural]
        if missing:
            raise ValueError(f"form {self.name!r} needs parameters {list(self.natural_params)}; missing {missing}")
        t = self._from_natural(natural)
        return np.array([t[p] for p in self.params], dtype=float)

    def distinct_needed(self) -> dict[tuple[str, ...], int]:
        """Distinct values each variable (or tuple of variables, jointly) needs for the form's
        parameters to be identified: `min_distinct`, else 2 of every variable."""
        given = self.min_distinct or {v.name: 2 for v in self.variables}
        return {(k,) if isinstance(k, str) else tuple(k): int(n) for k, n in given.items()}

    def bounds_list(self) -> list[tuple[float | None, float | None]]:
        return [self.bounds.get(p, (None, None)) for p in self.params]

    def describe(self) -> str:
        vars_ = ", ".join(f"{v.name}: {v.meaning}" for v in self.variables)
        return f"{self.name}: {self.formula}  [{vars_}]"

    # ----- per-form pieces ----------------------------------------------------------
    def _log_predict(self, theta: Array, prepared: Mapping[str, Array]) -> tuple[Array, list[Array]]:
        raise NotImplementedError

    def _to_natural(self, t: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def _from_natural(self, nat: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError


# Terms more than this far below the largest contribute < 1e-130 of the sum. Clipping them
# keeps exp() out of subnormal numbers, which are ~100x slower on x86 and otherwise appear
# as soon as the optimiser tries large exponents.
_LSE_FLOOR = -300.0


def _lse(terms: list[Array]) -> tuple[Array, list[Array]]:
    """log(sum exp(terms)) and the softmax weight of each term (all [S, n])."""
    m = terms[0]
    for t in terms[1:]:
        m = np.maximum(m, t)
    exps = [np.exp(np.maximum(t - m, _LSE_FLOOR)) for t in terms]
    total = exps[0]
    for e in exps[1:]:
        total = total + e
    inv = 1.0 / total
    return m + np.log(total), [e * inv for e in exps]


def _log_positive(nat: Mapping[str, float], key: str) -> float:
    value = float(nat[key])
    if value <= 0:
        raise ValueError(f"parameter {key} must be > 0 (it is fitted as log {key}), got {value}")
    return float(np.log(value))


def _effective_memory(theta_h: Array, theta_mu: Array, prepared: Mapping[str, Array]):
    """log M_eff [S, n] (-inf for dense rows) and d log M_eff / d mu, for eta = exp(h)."""
    has_mem = prepared["has_memory"]
    log_m, log_bk = prepared["logM_safe"], prepared["logBk_safe"]
    h, mu = theta_h[:, None], theta_mu[:, None]
    log_meff = np.where(has_mem, h + mu * log_m + (1.0 - mu) * log_bk, -np.inf)
    dlog_meff_dmu = np.where(has_mem, log_m - log_bk, 0.0)
    return log_meff, dlog_meff_dmu


class _MemoryForm(Form):
    """Shared preparation for forms over (N, M, Bk, D)."""

    def prepare(self, values: Mapping[str, Array]) -> dict[str, Array]:
        out = super().prepare(values)
        m = np.asarray(values["M"], dtype=float)
        bk = np.asarray(values["Bk"], dtype=float)
        has_mem = (m > 0) & (bk > 0)
        out["has_memory"] = has_mem
        # Finite stand-ins for dense rows; every use is masked by has_memory.
        out["logM_safe"] = np.where(has_mem, out["logM"], 0.0)
        out["logBk_safe"] = np.where(has_mem, out["logBk"], 0.0)
        return out


class Chinchilla(Form):
    """Chinchilla (Hoffmann et al. 2022) law L(N, D) = E + A / N^alpha + B / D^beta.

    Fitted as log L = LSE(a - alpha log N, b - beta log D, e); A = e^a, B = e^b, E = e^e.
    The default grid is Besiroglu et al.'s: alpha, beta in {0, 0.5, ..., 2}, e in
    {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (4,500 starts). Unbounded, as in their refit.
    """

    def _log_predict(self, theta, prepared):
        a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
        log_n, log_d = prepared["logN"], prepared["logD"]
        e_term = np.broadcast_to(e, (theta.shape[0], log_n.size))
        pred, (w1, w2, w3) = _lse([a - alpha * log_n, b - beta * log_d, e_term])
        return pred, [w1, w2, w3, -w1 * log_n, -w2 * log_d]

    def _to_natural(self, t):
        return {"A": np.exp(t["a"]), "B": np.exp(t["b"]), "E": np.exp(t["e"]), "alpha": t["alpha"], "beta": t["beta"]}

    def _from_natural(self, nat):
        return {"a": _log_positive(nat, "A"), "b": _log_positive(nat, "B"), "e": _log_positive(nat, "E"),
                "alpha": float(nat["alpha"]), "beta": float(nat["beta"])}


class PowerLaw(Form):
    """Saturating power law in one variable: y(N) = E + A / N^alpha.

    Use it for loss against one scale variable at a fixed other (e.g. tokens fixed), or for
    an error rate (1 - probe accuracy) against parameters; fitted as
    log y = LSE(a - alpha log N, e).
    """

    def _log_predict(self, theta, prepared):
        a, e, alpha = (theta[:, i:i + 1] for i in range(3))
        log_n = prepared["logN"]
        pred, (w1, w2) = _lse([a - alpha * log_n, np.broadcast_to(e, (theta.shape[0], log_n.size))])
        return pred, [w1, w2, -w1 * log_n]

    def _to_natural(self, t):
        return {"A": np.exp(t["a"]), "E": np.exp(t["e"]), "alpha": t["alpha"]}

    def _from_natural(self, nat):
        return {"a": _log_positive(nat, "A"), "e": _log_positive(nat, "E"), "alpha": float(nat["alpha"])}


class MemoryEffective(_MemoryForm):
    """'Effective parameters' form: memory acts as extra anchor parameters.

        L = E + A / (N + eta * M^mu * Bk^(1-mu))^alpha + B / D^beta

    Dense models (M = Bk = 0) are exactly Chinchilla with the same A, B, E, alpha, beta, so
    the memory's worth reads directly as a parameter multiplier (N + M_eff) / N. Fitted as
    log L = LSE(a - alpha log(N + M_eff), b - beta log D, e), log(N + M_eff) via logaddexp;
    eta = e^h, 0 <= mu <= 1.
    """

    def _log_predict(self, theta, prepared):
        a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
        log_meff, dmu = _effective_memory(theta[:, 5], theta[:, 6], prepared)
        log_n, log_d = prepared["logN"], prepared["logD"]
        log_neff = np.logaddexp(log_n, log_meff)
        share = np.exp(log_meff - log_neff)  # M_eff / (N + M_eff); 0 for dense rows
        pred, (w1, w2, w3) = _lse([a - alpha * log_neff, b - beta * log_d, np.broadcast_to(e, log_neff.shape)])
        d_h = -w1 * alpha * share
        return pred, [w1, w2, w3, -w1 * log_neff, -w2 * log_d, d_h, d_h * dmu]

    def _to_natural(self, t):
        return {"A": np.exp(t["a"]), "B": np.exp(t["b"]), "E": np.exp(t["e"]), "alpha": t["alpha"],
                "beta": t["beta"], "eta": np.exp(t["h"]), "mu": t["mu"]}

    def _from_natural(self, nat):
        return {"a": _log_positive(nat, "A"), "b": _log_positive(nat, "B"), "e": _log_positive(nat, "E"),
                "alpha": float(nat["alpha"]), "beta": float(nat["beta"]), "h": _log_positive(nat, "eta"),
                "mu": float(nat["mu"])}


class MemoryAdditive(_MemoryForm):
    """Additive form with its own memory ('knowledge') term and exponent:

        L = E + A / N^alpha + B / D^beta + C / (N + eta * M^mu * Bk^(1-mu))^gamma

    The anchor-only term A/N^alpha is loss memory cannot remove (general ability); the
    knowledge term, with its own coefficient C and exponent gamma, shrinks with anchor
    parameters and memory alike. A bare C / M_eff^gamma term would diverge for dense rows
    (M = 0) and make memory look harmful at small sizes; inside N + M_eff it stays finite and
    dense models reduce to E + A/N^alpha + C/N^gamma + B/D^beta. Compare it with
    `memory_effective` (AIC/BIC) to ask whether memory needs its own exponent.
    """

    def _log_predict(self, theta, prepared):
        a, b, c, e, alpha, beta, gamma = (theta[:, i:i + 1] for i in range(7))
        log_meff, dmu = _effective_memory(theta[:, 7], theta[:, 8], prepared)
        log_n, log_d = prepared["logN"], prepared["logD"]
        log_neff = np.logaddexp(log_n, log_meff)
        share = np.exp(log_meff - log_neff)
        terms = [a - alpha * log_n, b - beta * log_d, c - gamma * log_neff, np.broadcast_to(e, log_neff.shape)]
        pred, (w1, w2, w3, w4) = _lse(terms)
        d_h = -w3 * gamma * share
        return pred, [w1, w2, w3, w4, -w1 * log_n, -w2 * log_d, -w3 * log_neff, d_h, d_h * dmu]

    def _to_natural(self, t):
        return {"A": np.exp(t["a"]), "B": np.exp(t["b"]), "C": np.exp(t["c"]), "E": np.exp(t["e"]),
                "alpha": t["alpha"], "beta": t["beta"], "gamma": t["gamma"], "eta": np.exp(t["h"]), "mu": t["mu"]}

    def _from_natural(self, nat):
        return {"a": _log_positive(nat, "A"), "b": _log_positive(nat, "B"), "c": _log_positive(nat, "C"),
                "e": _log_positive(nat, "E"), "alpha": float(nat["alpha"]), "beta": float(nat["beta"]),
                "gamma": float(nat["gamma"]), "h": _log_positive(nat, "eta"), "mu": float(nat["mu"])}


def _steps(lo: float, hi: float, step: float) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(np.arange(lo, hi + step / 2, step), 10))


_N = Variable("N", "anchor (non-embedding) parameters")
_D = Variable("D", "training tokens")
_M = Variable("M", "fetched memory parameters per token (0 for dense)", allow_zero=True)
_BK = Variable("Bk", "memory bank parameters (0 for dense)", allow_zero=True)
_MU_BOUNDS = {"mu": (0.0, 1.0)}

FORMS: dict[str, Form] = {
    f.name: f
    for f in (
        Chinchilla(
            name="chinchilla", formula="L = E + A/N^alpha + B/D^beta", variables=(_N, _D),
            params=("a", "b", "e", "alpha", "beta"), natural_params=("A", "B", "E", "alpha", "beta"),
            default_grid={"a": _steps(0, 25, 5), "b": _steps(0, 25, 5), "e": _steps(-1, 1, 0.5),
                          "alpha": _steps(0, 2, 0.5), "beta": _steps(0, 2, 0.5)},
            min_distinct={"N": 3, "D": 3}, exponents=("alpha", "beta"), scales=("A", "B", "E"),
        ),
        PowerLaw(
            name="power_law", formula="y = E + A/N^alpha", variables=(_N,),
            params=("a", "e", "alpha"), natural_params=("A", "E", "alpha"),
            default_grid={"a": _steps(0, 25, 2.5), "e": _steps(-4, 1, 1), "alpha": _steps(0, 2, 0.25)},
            min_distinct={"N": 3}, exponents=("alpha",), scales=("A", "E"),
        ),
        MemoryEffective(
            name="memory_effective", formula="L = E + A/(N + eta*M^mu*Bk^(1-mu))^alpha + B/D^beta",
            variables=(_N, _M, _BK, _D),
            params=("a", "b", "e", "alpha", "beta", "h", "mu"),
            natural_params=("A", "B", "E", "alpha", "beta", "eta", "mu"),
            default_grid={"a": _steps(0, 20, 5), "b": _steps(0, 20, 5), "e": _steps(-1, 1, 1),
                          "alpha": (0.25, 0.5, 1.0), "beta": (0.25, 0.5, 1.0), "h": _steps(-6, 2, 2),
                          "mu": (0.25, 0.5, 0.75)},
            bounds=_MU_BOUNDS, default_max_starts=200,
            min_distinct={"N": 3, "D": 3, ("M", "Bk"): 2}, exponents=("alpha", "beta"),
            scales=("A", "B", "E", "eta"),
        ),
        MemoryAdditive(
            name="memory_additive", formula="L = E + A/N^alpha + B/D^beta + C/(N + eta*M^mu*Bk^(1-mu))^gamma",
            variables=(_N, _M, _BK, _D),
            params=("a", "b", "c", "e", "alpha", "beta", "gamma", "h", "mu"),
            natural_params=("A", "B", "C", "E", "alpha", "beta", "gamma", "eta", "mu"),
            default_grid={"a": _steps(0, 20, 5), "b": _steps(0, 20, 5), "c": _steps(0, 20, 5), "e": _steps(-1, 1, 1),
                          "alpha": (0.25, 0.5, 1.0), "beta": (0.25, 0.5, 1.0), "gamma": (0.25, 0.5, 1.0),
                          "h": _steps(-6, 2, 2), "mu": (0.25, 0.5, 0.75)},
            bounds=_MU_BOUNDS, default_max_starts=250,
            min_distinct={"N": 3, "D": 3, ("M", "Bk"): 3}, exponents=("alpha", "beta", "gamma"),
            scales=("A", "B", "C", "E", "eta"),
        ),
    )
}


def register_form(form: Form, replace: bool = False) -> Form:
    """Add a user-defined form (a Form subclass instance) to the registry used by name lookups
    and the CLI. Its default grid must give values for exactly its optimisation parameters."""
    if not isinstance(form, Form):
        raise ValueError(f"expected a Form instance, got {type(form).__name__}")
    if form.name in FORMS and not replace:
        raise ValueError(f"a form named {form.name!r} is already registered (pass replace=True to override)")
    if set(form.default_grid) != set(form.params):
        raise ValueError(f"form {form.name!r}: default_grid keys {sorted(form.default_grid)} must equal its "
                         f"parameters {sorted(form.params)}")
    if len(form.natural_params) != len(form.params):
        raise ValueError(f"form {form.name!r}: {len(form.params)} parameters but "
                         f"{len(form.natural_params)} natural parameter names")
    unknown = [p for p in dict.fromkeys((*form.exponents, *form.scales)) if p not in form.natural_params]
    if unknown:
        raise ValueError(f"form {form.name!r}: exponents/scales {unknown} are not among its natural parameters "
                         f"{list(form.natural_params)}")
    bad = [k for k in form.distinct_needed() if not set(k) <= set(form.variable_names)]
    if bad:
        raise ValueError(f"form {form.name!r}: min_distinct names {bad}, which are not among its variables "
                         f"{list(form.variable_names)}")
    FORMS[form.name] = form
    return form


def get_form(form: str | Form) -> Form:
    """The form registered under `form` (or `form` itself); ValueError naming the known forms."""
    if isinstance(form, Form):
        return form
    try:
        return FORMS[form]
    except (KeyError, TypeError):
        raise ValueError(f"unknown form {form!r}; known forms: {', '.join(sorted(FORMS))}") from None


def list_forms() -> "list[dict[str, object]]":
    """Name, formula, variables and parameters of every registered form."""
    return [{"form": f.name, "formula": f.formula, "variables": [v.name for v in f.variables],
             "params": list(f.natural_params)} for f in FORMS.values()]
