"""The safe column-expression evaluator used by --x / --y."""

import numpy as np
import pandas as pd
import pytest

from analysis.expressions import columns_used, evaluate


@pytest.fixture
def df():
    out = pd.DataFrame({"Model Size": [1e8, 2e8], "Training FLOP": [6e18, 2.4e19], "loss": [3.0, 2.5],
                        "loss-val": [3.1, 2.6], "N": [1.0, 2.0], "Loss (nats)": [2.0, 4.0]})
    out.attrs["source"] = "runs.csv"
    return out


def test_column_names_with_spaces_and_arithmetic(df):
    np.testing.assert_allclose(evaluate(df, "Training FLOP/(6*Model Size)"), [1e10, 2e10])
    assert columns_used(df, "Training FLOP/(6*Model Size)") == ["Training FLOP", "Model Size"]


def test_precedence_power_unary_and_functions(df):
    np.testing.assert_allclose(evaluate(df, "1 + 2*3^2"), [19, 19])
    np.testing.assert_allclose(evaluate(df, "-N**2"), [-1, -4])
    np.testing.assert_allclose(evaluate(df, "2^3^2"), [512, 512])          # right associative
    np.testing.assert_allclose(evaluate(df, "log(exp(loss)) - sqrt(N*N)"), [2.0, 0.5])
    np.testing.assert_allclose(evaluate(df, "1 - loss/10"), [0.7, 0.75])
    np.testing.assert_allclose(evaluate(df, "1e9 * N"), [1e9, 2e9])


def test_longest_column_wins_and_backticks_quote(df):
    np.testing.assert_allclose(evaluate(df, "loss-val"), [3.1, 2.6])          # the column, not loss - val
    np.testing.assert_allclose(evaluate(df, "`loss` - 1"), [2.0, 1.5])
    np.testing.assert_allclose(evaluate(df, "Loss (nats) / 2"), [1.0, 2.0])


def test_unknown_column_error_names_column_and_file(df):
    message = r"column 'Training FLOPs' not found in runs.csv; available columns: .*'Model Size'"
    with pytest.raises(ValueError, match=message):
        evaluate(df, "Training FLOPs/(6*Model Size)")
    with pytest.raises(ValueError, match=r"column 'tokens' not found"):
        evaluate(df, "tokens")


def test_no_code_execution_and_malformed_expressions(df):
    with pytest.raises(ValueError, match="not found"):
        evaluate(df, "__import__('os').system('true')")
    for bad in ("N +", "(N", "N N", "log N", "`N"):
        with pytest.raises(ValueError):
            evaluate(df, bad)


def test_non_numeric_column_is_rejected(df):
    df["name"] = ["a", "b"]
    with pytest.raises(ValueError, match="'name' in runs.csv is not numeric"):
        evaluate(df, "name")
