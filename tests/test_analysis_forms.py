"""Functional forms: analytic gradients, vectorisation over starts, dense rows, parameter transforms."""

import numpy as np
import pytest

from analysis.forms import FORMS, get_form

RNG = np.random.default_rng(0)
N = np.array([1e7, 3e7, 1e8, 3e8, 1e9, 5e7, 2e8])
D = np.array([1e9, 1e10, 3e9, 2e10, 1e11, 5e9, 4e9])
M = np.array([0, 0, 1e6, 4e6, 1.6e7, 2e6, 0])        # dense rows have no memory at all
BK = np.array([0, 0, 1e8, 1e9, 1e10, 3e8, 0])
VALUES = {"N": N, "D": D, "M": M, "Bk": BK}


def _values(form):
    return {v: VALUES[v] for v in form.variable_names}


def _random_thetas(form, n):
    base = np.array([np.mean(form.default_grid[p]) for p in form.params])
    thetas = base + RNG.normal(scale=0.3, size=(n, form.n_params))
    if "mu" in form.params:
        thetas[:, form.params.index("mu")] = RNG.uniform(0.1, 0.9, n)
    return thetas


@pytest.mark.parametrize("name", sorted(FORMS))
def test_analytic_gradient_matches_finite_differences(name):
    form = get_form(name)
    prepared = form.prepare(_values(form))
    for theta in _random_thetas(form, 3):
        _, jac = form.log_predict(theta[None], prepared)
        for j in range(form.n_params):
            step = np.zeros(form.n_params)
            step[j] = 1e-6
            up, _ = form.log_predict((theta + step)[None], prepared)
            down, _ = form.log_predict((theta - step)[None], prepared)
            numeric = (up - down)[0] / 2e-6
            np.testing.assert_allclose(jac[0, :, j], numeric, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name}: d/d{form.params[j]}")


@pytest.mark.parametrize("name", sorted(FORMS))
def test_batched_evaluation_equals_one_start_at_a_time(name):
    form = get_form(name)
    prepared = form.prepare(_values(form))
    thetas = _random_thetas(form, 5)
    pred, jac = form.log_predict(thetas, prepared)
    assert pred.shape == (5, len(N)) and jac.shape == (5, len(N), form.n_params)
    for s, theta in enumerate(thetas):
        p1, j1 = form.log_predict(theta[None], prepared)
        np.testing.assert_allclose(pred[s], p1[0])
        np.testing.assert_allclose(jac[s], j1[0])
    assert np.all(np.isfinite(pred)) and np.all(np.isfinite(jac))


def test_predictions_match_the_written_formulas():
    chin = get_form("chinchilla")
    nat = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
    expected = 1.69 + 406.4 / N**0.34 + 410.7 / D**0.28
    np.testing.assert_allclose(chin.predict(chin.from_natural(nat), {"N": N, "D": D}), expected, rtol=1e-12)

    eff = get_form("memory_effective")
    nat_e = {**nat, "eta": 0.5, "mu": 0.3}
    n_eff = N + 0.5 * np.where(M > 0, M**0.3 * BK**0.7, 0.0)
    expected = 1.69 + 406.4 / n_eff**0.34 + 410.7 / D**0.28
    np.testing.assert_allclose(eff.predict(eff.from_natural(nat_e), VALUES), expected, rtol=1e-12)

    add = get_form("memory_additive")
    nat_a = {**nat_e, "C": 50.0, "gamma": 0.2}
    expected = 1.69 + 406.4 / N**0.34 + 410.7 / D**0.28 + 50.0 / n_eff**0.2
    np.testing.assert_allclose(add.predict(add.from_natural(nat_a), VALUES), expected, rtol=1e-12)


