"""Identifiability: fits the data cannot determine are flagged, and nothing is derived from them.

The smoke notebooks used to print `converged=True` for a dense Chinchilla fit on two model sizes
(A = 3.6e87, alpha = 17.2, E = 0), rank a 9-parameter form 'best' on 10 runs with AICc = inf, and
derive iso-runtime gains and k = 0.21 from that fit. Each test below names the bug it catches.
"""

import json
import warnings
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import (  # noqa: E402
    UnidentifiedFitWarning, compare_fits, compare_forms, design_grid, estimate_equivalence, fit, get_form,
    identifiability, iso_runtime_view, isoflop_view, simulate,
)
from analysis.scaling import main  # noqa: E402

LAW = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)
XD = {"N": "anchor_params", "D": "tokens"}


def _two_size_ladder(noise=0.01, seed=0):
    """The smoke notebooks' dense ladder: two anchor sizes, a few token counts."""
    grid = design_grid(N=[2e5, 5e5], D=[2560, 5120, 7680, 10240])
    return simulate("chinchilla", LAW, grid, noise=noise, seed=seed).rename(columns={"N": "anchor_params",
                                                                                    "D": "tokens"})


def _good_ladder(noise=0.003, seed=0):
    grid = design_grid(N=[1e7, 3e7, 1e8, 3e8, 1e9], D=[1e9, 1e10, 1e11])
    return simulate("chinchilla", LAW, grid, noise=noise, seed=seed).rename(columns={"N": "anchor_params",
                                                                                    "D": "tokens"})


@pytest.fixture(scope="module")
def two_size_fit():
    with pytest.warns(UnidentifiedFitWarning, match="not identified"):
        return fit(_two_size_ladder(), "chinchilla", XD, "loss", max_starts=300)


@pytest.fixture(scope="module")
def good_fit():
    return fit(_good_ladder(), "chinchilla", XD, "loss", max_starts=300)


def test_two_model_sizes_converge_but_are_not_identified(two_size_fit):
    """Bug caught: a Chinchilla fit on two model sizes reported as a plain converged=True success."""
    result = two_size_fit
    assert result.converged                       # the optimiser is happy ...
    assert not result.identified                  # ... but the data cannot determine E + A/N^alpha
    distinct = [r for r in result.reasons if r.startswith("distinct:")]
    assert distinct and "N has 2 distinct values, needs 3" in distinct[0] and "D has" not in distinct[0]
    assert "identified=False" in result.status and "distinct" in result.status
    info = result.to_dict()["fit"]
    assert info["identified"] is False and any("distinct" in r for r in info["reasons"])
    summary = result.summary()
    assert not summary["identified"].any() and summary["issue"].str.contains("distinct").all()


def test_a_floor_driven_to_zero_is_flagged_naming_the_parameter():
    """Bug caught: a fit with E at its natural bound 0 (E = 1e-100) reported as an estimate of E.

    Data with no irreducible loss (L = A/N^alpha + B/D^beta) push the fitted floor to zero."""
    grid = design_grid(N=np.geomspace(1e6, 1e9, 6), D=np.geomspace(1e9, 1e11, 5))
    grid["loss"] = 400 * grid["N"] ** -0.3 + 400 * grid["D"] ** -0.3
    with pytest.warns(UnidentifiedFitWarning):
        result = fit(grid, "chinchilla", {"N": "N", "D": "D"}, "loss", max_starts=300)
    assert result.converged and not result.identified
    assert result.params["E"] < 1e-6
    flagged = [r for r in result.reasons if r.startswith(("sensitivity:", "magnitude:"))]
    assert flagged and all("E = " in r for r in flagged)
    assert "lower bound 0" in result.why
    assert not any(r.startswith(("distinct:", "points:")) for r in result.reasons)   # the design is fine
    issues = result.summary().set_index("param")["issue"]
    assert "E = " in issues["E"] and issues["alpha"] == ""


