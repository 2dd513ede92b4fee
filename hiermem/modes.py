"""Evaluation modes as data: each mode turns a set of rows into the memory every row uses.

A row is anything scored with retrieval: a probe (routed by its prompt) or a held-out document
(routed by its own text). `Rows` carries what any mode may need: the routed paths, the oracle paths
(where the fact's documents went), and the embeddings (to route again around blocked subtrees). A
mode's `choose(rows)` returns a `MemoryChoice` (per row: a path, a per-level drop mask, generic or no
memory); every scorer (generation, answer ranking, perplexity) takes that choice, so a mode means
the same thing for probes and for perplexity, and no model state is switched on or off.

    none              the anchor alone
    generic           anchor + the generic (context-independent) block
    fetched           anchor + the blocks on the row's routed path
    blocked-drop      as fetched, with the blocked blocks contributing nothing
    blocked-reroute   the row routed again with the blocked subtrees closed: it takes the nearest
                      unblocked cluster instead, as a deployed system would
    wrong-path        the blocks of a random path that differs at level 1
    oracle-path       the blocks of the path where most of the fact's documents went
    drop-level<l>     fetched with level l's block dropped
    rag               no memory; the prompt's nearest training document of its routed cluster is
                      prepended (`hiermem.rag`, the paper's vanilla RAG baseline; probes only)
    rag+fetched       that document and the fetched memory

What is blocked (`Blocking`): by default each row's *own* routed subtree from `level` down (the
paper's "block the matching part of the bank"); or one bank-wide set of node prefixes
(`Blocking.prefixes`, e.g. the best-matching or a random fraction of the bank, see
`choose_blocked_nodes`), the same for every row.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from hiermem.probing import MemoryChoice
from hiermem.rag import RAG_MODES

BASE_MODES = ("none", "generic", "fetched", "blocked-drop", "blocked-reroute", "wrong-path", "oracle-path")


@dataclasses.dataclass
class Rows:
    """What modes need to know about the rows being scored."""

    routed: np.ndarray                  # (n, depth) routed paths
    oracle: np.ndarray | None = None    # (n, depth) oracle paths (None: the routed ones)
    vectors: np.ndarray | None = None   # (n, dim) embeddings, for rerouting

    def __len__(self) -> int:
        return len(self.routed)


@dataclasses.dataclass(frozen=True)
class Blocking:
    """Which part of the bank is blocked: each row's routed subtree at `level` (prefixes=None) or a
    bank-wide list of node prefixes (tuples of 1..depth cluster indices)."""

    level: int = 1
    prefixes: tuple[tuple[int, ...], ...] | None = None

    def per_row_prefixes(self, routed: np.ndarray) -> list[tuple[int, ...]]:
        """The distinct blocked prefixes when each row blocks its own routed subtree."""
        return sorted({tuple(int(i) for i in p[:self.level]) for p in routed})

    def drop_mask(self, paths: np.ndarray) -> np.ndarray:
        """(n, depth) bool: the levels whose block on each row's path is blocked."""
        n, depth = paths.shape
        mask = np.zeros((n, depth), dtype=bool)
        if self.prefixes is None:
            mask[:, min(self.level, depth) - 1:] = True
            return mask
        for prefix in self.prefixes:
            hit = np.all(paths[:, :len(prefix)] == np.asarray(prefix)[None, :], axis=1)
            mask[hit, len(prefix) - 1:] = True
        return mask


Router = Callable[[np.ndarray, Sequence[Sequence[int]]], np.ndarray]  # (vectors, blocked prefixes) -> paths