def test_dense_rows_of_memory_forms_reduce_to_dense_laws():
    chin, eff = get_form("chinchilla"), get_form("memory_effective")
    nat = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
    dense = M == 0
    mem_pred = eff.predict(eff.from_natural({**nat, "eta": 3.0, "mu": 0.5}), VALUES)
    chin_pred = chin.predict(chin.from_natural(nat), {"N": N, "D": D})
    np.testing.assert_allclose(mem_pred[dense], chin_pred[dense], rtol=1e-12)
    assert np.all(mem_pred[~dense] < chin_pred[~dense])  # memory only ever helps in this form
    # eta and mu do not act on dense rows: their gradient there is exactly zero.
    _, jac = eff.log_predict(eff.from_natural({**nat, "eta": 3.0, "mu": 0.5})[None], eff.prepare(VALUES))
    assert np.all(jac[0, dense, 5:] == 0)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_natural_parameters_round_trip(name):
    form = get_form(name)
    theta = _random_thetas(form, 1)[0]
    natural = form.to_natural(theta)
    assert list(natural) == list(form.natural_params)
    np.testing.assert_allclose(form.from_natural(natural), theta, rtol=1e-12)


def test_unknown_form_and_bad_natural_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unknown form 'kaplan'.*chinchilla"):
        get_form("kaplan")
    chin = get_form("chinchilla")
    with pytest.raises(ValueError, match=r"missing \['beta'\]"):
        chin.from_natural(dict(A=1, B=1, E=1, alpha=0.3))
    with pytest.raises(ValueError, match="E must be > 0"):
        chin.from_natural(dict(A=1, B=1, E=0, alpha=0.3, beta=0.3))
    with pytest.raises(ValueError, match="takes 5 parameters"):
        chin.log_predict(np.zeros((1, 4)), chin.prepare({"N": N, "D": D}))


def test_default_chinchilla_grid_is_besiroglus():
    grid = get_form("chinchilla").default_grid
    assert grid["a"] == grid["b"] == (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    assert grid["e"] == (-1.0, -0.5, 0.0, 0.5, 1.0)
    assert grid["alpha"] == grid["beta"] == (0.0, 0.5, 1.0, 1.5, 2.0)


def test_user_defined_form_registers_and_fits():
    from analysis import design_grid, fit, register_form, simulate
    from analysis.forms import FORMS, Form, Variable, _lse

    class DataLimited(Form):
        """L(D) = E + B / D^beta, fitted as LSE(b - beta log D, e)."""

        def _log_predict(self, theta, prepared):
            b, e, beta = (theta[:, i:i + 1] for i in range(3))
            log_d = prepared["logD"]
            pred, (w1, w2) = _lse([b - beta * log_d, np.broadcast_to(e, (theta.shape[0], log_d.size))])
            return pred, [w1, w2, -w1 * log_d]

        def _to_natural(self, t):
            return {"B": np.exp(t["b"]), "E": np.exp(t["e"]), "beta": t["beta"]}

        def _from_natural(self, nat):
            return {"b": np.log(nat["B"]), "e": np.log(nat["E"]), "beta": nat["beta"]}

    form = DataLimited(name="data_limited_test", formula="L = E + B/D^beta", variables=(Variable("D", "tokens"),),
                       params=("b", "e", "beta"), natural_params=("B", "E", "beta"),
                       default_grid={"b": (0.0, 5.0, 10.0), "e": (0.0, 1.0), "beta": (0.2, 0.5)})
    try:
        register_form(form)
        with pytest.raises(ValueError, match="already registered"):
            register_form(form)
        runs = simulate("data_limited_test", {"B": 300.0, "E": 2.0, "beta": 0.3},
                        design_grid(D=np.geomspace(1e8, 1e12, 12)), noise=0.002, seed=0)
        result = fit(runs, "data_limited_test", {"D": "D"}, "loss")
        assert result.converged and result.params["beta"] == pytest.approx(0.3, abs=0.03)
    finally:
        FORMS.pop("data_limited_test", None)
    with pytest.raises(ValueError, match="default_grid keys"):
        register_form(DataLimited(name="bad_grid", formula="", variables=form.variables, params=form.params,
                                  natural_params=form.natural_params, default_grid={"b": (0.0,)}))
