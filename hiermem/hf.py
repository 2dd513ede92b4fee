"""Post-hoc hierarchical memories on Hugging Face causal LMs (the paper's Table 2), without forking them.

`HFMemoryLM(base, memory)` wraps a `transformers` causal LM (Llama, Qwen2, Gemma 3 and GPT-2 families,
or any model whose decoder layers hold an `mlp` with an activation module `act_fn` / `act`) and adds
FFN memories as extra hidden units of the chosen layers' MLPs: a forward hook adds

    down^T [act(gate x) * (up x)]

to the MLP's output, with the per-sequence gate/up/down rows fetched from a `hiermem.memory.MemoryBank`
(the same bank, fetch, generic block and blocking as the anchor's; `act` is the model's own MLP
activation: SiLU for Llama/Qwen2, tanh-GELU for Gemma 3 and GPT-2). `down` starts at zero, so at
initialisation the logits are the base model's exactly. The base model is frozen (or co-trained with
`TrainStepper(freeze_anchor=False)`): the wrapper exposes the attributes `TrainStepper` drives (`anchor`
is the base model, `bank`, `fetch`, `forward(tokens, segment_ids, paths, use_generic, blocked,
active)`), so training uses the same stepper, sparse bank optimizer and generic control. As in the
paper's post-hoc runs, attention is not restricted to documents: segment ids only mark padding.

A bank checkpoint (`save_bank` / `load_bank`) holds the bank files only, beside `hf_memory.json`: the
base model's name or path, the SHA-256 of its config and that config, and the memory config. Loading it
onto a base model with another config is refused, naming the differing fields. Nothing is downloaded:
`load_base(path)` reads a local directory (`from_pretrained(..., local_files_only=True)`).

`hf_model_config(config)` maps a model config (a dict, e.g. a local config.json) to the `ModelConfig`
the accounting needs (d_model, layers, ...); `hiermem count --hf CONFIG.json --memory 512,128,32,0`
prints the fetched and bank sizes (the paper's Table 2 sizes come out exactly).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from hiermem.config import MemoryConfig, ModelConfig
from hiermem.io import atomic_dir
from hiermem.memory import ActiveRows, FetchedMemory, MemoryBank
from hiermem.memory_kinds import ffn_memory

CONFIG_FILE = "hf_memory.json"
BANK_FILE = "bank.safetensors"
# config keys that do not describe the network (refusing a bank over them would be wrong)
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
             "_attn_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
             "return_dict", "bos_token_id", "eos_token_id", "pad_token_id"}


def _get(config: dict, *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def hf_model_config(config: dict | object) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face model config (dict or `PretrainedConfig`): width, layers, heads,
    MLP width and vocabulary, under the names of the Llama/Qwen2/Gemma 3 (`hidden_size`, ...) and GPT-2
    (`n_embd`, ...) families. A config without them is refused naming what is missing."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    if "text_config" in cfg and "hidden_size" not in cfg and "n_embd" not in cfg:
        cfg = cfg["text_config"]  # multimodal wrappers (e.g. Gemma 3) keep the language model's here
    d = _get(cfg, "hidden_size", "n_embd", "d_model")
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, "num_attention_heads", "n_head")
    vocab = _get(cfg, "vocab_size")
    missing = [name for name, value in (("hidden_size/n_embd", d), ("num_hidden_layers/n_layer", layers),
                                        ("num_attention_heads/n_head", heads), ("vocab_size", vocab)) if value is None]
    if missing:
        raise ValueError(f"invalid Hugging Face config: expected the fields {', '.join(missing)} "
                         f"(model_type {cfg.get('model_type')!r})")
    ffn = _get(cfg, "intermediate_size", "n_inner", default=4 * d)
    head_dim = _get(cfg, "head_dim", default=d // heads)
    return ModelConfig(d_model=int(d), n_layers=int(layers), n_heads=int(heads), head_dim=int(head_dim),
                       ffn_dim=int(ffn), vocab_size=int(vocab), tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                       max_seq_len=int(_get(cfg, "max_position_embeddings", "n_positions", default=2048)))


def config_fingerprint(config: dict | object) -> tuple[str, dict]:
    """(SHA-256 of the canonical JSON, the dict it hashes) of a model config, without volatile keys."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    kept = {k: v for k, v in sorted(cfg.items()) if k not in _VOLATILE}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)


