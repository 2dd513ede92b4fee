"""The command line (`python -m analysis.scaling`), run in-process: subcommands and error messages."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis import design_grid, simulate
from analysis.scaling import build_parser, main


@pytest.fixture
def runs_csv(tmp_path):
    runs = simulate("chinchilla", dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28),
                    design_grid(N=np.geomspace(1e7, 1e9, 5), C=np.geomspace(1e17, 1e20, 5)).assign(
                        D=lambda d: d["C"] / (6 * d["N"])), noise=0.005, seed=0)
    runs = runs.rename(columns={"N": "Model Size", "C": "Training FLOP"}).drop(columns="D")
    runs["run id"] = np.arange(len(runs)) // 2
    path = tmp_path / "my runs.csv"
    runs.to_csv(path, index=False)
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


X = ["--x", "N=Model Size", "--x", "D=Training FLOP/(6*Model Size)", "--y", "loss", "--max-starts", "200"]


def test_fit_json_with_expression_bootstrap_and_plot(capsys, runs_csv, tmp_path):
    code, out, err = _run(capsys, "fit", str(runs_csv), *X, "--bootstrap", "20", "--runs", "run id",
                          "--json", "--plot", str(tmp_path / "fig"))
    assert code == 0, err
    result = json.loads(out)
    assert {"A", "B", "E", "alpha", "beta"} <= set(result)
    assert result["alpha"] == pytest.approx(0.34, abs=0.05)
    assert set(result["ci"]) == {"A", "B", "E", "alpha", "beta"}
    assert result["fit"]["x"]["D"] == "Training FLOP/(6*Model Size)"
    assert (tmp_path / "fig.png").is_file() and (tmp_path / "fig_bootstrap.csv").is_file()


def test_fit_text_output_and_forms_listing(capsys, runs_csv):
    code, out, _ = _run(capsys, "fit", str(runs_csv), *X)
    assert code == 0 and "chinchilla: L = E + A/N^alpha + B/D^beta" in out and "alpha" in out
    code, out, _ = _run(capsys, "forms", "--json")
    names = [f["form"] for f in json.loads(out)]
    assert names == ["chinchilla", "power_law", "memory_effective", "memory_additive"]


def test_compare_and_holdout_subcommands(capsys, runs_csv):
    code, out, err = _run(capsys, "compare", str(runs_csv), "--form", "chinchilla", "--form", "power_law", *X,
                          "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["best"] == "chinchilla" and len(result["table"]) == 2
    code, out, err = _run(capsys, "holdout", str(runs_csv), *X, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n_holdout"] >= 1 and 0 <= result["mean_abs_rel_error"] < 0.1


def test_errors_name_the_problem(capsys, runs_csv, tmp_path):
    code, _, err = _run(capsys, "fit", str(runs_csv), "--x", "N=Model Size", "--x", "D=tokens", "--y", "loss")
    assert code == 2 and "column 'tokens' not found" in err and str(runs_csv) in err
    code, _, err = _run(capsys, "fit", str(runs_csv), "--form", "kaplan", *X)
    assert code == 2 and "unknown form 'kaplan'" in err
    code, _, err = _run(capsys, "fit", str(tmp_path / "missing.csv"), *X)
    assert code == 2 and "no such CSV file" in err
    code, _, err = _run(capsys, "fit", str(runs_csv), "--x", "Nparams", "--y", "loss")
    assert code == 2 and "expected ROLE=COLUMN_OR_EXPRESSION" in err
    code, _, err = _run(capsys, "fit", str(runs_csv), "--x", "N=Model Size", "--x", "N=loss", "--y", "loss")
    assert code == 2 and "gives variable 'N' twice" in err
    small = tmp_path / "small.csv"
    pd.DataFrame({"N": [1e8, 2e8], "D": [1e9, 1e9], "loss": [3.0, 2.9]}).to_csv(small, index=False)
    code, _, err = _run(capsys, "fit", str(small), "--x", "N=N", "--x", "D=D", "--y", "loss")
    assert code == 2 and "too few points" in err
    code, _, err = _run(capsys, "fit", str(small), "--x", "N=N-1e9", "--x", "D=D", "--y", "loss")
    assert code == 2 and "must be > 0 because the law takes its log" in err


def test_non_converged_fit_exits_1_with_flag(capsys, runs_csv):
    code, out, _ = _run(capsys, "fit", str(runs_csv), *X, "--maxiter", "2", "--json")
    assert code == 1
    result = json.loads(out)
    assert result["fit"]["converged"] is False and "no start converged" in result["fit"]["message"]
    assert all(isinstance(result[p], float) for p in ("A", "B", "E", "alpha", "beta"))


def test_help_strings_exist():
    parser = build_parser()
    text = parser.format_help()
    assert "fit" in text and "compare" in text and "holdout" in text


@pytest.mark.parametrize("content", [b'N,D,loss\n1e8,1e9,3.0\n"unterminated,1e9\n', b"\x00\xff\xfe not text",
                                     b"", b"N,D,loss\n1,2,3,4,5\n"])
def test_a_file_that_cannot_be_parsed_is_named_in_one_line(capsys, tmp_path, content):
    bad = tmp_path / "broken runs.csv"
    bad.write_bytes(content)
    code, out, err = _run(capsys, "fit", str(bad), "--x", "N=N", "--x", "D=D", "--y", "loss")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: cannot read {bad} as CSV (expected ")
