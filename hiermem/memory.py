"""Hierarchical memory bank: storage, initialization, blocking, the read rule and the fetch.

A tree with branching k and depth p has k^l nodes at level l (1-based, as in the paper). Every node
owns one memory block. A sequence with cluster path (i1, ..., ip) fetches the block of each node on
its root-to-leaf path; the node at level l has the flat, row-major index

    node(l) = i1 * k^(l-1) + i2 * k^(l-2) + ... + il

(the same convention as `hiermem.retriever.node_index`).

Storage. Level l is one parameter of shape (k^l, block_numel_l): one row per block, so a fetch is a
row gather and a sparse optimizer touches whole rows. A row holds, for each memory layer in order,
each of the kind's tensors as an (r_l, width) matrix ("unit-major"). Blocks of different levels are
concatenated along the unit axis, which for every kind is just a bigger memory. What a kind stores
and how it enters the anchor is its `MemoryKind` object (`hiermem.memory_kinds`, looked up by
`MemoryConfig.type`); this module never branches on the type.

A *generic* block (context-independent, the size of one fetch) can stand in for the fetched memory
of any sequence. *Blocked* nodes (or whole subtrees) contribute nothing: their rows are zeroed in
the fetch, which also stops their gradients, and KV keys of blocked units are masked out.

Which rows a batch really reads -- on its paths, not blocked bank-wide or for the sequence, not
replaced by the generic block -- is `MemoryBank.read_mask`, the one rule used by the fetch and by the
sparse optimizer (`hiermem.optim`) alike.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from hiermem.config import MemoryConfig, ModelConfig
from hiermem.configbase import require
from hiermem.kernels import gather_rows_low
from hiermem.memory_kinds import MemoryKind, get_kind


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
    """Per-sequence memory, ready for the anchor: tensors[name] is (n_mem_layers, B, R, width).

    The tensors may be strided views of the fetched rows (`MemoryBank.fast`): batched matmuls take
    them as they are."""

    tensors: dict[str, torch.Tensor]
    unit_mask: torch.Tensor | None  # (B, R) bool, False where a unit is blocked; None if none blocked
    layer_slot: dict[int, int]       # anchor layer index -> index into the first axis
    memory_type: str
    lora_alpha: float
    # per memory layer, the tensors as views made by one unbind (whose backward is one stack); None:
    # `for_layer` indexes the first axis (the plain path: each index's backward fills a zero tensor of
    # the whole fetch and adds into it, once per memory layer and tensor)
    layers: list[dict[str, torch.Tensor]] | None = None

    @property
    def kind(self) -> MemoryKind:
        """The memory kind, whose hooks the anchor calls in every memory layer."""
        return get_kind(self.memory_type)

    def for_layer(self, layer: int) -> dict[str, torch.Tensor] | None:
        slot = self.layer_slot.get(layer)
        if slot is None:
            return None
        if self.layers is not None:
            return self.layers[slot]
        return {name: t[slot] for name, t in self.tensors.items()}


class MemoryBank(nn.Module):
    """All memory blocks of a tree, plus the optional generic block.

    `levels[l]` holds the k^(l+1) blocks of 0-based level l (an empty placeholder when r_l = 0).
    """

    def __init__(self, model_cfg: ModelConfig, cfg: MemoryConfig):
        super().__init__()
        require(cfg.enabled, "multipliers", "at least one level with r > 0 to build a bank", cfg.multipliers)
        self.model_cfg, self.cfg = model_cfg, cfg
        self.kind = get_kind(cfg.type)
        self.specs = self.kind.specs(model_cfg)
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
        self.fast = True  # fetch without the copies of the plain path (see `fetch`); same values
        # FFN memories only: leave the rows in the bank and read them inside the memory's matmuls
        # (`hiermem.gather_matmul`; set by the trainer on CUDA, or by hand); same values
        self.gather_matmul = False
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

    def store_as(self, dtype: torch.dtype) -> None:
        """Keep the levels' blocks in `dtype` (bfloat16 on GPUs: half the bank's memory and no cast per
        fetch under bf16 autocast); the generic block and the optimizer's moments stay float32."""
        for p in self.levels:
            p.data = p.data.to(dtype)

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

    def read_mask(self, nodes: torch.Tensor, use_generic: torch.Tensor | None = None,
                  blocked: torch.Tensor | None = None) -> torch.Tensor:
        """(B, depth) bool: True where sequence b really reads its level-l block from the bank.

        nodes: (B, depth) flat node indices (`node_indices(paths)`). A block is not read when its node
        is blocked bank-wide (`block`), when `blocked[b, l]` (extra per-sequence blocking) or when
        `use_generic[b]` (the generic block stands in). The fetch reads exactly these rows and the
        sparse optimizer (`SparseBankAdamW.gather`) updates exactly these rows.
        """
        read = torch.stack([~getattr(self, f"blocked_{level}")[nodes[:, level]] for level in range(self.cfg.depth)],
                           dim=1)
        if blocked is not None:
            read &= ~blocked[:, : self.cfg.depth].to(device=read.device, dtype=torch.bool)
        if use_generic is not None:
            read &= ~use_generic.to(device=read.device, dtype=torch.bool)[:, None]
        return read

    def fetch(self, paths: torch.Tensor, use_generic: torch.Tensor | None = None,
              blocked: torch.Tensor | None = None, active: dict[int, ActiveRows] | None = None) -> FetchedMemory:
        """Gather each sequence's blocks and concatenate them along the unit axis.

        paths: (B, depth) cluster indices. use_generic: (B,) bool, True to use the generic block instead.
        blocked: (B, depth) bool, extra per-sequence blocking on top of the bank's blocked nodes.
        active: per level, the rows touched this step as leaf tensors (sparse training); when None
        the rows are gathered from the level parameters (gradients then land in `levels[l].grad`).
        The rows read from the bank are those of `read_mask`; the others contribute nothing.
        """
        nodes = self.node_indices(paths)
        batch = nodes.shape[0]
        if use_generic is not None:
            require(self.cfg.generic, "generic", "true to use the generic block", self.cfg.generic)
            use_generic = use_generic.to(torch.bool).to(nodes.device)
        read_mask = self.read_mask(nodes, use_generic, blocked)
        parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in self.specs}
        mask_parts, any_blocked = [], False
        n_layers = len(self.memory_layers)
        gathered = [] if self.gather_matmul and self.cfg.type == "ffn" else None
        for level, r in enumerate(self.units):
            if r == 0:
                continue
            node = nodes[:, level].contiguous()
            fetched = read_mask[:, level]  # rows really read from the bank
            keep = fetched if use_generic is None else fetched | use_generic  # the generic block is never blocked
            if active is not None and level in active:
                table, ids = active[level].rows, active[level].ids
                if len(ids):
                    pos = torch.searchsorted(ids, node).clamp(max=len(ids) - 1)
                    found = ids[pos] == node
                else:
                    pos, found = torch.zeros_like(node), torch.zeros_like(fetched)
                require(bool(found[fetched].all()), "active rows", "every fetched node of the batch",
                        node[fetched & ~found].tolist())
                if not len(ids):
                    table = table.new_zeros(1, table.shape[1])
            else:
                table, pos = self.levels[level], node
            if use_generic is not None and bool(use_generic.any()):
                table = torch.cat([table, self.generic[level]], dim=0)
                pos = torch.where(use_generic, torch.full_like(pos, table.shape[0] - 1), pos)
            if gathered is not None:  # the rows stay in the table; the matmuls read them (`GatheredFFN`)
                gathered.append((table, pos, None if bool(keep.all()) else keep, r))
                any_blocked = any_blocked or not bool(keep.all())
                mask_parts.append(keep[:, None].expand(batch, r))
                continue
            # index_select's backward is one index_add; indexing's is an accumulating index_put
            if self.fast and torch.is_autocast_enabled(table.device.type):
                # mixed precision: the touched blocks cast once, then gathered (the concatenation then
                # moves half the bytes, and no matmul casts its operand again)
                rows = gather_rows_low(table, pos, torch.get_autocast_dtype(table.device.type))
            else:
                rows = table.index_select(0, pos) if self.fast else table[pos]  # (B, numel)
            if not bool(keep.all()):
                any_blocked = True
                rows = rows * keep.to(rows.dtype)[:, None]
            mask_parts.append(keep[:, None].expand(batch, r))
            # one split (its backward is one cat) rather than slices (each slice's backward fills a
            # zero tensor of the whole row and adds into it: ~3 extra passes over the fetched rows)
            pieces = rows.view(batch, n_layers, -1).split([r * spec.width for spec in self.specs], dim=2)
            for spec, piece in zip(self.specs, pieces):
                parts[spec.name].append(piece.unflatten(2, (r, spec.width)))
        if gathered is not None:
            return self._gathered_memory(gathered, torch.cat(mask_parts, dim=1) if any_blocked else None)
        if self.fast:  # (layers, B, R, width): views when one level has units, else one cat that lays each
            # layer's (B, R, width) out contiguously (bf16 batched products copy a strided batch first)
            tensors = {name: (chunks[0].transpose(0, 1) if len(chunks) == 1
                              else torch.cat([c.transpose(0, 1) for c in chunks], dim=2))
                       for name, chunks in parts.items()}
        else:
            tensors = {name: torch.cat(chunks, dim=2).transpose(0, 1).contiguous() for name, chunks in parts.items()}
        unit_mask = torch.cat(mask_parts, dim=1) if any_blocked else None
        layers = None
        if self.fast:
            names, views = list(tensors), [t.unbind(0) for t in tensors.values()]
            layers = [dict(zip(names, per_layer)) for per_layer in zip(*views)]
        return FetchedMemory(tensors=tensors, unit_mask=unit_mask,
                             layer_slot={layer: i for i, layer in enumerate(self.memory_layers)},
                             memory_type=self.cfg.type, lora_alpha=self.cfg.lora_alpha, layers=layers)

    def _gathered_memory(self, levels: list, unit_mask: torch.Tensor | None) -> FetchedMemory:
        """Per memory layer a `GatheredFFN`: each level's table, rows and column offsets (the row of a node
        holds, per memory layer, gate | up | down as (r, width) matrices one after the other)."""
        from hiermem.gather_matmul import GatheredFFN, GatheredLevel
        width = self.specs[0].width
        layers = []
        for slot in range(len(self.memory_layers)):
            per_level = []
            for table, pos, keep, r in levels:
                per_layer = r * sum(s.width for s in self.specs)
                starts, at = {}, slot * per_layer
                for spec in self.specs:
                    starts[spec.name] = at
                    at += r * spec.width
                per_level.append(GatheredLevel(table=table, pos=pos, keep=keep, offsets=starts, units=r, width=width))
            layers.append(GatheredFFN(per_level))
        return FetchedMemory(tensors={}, unit_mask=unit_mask,
                             layer_slot={layer: i for i, layer in enumerate(self.memory_layers)},
                             memory_type=self.cfg.type, lora_alpha=self.cfg.lora_alpha, layers=layers)

    def fetch_for(self, paths: torch.Tensor | None, use_generic: torch.Tensor | None = None,
                  blocked: torch.Tensor | None = None, active: dict[int, ActiveRows] | None = None,
                  ) -> FetchedMemory | None:
        """`fetch`, or None when there is nothing to fetch: no paths, unless every row uses the generic
        block (what a model passes for its memory argument)."""
        if paths is None:
            if use_generic is None or not bool(use_generic.all()):
                return None
            paths = torch.zeros(use_generic.shape[0], self.cfg.depth, dtype=torch.long, device=use_generic.device)
        return self.fetch(paths, use_generic=use_generic, blocked=blocked, active=active)

    def extra_repr(self) -> str:
        return (f"type={self.cfg.type}, multipliers={self.cfg.multipliers}, k={self.cfg.branching}, "
                f"layers={len(self.memory_layers)}, generic={self.cfg.generic}")


def _unflatten(node: int, branching: int, length: int) -> list[int]:
    out = []
    for _ in range(length):
        out.append(node % branching)
        node //= branching
    return out[::-1]
