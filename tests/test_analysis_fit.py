"""The multi-start Huber fitter: round trips, bootstrap, weights, exclusions, and bad input."""

import numpy as np
import pandas as pd
import pytest

from analysis import bootstrap_fit, design_grid, fit, simulate
from analysis.optimize import batched_lbfgs

TRUE = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
X = {"N": "N", "D": "D"}


def _chinchilla_runs(noise=0.01, seed=0):
    design = design_grid(N=np.geomspace(1e7, 3e9, 7), D=np.geomspace(1e9, 3e11, 6))
    return simulate("chinchilla", TRUE, design, noise=noise, seed=seed)


@pytest.fixture(scope="module")
def runs():
    return _chinchilla_runs()


@pytest.fixture(scope="module")
def fitted(runs):
    return fit(runs, "chinchilla", X, "loss", max_starts=600, bootstrap=200, ci=0.99)


def test_round_trip_recovers_known_law_within_bootstrap_ci(fitted):
    assert fitted.converged
    ci = fitted.ci.set_index("param")
    for name, value in TRUE.items():
        assert ci.loc[name, "lo"] <= value <= ci.loc[name, "hi"], (name, value, ci.loc[name].to_dict())
        assert ci.loc[name, "lo"] <= fitted.params[name] <= ci.loc[name, "hi"]
    assert abs(fitted.params["alpha"] - TRUE["alpha"]) < 0.05
    assert abs(fitted.params["E"] - TRUE["E"]) < 0.2
    assert fitted.bootstrap["converged"].all() and len(fitted.bootstrap) == 200
    summary = fitted.summary()
    assert list(summary.columns) == ["param", "estimate", "lo", "hi", "se", "identified", "issue"]
    assert np.isfinite(summary[["estimate", "lo", "hi", "se"]].to_numpy()).all()
    assert fitted.identified and fitted.reasons == () and summary["identified"].all() and (summary["issue"] == "").all()


def test_noise_free_data_is_recovered_exactly():
    result = fit(_chinchilla_runs(noise=0.0), "chinchilla", X, "loss", max_starts=300)
    for name, value in TRUE.items():
        assert result.params[name] == pytest.approx(value, rel=1e-3), name
    assert result.objective < 1e-10


def test_memory_form_round_trip():
    true = dict(A=400.0, B=1500.0, E=1.8, alpha=0.34, beta=0.3, eta=0.5, mu=0.4)
    dense = design_grid(N=[1e7, 3e7, 1e8, 3e8, 1e9], M=[0], Bk=[0], D=[1e9, 3e9, 1e10, 3e10])
    memory = design_grid(N=[1e7, 3e7, 1e8], M=[1e6, 4e6, 1.6e7], Bk=[1e8, 1e9, 1e10], D=[3e9, 3e10])
    runs = simulate("memory_effective", true, pd.concat([dense, memory], ignore_index=True), noise=0.003, seed=1)
    result = fit(runs, "memory_effective", {r: r for r in ("N", "M", "Bk", "D")}, "loss")
    assert result.converged
    assert result.params["mu"] == pytest.approx(0.4, abs=0.05)
    assert result.params["eta"] == pytest.approx(0.5, rel=0.2)
    assert result.params["alpha"] == pytest.approx(0.34, abs=0.03)


def test_starts_table_records_every_start(fitted):
    table = fitted.starts
    assert len(table) == 600
    assert {"init_a", "a", "objective", "converged", "nit", "nfev", "status"} <= set(table.columns)
    assert fitted.objective <= table["objective"].min() + 1e-12


def test_exclusions_weights_and_highest_loss_exclusion(runs):
    small = dict(max_starts=80)
    base = fit(runs.iloc[5:], "chinchilla", X, "loss", **small)
    by_label = fit(runs, "chinchilla", X, "loss", exclude=list(runs.index[:5]), **small)
    by_mask = fit(runs, "chinchilla", X, "loss", exclude=np.arange(len(runs)) < 5, **small)
    zero_weight = fit(runs, "chinchilla", X, "loss", weights=np.r_[np.zeros(5), np.ones(len(runs) - 5)], **small)
    for other in (by_label, by_mask, zero_weight):
        assert other.objective == pytest.approx(base.objective, rel=1e-6)
        for name in TRUE:
            assert other.params[name] == pytest.approx(base.params[name], rel=1e-4)
    assert by_label.n_points == len(runs) - 5 and by_label.n_excluded == 5

    doubled = pd.concat([runs, runs], ignore_index=True)
    dup = fit(doubled, "chinchilla", X, "loss", **small)
    twice = fit(runs, "chinchilla", X, "loss", weights=np.full(len(runs), 2.0), **small)
    assert twice.objective == pytest.approx(dup.objective, rel=1e-6)

    highest = fit(runs, "chinchilla", X, "loss", exclude_highest=3, **small)
    dropped = runs.index[~highest.used]
    assert set(dropped) == set(runs["loss"].nlargest(3).index)


