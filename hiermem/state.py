"""Resume state without pickles: nested Python state as safetensors (tensors) + JSON (everything else).

A training run's resume state (optimizer moments and step counters, the sparse bank optimizer's
per-block tables and learning-rate history, the loader position) is a tree of dicts, lists, tuples,
numbers, strings and tensors. `save_state` writes its tensors to `<name>.safetensors` and the tree to
`<name>.json`, where a tensor is `{"__tensor__": key}`, a tuple `{"__tuple__": [...]}` and a dict
with non-string keys (torch optimizers key their state by parameter index) `{"__dict__": [[k, v],
...]}`. Loading reads only those two formats, so a resume state can never run code; a pickled
resume state from an older version (`train_state.pt`) is refused, naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hiermem.io import atomic_path, atomic_write_text

LEGACY_PICKLE = "train_state.pt"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a resume state (tensors, numbers, strings, "
                    f"lists, tuples and dicts only)")


def _decode(value: Any, tensors: dict[str, torch.Tensor], device: torch.device | str) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]].to(device)
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors, device) for v in value["__tuple__"])
        if set(value) == {"__dict__"}:
            return {_decode(k, tensors, device): _decode(v, tensors, device) for k, v in value["__dict__"]}
        return {k: _decode(v, tensors, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, device) for v in value]
    return value


def save_state(state: Any, directory: str | Path, name: str = "train_state") -> None:
    """Write `state` as `<name>.safetensors` + `<name>.json` in `directory` (each atomically)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    with atomic_path(directory / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(directory / f"{name}.json", json.dumps(tree))


def has_state(directory: str | Path, name: str = "train_state") -> bool:
    """True if `directory` holds a resume state; a legacy pickle there raises instead of being loaded."""
    directory = Path(directory)
    if (directory / LEGACY_PICKLE).exists():
        raise ValueError(f"{directory / LEGACY_PICKLE} is a pickled resume state from an older hiermem; pickles are "
                         f"never loaded (they can run code). Delete {directory} to restart the run from scratch")
    return (directory / f"{name}.json").exists() and (directory / f"{name}.safetensors").exists()


def load_state(directory: str | Path, name: str = "train_state", device: torch.device | str = "cpu") -> Any:
    """Read a state written by `save_state` (safetensors + JSON only; nothing is unpickled)."""
    directory = Path(directory)
    if not has_state(directory, name):
        raise FileNotFoundError(f"no resume state {name}.json/.safetensors in {str(directory)!r}")
    try:
        tree = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / (name + '.json')} is not valid JSON: {e}") from e
    return _decode(tree, load_file(str(directory / f"{name}.safetensors")), device)
