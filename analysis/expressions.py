"""A tiny, safe arithmetic evaluator over DataFrame columns (no `eval`).

Lets users write derived variables such as ``Training FLOP/(6*Model Size)``. Column names
may contain spaces and punctuation: at each position the longest column name that matches
wins, so ``Model Size`` is one column. Backticks quote a name explicitly
(``\\`loss-val\\` * 2``). Supported: numbers (1e9), + - * / and ** or ^ (power), unary
minus, parentheses and the functions log, log2, log10, exp, sqrt, abs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

FUNCTIONS = {"log": np.log, "log2": np.log2, "log10": np.log10, "exp": np.exp, "sqrt": np.sqrt, "abs": np.abs}
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_OPERATORS = ("**", "+", "-", "*", "/", "^", "(", ")")
_STOP = set("+-*/^()")


@dataclass(frozen=True)
class _Token:
    kind: str   # "num", "col", "func", "op"
    text: str
    value: float | None = None


def _source(df: pd.DataFrame) -> str:
    src = df.attrs.get("source")
    return f" in {src}" if src else ""


def _unknown_column(name: str, df: pd.DataFrame) -> ValueError:
    cols = ", ".join(repr(str(c)) for c in df.columns)
    return ValueError(f"column {name!r} not found{_source(df)}; available columns: {cols}")


def _tokenize(expr: str, df: pd.DataFrame) -> list[_Token]:
    columns = sorted((str(c) for c in df.columns), key=len, reverse=True)
    tokens: list[_Token] = []
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch.isspace():
            i += 1
            continue
        if ch == "`":
            end = expr.find("`", i + 1)
            if end < 0:
                raise ValueError(f"unclosed backtick in expression {expr!r}")
            name = expr[i + 1:end]
            if name not in columns:
                raise _unknown_column(name, df)
            tokens.append(_Token("col", name))
            i = end + 1
            continue
        word = re.match(r"[A-Za-z_]\w*", expr[i:])
        if word and word.group(0) in FUNCTIONS and expr[i + len(word.group(0)):].lstrip().startswith("("):
            tokens.append(_Token("func", word.group(0)))
            i += len(word.group(0))
            continue
        # Longest column name starting here that is not the prefix of a longer word.
        match = next((c for c in columns if expr.startswith(c, i)
                      and not (i + len(c) < len(expr) and (expr[i + len(c)].isalnum() or expr[i + len(c)] == "_")
                               and (c[-1].isalnum() or c[-1] == "_"))), None)
        if match is not None:
            tokens.append(_Token("col", match))
            i += len(match)
            continue
        num = _NUMBER.match(expr, i)
        if num:
            tokens.append(_Token("num", num.group(0), float(num.group(0))))
            i = num.end()
            continue
        op = next((o for o in _OPERATORS if expr.startswith(o, i)), None)
        if op is not None:
            tokens.append(_Token("op", op))
            i += len(op)
            continue
        # Anything else is a name we do not know: report the whole run up to an operator.
        j = i
        while j < len(expr) and expr[j] not in _STOP:
            j += 1
        raise _unknown_column(expr[i:j].strip(), df)
    return tokens


class _Parser:
    """Recursive descent: expr := term (+|- term)*; term := unary (*|/ unary)*;
    unary := (+|-) unary | power; power := atom ((**|^) unary)?; atom := num | col | f(expr) | (expr)."""

    def __init__(self, tokens: list[_Token], df: pd.DataFrame, expr: str):
        self.tokens, self.df, self.expr, self.pos = tokens, df, expr, 0
        self.columns: list[str] = []

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, text: str | None = None) -> _Token:
        tok = self.peek()
        if tok is None or (text is not None and tok.text != text):
            want = repr(text) if text else "a value"
            got = repr(tok.text) if tok else "end of expression"
            raise ValueError(f"malformed expression {self.expr!r}: expected {want}, got {got}")
        self.pos += 1
        return tok

    def parse(self):
        value = self.expression()
        if self.peek() is not None:
            raise ValueError(f"malformed expression {self.expr!r}: unexpected {self.peek().text!r}")
        return value

    def expression(self):
        value = self.term()
        while (tok := self.peek()) is not None and tok.kind == "op" and tok.text in "+-":
            self.pos += 1
            rhs = self.term()
            value = value + rhs if tok.text == "+" else value - rhs
        return value

    def term(self):
        value = self.unary()
        while (tok := self.peek()) is not None and tok.kind == "op" and tok.text in ("*", "/"):
            self.pos += 1
            rhs = self.unary()
            with np.errstate(divide="ignore", invalid="ignore"):
                value = value * rhs if tok.text == "*" else value / rhs
        return value

    def unary(self):
        tok = self.peek()
        if tok is not None and tok.kind == "op" and tok.text in "+-":
            self.pos += 1
            value = self.unary()
            return -value if tok.text == "-" else value
        return self.power()

    def power(self):
        base = self.atom()
        tok = self.peek()
        if tok is not None and tok.kind == "op" and tok.text in ("**", "^"):
            self.pos += 1
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                return np.power(base, self.unary())
        return base

    def atom(self):
        tok = self.take()
        if tok.kind == "num":
            return tok.value
        if tok.kind == "col":
            self.columns.append(tok.text)
            return _numeric_column(self.df, tok.text)
        if tok.kind == "func":
            self.take("(")
            arg = self.expression()
            self.take(")")
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                return FUNCTIONS[tok.text](arg)
        if tok.text == "(":
            value = self.expression()
            self.take(")")
            return value
        raise ValueError(f"malformed expression {self.expr!r}: unexpected {tok.text!r}")


def _numeric_column(df: pd.DataFrame, name: str) -> np.ndarray:
    column = next(c for c in df.columns if str(c) == name)
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(values) & df[column].notna().to_numpy()
    if bad.any():
        example = df[column][bad].iloc[0]
        raise ValueError(f"column {name!r}{_source(df)} is not numeric (e.g. {example!r} in row {int(np.argmax(bad))})")
    return values


def evaluate(df: pd.DataFrame, expr: str) -> np.ndarray:
    """Evaluate `expr` (a column name or arithmetic over columns) to a float array of len(df)."""
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"empty expression {expr!r}")
    if expr in map(str, df.columns):  # the common case, and names the tokenizer cannot split
        return _numeric_column(df, expr)
    parser = _Parser(_tokenize(expr, df), df, expr)
    value = parser.parse()
    return np.broadcast_to(np.asarray(value, dtype=float), (len(df),)).copy()


def columns_used(df: pd.DataFrame, expr: str) -> list[str]:
    """The column names an expression refers to (for error messages and provenance)."""
    if expr in map(str, df.columns):
        return [expr]
    parser = _Parser(_tokenize(expr, df), df, expr)
    parser.parse()
    return parser.columns