def test_each_named_check_fires_on_its_own(good_fit):
    """Bug caught: a check silently missing (absurd magnitudes, exponents, bounds, bootstrap spread)."""
    assert good_fit.identified, good_fit.reasons
    form = good_fit.form

    def with_params(result, **natural):
        params = {**result.params, **natural}
        return replace(result, params=params, theta=result.form.from_natural(params))

    smoke = with_params(good_fit, A=3.6e87, alpha=17.2)      # the numbers the smoke notebook printed
    checks = {r.split(":")[0] for r in smoke.reasons}
    assert {"magnitude", "exponent"} <= checks and not smoke.identified
    assert "A = 3.6e+87" in smoke.why and "alpha = 17.2" in smoke.why
    assert smoke.identification.failed["exponent"] == ("alpha",)
    assert "exponent" in identifiability(with_params(good_fit, beta=0.001)).failed

    wide = good_fit.params["A"]
    ci = pd.DataFrame({"param": list(form.natural_params), "estimate": list(good_fit.params.values()),
                       "lo": [good_fit.params[p] * 0.9 for p in form.natural_params],
                       "hi": [good_fit.params[p] * 1.1 for p in form.natural_params], "se": 0.0})
    assert replace(good_fit, ci=ci, ci_level=0.95).identified          # narrow CIs pass
    ci.loc[ci["param"] == "A", ["lo", "hi"]] = [wide / 50, wide * 50]  # 3.4 orders of magnitude
    ci.loc[ci["param"] == "beta", ["lo", "hi"]] = [0.05, 2.5]
    spread = replace(good_fit, ci=ci, ci_level=0.95)
    assert not spread.identified and spread.identification.failed["bootstrap"] == ("A", "beta")
    assert "orders of magnitude" in spread.why and "wider than 1" in spread.why

    runs = simulate("memory_effective", dict(LAW, eta=0.5, mu=0.4), pd.concat([
        design_grid(N=[1e7, 1e8, 1e9], M=[0], Bk=[0], D=[1e9, 1e10, 1e11]),
        design_grid(N=[1e7, 1e8], M=[1e6, 1e7], Bk=[1e9, 1e10], D=[1e10])], ignore_index=True), noise=0.003)
    mem = fit(runs, "memory_effective", {r: r for r in ("N", "M", "Bk", "D")}, "loss", max_starts=40)
    at_bound = with_params(mem, mu=1.0)
    assert at_bound.identification.failed.get("bound") == ("mu",) and "mu = 1 is at its bound" in at_bound.why


