"""Memory kinds: what a memory type stores per unit and how it enters the anchor, one object each.

A kind is an instance of a `MemoryKind` subclass, registered by name in `MEMORY_KINDS` (the same
pattern as `analysis.forms`). It holds

- `tensors`: the per-unit tensors of one memory layer, each an (r, width) matrix, as
  (name, dimension, init) with dimension "d" (d_model), "f" (ffn_dim) or "a" (attn_dim = heads x
  head_dim) and init "normal" (truncated normal), "zeros" or "kaiming" (LoRA A); `specs(model)`
  resolves them to `TensorSpec`s and `unit_width(model)` is their total width (the paper's c0 is
  that times the number of memory layers);
- the hooks the anchor calls in a memory layer (`hiermem.model`), each a no-op unless overridden:

    project_qkv(x, q, k, v, mem, alpha) -> (q, k, v)  before QK-norm and rotary
    attend(q, mem, unit_mask, n_heads, head_dim)       extra attention output (B, h, T, dh), or None
    project_out(out, y, mem, alpha) -> y               after the output projection y = W_o out
    ffn(layer, x, mem, alpha) -> y                     the FFN output (default: the plain SwiGLU)

  `mem[name]` is the fetched tensor `name` of the layer, (B, R, width); `alpha` the LoRA scale.

The registered kinds (a LoRA B is stored transposed, as (r, out)):

    ffn       gate (r, d), up (r, d), down (r, d)        extra SwiGLU hidden units
    lora-ffn  A/B for gate, up, down                     W + alpha * B A on every SwiGLU linear
    lora-qk   A/B for the query and key projections
    lora-vo   A/B for the value and output projections
    kv        key (r, a), value (r, a)                  r extra key/value vectors, no mask, no positions

Every kind has zero effect at initialization (FFN down = 0, LoRA B = 0, KV values = 0). A new kind:
subclass `MemoryKind`, override the hooks it needs and pass an instance to `register_kind`.

Memory acts token by token with its row's weights, so rows that share a memory may come as a group:
x with B*g rows against memories of B rows means rows i*g .. i*g+g-1 use memory i (scoring many
candidate answers of one prompt without copying its memory g times). Every hook accepts that.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hiermem.kernels import attention

if TYPE_CHECKING:  # annotations only: the configs import nothing from here, and nothing else is needed
    from hiermem.config import ModelConfig

Memory = dict[str, torch.Tensor]
INITS = ("normal", "zeros", "kaiming")
DIMENSIONS = ("d", "f", "a")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    width: int
    init: str  # "normal" (truncated normal), "zeros", "kaiming" (LoRA A)


@dataclasses.dataclass(frozen=True)
class MemoryKind:
    """One memory type: its per-unit tensors and the hooks the anchor calls (see the module docstring)."""

    name: str
    description: str
    tensors: tuple[tuple[str, str, str], ...]  # (tensor name, dimension "d" | "f" | "a", init)

    # ----- shapes -----------------------------------------------------------------------
    def specs(self, model: ModelConfig) -> tuple[TensorSpec, ...]:
        """The per-unit tensors of one memory layer, widths resolved for `model`."""
        width = {"d": model.d_model, "f": model.ffn_dim, "a": model.attn_dim}
        return tuple(TensorSpec(name, width[dim], init) for name, dim, init in self.tensors)

    def unit_width(self, model: ModelConfig) -> int:
        """Parameters per unit per memory layer."""
        return sum(s.width for s in self.specs(model))

    # ----- hooks (identity unless a kind overrides them) ----------------------------------
    def project_qkv(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem: Memory,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return q, k, v

    def attend(self, q: torch.Tensor, mem: Memory, unit_mask: torch.Tensor | None, n_heads: int,
               head_dim: int) -> torch.Tensor | None:
        return None

    def project_out(self, out: torch.Tensor, y: torch.Tensor, mem: Memory, alpha: float) -> torch.Tensor:
        return y

    def ffn(self, layer, x: torch.Tensor, mem: Memory, alpha: float) -> torch.Tensor:
        """`layer` is the anchor's SwiGLU (`w12` = [gate; up], `w3` = down, `ffn_dim`, `plain(x)`)."""
        return layer.plain(x)


