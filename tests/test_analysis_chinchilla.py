"""Real data: Besiroglu et al.'s Chinchilla refit on the SVG-extracted points, via the API and the CLI."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis import fit, load_csv

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1] / "analysis" / "reference" / "chinchilla_svg_extracted.csv"
X = {"N": "Model Size", "D": "Training FLOP/(6*Model Size)"}
# Besiroglu et al. (2024), Approach-3 refit with 5 highest-loss points excluded.
EXPECTED = {"E": (1.817, 0.02), "alpha": (0.347, 0.01), "beta": (0.367, 0.01)}



@pytest.fixture(scope="module")
def besiroglu_fit():
    df = load_csv(DATA)
    tic = time.perf_counter()
    result = fit(df, "chinchilla", X, "loss", exclude_highest=5, delta=1e-3)
    return result, time.perf_counter() - tic


def test_full_grid_reproduces_besiroglu_refit(besiroglu_fit):
    result, seconds = besiroglu_fit
    assert result.converged, result.message
    assert result.identified, result.reasons   # the identifiability thresholds pass the reference fit
    assert len(result.starts) == 4500          # the full grid, no subsampling
    assert result.n_points == 240 and result.n_excluded == 5
    for name, (value, tol) in EXPECTED.items():
        assert abs(result.params[name] - value) <= tol, (name, result.params[name])
    # Their a ~ 6.169, b ~ 7.670 (A ~ 478, B ~ 2141).
    assert result.params["A"] == pytest.approx(478, rel=0.05)
    assert result.params["B"] == pytest.approx(2141, rel=0.05)
    assert seconds < 60, f"the 4,500-start grid took {seconds:.1f} s"


def test_summed_objective_value_and_start_statistics(besiroglu_fit):
    result, _ = besiroglu_fit
    # Sum (not mean) of Huber losses: about 240 points x ~1e-3 x mean |residual|.
    assert 5e-4 < result.objective < 2e-3
    assert result.starts["converged"].mean() > 0.9
    assert result.starts["objective"].min() >= result.objective - 1e-12


def _cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "analysis.scaling", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_fit_end_to_end_json():
    proc = _cli("fit", str(DATA), "--form", "chinchilla", "--x", "N=Model Size",
                "--x", "D=Training FLOP/(6*Model Size)", "--y", "loss", "--exclude-highest", "5",
                "--bootstrap", "40", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"A", "B", "E", "alpha", "beta", "ci", "fit"} <= set(out)
    for name, (value, tol) in EXPECTED.items():
        assert abs(out[name] - value) <= tol
        lo, hi = out["ci"][name]
        assert lo <= out[name] <= hi
    assert out["fit"]["converged"] is True and out["fit"]["n_points"] == 240 and out["fit"]["n_starts"] == 4500
    assert out["fit"]["identified"] is True and out["fit"]["reasons"] == []   # with its bootstrap CIs too


