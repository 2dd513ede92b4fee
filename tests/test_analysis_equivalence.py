"""Equivalence estimator: the multiplier k for which anchor + memory matches a dense model."""

import numpy as np
import pandas as pd
import pytest

from analysis import design_grid, estimate_equivalence, fit, get_form, simulate, solve_equivalent_n

DENSE_LAW = dict(A=400.0, B=1500.0, E=1.8, alpha=0.34, beta=0.3)
K_TRUE = 2.5


def _dense_runs(noise=0.003, seed=0):
    grid = design_grid(N=[1e7, 2e7, 5e7, 1e8, 2e8, 5e8, 1e9], D=[1e9, 3e9, 1e10, 3e10])
    runs = simulate("chinchilla", DENSE_LAW, grid, noise=noise, seed=seed)
    return runs.rename(columns={"N": "anchor_params", "D": "tokens"})


def _memory_runs(k=K_TRUE, noise=0.0, seed=5, seeds_per_config=1):
    """Memory models whose loss is the dense law at k x their anchor size."""
    grid = design_grid(N=[2e7, 5e7, 1e8], D=[3e9, 1e10], seed=np.arange(seeds_per_config))
    grid["N_equiv_true"] = grid["N"] * k
    runs = simulate("chinchilla", DENSE_LAW, grid, x={"N": "N_equiv_true", "D": "D"}, noise=noise, seed=seed)
    runs["config"] = "mem-A"
    return runs.rename(columns={"N": "anchor_params", "D": "tokens"})


def test_solver_inverts_the_dense_law_exactly():
    form = get_form("chinchilla")
    theta = form.from_natural(DENSE_LAW)
    n = np.array([3e7, 4e8, 2e9])
    d = np.array([1e10, 1e10, 1e11])
    target = form.predict(theta, {"N": n, "D": d})
    n_eq, beyond, below = solve_equivalent_n(form, theta, {"D": d}, target)
    np.testing.assert_allclose(n_eq[0], n, rtol=1e-9)
    assert not beyond.any() and not below.any()


def test_recovers_known_multiplier_with_ci_covering_it():
    result = estimate_equivalence(_dense_runs(), _memory_runs(), bootstrap=100, max_starts=400)
    table = result.table
    assert {"N", "D", "target", "N_equiv", "k", "k_lo", "k_hi", "beyond_floor", "p_beyond_floor"} <= set(table)
    np.testing.assert_allclose(table["k"], K_TRUE, rtol=0.15)
    assert ((table["k_lo"] <= K_TRUE) & (K_TRUE <= table["k_hi"])).all(), table[["k", "k_lo", "k_hi"]]
    assert (table["k_hi"] > table["k_lo"]).all()
    assert not table["beyond_floor"].any()
    assert result.replicates.shape == (100, len(table))
    np.testing.assert_allclose(table["N_equiv"], table["k"] * table["N"])


def test_group_ci_resamples_noisy_memory_runs():
    memory = _memory_runs(noise=0.003, seeds_per_config=2)
    result = estimate_equivalence(_dense_runs(), memory, bootstrap=100, by="config", max_starts=400)
    group = result.groups.set_index("config").loc["mem-A"]
    assert group["n_runs"] == len(memory)
    assert group["k_lo"] <= K_TRUE <= group["k_hi"]
    assert group["k"] == pytest.approx(np.exp(np.log(result.table["k"]).mean()))


def test_target_below_the_dense_floor_gives_infinite_flagged_k():
    memory = _memory_runs().iloc[:2].copy()
    floor = DENSE_LAW["E"] + DENSE_LAW["B"] / memory["tokens"] ** DENSE_LAW["beta"]
    memory["loss"] = floor.to_numpy() * np.array([0.97, 1.0 + 1e-4])   # first beats any dense size
    result = estimate_equivalence(_dense_runs(noise=0.0), memory, bootstrap=20, max_starts=300)
    table = result.table
    assert np.isinf(table["k"].iloc[0]) and table["beyond_floor"].iloc[0]
    assert np.isfinite(table["k"].iloc[1]) and table["k"].iloc[1] > 100 and not table["beyond_floor"].iloc[1]
    assert table["p_beyond_floor"].iloc[0] == 1.0
    assert not table[["k_lo", "k_hi"]].isna().any().any()      # inf is reported, never NaN


