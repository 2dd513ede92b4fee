"""Load result tables and turn (role -> column or expression) mappings into validated arrays.

Standard column names in hiermem result tables (used as defaults by the notebooks):
`anchor_params`, `embedding_params`, `fetched_params`, `bank_params`, `tokens`,
`flops_per_token`, `loss` (held-out loss, nats) and probe-accuracy columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .expressions import evaluate
from .forms import Form

# The memory-model roles mapped onto our standard result-table columns.
STANDARD_X = {"N": "anchor_params", "M": "fetched_params", "Bk": "bank_params", "D": "tokens"}


def load_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV and remember where it came from, so errors can name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such CSV file: {path}")
    expected = ("expected UTF-8 text: a header row of column names, then one comma-separated row per run with "
                "as many fields")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())  # one line: pandas' messages can span several
        raise ValueError(f"cannot read {path} as CSV ({expected}): {reason}") from e
    if not isinstance(df.index, pd.RangeIndex):  # pandas turns the surplus leading fields into an index
        raise ValueError(f"cannot read {path} as CSV ({expected}): the rows have {df.index.nlevels} more "
                         f"field(s) than the header's {len(df.columns)} column names")
    if df.empty:
        raise ValueError(f"{path} has no data rows")
    df.attrs["source"] = str(path)
    return df


def source_of(df: pd.DataFrame) -> str:
    """' in FILE' when the table came from a file, else ''."""
    src = df.attrs.get("source")
    return f" in {src}" if src else ""


def scale_groups(values: np.ndarray, rtol: float = 0.05) -> np.ndarray:
    """Group id per value: sorted values closer than a factor (1 + rtol) share a scale."""
    order = np.argsort(values, kind="stable")
    ids = np.empty(len(values), dtype=int)
    group = 0
    for pos, i in enumerate(order):
        if pos and values[i] > values[order[pos - 1]] * (1 + rtol):
            group += 1
        ids[i] = group
    return ids


def parse_assignment(text: str) -> tuple[str, str]:
    """Split 'N=Model Size' into ('N', 'Model Size'); ValueError if there is no '='."""
    role, sep, expr = text.partition("=")
    if not sep or not role.strip() or not expr.strip():
        raise ValueError(f"expected ROLE=COLUMN_OR_EXPRESSION (e.g. N=anchor_params), got {text!r}")
    return role.strip(), expr.strip()


@dataclass
class Prepared:
    """Validated inputs for one form: raw variable arrays, the target and row bookkeeping."""

    values: dict[str, np.ndarray]   # role -> array over all rows of the table
    y: np.ndarray                   # target (loss, or error rate) over all rows
    x: dict[str, str]               # role -> column/expression as given
    y_name: str
    index: pd.Index                 # the table's row labels


def _bad_rows(df: pd.DataFrame, mask: np.ndarray, limit: int = 5) -> str:
    labels = list(df.index[mask][:limit])
    more = "" if mask.sum() <= limit else f" (and {int(mask.sum()) - limit} more)"
    return f"rows {labels}{more}"


def _checked(df: pd.DataFrame, expr: str, what: str, allow_zero: bool) -> np.ndarray:
    values = evaluate(df, expr)
    where = f"{what} ({expr!r}){source_of(df)}"
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{where} has missing or non-finite values at {_bad_rows(df, bad)}; "
                         "filter those rows out or fill them before fitting")
    if allow_zero:
        bad = values < 0
        if bad.any():
            raise ValueError(f"{where} must be >= 0 (0 means no memory), found negative values at {_bad_rows(df, bad)}")
    else:
        bad = values <= 0
        if bad.any():
            raise ValueError(f"{where} must be > 0 because the law takes its log; "
                             f"found non-positive values at {_bad_rows(df, bad)}")
    return values


def variable_values(df: pd.DataFrame, form: Form, x: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Evaluate and validate the variables `form` needs from `df` (see `prepare_inputs`)."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if len(df) == 0:
        raise ValueError(f"the table{source_of(df)} has no rows")
    roles = form.variable_names
    missing = [r for r in roles if r not in x]
    if missing:
        hint = ", ".join(f"{r}=<column>" for r in missing)
        raise ValueError(f"form {form.name!r} needs variables {list(roles)}; missing {missing} (give {hint})")
    values = {v.name: _checked(df, x[v.name], f"variable {v.name}", v.allow_zero) for v in form.variables}
    if "M" in values and "Bk" in values:
        mismatch = (values["M"] > 0) != (values["Bk"] > 0)
        if mismatch.any():
            raise ValueError(f"fetched memory (M={x['M']!r}) and bank (Bk={x['Bk']!r}) must be both zero (dense) "
                             f"or both positive{source_of(df)}; they disagree at {_bad_rows(df, mismatch)}")
    return values


def prepare_inputs(df: pd.DataFrame, form: Form, x: Mapping[str, str], y: str) -> Prepared:
    """Evaluate and validate the variables `form` needs and the target column `y`.

    `x` maps each of the form's variable roles (e.g. N, D) to a column name or an arithmetic
    expression over columns (see `analysis.expressions`); extra roles are ignored, so one
    mapping can serve several forms. Raises ValueError naming the role, column and file for:
    missing roles, unknown columns, non-numeric, missing or non-finite values, non-positive
    values under a log, and memory sizes that disagree (fetched > 0 with an empty bank or
    the reverse).
    """
    values = variable_values(df, form, x)
    target = _checked(df, y, "target", allow_zero=False)
    return Prepared(values=values, y=target, x={r: x[r] for r in form.variable_names}, y_name=y, index=df.index)
