"""Hierarchical memory bank and the memory types (FFN / LoRA / KV).

A tree with branching k and depth p has k^l nodes at level l (1-based, as in the paper). Every node
owns one memory block. A sequence with cluster path (i1, ..., ip) fetches the block of each node on
its root-to-leaf path; the node at level l has the flat, row-major index

    node(l) = i1 * k^(l-1) + i2 * k^(l-2) + ... + il

(the same convention as `hiermem.retriever.node_index`).

Storage. Level l is one parameter of shape (k^l, block_numel_l): one row per block, so a fetch is a
row gather and a sparse optimizer touches whole rows. A row holds, for each memory layer in order,
each of the type's tensors as an (r_l, width) matrix ("unit-major"). Blocks of different levels are
concatenated along the unit axis, which for every type is just a bigger memory:

    ffn       gate (r, d), up (r, d), down (r, d)        extra SwiGLU hidden units
    lora-ffn  A/B for gate, up, down (B stored as B^T)  W + alpha * B A on every SwiGLU linear
    lora-qk   A/B for the query and key projections
    lora-vo   A/B for the value and output projections
    kv        key (r, h*dh), value (r, h*dh)            r extra key/value vectors, no mask, no positions

All types have zero effect at initialization (FFN down = 0, LoRA B = 0, KV values = 0), so the
anchor's outputs are unchanged at step 0.

A *generic* block (context-independent, the size of one fetch) can stand in for the fetched memory
of any sequence. *Blocked* nodes (or whole subtrees) contribute nothing: their rows are zeroed in
the fetch, which also stops their gradients, and KV keys of blocked units are masked out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiermem.config import MemoryConfig, ModelConfig
from hiermem.configbase import require


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    width: int
    init: str  # "normal" (truncated normal), "zeros", "kaiming" (LoRA A)


def memory_tensor_specs(model: ModelConfig, memory_type: str) -> tuple[TensorSpec, ...]:
    """The per-unit tensors of one memory layer for a memory type (each is (r, width))."""
    d, f, a = model.d_model, model.ffn_dim, model.attn_dim
    if memory_type == "ffn":
        return (TensorSpec("gate", d, "normal"), TensorSpec("up", d, "normal"), TensorSpec("down", d, "zeros"))
    if memory_type == "lora-ffn":
        return (TensorSpec("gate_a", d, "kaiming"), TensorSpec("gate_b", f, "zeros"),
                TensorSpec("up_a", d, "kaiming"), TensorSpec("up_b", f, "zeros"),
                TensorSpec("down_a", f, "kaiming"), TensorSpec("down_b", d, "zeros"))
    if memory_type == "lora-qk":
        return (TensorSpec("q_a", d, "kaiming"), TensorSpec("q_b", a, "zeros"),
                TensorSpec("k_a", d, "kaiming"), TensorSpec("k_b", a, "zeros"))
    if memory_type == "lora-vo":
        return (TensorSpec("v_a", d, "kaiming"), TensorSpec("v_b", a, "zeros"),
                TensorSpec("o_a", a, "kaiming"), TensorSpec("o_b", d, "zeros"))
    if memory_type == "kv":
        return (TensorSpec("key", a, "normal"), TensorSpec("value", a, "zeros"))
    raise ValueError(f"invalid config field 'type': unknown memory type {memory_type!r}")


def unit_width(model: ModelConfig, memory_type: str) -> int:
    """Parameters per unit per memory layer (the paper's c0 is this times the number of layers)."""
    return sum(s.width for s in memory_tensor_specs(model, memory_type))


def node_indices(paths: torch.Tensor, branching: int, depth: int) -> torch.Tensor:
    """(B, >=depth) cluster paths -> (B, depth) flat node index per level (row-major prefixes)."""
    paths = paths[:, :depth].long()
    out = torch.empty_like(paths)
    acc = torch.zeros(paths.shape[0], dtype=torch.long, device=paths.device)
    for level in range(depth):
        acc = acc * branching + paths[:, level]
        out[:, level] = acc
    return out


@dataclasses.dataclass
class ActiveRows:
    """The rows of one level touched in a step, as leaf tensors (the sparse-training path).

    ids: sorted unique node indices (U,); rows: (U, block_numel) leaf tensor that requires grad.
    """

    ids: torch.Tensor
    rows: torch.Tensor


@dataclasses.dataclass
class FetchedMemory:
    """Per-sequence memory, ready for the anchor: tensors[name] is (n_mem_layers, B, R, width)."""

    tensors: dict[str, torch.Tensor]
    unit_mask: torch.Tensor | None  # (B, R) bool, False where a unit is blocked; None if none blocked
    layer_slot: dict[int, int]       # anchor layer index -> index into the first axis
    memory_type: str
    lora_alpha: float

    def for_layer(self, layer: int) -> dict[str, torch.Tensor] | None:
        slot = self.layer_slot.get(layer)
        if slot is None:
            return None
        return {name: t[slot] for name, t in self.tensors.items()}


class MemoryBank(nn.Module):
    """All memory blocks of a tree, plus the optional generic block.

    `levels[l]` holds the k^(l+1) blocks of 0-based level l (an empty placeholder when r_l = 0).
    """

    def __init__(self, model_cfg: ModelConfig, cfg: MemoryConfig):
        super().__init__()
        require(cfg.enabled, "multipliers", "at least one level with r > 0 to build a bank", cfg.multipliers)
        self.model_cfg, self.cfg = model_cfg, cfg
        self.specs = memory_tensor_specs(model_cfg, cfg.type)
        self.memory_layers = cfg.memory_layers(model_cfg.n_layers)
        self.units = cfg.units_per_layer(model_cfg.n_layers)
        width = sum(s.width for s in self.specs)
        self.block_numel = tuple(len(self.memory_layers) * r * width for r in self.units)
        self.levels = nn.ParameterList()
        self.generic = nn.ParameterList()
        for level, numel in enumerate(self.block_numel):
            n_nodes = cfg.nodes_at_level(level) if numel else 0
            self.levels.append(nn.Parameter(torch.empty(n_nodes, numel)))
            self.generic.append(nn.Parameter(torch.empty(1 if cfg.generic else 0, numel)))
        # blocked nodes per level (not saved with the weights: blocking is an evaluation-time choice)
        for level in range(cfg.depth):
            self.register_buffer(f"blocked_{level}", torch.zeros(cfg.nodes_at_level(level), dtype=torch.bool),
                                 persistent=False)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- initialization
    @torch.no_grad()
    def init_rows_(self, rows: torch.Tensor, level: int, generator: torch.Generator | None = None) -> None:
        """Initialize rows of `level` in place: gate/up/keys truncated normal (std `init_std`, by default
        1/sqrt(d_model)), down/B/values zero."""
        r = self.units[level]
        if rows.numel() == 0 or r == 0:
            return
        view = rows.view(rows.shape[0], len(self.memory_layers), -1)
        offset = 0
        std = self.cfg.resolved_init_std(self.model_cfg.d_model)
        for spec in self.specs:
            part = view[:, :, offset:offset + r * spec.width]
            offset += r * spec.width
            if spec.init == "zeros":
                part.zero_()
            elif spec.init == "normal":
                part.copy_(torch.nn.init.trunc_normal_(torch.empty(part.shape), std=std, a=-3 * std, b=3 * std,
                                                       generator=generator))
            else:  # LoRA A: Kaiming-uniform as nn.Linear does, bound = 1/sqrt(fan_in), fan_in = width
                bound = 1.0 / math.sqrt(spec.width)
                part.copy_(torch.empty(part.shape).uniform_(-bound, bound, generator=generator))

    def reset_parameters(self) -> None:
        for level in range(self.cfg.depth):
            self.init_rows_(self.levels[level].data, level)
            self.init_rows_(self.generic[level].data, level)

    # ----------------------------------------------------------------------------- blocking
    def block(self, prefixes: Iterable[Sequence[int]]) -> None:
        """Block the nodes (and their whole subtrees) given as path prefixes, e.g. (3,) or (3, 7)."""
        k = self.cfg.branching
        for prefix in prefixes:
            prefix = tuple(int(i) for i in prefix)
            require(1 <= len(prefix) <= self.cfg.depth, "blocked path", f"1 to {self.cfg.depth} levels", prefix)
            require(all(0 <= i < k for i in prefix), "blocked path", f"indices in [0, {k - 1}]", prefix)
            node = 0
            for i in prefix:
                node = node * k + i
            for level in range(len(prefix) - 1, self.cfg.depth):
                span = k ** (level - len(prefix) + 1)
                getattr(self, f"blocked_{level}")[node * span:(node + 1) * span] = True

    def block_fraction(self, fraction: float, level: int = 0, seed: int = 0) -> list[tuple[int, ...]]:
        """Block a random `fraction` of the nodes at 0-based `level` (with their subtrees)."""
        require(0.0 <= fraction <= 1.0, "fraction", "a number in [0, 1]", fraction)
        n = self.cfg.nodes_at_level(level)
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=g)[: round(fraction * n)].tolist()
        prefixes = [tuple(_unflatten(node, self.cfg.branching, level + 1)) for node in chosen]
        self.block(prefixes)
        return prefixes

    def unblock_all(self) -> None:
        for level in range(self.cfg.depth):
            getattr(self, f"blocked_{level}").zero_()

    # ----------------------------------------------------------------------------- fetch
    def node_indices(self, paths: torch.Tensor) -> torch.Tensor:
        require(paths.dim() == 2 and paths.shape[1] >= self.cfg.depth, "paths",
                f"a (batch, >= {self.cfg.depth}) tensor of cluster indices", tuple(paths.shape))
        p = paths[:, : self.cfg.depth]
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= self.cfg.branching):
            raise ValueError(f"invalid config field 'paths': expected indices in [0, {self.cfg.branching - 1}], "
                             f"got values in [{int(p.min())}, {int(p.max())}]")
        return node_indices(p, self.cfg.branching, self.cfg.depth)

    def fetch(self, paths: torch.Tensor, use_generic: torch.Tensor | None = None,
              blocked: torch.Tensor | None = None, active: dict[int, ActiveRows] | None = None) -> FetchedMemory:
        """Gather each sequence's blocks and concatenate them along the unit axis.

        paths: (B, depth) cluster indices. use_generic: (B,) bool, True to use the generic block instead.
        blocked: (B, depth) bool, extra per-sequence blocking on top of the bank's blocked nodes.
        active: per level, the rows touched this step as leaf tensors (sparse training); when None
        the rows are gathered from the level parameters (gradients then land in `levels[l].grad`).
        """
        nodes = self.node_indices(paths)
        batch = nodes.shape[0]
        if use_generic is not None:
            require(self.cfg.generic, "generic", "true to use the generic block", self.cfg.generic)
            use_generic = use_generic.to(torch.bool).to(nodes.device)
        parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in self.specs}
        mask_parts, any_blocked = [], False
        n_layers = len(self.memory_layers)
        for level, r in enumerate(self.units):
            if r == 0:
                continue
            node = nodes[:, level].contiguous()
            keep = ~getattr(self, f"blocked_{level}")[node]
            if blocked is not None:
                keep = keep & ~blocked[:, level].to(keep.device)
            fetched = keep if use_generic is None else keep & ~use_generic  # rows really read
            if active is not None and level in active:
                table, ids = active[level].rows, active[level].ids
                if len(ids):
                    pos = torch.searchsorted(ids, node).clamp(max=len(ids) - 1)
                    found = ids[pos] == node
                else:
                    pos, found = torch.zeros_like(node), torch.zeros_like(keep)
                require(bool(found[fetched].all()), "active rows", "every fetched node of the batch",
                        node[fetched & ~found].tolist())
                if not len(ids):
                    table = table.new_zeros(1, table.shape[1])
            else:
                table, pos = self.levels[level], node
            if use_generic is not None and bool(use_generic.any()):
                table = torch.cat([table, self.generic[level]], dim=0)
                pos = torch.where(use_generic, torch.full_like(pos, table.shape[0] - 1), pos)
                keep = keep | use_generic  # the generic block is never blocked
            rows = table[pos]  # (B, numel)
            if not bool(keep.all()):
                any_blocked = True
                rows = rows * keep.to(rows.dtype)[:, None]
            mask_parts.append(keep[:, None].expand(batch, r))
            # one split (its backward is one cat) rather than slices (each slice's backward fills a
            # zero tensor of the whole row and adds into it: ~3 extra passes over the fetched rows)
            pieces = rows.view(batch, n_layers, -1).split([r * spec.width for spec in self.specs], dim=2)
            for spec, piece in zip(self.specs, pieces):
                parts[spec.name].append(piece.reshape(batch, n_layers, r, spec.width))
        tensors = {name: torch.cat(chunks, dim=2).transpose(0, 1).contiguous() for name, chunks in parts.items()}
        unit_mask = torch.cat(mask_parts, dim=1) if any_blocked else None
        return FetchedMemory(tensors=tensors, unit_mask=unit_mask,
                             layer_slot={layer: i for i, layer in enumerate(self.memory_layers)},
                             memory_type=self.cfg.type, lora_alpha=self.cfg.lora_alpha)

    def extra_repr(self) -> str:
        return (f"type={self.cfg.type}, multipliers={self.cfg.multipliers}, k={self.cfg.branching}, "
                f"layers={len(self.memory_layers)}, generic={self.cfg.generic}")


