"""Scaling-law analysis over tidy result tables (one row per run).

    from analysis import fit, compare_forms, estimate_equivalence, isoflop_view, plot_fit
    res = fit(df, "chinchilla", {"N": "anchor_params", "D": "tokens"}, "loss", bootstrap=200)
    res.summary()                      # parameters with bootstrap CIs
    res.identified, res.reasons        # do the data determine the law? (analysis.identifiability)

Modules: forms (functional forms), fitting (multi-start Huber fitter, bootstrap), identifiability
(do the data determine a fitted law?), optimize (batched L-BFGS), compare (AIC/BIC, hold-out
extrapolation), equivalence (dense-equivalent
multiplier k), views (IsoFLOP, iso-runtime), plots (PNG + CSV), synthetic (runs from a known
law), expressions (safe column arithmetic), data (loading and validation), scaling (the CLI).
Plotting is imported lazily, so fitting does not pull in matplotlib and seaborn.
"""

from .compare import Comparison, HoldoutResult, compare_fits, compare_forms, holdout_forms, holdout_largest, information_criteria
from .data import STANDARD_X, load_csv
from .equivalence import EquivalenceResult, estimate_equivalence, solve_equivalent_n
from .expressions import evaluate
from .fitting import FitResult, bootstrap_fit, fit, huber, make_starts
from .forms import FORMS, Form, Variable, get_form, list_forms, register_form
from .identifiability import Identifiability, UnidentifiedFitWarning, identifiability
from .synthetic import design_grid, simulate
from .views import IsoFlopView, iso_runtime_view, isoflop_view

_PLOTS = ("PlotFiles", "plot_bootstrap", "plot_comparison", "plot_equivalence", "plot_fit", "plot_holdout", "plot_holdout_forms",
          "plot_iso_runtime", "plot_isoflop", "save_figure")


def __getattr__(name: str):
    if name in _PLOTS:
        from . import plots
        return getattr(plots, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


__all__ = [
    "FORMS", "STANDARD_X", "Comparison", "EquivalenceResult", "FitResult", "Form", "HoldoutResult", "Identifiability",
    "IsoFlopView", "UnidentifiedFitWarning", "identifiability",
    "bootstrap_fit", "compare_fits", "compare_forms", "design_grid", "estimate_equivalence", "evaluate", "fit",
    "get_form", "holdout_forms", "holdout_largest", "huber", "information_criteria", "iso_runtime_view", "isoflop_view",
    "list_forms", "load_csv", "make_starts", "register_form", "simulate", "solve_equivalent_n", "Variable", *_PLOTS,
]

# Knowledge attribution over probe tables (numpy/pandas only; its plots import seaborn when drawn).
from .attribution import (CATEGORIES, accuracy_by_frequency, attribute_knowledge, attribution_shares,
                          blocking_effect, bucket_order, exposure_curve, level_contribution, load_eval_summary,
                          load_probe_results, memory_gain, plot_accuracy_by_frequency, plot_against_size,
                          plot_attribution, plot_blocking, plot_exposure_curve, plot_level_contribution,
                          plot_memory_gain)
from .claims import demo_claims, format_claims
from .paper_claims import CLAIMS as PAPER_CLAIMS, paper_claims

__all__ += [
    "CATEGORIES", "accuracy_by_frequency", "attribute_knowledge", "attribution_shares", "blocking_effect",
    "bucket_order", "level_contribution", "load_eval_summary", "load_probe_results", "memory_gain",
    "plot_accuracy_by_frequency", "plot_against_size", "plot_attribution", "plot_blocking",
    "plot_level_contribution", "plot_memory_gain", "exposure_curve", "plot_exposure_curve", "demo_claims",
    "format_claims", "PAPER_CLAIMS", "paper_claims",
]