def test_run_level_bootstrap_resamples_whole_runs(runs):
    # Two "checkpoints" per run: identical rows sharing a run id must be drawn together.
    doubled = pd.concat([runs, runs], ignore_index=True)
    doubled["run"] = np.r_[np.arange(len(runs)), np.arange(len(runs))]
    result = fit(doubled, "chinchilla", X, "loss", max_starts=200, bootstrap=30, runs="run")
    row_level = bootstrap_fit(result, n_boot=30, seed=0)
    run_ci = result.ci.set_index("param")
    row_ci = row_level.ci.set_index("param")
    # Resampling rows of duplicated runs understates uncertainty: run-level CIs are wider.
    assert (run_ci["hi"] - run_ci["lo"])["alpha"] > (row_ci["hi"] - row_ci["lo"])["alpha"]
    with pytest.raises(ValueError, match="runs column 'nope' not found"):
        fit(doubled, "chinchilla", X, "loss", max_starts=10, bootstrap=5, runs="nope")


def test_batched_lbfgs_solves_rosenbrock_and_respects_bounds():
    def rosen(x, rows):
        a, b = x[:, 0], x[:, 1]
        f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        g = np.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], axis=1)
        return f, g
    starts = np.array([[-1.2, 1.0], [2.0, 2.0], [0.0, -1.0], [-3.0, 5.0]])
    res = batched_lbfgs(rosen, starts, gtol=1e-10, ftol=1e-15)
    assert res.converged.all()
    np.testing.assert_allclose(res.x, 1.0, atol=1e-5)
    bounded = batched_lbfgs(rosen, starts, lower=np.array([-5.0, -5.0]), upper=np.array([0.5, 5.0]))
    assert bounded.converged.all()
    np.testing.assert_allclose(bounded.x[:, 0], 0.5, atol=1e-6)    # optimum on the bound
    np.testing.assert_allclose(bounded.x[:, 1], 0.25, atol=1e-4)


# ----- bad input: clear errors or flagged results, never a silent NaN -----------------------------

def test_unknown_form(runs):
    with pytest.raises(ValueError, match=r"unknown form 'chinchila'; known forms: chinchilla"):
        fit(runs, "chinchila", X, "loss")


def test_missing_column_names_column_and_file(runs, tmp_path):
    path = tmp_path / "my_runs.csv"
    runs.to_csv(path, index=False)
    from analysis import load_csv
    df = load_csv(path)
    with pytest.raises(ValueError, match=rf"column 'tokens' not found in {path}"):
        fit(df, "chinchilla", {"N": "N", "D": "tokens"}, "loss")
    with pytest.raises(ValueError, match=rf"column 'val_loss' not found in {path}"):
        fit(df, "chinchilla", X, "val_loss")
    with pytest.raises(ValueError, match=r"needs variables \['N', 'D'\]; missing \['D'\]"):
        fit(df, "chinchilla", {"N": "N"}, "loss")


def test_non_positive_values_under_a_log(runs):
    bad = runs.copy()
    bad.loc[3, "N"] = 0.0
    with pytest.raises(ValueError, match=r"variable N \('N'\) must be > 0 because the law takes its log.*rows \[3\]"):
        fit(bad, "chinchilla", X, "loss")
    bad = runs.copy()
    bad.loc[[1, 2], "loss"] = -1.0
    with pytest.raises(ValueError, match=r"target \('loss'\) must be > 0.*rows \[1, 2\]"):
        fit(bad, "chinchilla", X, "loss")
    with pytest.raises(ValueError, match=r"must be > 0"):
        fit(runs, "chinchilla", X, "loss - 100")


def test_missing_values_and_memory_inconsistencies():
    df = pd.DataFrame({"N": [1e8, 2e8, 3e8], "M": [0.0, 1e6, -1.0], "Bk": [0.0, 0.0, 1e8],
                       "D": [1e9, 1e9, np.nan], "loss": [3.0, 2.9, 2.8]})
    x = {r: r for r in ("N", "M", "Bk", "D")}
    with pytest.raises(ValueError, match=r"variable M \('M'\) must be >= 0.*rows \[2\]"):
        fit(df, "memory_effective", x, "loss")
    df.loc[2, "M"] = 0.0
    with pytest.raises(ValueError, match=r"variable D \('D'\) has missing or non-finite values at rows \[2\]"):
        fit(df, "memory_effective", x, "loss")
    df.loc[2, "D"] = 1e9
    with pytest.raises(ValueError, match=r"must be both zero \(dense\) or both positive.*rows \[1, 2\]"):
        fit(df, "memory_effective", x, "loss")


def test_too_few_points_for_the_number_of_parameters(runs):
    with pytest.raises(ValueError, match=r"too few points: form 'chinchilla' has 5 parameters.*only 5 remain"):
        fit(runs.iloc[:5], "chinchilla", X, "loss")
    with pytest.raises(ValueError, match=r"only 5 remain after exclusions"):
        fit(runs, "chinchilla", X, "loss", exclude_highest=len(runs) - 5)


