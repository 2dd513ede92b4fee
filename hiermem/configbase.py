"""Dataclass configs with a strict YAML/dict round trip.

Every config in hiermem subclasses `Config`. Loading rejects unknown keys and wrong types with a
`ValueError` that names the field, so a typo in a YAML file never silently falls back to a default.
Subclasses validate their values in `validate()` (called from `__post_init__`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T", bound="Config")


def require(cond: bool, field: str, expected: str, got: Any) -> None:
    """Raise `ValueError` naming `field`, what was expected and what was given, unless `cond`."""
    if not cond:
        raise ValueError(f"invalid config field '{field}': expected {expected}, got {got!r}")


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Convert a YAML value to the annotated type (lists -> tuples, nested dicts -> configs)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, field)
            except ValueError as e:
                errors.append(str(e))
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise ValueError(f"invalid config field '{field}': {value!r} matches none of {tp}{detail}")
    if origin is typing.Literal:
        require(value in args, field, f"one of {list(args)}", value)
        return value
    if origin in (tuple, list):
        require(isinstance(value, (list, tuple)), field, f"a list ({tp})", value)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            require(len(value) == len(args), field, f"{len(args)} items", value)
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        require(isinstance(value, dict), field, "a mapping", value)
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, field): _coerce(v, vt, f"{field}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        require(isinstance(value, dict), field, f"a mapping for {tp.__name__}", value)
        return tp.from_dict(value, _prefix=f"{field}.")
    if tp is bool:
        require(isinstance(value, bool), field, "true or false", value)
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), field, "an integer", value)
        return value
    if tp is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), field, "a number", value)
        return float(value)
    if tp is str:
        require(isinstance(value, str), field, "a string", value)
        return value
    return value


ADDED = "hiermem_added"  # field metadata key: see `added_field`


def added_field(default: Any) -> Any:
    """A config field added after runs were identified by their config: at its default it is left out of
    `to_dict` (and so of the YAML and of run ids, which hash the dict), so every earlier run keeps its id
    and is reused; set, it is written like any field."""
    return dataclasses.field(default=default, metadata={ADDED: True})


def plain(value: Any) -> Any:
    """Configs (nested in dicts, lists and tuples) as plain dicts and lists, ready for YAML/JSON."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: frozen dataclass with validation and strict dict/YAML round trip."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    @classmethod
    def from_dict(cls: type[T], data: dict | None, _prefix: str = "") -> T:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(_prefix + u for u in unknown)} for "
                             f"{cls.__name__}; allowed: {', '.join(sorted(names))}")
        kwargs = {k: _coerce(v, hints[k], _prefix + k) for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Every field, except a field made with `added_field` while it holds its default."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.init and not (f.metadata.get(ADDED) and getattr(self, f.name) == f.default)}

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[T], text: str) -> T:
        return cls.from_dict(yaml.safe_load(text) or {})

    def save(self, path: str | Path) -> Path:
        from hiermem.io import atomic_write_text
        return atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r}: expected a mapping at the top level")
        try:
            return cls.from_dict(data or {})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def diff(self, other: "Config", _prefix: str = "") -> list[str]:
        """Names of the fields (dotted) whose values differ between two configs of the same class."""
        a, b = self.to_dict(), other.to_dict()
        return _dict_diff(a, b, _prefix)


def _dict_diff(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
