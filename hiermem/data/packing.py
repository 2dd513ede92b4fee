"""Cluster-packed training sequences and the data loader (paper App. A.2).

`pack_by_leaf` packs the documents routed to the same leaf (same full path) into sequences of
length T; sequences never mix leaves and each carries its leaf's path, which selects the memory
blocks. `pack_plain` packs without regard to leaves (dense baselines; paths are -1).

Layout of a sequence: each document contributes its tokens followed by one EOT token, all with
the document's segment id (0, 1, 2, ... within the sequence); padding is `pad_id` with segment
-1. Documents are placed by best-fit-decreasing bin packing, so a document that fits in T tokens
is never cut; a longer document is split into pieces of T tokens (each piece its own segment, in
its own sequence) and its remainder is packed like a short document. Sequences are shuffled
globally with the seed.

Loss convention: the target of position t is token t+1, and it counts only when
`segment_ids[t] == segment_ids[t+1] >= 0` (same document, not padding), and attention stays inside
a segment: `loss_mask` and `document_attention_mask` live in `hiermem.masks` (shared with the model)
and are re-exported here.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from hiermem.io import atomic_path
from hiermem.masks import document_attention_mask, loss_mask  # re-exported: the masks of this layout

log = logging.getLogger(__name__)

FORMAT = "hiermem.packed/1"


@dataclass
class PackedSequences:
    """Packed token sequences with per-token segment ids and per-sequence memory paths."""

    tokens: np.ndarray        # (N, T) int32
    segment_ids: np.ndarray   # (N, T) int32: 0, 1, 2, ... per document within a sequence; -1 = padding
    paths: np.ndarray         # (N, depth) int64; -1 everywhere for plain packing
    doc_index: np.ndarray     # (N, T) int32: corpus document of each token; -1 = padding

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if self.tokens.ndim != 2 or self.segment_ids.shape != self.tokens.shape or self.doc_index.shape != self.tokens.shape:
            raise ValueError(f"tokens {self.tokens.shape}, segment_ids {self.segment_ids.shape} and doc_index "
                             f"{self.doc_index.shape} must share one (N, T) shape")
        if self.paths.ndim != 2 or len(self.paths) != n:
            raise ValueError(f"paths must be (N={n}, depth), got {self.paths.shape}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def depth(self) -> int:
        return int(self.paths.shape[1])

    @property
    def fill_rate(self) -> float:
        """Share of positions holding document tokens (the rest is padding)."""
        return float((self.segment_ids >= 0).mean()) if self.tokens.size else 0.0

    def save(self, path: str | Path) -> Path:
        """Write an .npz file atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, format=np.array(FORMAT), tokens=self.tokens, segment_ids=self.segment_ids,
                         paths=self.paths, doc_index=self.doc_index)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PackedSequences":
        with np.load(Path(path), allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != FORMAT:
                raise ValueError(f"{path}: not a hiermem packed-sequences file")
            return cls(tokens=z["tokens"], segment_ids=z["segment_ids"], paths=z["paths"], doc_index=z["doc_index"])


# ----------------------------------------------------------------------------------------------
# packing

def _best_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bin packing of items (all <= capacity), in the given tie order.

    Returns (bin of each item, offset of each item inside its bin)."""
    order = np.argsort(-lengths, kind="stable")
    bins = np.empty(len(lengths), dtype=np.int64)
    offsets = np.empty(len(lengths), dtype=np.int64)
    free: list[tuple[int, int]] = []  # sorted (remaining space, bin id) of bins with space left
    fill: list[int] = []
    for i in order:
        need = int(lengths[i])
        j = bisect.bisect_left(free, (need, -1))
        if j == len(free):
            b = len(fill)
            fill.append(0)
        else:
            _, b = free.pop(j)
        bins[i], offsets[i] = b, fill[b]
        fill[b] += need
        if fill[b] < capacity:
            bisect.insort(free, (capacity - fill[b], b))
    return bins, offsets


def _pack(token_ids: Sequence[np.ndarray], groups: np.ndarray, seq_len: int, eot_id: int, pad_id: int,
          seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pack documents so that a sequence only holds documents of one group.

    Returns tokens, segment_ids, doc_index (N, T) and the group of each sequence (N,)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n_docs = len(token_ids)
    if len(groups) != n_docs:
        raise ValueError(f"{n_docs} documents but {len(groups)} paths")
    if n_docs == 0:
        raise ValueError("no documents to pack")
    rng = np.random.default_rng(seed)
    docs = [np.asarray(t).ravel() for t in token_ids]
    for i, d in enumerate(docs):
        if d.size and not np.issubdtype(d.dtype, np.integer):
            raise ValueError(f"document {i}: token ids must be integers, got dtype {d.dtype}")
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=n_docs)  # + EOT
    # one stream of all tokens, each document followed by EOT
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    stream = np.full(int(lengths.sum()), eot_id, dtype=np.int64)
    nonempty = [i for i in range(n_docs) if len(docs[i])]
    if nonempty:
        stream[np.concatenate([np.arange(starts[i], starts[i] + len(docs[i])) for i in nonempty])] = \
            np.concatenate([docs[i] for i in nonempty])

    # pieces: full-length chunks of long documents, then the (short) rest of every document
    n_full = (lengths - 1) // seq_len  # a remainder of >= 1 token (the EOT) always stays
    full_doc = np.repeat(np.arange(n_docs), n_full)
    full_src = starts[full_doc] + seq_len * (np.arange(len(full_doc)) - np.repeat(np.cumsum(n_full) - n_full, n_full))
    rest_len = lengths - n_full * seq_len
    rest_src = starts + n_full * seq_len

    # random tie order, then best-fit-decreasing within each group
    seq_of_rest = np.empty(n_docs, dtype=np.int64)
    off_of_rest = np.empty(n_docs, dtype=np.int64)
    seq_group: list[np.ndarray] = []
    next_seq = 0
    shuffled = rng.permutation(n_docs)
    g_sorted = shuffled[np.argsort(groups[shuffled], kind="stable")]
    cuts = np.flatnonzero(groups[g_sorted][1:] != groups[g_sorted][:-1]) + 1
    for members in np.split(g_sorted, cuts):
        b, off = _best_fit(rest_len[members], seq_len)
        seq_of_rest[members] = b + next_seq
        off_of_rest[members] = off
        n_bins = int(b.max()) + 1
        seq_group.append(np.full(n_bins, groups[members[0]], dtype=np.int64))
        next_seq += n_bins
    full_seq = next_seq + np.arange(len(full_doc))
    n_seq = next_seq + len(full_doc)
    seq_groups = np.concatenate(seq_group + [groups[full_doc].astype(np.int64)])

    piece_seq = np.concatenate([seq_of_rest, full_seq])
    piece_off = np.concatenate([off_of_rest, np.zeros(len(full_doc), dtype=np.int64)])
    piece_src = np.concatenate([rest_src, full_src])
    piece_len = np.concatenate([rest_len, np.full(len(full_doc), seq_len, dtype=np.int64)])
    piece_doc = np.concatenate([np.arange(n_docs), full_doc])

    # segment id = rank of the piece inside its sequence
    o = np.lexsort((piece_off, piece_seq))
    first = np.searchsorted(piece_seq[o], piece_seq[o], side="left")
    piece_seg = np.empty(len(o), dtype=np.int64)
    piece_seg[o] = np.arange(len(o)) - first

    # scatter every token of every piece to its place (vectorized)
    total = int(piece_len.sum())
    within = np.arange(total) - np.repeat(np.cumsum(piece_len) - piece_len, piece_len)
    dest = np.repeat(piece_seq * seq_len + piece_off, piece_len) + within
    src = np.repeat(piece_src, piece_len) + within
    tokens = np.full(n_seq * seq_len, pad_id, dtype=np.int32)
    segs = np.full(n_seq * seq_len, -1, dtype=np.int32)
    didx = np.full(n_seq * seq_len, -1, dtype=np.int32)
    tokens[dest] = stream[src]
    segs[dest] = np.repeat(piece_seg, piece_len)
    didx[dest] = np.repeat(piece_doc, piece_len)

    perm = rng.permutation(n_seq)  # global shuffle
    shape = (n_seq, seq_len)
    return tokens.reshape(shape)[perm], segs.reshape(shape)[perm], didx.reshape(shape)[perm], seq_groups[perm]


def pack_by_leaf(token_ids: Sequence[np.ndarray], paths: np.ndarray, seq_len: int, eot_id: int, pad_id: int,
                 seed: int) -> PackedSequences:
    """Pack documents of the same leaf (same full path) together; each sequence carries its path."""
    paths = np.asarray(paths)
    if paths.ndim != 2 or paths.shape[1] < 1:
        raise ValueError(f"paths must be (n_docs, depth), got shape {paths.shape}")
    if len(paths) and paths.min() < 0:
        raise ValueError("paths contain negative entries; route every document before packing by leaf")
    leaves, leaf_of_doc = np.unique(paths, axis=0, return_inverse=True)
    tokens, segs, didx, leaf = _pack(token_ids, leaf_of_doc.ravel(), seq_len, eot_id, pad_id, seed)
    packed = PackedSequences(tokens, segs, leaves[leaf].astype(np.int64), didx)
    log.info("packed %d docs of %d leaves into %d sequences of %d tokens (fill %.1f%%)",
             len(token_ids), len(leaves), len(packed), seq_len, 100 * packed.fill_rate)
    return packed


def pack_plain(token_ids: Sequence[np.ndarray], seq_len: int, eot_id: int, pad_id: int, seed: int,
               depth: int = 4) -> PackedSequences:
    """Pack all documents ignoring leaves (dense baselines); paths are -1 with `depth` columns."""
    tokens, segs, didx, _ = _pack(token_ids, np.zeros(len(token_ids), dtype=np.int64), seq_len, eot_id, pad_id, seed)
    packed = PackedSequences(tokens, segs, np.full((len(tokens), depth), -1, dtype=np.int64), didx)
    log.info("packed %d docs into %d plain sequences of %d tokens (fill %.1f%%)",
             len(token_ids), len(packed), seq_len, 100 * packed.fill_rate)
    return packed


# ----------------------------------------------------------------------------------------------
# loader

class SequenceLoader:
    """Endless batches over epochs; epoch e visits the sequences in a permutation drawn from
    (seed, e). `state_dict()` / `load_state_dict()` resume at exactly the next batch."""

    def __init__(self, packed: PackedSequences, batch_size: int, seed: int, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.packed = packed
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        n = len(packed)
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} sequences cannot fill one batch of {batch_size} (drop_last={drop_last})")
        self.epoch = 0
        self.position = 0  # index of the next batch within the epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.packed))
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        idx = np.sort(self._permutation()[self.position * self.batch_size:(self.position + 1) * self.batch_size])
        self.position += 1
        p = self.packed
        return (torch.from_numpy(p.tokens[idx].astype(np.int64)),
                torch.from_numpy(p.segment_ids[idx].astype(np.int64)),
                torch.from_numpy(p.paths[idx].astype(np.int64)))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "n_sequences": len(self.packed), "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("n_sequences", len(self.packed)),
                          ("drop_last", self.drop_last)):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader has {mine!r}")
        if not 0 <= int(state["position"]) <= self.batches_per_epoch or int(state["epoch"]) < 0:
            raise ValueError(f"invalid loader state {state}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def block_updates(packed: PackedSequences, branching: int, batch_size: int, steps: int, seed: int,
                  generic_prob: float = 0.0, depth: int | None = None) -> list[dict[str, np.ndarray]]:
    """How often each memory block is fetched in `steps` steps of a `SequenceLoader(packed, batch_size,
    seed)`: per level (0-based), for every node, `sequences` (packed sequences routed there) and
    `updates`, the expected number of steps that update the block. The batches are replayed exactly;
    a step updates a block unless every one of its sequences in the batch drew the generic block
    (probability `generic_prob` each), so a block with m sequences in a batch counts 1 - p^m."""
    depth = packed.depth if depth is None else depth
    loader = SequenceLoader(packed, batch_size=min(batch_size, len(packed)), seed=seed)
    out = []
    flat = np.zeros(len(packed), dtype=np.int64)
    for level in range(depth):
        flat = flat * branching + packed.paths[:, level]
        n_nodes = branching ** (level + 1)
        updates = np.zeros(n_nodes)
        for step in range(steps):
            epoch, position = divmod(step, loader.batches_per_epoch)
            perm = np.random.default_rng([seed, epoch]).permutation(len(packed))
            batch = perm[position * loader.batch_size:(position + 1) * loader.batch_size]
            nodes, m = np.unique(flat[batch], return_counts=True)
            updates[nodes] += 1.0 - generic_prob ** m
        out.append({"sequences": np.bincount(flat, minlength=n_nodes), "updates": updates})
    return out


def update_report(updates: list[dict[str, np.ndarray]]) -> "list[dict]":
    """Per level: used nodes and min/median/max sequences and expected updates over the used nodes."""
    rows = []
    for level, u in enumerate(updates):
        used = u["sequences"] > 0
        rows.append({"level": level + 1, "nodes_used": int(used.sum()), "nodes": len(used),
                     "sequences_min": int(u["sequences"][used].min()), "sequences_median": float(np.median(u["sequences"][used])),
                     "sequences_max": int(u["sequences"][used].max()),
                     "updates_min": float(u["updates"][used].min()), "updates_median": float(np.median(u["updates"][used])),
                     "updates_max": float(u["updates"][used].max())})
    return rows


__all__ = ["PackedSequences", "pack_by_leaf", "pack_plain", "SequenceLoader", "loss_mask", "document_attention_mask",
           "block_updates", "update_report"]