# ------------------------------------------------------------------------------------- deltas
def _grouped(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.shape[0] == rows:
        return x, tuple(x.shape)
    if x.shape[0] % rows:
        raise ValueError(f"{x.shape[0]} rows cannot share {rows} fetched memories")
    return x.reshape(rows, -1, x.shape[-1]), tuple(x.shape)


def ffn_memory(x: torch.Tensor, mem: Memory, act=F.silu) -> torch.Tensor:
    """Extra gated units: down^T [act(gate x) * (up x)] with per-sequence weights (gather + bmm).

    x: (B, T, d) (or grouped rows); gate/up/down: (B, R, d). With SiLU, equal to widening the anchor's
    SwiGLU by R hidden units (`hiermem.hf` passes a base model's own MLP activation).
    """
    if not isinstance(mem, dict):  # `hiermem.gather_matmul.GatheredFFN`: the rows are still in the bank
        x, shape = _grouped(x, mem.batch)
        return mem.apply(x, act).reshape(shape)
    x, shape = _grouped(x, mem["gate"].shape[0])
    if torch.is_autocast_enabled(x.device.type):  # one cast of x for both products
        x = x.to(torch.get_autocast_dtype(x.device.type))
    hidden = act(torch.bmm(x, mem["gate"].transpose(1, 2))) * torch.bmm(x, mem["up"].transpose(1, 2))
    return torch.bmm(hidden, mem["down"]).reshape(shape[:-1] + (mem["down"].shape[-1],))


def lora_delta(x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * B A x with per-sequence A (B, R, in) and B^T (B, R, out); x: (B, T, in) (or grouped rows)."""
    x, shape = _grouped(x, a.shape[0])
    return (alpha * torch.bmm(torch.bmm(x, a.transpose(1, 2)), b_t)).reshape(shape[:-1] + (b_t.shape[-1],))


def kv_memory_attention(q: torch.Tensor, mem: Memory, unit_mask: torch.Tensor | None,
                        n_heads: int, head_dim: int) -> torch.Tensor:
    """Queries (B, h, T, dh) attend to the fetched key/value vectors (no causal mask, no positions).

    Returns (B, h, T, dh), added to the self-attention output. Blocked units are masked out; a
    sequence whose units are all blocked gets zero.
    """
    batch, units = mem["key"].shape[:2]
    shape = q.shape
    if shape[0] != batch:  # grouped rows: (B*g, h, T, dh) -> (B, h, g*T, dh)
        if shape[0] % batch:
            raise ValueError(f"{shape[0]} rows cannot share {batch} fetched memories")
        q = q.reshape(batch, shape[0] // batch, n_heads, shape[2], head_dim).transpose(1, 2).reshape(
            batch, n_heads, -1, head_dim)
    keys = mem["key"].view(batch, units, n_heads, head_dim).transpose(1, 2)
    values = mem["value"].view(batch, units, n_heads, head_dim).transpose(1, 2)
    if unit_mask is None:
        out = attention(q, keys, values)
    else:
        attn_mask = unit_mask[:, None, None, :].expand(batch, 1, q.shape[2], units)
        out = attention(q, keys, values, attn_mask=attn_mask)
        any_unit = unit_mask.any(dim=1)
        out = torch.where(any_unit[:, None, None, None], torch.nan_to_num(out), torch.zeros_like(out))
    if shape[0] != batch:
        out = out.reshape(batch, n_heads, shape[0] // batch, shape[2], head_dim).transpose(1, 2).reshape(shape)
    return out


# ------------------------------------------------------------------------------------- kinds
class FFNMemory(MemoryKind):
    def ffn(self, layer, x, mem, alpha):
        return layer.plain(x) + ffn_memory(x, mem)


class LoRAFFNMemory(MemoryKind):
    def ffn(self, layer, x, mem, alpha):
        gate_up = layer.w12(x) + torch.cat([lora_delta(x, mem["gate_a"], mem["gate_b"], alpha),
                                            lora_delta(x, mem["up_a"], mem["up_b"], alpha)], dim=-1)
        gate, up = gate_up.split(layer.ffn_dim, dim=-1)
        hidden = F.silu(gate) * up
        return layer.w3(hidden) + lora_delta(hidden, mem["down_a"], mem["down_b"], alpha)


class LoRAQKMemory(MemoryKind):
    def project_qkv(self, x, q, k, v, mem, alpha):
        return (q + lora_delta(x, mem["q_a"], mem["q_b"], alpha),
                k + lora_delta(x, mem["k_a"], mem["k_b"], alpha), v)


class LoRAVOMemory(MemoryKind):
    def project_qkv(self, x, q, k, v, mem, alpha):
        return q, k, v + lora_delta(x, mem["v_a"], mem["v_b"], alpha)

    def project_out(self, out, y, mem, alpha):
        return y + lora_delta(out, mem["o_a"], mem["o_b"], alpha)


class KVMemory(MemoryKind):
    def attend(self, q, mem, unit_mask, n_heads, head_dim):
        # memory keys carry no position, so the caller passes the queries before rotation
        return kv_memory_attention(q, mem, unit_mask, n_heads, head_dim)


# ------------------------------------------------------------------------------------- registry
MEMORY_KINDS: dict[str, MemoryKind] = {}


def register_kind(kind: MemoryKind, replace: bool = False) -> MemoryKind:
    """Add a kind to the registry used by name lookups (`MemoryConfig.type`)."""
    if not isinstance(kind, MemoryKind):
        raise ValueError(f"expected a MemoryKind instance, got {type(kind).__name__}")
    if kind.name in MEMORY_KINDS and not replace:
        raise ValueError(f"a memory kind named {kind.name!r} is already registered (pass replace=True to override)")
    names = [name for name, _, _ in kind.tensors]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"memory kind {kind.name!r}: tensor names must be distinct and at least one, got {names}")
    for name, dim, init in kind.tensors:
        if dim not in DIMENSIONS or init not in INITS:
            raise ValueError(f"memory kind {kind.name!r}, tensor {name!r}: dimension must be one of {DIMENSIONS} "
                             f"and init one of {INITS}, got {dim!r}, {init!r}")
    MEMORY_KINDS[kind.name] = kind
    return kind


def get_kind(kind: str | MemoryKind) -> MemoryKind:
    """The kind registered under `kind` (or `kind` itself); a one-line ValueError listing the known kinds."""
    if isinstance(kind, MemoryKind):
        return kind
    try:
        return MEMORY_KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"invalid config field 'type': unknown memory type {kind!r}; "
                         f"registered: {', '.join(MEMORY_KINDS)}") from None


for _kind in (
    FFNMemory("ffn", "extra SwiGLU hidden units",
              (("gate", "d", "normal"), ("up", "d", "normal"), ("down", "d", "zeros"))),
    LoRAFFNMemory("lora-ffn", "low-rank deltas on the SwiGLU gate, up and down projections",
                  (("gate_a", "d", "kaiming"), ("gate_b", "f", "zeros"), ("up_a", "d", "kaiming"),
                   ("up_b", "f", "zeros"), ("down_a", "f", "kaiming"), ("down_b", "d", "zeros"))),
    LoRAQKMemory("lora-qk", "low-rank deltas on the query and key projections",
                 (("q_a", "d", "kaiming"), ("q_b", "a", "zeros"), ("k_a", "d", "kaiming"), ("k_b", "a", "zeros"))),
    LoRAVOMemory("lora-vo", "low-rank deltas on the value and output projections",
                 (("v_a", "d", "kaiming"), ("v_b", "a", "zeros"), ("o_a", "a", "kaiming"), ("o_b", "d", "zeros"))),
    KVMemory("kv", "extra key/value vectors every query attends to (no causal mask, no positions)",
             (("key", "a", "normal"), ("value", "a", "zeros"))),
):
    register_kind(_kind)
del _kind
