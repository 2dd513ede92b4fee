"""Greedy routing down a k-means tree: node addressing, vector checks and the vectorized router.

`Router` holds each level's child centroids; a batch of queries descends level by level, grouped
by current node so that each group meets only its node's k centroids (first levels on cache-sized
chunks, deeper levels on per-node blocks, on worker threads). `hiermem.retriever` wraps it in the
public `HierarchicalKMeans`.

Two implementations of the per-group step, chosen per call by `_kernel_for`:
- the compiled kernel (`hiermem.native`, k <= 16): reads each group's rows where they are (no
  gather copy), scores them against the node's centroids with SIMD fused multiply-adds, takes the
  argmin, all in one pass with the GIL released;
- numpy/BLAS: the group's rows are gathered into a contiguous block, one matmul, an add, an argmin.
The kernel removes the per-group gather copies, the separate add and argmin passes, and the Python/GIL
time between numpy calls (measured side by side by `bench/retriever.py`; figures in the README).
Tree build assigns points with the same `nearest`, so paths agree bit for bit
between build and route whichever implementation the process uses.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hiermem.native import LANES, NearestKernel, kernel, pad_sets

log = logging.getLogger(__name__)

_CHUNK = 2048          # stage-A chunk (rows): 2048 x 384 floats (3 MB) and their regrouped copy stay in cache
PIECE = 16384         # largest block scored at once (single-parent levels, build assignment)
_BLOCK = 2048          # largest stage-B block: it and its regrouped copy (6 MB) stay in cache
_MIN_GROUP = 128       # stage A handles a level while its average group has this many rows
_PARALLEL_MIN = 32768  # below this many queries, routing runs on the calling thread
_UNIT_TOL = 1e-4       # rows whose norm is within this of 1 count as unit vectors


# ----------------------------------------------------------------------------------------------
# node addressing

def node_index(prefix: Sequence[int], k: int) -> int:
    """Flat row-major index of the node with path prefix (i1..il): sum_j i_j * k**(l-1-j)."""
    idx = 0
    for i in prefix:
        i = int(i)
        if not 0 <= i < k:
            raise ValueError(f"path entry {i} outside [0, {k}) in prefix {tuple(prefix)}")
        idx = idx * k + i
    return idx


def node_prefix(index: int, level: int, k: int) -> tuple[int, ...]:
    """Inverse of `node_index`: the length-`level` prefix of flat index `index`."""
    if not 0 <= index < k ** level:
        raise ValueError(f"node index {index} outside [0, {k}**{level})")
    out = []
    for _ in range(level):
        index, r = divmod(index, k)
        out.append(r)
    return tuple(reversed(out))


def prefix_indices(paths: np.ndarray, level: int, k: int) -> np.ndarray:
    """Flat indices (int64) of the level-`level` nodes of many paths (n, depth)."""
    paths = np.asarray(paths)
    flat = np.zeros(len(paths), dtype=np.int64)
    for j in range(level):
        flat = flat * k + paths[:, j]
    return flat


# ----------------------------------------------------------------------------------------------
# input checks

def check_vectors(vectors: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what}: expected dimension {dim}, got {x.shape[1]}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{what}: expected real numbers, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def row_norms(x: np.ndarray, what: str, offset: int = 0) -> np.ndarray:
    """L2 norms (float32) of the rows of `x`; NaN/inf and zero rows raise ValueError."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        first = int(np.argmax(bad))
        kind = "a zero vector" if np.isfinite(norms[first]) else "NaN/inf"
        raise ValueError(f"{what}: {int(bad.sum())} rows are NaN/inf or zero vectors "
                         f"(first: row {first + offset}, {kind}); they cannot be routed")
    return norms


