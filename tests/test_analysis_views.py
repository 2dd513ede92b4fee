"""IsoFLOP and iso-runtime views, and the plots (each writes a PNG and the CSV it plots)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import (  # noqa: E402
    bootstrap_fit, compare_forms, estimate_equivalence, fit, holdout_largest, iso_runtime_view,
    isoflop_view, simulate,
)
from analysis import plots  # noqa: E402

LAW = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
BUDGETS = [1e18, 1e19, 1e20]


def _n_opt(c):
    a, b, alpha, beta = LAW["A"], LAW["B"], LAW["alpha"], LAW["beta"]
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    return g * (c / 6) ** (beta / (alpha + beta))


@pytest.fixture(scope="module")
def isoflop_runs():
    rows = []
    for c in BUDGETS:
        for n in _n_opt(c) * np.geomspace(0.2, 5, 7):
            rows.append({"anchor_params": n, "tokens": c / (6 * n)})
    return simulate("chinchilla", LAW, pd.DataFrame(rows), x={"N": "anchor_params", "D": "tokens"},
                    noise=0.002, seed=0)


@pytest.fixture(scope="module")
def dense_fit(isoflop_runs):
    return fit(isoflop_runs, "chinchilla", {"N": "anchor_params", "D": "tokens"}, "loss", max_starts=300,
               bootstrap=30)


def test_isoflop_groups_budgets_and_finds_optima(isoflop_runs, dense_fit):
    runs = isoflop_runs.copy()
    runs["tokens"] *= np.random.default_rng(1).uniform(0.97, 1.03, len(runs))   # budgets are never exact
    view = isoflop_view(runs, law=dense_fit)
    assert view.points["budget_group"].nunique() == 3
    assert list(view.optima["n_points"]) == [7, 7, 7]
    np.testing.assert_allclose(view.optima["budget"], BUDGETS, rtol=0.05)
    np.testing.assert_allclose(view.optima["params_opt_law"], _n_opt(view.optima["budget"]), rtol=0.1)
    np.testing.assert_allclose(view.optima["params_opt_parabola"], _n_opt(view.optima["budget"]), rtol=0.35)
    assert view.optima["interior"].all() and not view.optima["law_opt_at_edge"].any()
    assert {"loss_parabola", "loss_law"} <= set(view.curves)
    binned = isoflop_view(runs, bins=3)
    assert binned.points["budget_group"].nunique() == 3
    fpt = isoflop_view(runs.assign(fpt=6 * runs["anchor_params"]), flops_per_token="fpt")
    np.testing.assert_allclose(fpt.points["flops"], 6 * runs["anchor_params"] * runs["tokens"])


def test_iso_runtime_view_labels_and_gain(dense_fit):
    df = pd.DataFrame({"anchor_params": [1e8, 2e8, 1e8], "fetched_params": [0.0, 0.0, 1e7],
                       "tokens": [1e10, 1e10, 1e10], "loss": [3.0, 2.9, 2.7], "bank": [0, 0, 1e9]})
    view = iso_runtime_view(df, hue="bank", dense_fit=dense_fit)
    assert list(view["kind"]) == ["dense", "dense", "memory"]
    np.testing.assert_allclose(view["runtime_params"], [1e8, 2e8, 1.1e8])
    expected = dense_fit.predict(pd.DataFrame({"anchor_params": [1.1e8], "tokens": [1e10]}))[0]
    assert view["dense_loss_at_runtime"].iloc[2] == pytest.approx(expected)
    assert view["gain_vs_dense"].iloc[2] == pytest.approx(expected - 2.7)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        iso_runtime_view(df.assign(fetched_params=[-1.0, 0, 0]))


def _check_files(files, min_rows=1):
    assert files.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(files.csv)
    assert len(table) >= min_rows
    leftovers = [p for p in files.png.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers        # atomic writes leave no temp files behind
    return table


def test_every_plot_writes_png_and_csv(tmp_path, isoflop_runs, dense_fit):
    table = _check_files(plots.plot_fit(dense_fit, tmp_path / "fit.png"), len(isoflop_runs))
    assert {"observed", "predicted", "log_residual", "used"} <= set(table)
    _check_files(plots.plot_bootstrap(dense_fit, tmp_path / "boot"), 30)
    table = _check_files(plots.plot_isoflop(isoflop_view(isoflop_runs, law=dense_fit), tmp_path / "isoflop"))
    assert {"run", "parabola", "law", "optimum_parabola", "optimum_law"} == set(table["series"])

    memory = isoflop_runs.iloc[:4].assign(fetched_params=[0, 1e6, 2e6, 4e6], loss=lambda d: d["loss"] * 0.97)
    runtime = iso_runtime_view(pd.concat([isoflop_runs.assign(fetched_params=0.0), memory]), dense_fit=dense_fit)
    _check_files(plots.plot_iso_runtime(runtime, tmp_path / "runtime"), len(runtime))

    eq = estimate_equivalence(dense_fit, memory.iloc[1:], bootstrap=0)
    table = _check_files(plots.plot_equivalence(eq, tmp_path / "equiv"), 3)
    assert "k" in table

    held = holdout_largest(isoflop_runs, "chinchilla", {"N": "anchor_params", "D": "tokens"}, "loss",
                           max_starts=200, rtol=0.01)
    table = _check_files(plots.plot_holdout(held, tmp_path / "holdout"))
    assert set(table["set"]) == {"fitted", "held out"}

    comparison = compare_forms(isoflop_runs, ["chinchilla", "power_law"], {"N": "anchor_params", "D": "tokens"},
                               "loss", max_starts=100)
    _check_files(plots.plot_comparison(comparison, tmp_path / "compare.png"), 2)
    assert sorted(p.suffix for p in tmp_path.iterdir()).count(".png") == 7


def test_plot_bootstrap_needs_replicates(tmp_path, isoflop_runs):
    plain = fit(isoflop_runs, "chinchilla", {"N": "anchor_params", "D": "tokens"}, "loss", max_starts=50)
    with pytest.raises(ValueError, match="no bootstrap replicates"):
        plots.plot_bootstrap(plain, tmp_path / "x")
    assert bootstrap_fit(plain, n_boot=5).ci is not None
