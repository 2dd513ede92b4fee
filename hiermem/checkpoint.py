"""Checkpoints in safetensors, with the YAML config beside them.

Layout of a checkpoint directory:

    config.yaml                 {model: ModelConfig, memory: MemoryConfig | null, hf_base: {path,
                                config_sha256, config} for a memory on a Hugging Face model}
    anchor.safetensors          every anchor tensor (absent for a frozen Hugging Face base: its
                                weights are read from the base directory, whose config hash must match)
    bank/level_<l>.safetensors  the k^l blocks of level l (1-based), one tensor "blocks"
    bank/generic.safetensors    the generic block, one tensor per level ("level_<l>")

The bank is stored per level so that a level can be loaded, shipped or deleted alone (shallow levels
on fast storage, deep ones elsewhere). Loading into a model whose config differs fails with a message
that names the differing fields; every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hiermem.config import MemoryConfig, ModelConfig
from hiermem.hf import HFMemoryLM, check_base, config_fingerprint, load_base
from hiermem.io import atomic_path, atomic_write_text
from hiermem.model import HierMemLM

CONFIG_FILE = "config.yaml"
HF_BASE = "hf_base"  # config.yaml section of a Hugging Face memory: the base's path and config hash
ANCHOR_FILE = "anchor.safetensors"
BANK_DIR = "bank"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})


def _distinct(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without the second name of a tied tensor (e.g. GPT-2's output head = its embedding):
    safetensors stores each tensor once; loading re-fills the alias through the tie."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def config_dict(model: HierMemLM | HFMemoryLM) -> dict:
    out = {"model": model.model_cfg.to_dict(),
           "memory": model.memory_cfg.to_dict() if model.memory_cfg is not None else None}
    if isinstance(model, HFMemoryLM):  # the base is referenced, never copied (unless co-trained)
        digest, config = config_fingerprint(model.anchor.config)
        out[HF_BASE] = {"path": model.base_name, "config_sha256": digest, "config": config}
    return out


def read_hf_base(ckpt_dir: str | Path) -> dict | None:
    """The Hugging Face base a checkpoint's memory belongs to ({path, config_sha256, config}), or None."""
    path = Path(ckpt_dir) / CONFIG_FILE
    return (yaml.safe_load(path.read_text()) or {}).get(HF_BASE) if path.exists() else None


def read_config(ckpt_dir: str | Path) -> tuple[ModelConfig, MemoryConfig | None]:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found: not a hiermem checkpoint directory")
    data = yaml.safe_load(path.read_text()) or {}
    if "model" not in data:
        raise ValueError(f"{path}: missing the 'model' section")
    memory = MemoryConfig.from_dict(data["memory"]) if data.get("memory") else None
    return ModelConfig.from_dict(data["model"]), memory