def unit_rows(x: np.ndarray, norms: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Rows of `x` divided by their norms, except rows already unit-norm to 1e-4, kept as they are
    (embedders emit unit rows; skipping them saves a pass over the data). Build and route both go
    through this function, so a vector gets bitwise the same row, and path, in both. Returns `x`
    itself when no row needs scaling or when `inplace`."""
    scale = np.abs(norms - 1.0) > _UNIT_TOL
    if not scale.any():
        return x
    out = x if inplace else x.copy()
    out[scale] /= norms[scale, None]
    return out


def group_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stable grouping of equal keys: (order, starts, ends, key of each group)."""
    if len(keys) == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e, e
    small = keys.max() < 65536 and keys.min() >= 0
    order = np.argsort(keys.astype(np.uint16) if small else keys, kind="stable")
    sk = keys[order]
    cuts = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(keys)]))
    return order, starts, ends, sk[starts]


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def blas_single_thread(enabled: bool):
    """Limit BLAS to one thread while our own worker threads run (avoids oversubscription)."""
    if not enabled:
        return nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(1, user_api="blas")


def sqnorms(c: np.ndarray) -> np.ndarray:
    """Squared norms of centroids (..., k, d) -> (..., k), summed in float64 so that build and
    route get the same float32 values whatever the array shape."""
    return np.einsum("...kd,...kd->...k", c, c, dtype=np.float64).astype(np.float32)


def scorer(c: np.ndarray) -> np.ndarray:
    """-2 * centroids^T, contiguous: (..., k, d) -> (..., d, k). Scaling by -2 is exact in binary
    floating point, so x @ (-2 c^T) equals -2 (x @ c^T) bit for bit, one pass fewer per level."""
    return np.ascontiguousarray(np.swapaxes(c, -1, -2) * np.float32(-2.0))


