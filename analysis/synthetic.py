"""Synthetic runs from a known law, for round-trip tests of the fitter and for planning sweeps."""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .data import variable_values
from .forms import Form, get_form


def design_grid(**levels: Sequence[float]) -> pd.DataFrame:
    """Every combination of the given levels, one column per keyword (e.g. N=[...], D=[...])."""
    if not levels:
        raise ValueError("design_grid needs at least one variable, e.g. design_grid(N=[1e7, 1e8], D=[1e9])")
    names = list(levels)
    rows = list(itertools.product(*(np.atleast_1d(levels[k]) for k in names)))
    return pd.DataFrame(rows, columns=names).astype(float)


def simulate(form: str | Form, params: Mapping[str, float], design: pd.DataFrame, *,
             x: Mapping[str, str] | None = None, noise: float = 0.0, seed: int = 0,
             y: str = "loss") -> pd.DataFrame:
    """A copy of `design` with column `y` = law(params) * exp(noise * standard normal).

    `params` are the form's natural parameters (e.g. A, B, E, alpha, beta); `x` maps roles to
    columns of `design` (default: columns named after the roles). Noise is multiplicative, i.e.
    additive with standard deviation `noise` in log space, where the fitter works.
    """
    form = get_form(form)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    x = {v: v for v in form.variable_names} if x is None else dict(x)
    values = variable_values(design, form, x)
    clean = form.predict(form.from_natural(params), values)
    rng = np.random.default_rng(seed)
    out = design.copy()
    out[y] = clean * np.exp(noise * rng.standard_normal(len(design)))
    return out