def test_the_published_chinchilla_refit_is_identified_with_its_bootstrap():
    """Bug caught: thresholds so strict that the reference fit (Besiroglu et al.) is flagged."""
    from analysis import load_csv
    from pathlib import Path
    data = load_csv(Path(__file__).resolve().parents[1] / "analysis" / "reference" / "chinchilla_svg_extracted.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnidentifiedFitWarning)
        result = fit(data, "chinchilla", {"N": "Model Size", "D": "Training FLOP/(6*Model Size)"}, "loss",
                     exclude_highest=5, max_starts=300, bootstrap=30)
    assert result.converged and result.identified, result.reasons
    assert result.ci is not None and result.summary()["issue"].eq("").all()


def _ten_runs():
    """Nine dense runs (3 sizes x 3 token counts) and one memory run 20% below the dense law."""
    design = pd.concat([design_grid(N=[1e7, 1e8, 1e9], M=[0], Bk=[0], D=[1e9, 1e10, 1e11]),
                        pd.DataFrame({"N": [1e8], "M": [1e7], "Bk": [1e9], "D": [1e10]})], ignore_index=True)
    runs = simulate("chinchilla", LAW, design, noise=0.003, seed=0)
    runs.loc[9, "loss"] *= 0.8
    return runs


def test_a_nine_parameter_form_on_ten_runs_is_never_best():
    """Bug caught: memory_additive (9 parameters) ranked 'best' on 10 runs with AICc = inf, because its
    near-interpolation has the lowest AIC."""
    with pytest.warns(UnidentifiedFitWarning, match="memory_additive"):
        comparison = compare_forms(_ten_runs(), ["chinchilla", "memory_additive"], {r: r for r in ("N", "M", "Bk", "D")},
                                   "loss", max_starts=150)
    table = comparison.table.set_index("form")
    assert table.loc["memory_additive", "aic"] < table.loc["chinchilla", "aic"]   # it would have won on AIC
    assert np.isinf(table.loc["memory_additive", "aicc"])
    assert comparison.best == "chinchilla" and comparison.table["form"].iloc[0] == "chinchilla"
    row = table.loc["memory_additive"]
    assert not row["comparable"] and not row["eligible"] and not row["identified"]
    assert np.isnan(row["delta_aic"]) and np.isnan(row["aic_weight"])
    assert "AICc is infinite" in row["why"] and "AICc is infinite" in comparison.excluded["memory_additive"]
    assert "memory_additive" in comparison.note and table.loc["chinchilla", "aic_weight"] == pytest.approx(1.0)


def test_no_best_form_when_none_is_identified(two_size_fit):
    """Bug caught: a 'best' form (and Akaike weights) reported when every candidate is unidentified."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnidentifiedFitWarning)
        other = fit(_two_size_ladder(), "power_law", {"N": "anchor_params"}, "loss", max_starts=100)
        comparison = compare_fits([two_size_fit, other])
    assert comparison.best is None and "no form can be ranked best" in comparison.note
    assert comparison.table["aic_weight"].isna().all() and not comparison.table["eligible"].any()


def test_equivalence_refuses_an_unidentified_dense_fit(two_size_fit):
    """Bug caught: k = 0.21 derived from a dense fit of two model sizes."""
    memory = pd.DataFrame({"anchor_params": [2e5, 5e5], "tokens": [5120, 5120], "loss": [6.0, 5.5],
                           "label": ["m1", "m2"]})
    with pytest.warns(UnidentifiedFitWarning, match="k not reported"):
        result = estimate_equivalence(two_size_fit, memory, by="label", bootstrap=20)
    assert not result.identified and "distinct" in result.why and "not identified" in result.why
    assert result.table["k"].isna().all() and result.table["N_equiv"].isna().all()
    assert result.replicates is None and "k_lo" not in result.table
    assert (result.table["why"] == result.why).all()
    assert len(result.groups) == 2 and result.groups["k"].isna().all() and (result.groups["why"] == result.why).all()
    # from a table too: the fit made inside is refused the same way
    with pytest.warns(UnidentifiedFitWarning, match="k not reported"):
        again = estimate_equivalence(_two_size_ladder(), memory, bootstrap=0, max_starts=200)
    assert not again.identified and again.table["k"].isna().all()


def test_equivalence_refuses_an_unidentified_memory_law(good_fit):
    """Bug caught: k read off an undetermined memory law (a fitted target) still reported."""
    memory = pd.DataFrame({"anchor_params": [3e7, 1e8], "tokens": [1e10, 1e10], "loss": [3.0, 2.8]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnidentifiedFitWarning)
        law = fit(_two_size_ladder(), "chinchilla", XD, "loss", max_starts=100)
    with pytest.warns(UnidentifiedFitWarning):
        result = estimate_equivalence(good_fit, memory, memory_fit=law, bootstrap=0)
    assert not result.identified and "memory law" in result.why and result.table["k"].isna().all()
    ok = estimate_equivalence(good_fit, memory, bootstrap=0)           # identified: k as before
    assert ok.identified and ok.why == "" and np.isfinite(ok.table["k"]).all()


def test_views_skip_an_unidentified_law_and_say_why(two_size_fit, tmp_path):
    """Bug caught: iso-runtime 'gains' (and IsoFLOP law optima) computed from an unidentified dense fit."""
    from analysis import plot_equivalence, plot_iso_runtime
    runs = _two_size_ladder().assign(fetched_params=0.0)
    runs = pd.concat([runs, pd.DataFrame({"anchor_params": [2e5], "tokens": [5120], "loss": [5.0],
                                          "fetched_params": [1e5]})], ignore_index=True)
    with pytest.warns(UnidentifiedFitWarning, match="iso-runtime gains"):
        view = iso_runtime_view(runs, dense_fit=two_size_fit)
    assert view["gain_vs_dense"].isna().all() and view["dense_loss_at_runtime"].isna().all()
    assert "not identified" in view.attrs["skipped"] and "distinct" in view.attrs["skipped"]
    files = plot_iso_runtime(view, tmp_path / "iso")
    assert files.png.is_file() and len(pd.read_csv(files.csv)) == len(runs)
    with pytest.warns(UnidentifiedFitWarning, match="IsoFLOP"):
        iso = isoflop_view(runs, law=two_size_fit)
    assert "not identified" in iso.skipped and "params_opt_law" not in iso.optima and "loss_law" not in iso.curves
    with pytest.warns(UnidentifiedFitWarning):
        refused = estimate_equivalence(two_size_fit, runs.iloc[[-1]], bootstrap=0)
    files = plot_equivalence(refused, tmp_path / "k")       # the figure says why instead of plotting k
    assert files.png.is_file() and "k not reported" in pd.read_csv(files.csv)["why"].iloc[0]


@pytest.fixture
def two_sizes_csv(tmp_path):
    path = tmp_path / "ladder.csv"
    _two_size_ladder().to_csv(path, index=False)
    return path


def test_cli_reports_identified_false_with_the_reason(capsys, two_sizes_csv):
    """Bug caught: `fit` printing converged=True (exit 0) for a fit the data cannot determine."""
    args = ["fit", str(two_sizes_csv), "--x", "N=anchor_params", "--x", "D=tokens", "--y", "loss",
            "--max-starts", "200"]
    code = main(args)
    out = capsys.readouterr().out
    assert code == 1
    assert "identified=False" in out and "distinct: too few distinct sizes" in out and "N has 2 distinct" in out
    code = main(args + ["--json"])
    info = json.loads(capsys.readouterr().out)["fit"]
    assert code == 1 and info["converged"] is True and info["identified"] is False
    assert any(r.startswith("distinct:") for r in info["reasons"])


def test_cli_compare_says_why_a_form_is_not_ranked(capsys, tmp_path):
    """Bug caught: `compare` naming a best form among unidentified fits without saying why."""
    path = tmp_path / "ten.csv"
    _ten_runs().to_csv(path, index=False)
    args = ["compare", str(path), "--form", "chinchilla", "--form", "memory_additive", "--x", "N=N", "--x", "M=M",
            "--x", "Bk=Bk", "--x", "D=D", "--y", "loss", "--max-starts", "150"]
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0 and "best: chinchilla" in out
    assert "memory_additive not ranked: identified=False" in out and "AICc is infinite" in out
    code = main(args + ["--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["best"] == "chinchilla" and "AICc is infinite" in result["not_ranked"]["memory_additive"]


def test_forms_declare_what_identifies_them():
    """Bug caught: a form whose identifiability needs are undeclared (every check silently passes)."""
    assert get_form("chinchilla").distinct_needed() == {("N",): 3, ("D",): 3}
    assert get_form("memory_additive").distinct_needed()[("M", "Bk")] == 3
    for name in ("chinchilla", "power_law", "memory_effective", "memory_additive"):
        form = get_form(name)
        assert form.exponents and form.scales and set(form.exponents) | set(form.scales) <= set(form.natural_params)