def test_probe_accuracy_equivalence_uses_error_rate():
    # Dense accuracy rises with N: error = 1 - acc = 0.2 + 30 / N^0.25 (power law in N only).
    law = dict(A=30.0, E=0.2, alpha=0.25)
    dense = simulate("power_law", law, design_grid(N=np.geomspace(1e7, 2e9, 9)), noise=0.002, seed=1)
    dense["acc"] = 1 - dense.pop("loss")
    memory = pd.DataFrame({"N": [3e7, 1e8]})
    memory["acc"] = 1 - simulate("power_law", law, pd.DataFrame({"N": memory["N"] * 3.0}))["loss"]
    result = estimate_equivalence(dense, memory, x={"N": "N"}, y="acc", form="power_law", higher_is_better=True,
                                  bootstrap=60, max_starts=300)
    np.testing.assert_allclose(result.table["k"], 3.0, rtol=0.15)
    assert ((result.table["k_lo"] <= 3.0) & (3.0 <= result.table["k_hi"])).all()


def test_memory_law_as_target_and_ready_dense_fit():
    dense = _dense_runs()
    dense_fit = fit(dense, "chinchilla", {"N": "anchor_params", "D": "tokens"}, "loss", max_starts=300)
    memory = _memory_runs()
    result = estimate_equivalence(dense_fit, memory, bootstrap=0)
    assert result.replicates is None and "k_lo" not in result.table
    np.testing.assert_allclose(result.table["k"], K_TRUE, rtol=0.15)
    with pytest.raises(ValueError, match="give `runs` as one id per row"):
        estimate_equivalence(dense_fit, memory, runs="run_id")


def test_bad_inputs():
    dense = _dense_runs()
    memory = _memory_runs()
    with pytest.raises(ValueError, match="column 'anchor_params' not found"):
        estimate_equivalence(dense, memory.rename(columns={"anchor_params": "n"}), bootstrap=0, max_starts=50)
    bad = memory.copy()
    bad.loc[0, "loss"] = -1.0
    with pytest.raises(ValueError, match="must be finite and > 0"):
        estimate_equivalence(dense, bad, bootstrap=0, max_starts=50)
    form = get_form("chinchilla")
    rising = form.from_natural({**DENSE_LAW, "alpha": -0.1})   # loss growing with N: no inverse
    with pytest.raises(ValueError, match="does not decrease with N"):
        solve_equivalent_n(form, rising, {"D": np.array([1e10])}, np.array([3.0]))


def test_fitted_memory_law_as_target_gives_its_implied_multiplier():
    # In the effective-parameters form a memory model IS a dense model with N + eta*M_eff params,
    # so k = 1 + eta * M^mu * Bk^(1-mu) / N.
    true = dict(A=400.0, B=1500.0, E=1.8, alpha=0.34, beta=0.3, eta=0.5, mu=0.4)
    dense = design_grid(N=[1e7, 3e7, 1e8, 3e8, 1e9], M=[0], Bk=[0], D=[1e9, 3e9, 1e10, 3e10])
    memory = design_grid(N=[1e7, 3e7, 1e8], M=[1e6, 4e6, 1.6e7], Bk=[1e8, 1e9, 1e10], D=[3e9, 3e10])
    runs = simulate("memory_effective", true, pd.concat([dense, memory], ignore_index=True), noise=0.003, seed=1)
    x_mem = {r: r for r in ("N", "M", "Bk", "D")}
    memory_fit = fit(runs, "memory_effective", x_mem, "loss", bootstrap=40)
    dense_runs = runs[runs["M"] == 0]
    query = memory.iloc[[0, 13, 26, 53]]
    result = estimate_equivalence(dense_runs, query, x={"N": "N", "D": "D"}, memory_fit=memory_fit,
                                  bootstrap=40, max_starts=300)
    implied = 1 + true["eta"] * query["M"] ** true["mu"] * query["Bk"] ** (1 - true["mu"]) / query["N"]
    np.testing.assert_allclose(result.table["k"], implied, rtol=0.2)
    assert ((result.table["k_lo"] <= implied) & (implied <= result.table["k_hi"])).all()