def test_fit_that_does_not_converge_is_flagged_not_nan(runs):
    # Starts on the slope of the objective (not on a flat plateau where the gradient test
    # would legitimately pass): two iterations cannot converge from there.
    grid = {"a": [4.0, 7.0], "b": [4.0, 7.0], "e": [0.2], "alpha": [0.2], "beta": [0.2]}
    result = fit(runs, "chinchilla", X, "loss", grid=grid, maxiter=2)
    assert result.converged is False
    assert "no start converged" in result.message
    assert np.all(np.isfinite(list(result.params.values())))
    assert result.to_dict()["fit"]["converged"] is False
    assert not result.starts["converged"].any()


def test_bad_options(runs):
    with pytest.raises(ValueError, match="Huber delta must be > 0"):
        fit(runs, "chinchilla", X, "loss", delta=0)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        fit(runs, "chinchilla", X, "loss", weights=-np.ones(len(runs)))
    with pytest.raises(ValueError, match=r"grid for form 'chinchilla' must give values.*missing \['beta'\]"):
        fit(runs, "chinchilla", X, "loss", grid={"a": [1], "b": [1], "e": [0], "alpha": [0.3]})


# ----- Huber-specific behaviour on synthetic data (no reference file needed) ----------------------

def _own_huber(r, delta):
    """Huber loss written out by hand: r^2/2 inside delta, delta*(|r| - delta/2) outside."""
    r = np.abs(r)
    return np.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta))


def _own_fit(log_n, log_y, loss, starts):
    """An independent fit of y = E + A/N^alpha: scipy Nelder-Mead on (log A, log E, alpha) from a
    few starts, the best kept."""
    from scipy.optimize import minimize

    def objective(t):
        a, e, alpha = t
        pred = np.logaddexp(a - alpha * log_n, e)
        return loss(pred - log_y).sum()

    best = None
    for s in starts:
        res = minimize(objective, s, method="Nelder-Mead",
                       options=dict(xatol=1e-10, fatol=1e-16, maxiter=40000, maxfev=40000))
        res = minimize(objective, res.x, method="Nelder-Mead",  # a restart: Nelder-Mead can stall
                       options=dict(xatol=1e-10, fatol=1e-16, maxiter=40000, maxfev=40000))
        if best is None or res.fun < best.fun:
            best = res
    return best.x, best.fun, objective


def test_huber_fit_resists_outliers_and_equals_an_independent_minimisation():
    """Bug caught: the Huber loss replaced by a squared loss, delta ignored or scaled, or a wrong Huber
    gradient. On a power law with three gross outliers the squared-loss fit is measurably pulled
    away; the fitter's optimum must equal an independent Nelder-Mead minimisation of a hand-written
    summed Huber objective (parameters and objective value)."""
    true = dict(A=300.0, E=1.5, alpha=0.3)
    n = np.geomspace(1e6, 1e10, 24)
    rng = np.random.default_rng(0)
    log_y = np.log(true["E"] + true["A"] * n ** -true["alpha"]) + 0.002 * rng.standard_normal(len(n))
    log_y[[3, 10, 17]] += np.array([0.25, 0.3, 0.2])  # gross outliers, all upwards
    df = pd.DataFrame({"N": n, "loss": np.exp(log_y)})
    delta = 1e-2
    result = fit(df, "power_law", {"N": "N"}, "loss", delta=delta, max_starts=150)
    assert result.converged

    log_n = np.log(n)
    t0 = [np.log(true["A"]), np.log(true["E"]), true["alpha"]]
    starts = [t0, [t0[0] + 1.0, t0[1] - 0.2, 0.4], [t0[0] - 1.0, t0[1] + 0.1, 0.2]]
    huber_t, huber_f, huber_obj = _own_fit(log_n, log_y, lambda r: _own_huber(r, delta), starts)
    sq_t, _, _ = _own_fit(log_n, log_y, lambda r: 0.5 * r ** 2, starts)

    got = np.array([np.log(result.params["A"]), np.log(result.params["E"]), result.params["alpha"]])
    # the two losses give measurably different laws here, so a squared loss cannot pass below
    assert abs(sq_t[2] - huber_t[2]) > 0.02 and abs(np.exp(sq_t[1]) - np.exp(huber_t[1])) > 0.02
    # the fitter finds the independent Huber optimum, and its objective is the hand-written one
    np.testing.assert_allclose(got, huber_t, rtol=2e-3, atol=2e-3)
    assert result.objective == pytest.approx(huber_obj(got), rel=1e-6)
    assert result.objective == pytest.approx(huber_f, rel=1e-4)
    # and it is robust: near the true law despite the outliers
    assert abs(result.params["alpha"] - true["alpha"]) < 0.01