def _scores(xb: np.ndarray, ct: np.ndarray, cn: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """||c||^2 - 2 <x, c> (= squared L2 distance - 1) of unit rows `xb` (m, d) against the centroids
    given as `ct` = `scorer(c)` (d, k) and `cn` = `sqnorms(c)` (k,): the one scoring routine of build
    and route, so both give a vector the same path bit for bit."""
    s = np.matmul(xb, ct, out=out)
    s += cn
    return s


def nearest(xb: np.ndarray, ct: np.ndarray, cn: np.ndarray, sbuf: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest centroid for unit rows `xb` (see `_scores`): the compiled kernel when
    available (`hiermem.native`), else BLAS. Tree build assigns points with this function and the
    router uses the same kernel, so a vector's path is the same in both."""
    kern = _kernel_for(ct.shape[-1])
    if kern is not None:
        ct16, cn16 = pad_sets(ct[None], cn[None])
        out = np.empty(len(xb), dtype=np.int64)
        return kern.nearest_groups(np.ascontiguousarray(xb, dtype=np.float32), None,
                                   np.array([0, len(xb)], dtype=np.int64), np.zeros(1, dtype=np.int64), ct16, cn16, out)
    return _scores(xb, ct, cn, None if sbuf is None else sbuf[:len(xb)]).argmin(axis=1)


def _kernel_for(k: int) -> NearestKernel | None:
    """The compiled kernel if it is enabled, built, and handles `k` children per node."""
    return kernel() if k <= LANES else None


# ----------------------------------------------------------------------------------------------
# tree levels and the router

@dataclass
class Level:
    """Parent nodes at one level (prefix length l) and their k children each."""

    node_ids: np.ndarray   # (R,) int64, sorted flat indices of the parent nodes that exist
    centroids: np.ndarray  # (R, k, d) float32 child centroids
    counts: np.ndarray     # (R, k) int64 training points per child (0 = never routed to)
    split: np.ndarray      # (R,) bool; False = under-filled node, everything goes to child 0


class Router:
    """Precomputed arrays for greedy descent over a list of levels.

    Scores are ||c||^2 - 2 <x, c> for unit rows x, i.e. squared L2 distance minus the constant
    ||x||^2 = 1; unusable children (no points, or blocked) get +inf.
    """

    def __init__(self, levels: list[Level], k: int, dead: list[np.ndarray] | None = None):
        self.k = k
        self.depth = len(levels)
        self.ct = [scorer(lv.centroids) for lv in levels]
        self.cn = []
        for li, lv in enumerate(levels):
            cn = sqnorms(lv.centroids)
            unusable = lv.counts == 0
            if dead is not None:
                unusable = unusable | dead[li]
            cn[unusable] = np.inf
            self.cn.append(cn)
        self.lookup = []
        for lv in levels:
            size = int(lv.node_ids.max()) + 1 if len(lv.node_ids) else 0
            if size <= 1 << 24:
                table = np.full(size, -1, dtype=np.int32)
                table[lv.node_ids] = np.arange(len(lv.node_ids), dtype=np.int32)
                self.lookup.append(table)
            else:
                self.lookup.append(None)
        self.node_ids = [lv.node_ids for lv in levels]
        self._local = threading.local()
        self._padded: list[tuple[np.ndarray, np.ndarray]] | None = None  # sets for the compiled kernel

    def rows(self, level: int, flat: np.ndarray) -> np.ndarray:
        table = self.lookup[level]
        if table is not None:
            r = table[flat]
        else:
            ids = self.node_ids[level]
            r = np.minimum(np.searchsorted(ids, flat), len(ids) - 1)
            r[ids[r] != flat] = -1
        if len(r) and r.min() < 0:
            raise RuntimeError("routing reached a node that does not exist (corrupt tree)")
        return r

    def _buffer(self, name: str, m: int, width: int) -> np.ndarray:
        """Per-thread scratch array (m, width), reused across calls to avoid page faults."""
        buf = getattr(self._local, name, None)
        if buf is None or len(buf) < m:
            buf = np.empty((max(m, 1024), width), dtype=np.float32)
            setattr(self._local, name, buf)
        return buf[:m]

    def _choose(self, xb: np.ndarray, level: int, row: int, sbuf: np.ndarray) -> np.ndarray:
        return nearest(xb, self.ct[level][row], self.cn[level][row], sbuf)

    def step(self, xb: np.ndarray, level: int, rows: np.ndarray) -> np.ndarray:
        """Child choice at `level` for the unit rows of block `xb` whose parents are `rows`."""
        m = len(xb)
        out = np.empty(m, dtype=np.int64)
        if m == 0:
            return out
        if rows.min() == rows.max():  # one parent: the block is already contiguous
            sbuf = self._buffer("scores", min(m, PIECE), self.k)
            for lo in range(0, m, PIECE):
                hi = min(m, lo + PIECE)
                out[lo:hi] = self._choose(xb[lo:hi], level, int(rows[0]), sbuf)
            return out
        # several parents: one gather into parent order, `_scores` per parent on its contiguous
        # slice, then one argmin and one scatter for the whole block (few numpy calls)
        order, starts, ends, keys = group_rows(rows)
        xg = np.take(xb, order, axis=0, out=self._buffer("group", m, xb.shape[1]), mode="clip")  # clip: ~2x faster
        scores = self._buffer("scores", m, self.k)
        ct, cn = self.ct[level], self.cn[level]
        for s, e, r in zip(starts.tolist(), ends.tolist(), keys.tolist()):
            _scores(xg[s:e], ct[r], cn[r], out=scores[s:e])
        out[order] = scores.argmin(axis=1)
        return out

    def descend(self, xb: np.ndarray, flat: np.ndarray, lo: int, hi: int, paths: np.ndarray) -> np.ndarray:
        """Levels lo..hi-1 for block `xb` (parents `flat` at level lo); fills paths[:, lo:hi]."""
        for level in range(lo, hi):
            c = self.step(xb, level, self.rows(level, flat))
            paths[:, level] = c
            flat = flat * self.k + c
        return flat

    # -- compiled path: the kernel gathers each group's rows itself (no copies), GIL released
    def _native_step(self, kern: NearestKernel, x: np.ndarray, idx: np.ndarray | None, level: int,
                     rows: np.ndarray) -> np.ndarray:
        """Child choice at `level` for rows x[idx] (the rows of x when idx is None), parents `rows`."""
        m = len(rows)
        out = np.empty(m, dtype=np.int64)
        ct16, cn16 = self._padded[level]
        if m and rows.min() == rows.max():
            return kern.nearest_groups(x, idx, np.array([0, m], dtype=np.int64), rows[:1].astype(np.int64),
                                       ct16, cn16, out)
        order, starts, _, keys = group_rows(rows)
        choice = kern.nearest_groups(x, order if idx is None else idx[order], np.append(starts, m),
                                     keys.astype(np.int64), ct16, cn16, np.empty(m, dtype=np.int64))
        out[order] = choice
        return out

    def _descend_native(self, kern: NearestKernel, x: np.ndarray, idx: np.ndarray | None, flat: np.ndarray,
                        lo: int, hi: int, paths: np.ndarray) -> np.ndarray:
        for level in range(lo, hi):
            c = self._native_step(kern, x, idx, level, self.rows(level, flat))
            paths[:, level] = c
            flat = flat * self.k + c
        return flat

    def route(self, x: np.ndarray, threads: int) -> np.ndarray:
        """Greedy paths (n, depth) for float32 rows `x` (normalized here, see `unit_rows`).

        Stage A walks cache-sized chunks of consecutive rows through the first levels, where a
        chunk's rows still form large groups per node. Stage B takes the rows of each node of the
        last stage-A level as one block and walks it through the remaining levels, regrouping
        inside the (cache-resident) block. Chunks and blocks run on `threads` threads. With the
        compiled kernel (`hiermem.native`) the kernel reads each group's rows in place; without
        it, each group is gathered into a contiguous copy for one BLAS matmul.
        """
        n, k, depth = len(x), self.k, self.depth
        paths = np.empty((n, depth), dtype=np.int64)
        if n == 0:
            return paths
        kern = _kernel_for(k)
        if kern is not None and self._padded is None:
            self._padded = [pad_sets(ct, cn) for ct, cn in zip(self.ct, self.cn)]
        # stage A: the first levels on cache-resident chunks (groups within a chunk stay large)
        a = 1
        while a < depth and _CHUNK / k ** a >= _MIN_GROUP:
            a += 1
        flat_a = np.empty(n, dtype=np.int64)
        norms = np.empty(n, dtype=np.float32)
        d = x.shape[1]

        def stage_a(lo: int) -> None:
            hi = min(n, lo + _CHUNK)
            norms[lo:hi] = row_norms(x[lo:hi], "route", lo)
            xb = unit_rows(x[lo:hi], norms[lo:hi])  # a view of x when its rows are unit vectors
            root = np.zeros(hi - lo, dtype=np.int64)
            if kern is not None:
                flat_a[lo:hi] = self._descend_native(kern, xb, None, root, 0, a, paths[lo:hi])
            else:
                flat_a[lo:hi] = self.descend(xb, root, 0, a, paths[lo:hi])

        # stage B: the remaining levels, one block per level-a node, regrouping inside the block
        xs = x  # stage B's rows for the kernel: x itself unless some rows need scaling

        def stage_b(task: tuple[np.ndarray, int]) -> None:
            gi, key = task
            sub = np.empty((len(gi), depth), dtype=np.int64)
            if kern is not None:
                self._descend_native(kern, xs, gi, np.full(len(gi), key, dtype=np.int64), a, depth, sub)
            else:
                xb = np.take(x, gi, axis=0, out=self._buffer("block", len(gi), d), mode="clip")
                unit_rows(xb, norms[gi], inplace=True)
                self.descend(xb, np.full(len(gi), key, dtype=np.int64), a, depth, sub)
            paths[gi, a:] = sub[:, a:]

        parallel = threads > 1 and n >= _PARALLEL_MIN
        # BLAS threads only add synchronization to these small matmuls: one thread each
        with blas_single_thread(n > 1024), (ThreadPoolExecutor(threads) if parallel else nullcontext()) as pool:
            run = pool.map if pool is not None else map
            list(run(stage_a, range(0, n, _CHUNK)))
            if a < depth:
                if kern is not None:
                    xs = unit_rows(x, norms)  # a copy only when some rows are not unit vectors
                order, starts, ends, keys = group_rows(flat_a)
                tasks = [(order[s0:e0], int(key)) for s, e, key in zip(starts, ends, keys)
                         for s0, e0 in _pieces(s, e)]
                tasks.sort(key=lambda t: -len(t[0]))
                list(run(stage_b, tasks))
        return paths


def _pieces(s: int, e: int) -> list[tuple[int, int]]:
    return [(p, min(e, p + _BLOCK)) for p in range(s, e, _BLOCK)]