def _unflatten(node: int, branching: int, length: int) -> list[int]:
    out = []
    for _ in range(length):
        out.append(node % branching)
        node //= branching
    return out[::-1]


# --------------------------------------------------------------------------------- forward pieces
# Memory acts token by token with its row's weights, so rows that share a memory may come as a group:
# x with B*g rows against memories of B rows means rows i*g .. i*g+g-1 use memory i (scoring many
# candidate answers of one prompt without copying its memory g times).
def _grouped(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.shape[0] == rows:
        return x, tuple(x.shape)
    if x.shape[0] % rows:
        raise ValueError(f"{x.shape[0]} rows cannot share {rows} fetched memories")
    return x.reshape(rows, -1, x.shape[-1]), tuple(x.shape)


def ffn_memory(x: torch.Tensor, mem: dict[str, torch.Tensor]) -> torch.Tensor:
    """Extra SwiGLU units: down^T [silu(gate x) * (up x)] with per-sequence weights (gather + bmm).

    x: (B, T, d) (or (B*g, T, d): see above); gate/up/down: (B, R, d). Equal to widening the anchor's
    FFN by R hidden units.
    """
    x, shape = _grouped(x, mem["gate"].shape[0])
    hidden = F.silu(torch.bmm(x, mem["gate"].transpose(1, 2))) * torch.bmm(x, mem["up"].transpose(1, 2))
    return torch.bmm(hidden, mem["down"]).reshape(shape[:-1] + (mem["down"].shape[-1],))


def lora_delta(x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * B A x with per-sequence A (B, R, in) and B^T (B, R, out); x: (B, T, in) (or grouped rows)."""
    x, shape = _grouped(x, a.shape[0])
    return (alpha * torch.bmm(torch.bmm(x, a.transpose(1, 2)), b_t)).reshape(shape[:-1] + (b_t.shape[-1],))


def kv_memory_attention(q: torch.Tensor, mem: dict[str, torch.Tensor], unit_mask: torch.Tensor | None,
                        n_heads: int, head_dim: int) -> torch.Tensor:
    """Queries (B, h, T, dh) attend to the fetched key/value vectors (no causal mask, no positions).

    Returns (B, h, T, dh), added to the self-attention output. Blocked units are masked out; a
    sequence whose units are all blocked gets zero.
    """
    batch, units = mem["key"].shape[:2]
    shape = q.shape
    if shape[0] != batch:  # grouped rows (see above): (B*g, h, T, dh) -> (B, h, g*T, dh)
        if shape[0] % batch:
            raise ValueError(f"{shape[0]} rows cannot share {batch} fetched memories")
        q = q.reshape(batch, shape[0] // batch, n_heads, shape[2], head_dim).transpose(1, 2).reshape(
            batch, n_heads, -1, head_dim)
    keys = mem["key"].view(batch, units, n_heads, head_dim).transpose(1, 2)
    values = mem["value"].view(batch, units, n_heads, head_dim).transpose(1, 2)
    if unit_mask is None:
        out = F.scaled_dot_product_attention(q, keys, values)
    else:
        attn_mask = unit_mask[:, None, None, :].expand(batch, 1, q.shape[2], units)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)
        any_unit = unit_mask.any(dim=1)
        out = torch.where(any_unit[:, None, None, None], torch.nan_to_num(out), torch.zeros_like(out))
    if shape[0] != batch:
        out = out.reshape(batch, n_heads, shape[0] // batch, shape[2], head_dim).transpose(1, 2).reshape(shape)
    return out