def save_checkpoint(model: HierMemLM, ckpt_dir: str | Path, extra: dict | None = None) -> Path:
    """Write config, anchor and bank (per level) into `ckpt_dir`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    frozen_base = isinstance(model, HFMemoryLM) and not any(p.requires_grad for p in model.anchor.parameters())
    if not frozen_base:  # a frozen Hugging Face base is read from its own directory: the bank files only
        _save_tensors(_distinct(model.anchor.state_dict()), ckpt_dir / ANCHOR_FILE, {"format": "hiermem-anchor"})
    if model.bank is not None:
        cfg = model.bank.cfg
        for level, param in enumerate(model.bank.levels):
            _save_tensors({"blocks": param.data}, ckpt_dir / BANK_DIR / f"level_{level + 1}.safetensors",
                          {"level": level + 1, "branching": cfg.branching, "units": model.bank.units[level],
                           "memory_type": cfg.type})
        _save_tensors({f"level_{level + 1}": p.data for level, p in enumerate(model.bank.generic)},
                      ckpt_dir / BANK_DIR / "generic.safetensors", {"memory_type": cfg.type})
    payload = config_dict(model)
    if extra:
        payload["extra"] = extra
    atomic_write_text(ckpt_dir / CONFIG_FILE, yaml.safe_dump(payload, sort_keys=False))
    return ckpt_dir


def _mismatch(what: str, ckpt_dir: Path, expected, found) -> ValueError:
    fields = expected.diff(found) if hasattr(expected, "diff") else []
    detail = ", ".join(f"{f}: checkpoint has {_get(found, f)!r}, model has {_get(expected, f)!r}" for f in fields)
    return ValueError(f"checkpoint {str(ckpt_dir)!r} does not match the model's {what} config ({detail or 'differs'})")


def _get(cfg, dotted: str):
    value = cfg.to_dict()
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def load_anchor_weights(model: HierMemLM, ckpt_dir: str | Path) -> None:
    """Load only the anchor (e.g. to start memory training from a pretrained anchor)."""
    ckpt_dir = Path(ckpt_dir)
    model_cfg, _ = read_config(ckpt_dir)
    base = read_hf_base(ckpt_dir)
    if isinstance(model, HFMemoryLM) != (base is not None):
        raise ValueError(f"checkpoint {str(ckpt_dir)!r} is {'a Hugging Face memory' if base else 'a hiermem model'}; "
                         f"the model is {type(model).__name__}")
    if base is not None:  # first: it names every differing field of the base's config
        check_base(model.anchor, base["config_sha256"], base["config"], base["path"], f"checkpoint {str(ckpt_dir)!r}")
    if model_cfg != model.model_cfg:
        raise _mismatch("model", ckpt_dir, model.model_cfg, model_cfg)
    if base is not None and not (ckpt_dir / ANCHOR_FILE).exists():
        return  # a frozen base: its weights are the base directory's
    state = load_file(str(ckpt_dir / ANCHOR_FILE))
    missing, unexpected = model.anchor.load_state_dict(state, strict=False)
    tied = set(model.anchor.state_dict()) - set(_distinct(model.anchor.state_dict()))
    missing = [name for name in missing if name not in tied]  # aliases of a loaded tensor
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(ckpt_dir)!r}: anchor tensors missing {missing}, unexpected {unexpected}")


def load_bank_level(ckpt_dir: str | Path, level: int) -> torch.Tensor:
    """The blocks of one level (1-based) as a tensor, without touching the other levels."""
    path = Path(ckpt_dir) / BANK_DIR / f"level_{level}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found (level {level} of the bank)")
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("blocks")


def load_weights(model: HierMemLM, ckpt_dir: str | Path, levels: list[int] | None = None) -> None:
    """Load anchor and bank into `model`; configs must match exactly (the error names what differs).

    levels: 1-based bank levels to load (default: all); the others keep their current values.
    """
    ckpt_dir = Path(ckpt_dir)
    model_cfg, memory_cfg = read_config(ckpt_dir)
    load_anchor_weights(model, ckpt_dir)
    if (memory_cfg is None) != (model.memory_cfg is None or not model.memory_cfg.enabled):
        raise ValueError(f"checkpoint {str(ckpt_dir)!r} has memory {memory_cfg and memory_cfg.multipliers}, "
                         f"the model has {model.memory_cfg and model.memory_cfg.multipliers}")
    if model.bank is None:
        return
    if memory_cfg != model.memory_cfg:
        raise _mismatch("memory", ckpt_dir, model.memory_cfg, memory_cfg)
    wanted = levels or list(range(1, memory_cfg.depth + 1))
    with torch.no_grad():
        for level in wanted:
            blocks = load_bank_level(ckpt_dir, level)
            target = model.bank.levels[level - 1]
            if blocks.shape != target.shape:
                raise ValueError(f"bank level {level} in {str(ckpt_dir)!r} has shape {tuple(blocks.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(blocks)
        generic = load_file(str(ckpt_dir / BANK_DIR / "generic.safetensors"))
        for level, param in enumerate(model.bank.generic):
            param.copy_(generic[f"level_{level + 1}"])


def load_model(ckpt_dir: str | Path) -> HierMemLM | HFMemoryLM:
    """Build the model described by a checkpoint's config.yaml and load its weights (a Hugging Face memory:
    its base from the local directory it names, refused if that base's config changed)."""
    model_cfg, memory_cfg = read_config(ckpt_dir)
    base = read_hf_base(ckpt_dir)
    if base is not None:
        model = HFMemoryLM(load_base(base["path"]), memory_cfg, base_name=base["path"])
        load_weights(model, ckpt_dir)
        return model
    model = HierMemLM(model_cfg, memory_cfg)
    load_weights(model, ckpt_dir)
    return model


def checkpoint_summary(ckpt_dir: str | Path) -> str:
    model_cfg, memory_cfg = read_config(ckpt_dir)
    return json.dumps({"model": model_cfg.to_dict(), "memory": memory_cfg.to_dict() if memory_cfg else None})