def decoder_mlps(base: nn.Module) -> list[nn.Module]:
    """The MLP module of every decoder layer; a model without them is refused naming its class."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        holder = base
        for part in path.split("."):
            holder = getattr(holder, part, None)
            if holder is None:
                break
        if holder is not None:
            mlps = [getattr(layer, "mlp", None) for layer in holder]
            if mlps and all(m is not None and _activation(m) is not None for m in mlps):
                return mlps
    raise ValueError(f"{type(base).__name__}: its decoder layers have no MLP with an activation module "
                     f"(`mlp.act_fn` or `mlp.act`) to add memory units to; supported: Llama, Qwen2, Gemma 3, GPT-2 "
                     f"and models built like them")


def _activation(mlp: nn.Module) -> nn.Module | None:
    return getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)


class HFMemoryLM(nn.Module):
    """A frozen (or co-trained) Hugging Face causal LM with a hierarchical FFN memory bank."""

    kv_cache = False  # evaluation scores whole sequences (`hiermem.probing`'s path without hiermem's cache)

    @property
    def fast(self) -> bool:
        """Always False: the fast paths of `hiermem.kernels` belong to hiermem's own model (setting it, as
        `evaluate_run` does, changes nothing)."""
        return False

    @fast.setter
    def fast(self, value: bool) -> None:
        pass

    def __init__(self, base: nn.Module, memory: MemoryConfig, base_name: str = ""):
        super().__init__()
        if memory.type != "ffn":
            raise ValueError(f"invalid config field 'type': post-hoc memories on {type(base).__name__} are FFN "
                             f"memories (extra MLP units), got {memory.type!r}")
        self.anchor = base
        self.base_name = base_name or getattr(base.config, "_name_or_path", "") or type(base).__name__
        self.model_cfg = hf_model_config(base.config)
        mlps = decoder_mlps(base)
        layers = memory.memory_layers(self.model_cfg.n_layers)
        if len(mlps) != self.model_cfg.n_layers or (layers and max(layers) >= len(mlps)):
            raise ValueError(f"invalid config field 'placement': the memory's layers {list(layers)} do not fit "
                             f"{type(base).__name__}'s {len(mlps)} decoder layers")
        self.memory_cfg = memory
        self.bank = MemoryBank(self.model_cfg, memory)
        for p in base.parameters():
            p.requires_grad_(False)
        self._fetched: FetchedMemory | None = None
        self._hooks = [mlps[layer].register_forward_hook(self._hook(layer, _activation(mlps[layer]))) for layer in layers]

    def _hook(self, layer: int, act: nn.Module):
        def add_units(module, args, output):
            if self._fetched is None:
                return output
            x = args[0]
            mem = self._fetched.for_layer(layer)
            if isinstance(mem, dict):
                mem = {name: t.to(x.dtype) for name, t in mem.items()}
            return output + ffn_memory(x, mem, act)
        return add_units

    def fetch(self, paths: torch.Tensor | None, use_generic: torch.Tensor | None = None,
              blocked: torch.Tensor | None = None, active: dict[int, ActiveRows] | None = None) -> FetchedMemory | None:
        return self.bank.fetch_for(paths, use_generic, blocked, active)

    def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None, paths: torch.Tensor | None = None,
                use_generic: torch.Tensor | None = None, blocked: torch.Tensor | None = None,
                active: dict[int, ActiveRows] | None = None, last_n: int | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T or last_n, vocab); segment ids < 0 mark padding (masked out)."""
        self._fetched = self.fetch(paths, use_generic, blocked, active)
        try:
            mask = None if segment_ids is None else (segment_ids >= 0).long()
            # positions count real tokens only, so a left-padded prompt is placed as it would be alone
            # (absolute position embeddings, GPT-2, depend on it; rotary ones do not)
            positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.anchor(input_ids=tokens, attention_mask=mask, position_ids=positions).logits
        finally:
            self._fetched = None
        return logits if last_n is None else logits[:, -last_n:]

    def num_params(self) -> dict[str, int]:
        return {"anchor": sum(p.numel() for p in self.anchor.parameters()),
                **{f"bank_level{level + 1}": p.numel() for level, p in enumerate(self.bank.levels)},
                "generic": sum(p.numel() for p in self.bank.generic)}


def load_base(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM from a local directory (config.json + weights); nothing is downloaded."""
    from transformers import AutoModelForCausalLM
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {str(path)!r}: expected a config.json there (weights are "
                                f"loaded from a local path; nothing is downloaded)")
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)


def save_bank(model: HFMemoryLM, out_dir: str | Path) -> Path:
    """Write the bank (levels and generic block) and `hf_memory.json` atomically; the base model is
    referenced by name/path and config hash, never copied."""
    digest, config = config_fingerprint(model.anchor.config)
    tensors = {f"level_{level + 1}": p.detach().cpu().contiguous() for level, p in enumerate(model.bank.levels)}
    tensors.update({f"generic_{level + 1}": p.detach().cpu().contiguous() for level, p in enumerate(model.bank.generic)})
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / BANK_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps({"base": model.base_name, "config_sha256": digest,
                                                   "base_config": config, "memory": model.memory_cfg.to_dict()},
                                                  indent=2, sort_keys=True))
    return out_dir


def check_base(base: nn.Module, digest: str, saved: dict, name: str, what: str) -> None:
    """Refuse (naming the differing fields) a base model whose config is not the one `what` was trained on."""
    mine, config = config_fingerprint(base.config)
    if mine != digest:
        differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise ValueError(f"{what} was trained on {name!r}, whose config differs from {type(base).__name__}'s in: "
                         + ", ".join(f"{k} ({saved.get(k)!r} vs {config.get(k)!r})" for k in differ[:8]))


def load_bank(base: nn.Module, bank_dir: str | Path) -> HFMemoryLM:
    """Attach a saved bank to `base`; refused (naming the differing fields) if base's config differs."""
    bank_dir = Path(bank_dir)
    meta_path = bank_dir / CONFIG_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(bank_dir)!r} is not a post-hoc memory bank: no {CONFIG_FILE} there")
    meta = json.loads(meta_path.read_text())
    check_base(base, meta["config_sha256"], meta["base_config"], meta["base"], f"bank {str(bank_dir)!r}")
    model = HFMemoryLM(base, MemoryConfig.from_dict(meta["memory"]), base_name=meta["base"])
    tensors = load_file(str(bank_dir / BANK_FILE))
    with torch.no_grad():
        for level, p in enumerate(model.bank.levels):
            p.copy_(tensors[f"level_{level + 1}"])
        for level, p in enumerate(model.bank.generic):
            p.copy_(tensors[f"generic_{level + 1}"])
    return model