@dataclasses.dataclass(frozen=True)
class EvalMode:
    """One evaluation mode; `choose(rows)` gives each row's memory (see the module docstring)."""

    name: str
    depth: int = 0
    branching: int = 0
    blocking: Blocking = Blocking()
    router: Router | None = None
    seed: int = 0

    def choose(self, rows: Rows) -> MemoryChoice:
        n, name, depth = len(rows), self.name, self.depth
        if name in ("none", "rag") or depth == 0:
            return MemoryChoice()
        routed = np.asarray(rows.routed)[:, :depth]
        if name == "generic":
            return MemoryChoice(paths=routed, use_generic=np.ones(n, dtype=bool))
        if name in ("fetched", "rag+fetched"):
            return MemoryChoice(paths=routed)
        if name == "blocked-drop":
            return MemoryChoice(paths=routed, blocked=self.blocking.drop_mask(routed))
        if name == "blocked-reroute":
            return MemoryChoice(paths=self.reroute(rows, routed))
        if name == "wrong-path":
            rng = np.random.default_rng(self.seed)
            k = self.branching
            wrong = rng.integers(0, k, size=(n, depth))
            wrong[:, 0] = (routed[:, 0] + rng.integers(1, k, size=n)) % k  # never the routed subtree
            return MemoryChoice(paths=wrong)
        if name == "oracle-path":
            oracle = routed if rows.oracle is None else np.asarray(rows.oracle)[:, :depth]
            return MemoryChoice(paths=oracle)
        if name.startswith("drop-level"):
            level = int(name.removeprefix("drop-level"))
            blocked = np.zeros((n, depth), dtype=bool)
            blocked[:, level - 1] = True
            return MemoryChoice(paths=routed, blocked=blocked)
        raise ValueError(f"unknown evaluation mode {name!r}")

    def reroute(self, rows: Rows, routed: np.ndarray) -> np.ndarray:
        """Paths of the rows routed with the blocked subtrees closed (never entering one)."""
        if self.router is None or rows.vectors is None:
            raise ValueError(f"mode {self.name!r} needs the rows' embeddings and the tree to route again")
        vectors = np.asarray(rows.vectors)
        if self.blocking.prefixes is not None:
            return self.router(vectors, list(self.blocking.prefixes))[:, :self.depth]
        out = np.empty_like(routed)
        level = min(self.blocking.level, self.depth)
        keys = [tuple(p) for p in routed[:, :level]]
        for prefix in sorted(set(keys)):  # each row closes its own routed subtree
            idx = np.array([i for i, key in enumerate(keys) if key == prefix])
            out[idx] = self.router(vectors[idx], [prefix])[:, :self.depth]
        return out


def mode_names(cfg_modes: Sequence[str], depth_units: Sequence[int], generic: bool,
               level_ablation: bool) -> list[str]:
    """The modes that make sense for a model: its configured ones plus drop-level<l> per level."""
    modes = [m for m in cfg_modes if m != "generic" or generic]
    if level_ablation:
        modes += [f"drop-level{level + 1}" for level, r in enumerate(depth_units) if r > 0]
    return modes


def check_mode_name(name: str) -> None:
    if name in BASE_MODES or name in RAG_MODES or (name.startswith("drop-level")
                                                   and name.removeprefix("drop-level").isdigit()):
        return
    raise ValueError(f"invalid config field 'modes': unknown evaluation mode {name!r}; expected one of "
                     f"{', '.join(BASE_MODES + RAG_MODES)} or drop-level<l>")


def choose_blocked_nodes(fraction: float, level: int, branching: int, how: str,
                         fact_doc_paths: np.ndarray | None = None, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """round(fraction * k^level) node prefixes at `level` (with their subtrees) to block bank-wide.

    how: "best-match" takes the nodes holding the most documents of the evaluated facts
    (`fact_doc_paths`, (m, depth)) first, the paper's adversarial blocking; "random" a seeded sample.
    """
    n_nodes = branching ** level
    count = round(fraction * n_nodes)
    if count == 0:
        return ()
    if how == "random":
        chosen = np.random.default_rng(seed).permutation(n_nodes)[:count]
    elif how == "best-match":
        if fact_doc_paths is None or not len(fact_doc_paths):
            raise ValueError("best-match blocking needs the paths of the evaluated facts' documents")
        flat = np.zeros(len(fact_doc_paths), dtype=np.int64)
        for j in range(level):
            flat = flat * branching + np.asarray(fact_doc_paths)[:, j]
        hits = np.bincount(flat, minlength=n_nodes)
        order = np.lexsort((np.arange(n_nodes), -hits))  # most documents first, ties by index
        chosen = order[:count]
    else:
        raise ValueError(f"invalid config field 'block_choice': expected 'best-match' or 'random', got {how!r}")
    out = []
    for node in sorted(int(c) for c in chosen):
        digits = []
        for _ in range(level):
            digits.append(node % branching)
            node //= branching
        out.append(tuple(digits[::-1]))
    return tuple(out)
