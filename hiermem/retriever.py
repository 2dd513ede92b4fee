"""Hierarchical k-means retriever (paper §2.1 / App. C).

A tree with `branching` (k) children per node and `depth` (p) levels is built root to leaves on
L2-normalized embeddings. Each node is split by k-means: k-means++ seeding on a sample, then
`em_steps` EM steps that each draw `sample_size` new points of the node. At every assignment step
the cluster sizes are checked: the points of a cluster holding more than `balance_factor / k` of
the step's points are pooled with those of the smallest cluster and split evenly at random between
the two (the paper's balancing trick), until no cluster is over the limit (nodes with fewer than
4k points skip balancing: the cap would be below a handful of points). After fitting, all
points of the node are assigned to their nearest child centroid ("polish" steps repeat the
balanced EM step on the whole node while a child is still over the limit); those assignments are
the training paths and equal what `route` returns for the same vectors.

Routing is greedy: at each level a vector goes to the child whose centroid is nearest in L2
distance, giving a path (i1, ..., ip) with entries in [0, k). It is vectorized: queries are grouped
by their current node and each group meets its node's k centroids in one BLAS matmul, with the
first levels computed on cache-sized chunks (see `_Router`).

Addressing: a node at level l is its path prefix (i1..il); its flat index is
`sum_j i_j * k**(l-1-j)` (row-major, `node_index`), the convention the memory bank uses.

Fallbacks (documented, logged at build time, visible in `level_stats`):
- a node with fewer than `max(branching, min_split_size)` points is not split: all its points, and
  every query reaching it, go to child 0, and so on down to full depth (paths always have length p);
- a child that received no point in the final assignment is never routed to.
Bad input (empty, NaN/inf, zero vectors, wrong dimension, fewer points than k) raises ValueError.

Blocking: `route(..., blocked=[prefix, ...])` never enters a blocked subtree; a query takes the
nearest unblocked child instead (a node whose children are all blocked counts as blocked).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from hiermem.configbase import Config, require
from hiermem.io import atomic_path

if TYPE_CHECKING:  # imported lazily: pandas and the embedders are not needed for routing
    import pandas as pd

    from hiermem.embed import Embedder

log = logging.getLogger(__name__)

FORMAT = "hiermem.tree/1"
_CHUNK = 4096          # stage-A chunk (rows); 4096 x 384 floats stay in cache
_PIECE = 16384         # largest block gathered at once in stage B / build assignment
_MIN_GROUP = 128       # stage A handles a level while its average group has this many rows
_PARALLEL_MIN = 32768  # below this many queries, routing runs on the calling thread
_UNIT_TOL = 1e-4       # rows whose norm is within this of 1 count as unit vectors
_BALANCE_MIN = 4       # balancing needs >= 4 points per cluster: below that the 1.5/k cap is under one point


@dataclass(frozen=True)
class TreeConfig(Config):
    """Hierarchical k-means settings; defaults are the paper's (k=16, depth 4, 20 x 6,400)."""

    branching: int = 16
    depth: int = 4
    sample_size: int = 6400
    em_steps: int = 20
    balance_factor: float = 1.5
    seed: int = 0
    min_split_size: int = 0  # nodes with fewer points are not split; 0 means `branching`
    polish_steps: int = 10   # extra whole-node balanced EM steps while a child exceeds the balance limit

    def validate(self) -> None:
        require(self.branching >= 2, "branching", "an integer >= 2", self.branching)
        require(self.depth >= 1, "depth", "an integer >= 1", self.depth)
        require(self.branching ** self.depth < 2 ** 62, "depth", "branching**depth < 2**62", self.depth)
        require(self.sample_size >= self.branching, "sample_size", f">= branching ({self.branching})",
                self.sample_size)
        require(self.em_steps >= 1, "em_steps", "an integer >= 1", self.em_steps)
        require(self.balance_factor > 1.0, "balance_factor", "a number > 1", self.balance_factor)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require(self.min_split_size >= 0, "min_split_size", "an integer >= 0", self.min_split_size)
        require(self.polish_steps >= 0, "polish_steps", "an integer >= 0", self.polish_steps)

    @property
    def min_points(self) -> int:
        """Fewest points a node needs to be split."""
        return max(self.branching, self.min_split_size)


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

def _check_vectors(vectors: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what}: expected dimension {dim}, got {x.shape[1]}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{what}: expected real numbers, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _row_norms(x: np.ndarray, what: str, offset: int = 0) -> np.ndarray:
    """L2 norms (float32) of the rows of `x`; NaN/inf and zero rows raise ValueError."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        first = int(np.argmax(bad))
        kind = "a zero vector" if np.isfinite(norms[first]) else "NaN/inf"
        raise ValueError(f"{what}: {int(bad.sum())} rows are NaN/inf or zero vectors "
                         f"(first: row {first + offset}, {kind}); they cannot be routed")
    return norms


def _unit_rows(x: np.ndarray, norms: np.ndarray, inplace: bool = False) -> np.ndarray:
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


def _group(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _blas_single_thread(enabled: bool):
    """Limit BLAS to one thread while our own worker threads run (avoids oversubscription)."""
    if not enabled:
        return nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(1, user_api="blas")


# ----------------------------------------------------------------------------------------------
# k-means with balancing, for one node

def _kmeans_pp(xs: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling) on a sample of unit vectors."""
    m = len(xs)
    c = np.empty((k, xs.shape[1]), dtype=np.float32)
    c[0] = xs[rng.integers(m)]
    d2 = np.maximum(2.0 - 2.0 * (xs @ c[0]), 0.0)
    for j in range(1, k):
        cum = np.cumsum(d2, dtype=np.float64)
        if cum[-1] <= 0:  # every point coincides with a chosen centroid
            i = int(rng.integers(m))
        else:
            i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), m - 1)
        c[j] = xs[i]
        np.minimum(d2, np.maximum(2.0 - 2.0 * (xs @ c[j]), 0.0), out=d2)
    return c


def _balance(a: np.ndarray, k: int, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Paper's balancing: while a cluster holds more than factor/k of the points, its points and
    those of the currently smallest cluster are pooled and split evenly at random between the two.

    Each split lowers the sum of squared cluster sizes by at least (m/2k)^2 / 2, so the loop ends
    within 8k^2 splits (in practice a handful)."""
    counts = np.bincount(a, minlength=k)
    limit = factor * len(a) / k
    for _ in range(8 * k * k):
        big = int(counts.argmax())
        if counts[big] <= limit:
            break
        small = int(counts.argmin())
        members = rng.permutation(np.flatnonzero((a == big) | (a == small)))
        half = len(members) // 2
        a[members[:half]] = small
        a[members[half:]] = big
        counts[small], counts[big] = half, len(members) - half
    return a


def _sqnorms(c: np.ndarray) -> np.ndarray:
    """Squared norms of centroids (..., k, d) -> (..., k), summed in float64 so that build and
    route get the same float32 values whatever the array shape."""
    return np.einsum("...kd,...kd->...k", c, c, dtype=np.float64).astype(np.float32)


def _nearest(xb: np.ndarray, ct: np.ndarray, cn: np.ndarray, sbuf: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest centroid for unit rows `xb` (m, d); `ct` (d, k) contiguous, `cn` (k,).
    The one scoring routine of build and route: ||c||^2 - 2 <x, c> (= squared L2 distance - 1)."""
    s = np.matmul(xb, ct, out=None if sbuf is None else sbuf[:len(xb)])
    s *= -2.0
    s += cn
    return s.argmin(axis=1)


def _onehot_sums(a: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster sums of the rows of `xb` assigned by `a` (a one-hot matmul beats np.add.at)."""
    return (a[None, :] == np.arange(k)[:, None]).astype(np.float32) @ xb


def _fit_node(x: np.ndarray, idx: np.ndarray, cfg: TreeConfig,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
    """Split the node holding rows `idx` of the unit vectors `x`.

    Returns (centroids (k, d), nearest-child assignment of every point of the node, balanced?).
    """
    k, m = cfg.branching, len(idx)
    balance = m >= _BALANCE_MIN * k
    full = m <= cfg.sample_size
    if full:  # the whole node fits in one sample: every EM step sees all points
        xs = np.take(x, idx, axis=0)
    else:
        perm = rng.permutation(m)
        cursor = 0

        def next_sample() -> np.ndarray:
            nonlocal cursor, perm
            if cursor + cfg.sample_size > m:  # every point seen once: start a new pass
                perm, cursor = rng.permutation(m), 0
            pick = np.sort(perm[cursor:cursor + cfg.sample_size])
            cursor += cfg.sample_size
            return np.take(x, idx[pick], axis=0)

        xs = next_sample()
    c = _kmeans_pp(xs, k, rng)
    prev, sums = None, None
    for step in range(cfg.em_steps):
        if not full and step > 0:
            xs = next_sample()
        a = _nearest(xs, np.ascontiguousarray(c.T), _sqnorms(c))
        if balance and np.bincount(a, minlength=k).max() > cfg.balance_factor * len(a) / k:
            a = _balance(a, k, cfg.balance_factor, rng)
        if full and prev is not None:
            # same points every step: update the cluster sums with the points that moved only
            moved = np.flatnonzero(a != prev)
            if len(moved) == 0:
                break  # fixed point of (balanced) Lloyd's iterations
            xm = xs[moved]
            sums -= _onehot_sums(prev[moved], xm, k)
            sums += _onehot_sums(a[moved], xm, k)
        else:
            sums = _onehot_sums(a, xs, k)
        prev = a
        counts = np.bincount(a, minlength=k)
        nz = counts > 0
        c[nz] = sums[nz] / counts[nz, None]  # an empty cluster keeps its centroid

    # Final nearest-child assignment of every point. The balancing above acts on the EM samples,
    # so the nearest assignment of the whole node can still leave a child over the limit. Then
    # "polish": the same balanced EM step on the whole node, at most `polish_steps` times, keeping
    # the most balanced state seen. On smooth data this settles under the limit; a tight cluster
    # just over the limit can keep it slightly above (logged; `level_stats` shows the max share).
    limit = cfg.balance_factor * m / k
    best = None
    for it in range(cfg.polish_steps + 1):
        ct, cn = np.ascontiguousarray(c.T), _sqnorms(c)
        if full:
            a = _nearest(xs, ct, cn)
            sums = _onehot_sums(a, xs, k)
        else:
            a = np.empty(m, dtype=np.int64)
            sums = np.zeros((k, x.shape[1]), dtype=np.float32)
            for lo in range(0, m, _PIECE):
                xb = np.take(x, idx[lo:lo + _PIECE], axis=0)
                a[lo:lo + _PIECE] = _nearest(xb, ct, cn)
                sums += _onehot_sums(a[lo:lo + _PIECE], xb, k)
        counts = np.bincount(a, minlength=k)
        if it:
            log.debug("polish step %d: largest child %.4f of %d points", it, counts.max() / m, m)
        if best is None or counts.max() < best[2]:
            best = (c.copy(), a, counts.max())
        if not balance or counts.max() <= limit or it == cfg.polish_steps:
            break
        before = a  # kept intact: `best` may hold it
        a = _balance(a.copy(), k, cfg.balance_factor, rng)
        moved = np.flatnonzero(a != before)
        xm = np.take(x, idx[moved], axis=0)
        sums -= _onehot_sums(before[moved], xm, k)
        sums += _onehot_sums(a[moved], xm, k)
        counts = np.bincount(a, minlength=k)
        nz = counts > 0
        c[nz] = sums[nz] / counts[nz, None]
    c, a, biggest = best
    return c, a, not balance or biggest <= limit


# ----------------------------------------------------------------------------------------------
# tree levels and the router

@dataclass
class _Level:
    """Parent nodes at one level (prefix length l) and their k children each."""

    node_ids: np.ndarray   # (R,) int64, sorted flat indices of the parent nodes that exist
    centroids: np.ndarray  # (R, k, d) float32 child centroids
    counts: np.ndarray     # (R, k) int64 training points per child (0 = never routed to)
    split: np.ndarray      # (R,) bool; False = under-filled node, everything goes to child 0


class _Router:
    """Precomputed arrays for greedy descent over a list of levels.

    Scores are ||c||^2 - 2 <x, c> for unit rows x, i.e. squared L2 distance minus the constant
    ||x||^2 = 1; unusable children (no points, or blocked) get +inf.
    """

    def __init__(self, levels: list[_Level], k: int, dead: list[np.ndarray] | None = None):
        self.k = k
        self.depth = len(levels)
        self.ct = [np.ascontiguousarray(lv.centroids.transpose(0, 2, 1)) for lv in levels]
        self.cn = []
        for li, lv in enumerate(levels):
            cn = _sqnorms(lv.centroids)
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
        return _nearest(xb, self.ct[level][row], self.cn[level][row], sbuf)

    def step(self, xb: np.ndarray, level: int, rows: np.ndarray) -> np.ndarray:
        """Child choice at `level` for the unit rows of block `xb` whose parents are `rows`."""
        m = len(xb)
        out = np.empty(m, dtype=np.int64)
        if m == 0:
            return out
        if rows.min() == rows.max():  # one parent: the block is already contiguous
            sbuf = self._buffer("scores", min(m, _PIECE), self.k)
            for lo in range(0, m, _PIECE):
                hi = min(m, lo + _PIECE)
                out[lo:hi] = self._choose(xb[lo:hi], level, int(rows[0]), sbuf)
            return out
        order, starts, ends, keys = _group(rows)
        big = int((ends - starts).max())
        xbuf, sbuf = self._buffer("group", big, xb.shape[1]), self._buffer("scores", big, self.k)
        for s, e, r in zip(starts, ends, keys):
            gi = order[s:e]
            xg = np.take(xb, gi, axis=0, out=xbuf[:e - s])
            out[gi] = self._choose(xg, level, int(r), sbuf)
        return out

    def descend(self, xb: np.ndarray, flat: np.ndarray, lo: int, hi: int, paths: np.ndarray) -> np.ndarray:
        """Levels lo..hi-1 for block `xb` (parents `flat` at level lo); fills paths[:, lo:hi]."""
        for level in range(lo, hi):
            c = self.step(xb, level, self.rows(level, flat))
            paths[:, level] = c
            flat = flat * self.k + c
        return flat

    def route(self, x: np.ndarray, threads: int) -> np.ndarray:
        """Greedy paths (n, depth) for float32 rows `x` (normalized here, see `_unit_rows`).

        Stage A walks cache-sized chunks of consecutive rows through the first levels, where a
        chunk's rows still form large groups per node. Stage B gathers the rows of each node of
        the last stage-A level into one block and walks it through the remaining levels,
        regrouping inside the (cache-resident) block. Chunks and blocks run on `threads` threads.
        """
        n, k, depth = len(x), self.k, self.depth
        paths = np.empty((n, depth), dtype=np.int64)
        if n == 0:
            return paths
        # stage A: the first levels on cache-resident chunks (groups within a chunk stay large)
        a = 1
        while a < depth and _CHUNK / k ** a >= _MIN_GROUP:
            a += 1
        flat_a = np.empty(n, dtype=np.int64)
        norms = np.empty(n, dtype=np.float32)
        d = x.shape[1]

        def stage_a(lo: int) -> None:
            hi = min(n, lo + _CHUNK)
            norms[lo:hi] = _row_norms(x[lo:hi], "route", lo)
            xb = _unit_rows(x[lo:hi], norms[lo:hi])  # a view of x when its rows are unit vectors
            flat_a[lo:hi] = self.descend(xb, np.zeros(hi - lo, dtype=np.int64), 0, a, paths[lo:hi])

        # stage B: the remaining levels, one gather per level-a node, regrouping inside the gathered block
        def stage_b(task: tuple[np.ndarray, int]) -> None:
            gi, key = task
            xb = np.take(x, gi, axis=0, out=self._buffer("block", len(gi), d))
            _unit_rows(xb, norms[gi], inplace=True)
            sub = np.empty((len(gi), depth), dtype=np.int64)
            self.descend(xb, np.full(len(gi), key, dtype=np.int64), a, depth, sub)
            paths[gi, a:] = sub[:, a:]

        parallel = threads > 1 and n >= _PARALLEL_MIN
        # BLAS threads only add synchronization to these small matmuls: one thread each
        with _blas_single_thread(n > 1024), (ThreadPoolExecutor(threads) if parallel else nullcontext()) as pool:
            run = pool.map if pool is not None else map
            list(run(stage_a, range(0, n, _CHUNK)))
            if a < depth:
                order, starts, ends, keys = _group(flat_a)
                tasks = [(order[s0:e0], int(key)) for s, e, key in zip(starts, ends, keys)
                         for s0, e0 in _pieces(s, e)]
                tasks.sort(key=lambda t: -len(t[0]))
                list(run(stage_b, tasks))
        return paths


def _pieces(s: int, e: int) -> list[tuple[int, int]]:
    return [(p, min(e, p + _PIECE)) for p in range(s, e, _PIECE)]


# ----------------------------------------------------------------------------------------------

class HierarchicalKMeans:
    """A fitted k-ary tree of centroids with greedy routing (see module docstring)."""

    def __init__(self, cfg: TreeConfig, dim: int, levels: list[_Level], embedder_fingerprint: str | None = None):
        if len(levels) != cfg.depth:
            raise ValueError(f"tree has {len(levels)} levels, config says depth {cfg.depth}")
        self.cfg = cfg
        self.dim = int(dim)
        self.levels = levels
        self.embedder_fingerprint = embedder_fingerprint
        self.train_paths: np.ndarray | None = None  # set by build(): paths of the build vectors
        self._router = _Router(levels, cfg.branching)

    @property
    def branching(self) -> int:
        return self.cfg.branching

    @property
    def depth(self) -> int:
        return self.cfg.depth

    def __repr__(self) -> str:
        return (f"HierarchicalKMeans(k={self.branching}, depth={self.depth}, dim={self.dim}, "
                f"leaves_used={int((self.levels[-1].counts > 0).sum())})")

    # -- build ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, cfg: TreeConfig | None = None, progress: bool = True,
              threads: int | None = None, embedder_fingerprint: str | None = None) -> "HierarchicalKMeans":
        """Fit the tree root to leaves on `vectors` (n, dim), normalized first; `tree.train_paths`
        holds their paths (equal to `tree.route(vectors)`). Nodes of a level are fitted in
        parallel on `threads` threads; results do not depend on the thread count."""
        cfg = cfg or TreeConfig()
        threads = threads or _default_threads()
        x = _check_vectors(vectors, None, "build")
        n, d = x.shape
        k = cfg.branching
        if n < k:
            raise ValueError(f"build: need at least branching={k} vectors, got {n}")
        x = _unit_rows(x, _row_norms(x, "build"))
        t_start = time.perf_counter()
        flat = np.zeros(n, dtype=np.int64)
        paths = np.empty((n, cfg.depth), dtype=np.int64)
        levels: list[_Level] = []
        parallel = threads > 1
        with _blas_single_thread(True), (ThreadPoolExecutor(threads) if parallel else nullcontext()) as pool:
            run = pool.map if pool is not None else map
            for level in range(cfg.depth):
                t0 = time.perf_counter()
                order, starts, ends, node_ids = _group(flat)
                r_count = len(node_ids)
                centroids = np.zeros((r_count, k, d), dtype=np.float32)
                split = np.zeros(r_count, dtype=bool)
                balanced = np.ones(r_count, dtype=bool)
                child = np.zeros(n, dtype=np.int64)

                def fit(r: int) -> None:
                    idx = np.sort(order[starts[r]:ends[r]])
                    if len(idx) < cfg.min_points:  # under-filled: child 0 stands for the node itself
                        centroids[r, 0] = x[idx].mean(axis=0)
                        return
                    rng = np.random.default_rng([cfg.seed, level, int(node_ids[r])])
                    centroids[r], child[idx], balanced[r] = _fit_node(x, idx, cfg, rng)
                    split[r] = True

                by_size = np.argsort(-(ends - starts), kind="stable")  # big nodes first: better load balance
                list(tqdm(run(fit, by_size), total=r_count, disable=not progress, leave=False,
                          desc=f"k-means level {level + 1}/{cfg.depth}", unit="node"))
                counts = np.bincount(np.repeat(np.arange(r_count), ends - starts) * k + child[order],
                                     minlength=r_count * k).reshape(r_count, k)
                lv = _Level(node_ids=node_ids, centroids=centroids, counts=counts, split=split)
                levels.append(lv)
                paths[:, level] = child
                flat = flat * k + child
                n_unsplit = int((~split).sum())
                if not balanced.all():
                    log.warning("level %d: %d node(s) still have a child over %.3g of their points after "
                                "%d polish steps", level + 1, int((~balanced).sum()), cfg.balance_factor / k,
                                cfg.polish_steps)
                msg = (f"level {level + 1}/{cfg.depth}: {r_count} nodes split into "
                       f"{int((lv.counts > 0).sum())} non-empty children in {time.perf_counter() - t0:.1f}s")
                if n_unsplit:
                    log.warning("%s; %d under-filled node(s) (< %d points) not split: their points "
                                "go to child 0", msg, n_unsplit, cfg.min_points)
                else:
                    log.info(msg)
        tree = cls(cfg, d, levels, embedder_fingerprint)
        tree.train_paths = paths
        log.info("built %r on %d vectors in %.1fs", tree, n, time.perf_counter() - t_start)
        return tree

    # -- routing -------------------------------------------------------------------------------
    def route(self, vectors: np.ndarray, blocked: Iterable[Sequence[int]] = (), threads: int | None = None) -> np.ndarray:
        """Greedy root-to-leaf paths, int64 (n, depth), for vectors (n, dim).

        Rows are L2-normalized first (NaN/inf/zero rows raise ValueError). `blocked` lists node
        prefixes (tuples of length 1..depth) whose subtrees routing never enters: a query takes the
        nearest unblocked child instead. `threads` defaults to the CPUs this process may use."""
        x = _check_vectors(vectors, self.dim, "route")
        blocked = list(blocked)
        router = self._router if not blocked else _Router(self.levels, self.branching, self._dead_mask(blocked))
        return router.route(x, threads or _default_threads())

    def route_texts(self, texts: Sequence[str], embedder: "Embedder", blocked: Iterable[Sequence[int]] = (),
                    batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed `texts` (e.g. evaluation prompts) with `embedder` and route them."""
        if embedder.dim != self.dim:
            raise ValueError(f"embedder {embedder.name!r} has dim {embedder.dim}, tree was built on dim {self.dim}")
        if self.embedder_fingerprint is not None and embedder.fingerprint() != self.embedder_fingerprint:
            raise ValueError(f"embedder {embedder.name!r} ({embedder.fingerprint()}) differs from the one the tree "
                             f"was built with ({self.embedder_fingerprint}); prompts would be embedded differently")
        return self.route(embedder.encode(list(texts), batch_size=batch_size, progress=progress), blocked)

    def _dead_mask(self, blocked: list[Sequence[int]]) -> list[np.ndarray]:
        """Per level, (R, k) mask of children that routing must avoid."""
        k, depth = self.branching, self.depth
        dead = [np.zeros(lv.counts.shape, dtype=bool) for lv in self.levels]
        for prefix in blocked:
            prefix = tuple(int(i) for i in prefix)
            if not 1 <= len(prefix) <= depth:
                raise ValueError(f"blocked prefix {prefix} must have length 1..{depth}")
            parent = node_index(prefix, k) // k  # also checks every entry is in [0, k)
            lv = self.levels[len(prefix) - 1]
            r = np.searchsorted(lv.node_ids, parent)
            if r < len(lv.node_ids) and lv.node_ids[r] == parent:
                dead[len(prefix) - 1][r, prefix[-1]] = True
            else:
                log.debug("blocked prefix %s is not in the tree; ignored", prefix)
        # a node none of whose usable children is open is itself closed (bottom-up)
        for level in range(depth - 1, 0, -1):
            lv = self.levels[level]
            closed = (dead[level] | (lv.counts == 0)).all(axis=1)
            if closed.any():
                ids = lv.node_ids[closed]
                plv = self.levels[level - 1]
                rows = np.searchsorted(plv.node_ids, ids // k)
                dead[level - 1][rows, ids % k] = True
        if (dead[0] | (self.levels[0].counts == 0)).all():
            raise ValueError("every leaf is blocked: nothing left to route to")
        return dead

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the tree to one safetensors file (atomically)."""
        from safetensors.numpy import save_file

        tensors = {}
        for i, lv in enumerate(self.levels):
            tensors[f"level{i}.node_ids"] = lv.node_ids.astype(np.int64)
            tensors[f"level{i}.centroids"] = np.ascontiguousarray(lv.centroids, dtype=np.float32)
            tensors[f"level{i}.counts"] = lv.counts.astype(np.int64)
            tensors[f"level{i}.split"] = lv.split.astype(np.uint8)
        meta = {"format": FORMAT, "config": self.cfg.to_yaml(), "dim": str(self.dim),
                "embedder_fingerprint": self.embedder_fingerprint or ""}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HierarchicalKMeans":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tree file {str(path)!r} does not exist")
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a hiermem tree (format {meta.get('format')!r}, expected {FORMAT!r})")
            cfg = TreeConfig.from_yaml(meta["config"])
            dim = int(meta["dim"])
            levels = []
            for i in range(cfg.depth):
                lv = _Level(node_ids=f.get_tensor(f"level{i}.node_ids"), centroids=f.get_tensor(f"level{i}.centroids"),
                            counts=f.get_tensor(f"level{i}.counts"), split=f.get_tensor(f"level{i}.split").astype(bool))
                r = len(lv.node_ids)
                if lv.centroids.shape != (r, cfg.branching, dim) or lv.counts.shape != (r, cfg.branching):
                    raise ValueError(f"{path}: level {i} arrays have inconsistent shapes")
                levels.append(lv)
        return cls(cfg, dim, levels, meta.get("embedder_fingerprint") or None)

    # -- statistics ----------------------------------------------------------------------------
    def level_stats(self, paths: np.ndarray | None = None, labels: dict[str, np.ndarray] | None = None) -> "pd.DataFrame":
        """Per level: non-empty nodes, min/median/max size, balance, purity against each label.

        `paths` defaults to the build paths. Row 0 is the root (its purity is the majority-label
        share, a baseline). `max_share_of_parent` is the largest child's share of its parent over
        parents with at least 4k points (where balancing applies); `n_unsplit_parents` counts
        under-filled parents.
        """
        import pandas as pd

        if paths is None:
            if self.train_paths is None:
                raise ValueError("level_stats: pass paths (a loaded tree has no build paths)")
            paths = self.train_paths
        paths = np.asarray(paths)
        if paths.ndim != 2 or paths.shape[1] != self.depth:
            raise ValueError(f"level_stats: expected paths of shape (n, {self.depth}), got {paths.shape}")
        n, k = len(paths), self.branching
        if n == 0:
            raise ValueError("level_stats: no paths")
        codes = {}
        for name, lab in (labels or {}).items():
            lab = np.asarray(lab)
            if len(lab) != n:
                raise ValueError(f"level_stats: label {name!r} has {len(lab)} entries, paths have {n}")
            codes[name] = np.unique(lab, return_inverse=True)[1].ravel()
        rows = []
        parent_counts = None
        for level in range(self.depth + 1):
            flat = prefix_indices(paths, level, k)
            ids, sizes = np.unique(flat, return_counts=True)
            row = {"level": level, "n_possible": k ** level, "n_nonempty": len(ids), "size_min": int(sizes.min()),
                   "size_median": float(np.median(sizes)), "size_max": int(sizes.max())}
            if level > 0:
                plv = self.levels[level - 1]
                p_ids, p_sizes = parent_counts
                tot = p_sizes[np.searchsorted(p_ids, ids // k)]
                pr = np.searchsorted(plv.node_ids, ids // k)
                known = (pr < len(plv.node_ids))
                pr = np.minimum(pr, len(plv.node_ids) - 1)
                was_split = known & (plv.node_ids[pr] == ids // k) & plv.split[pr]
                ok = was_split & (tot >= _BALANCE_MIN * k)
                row["max_share_of_parent"] = float((sizes[ok] / tot[ok]).max()) if ok.any() else float("nan")
                row["balance_limit"] = self.cfg.balance_factor / k
                row["n_unsplit_parents"] = int((~plv.split).sum())
            for name, code in codes.items():
                pair = flat * (int(code.max()) + 1) + code
                p, c = np.unique(pair, return_counts=True)
                node = p // (int(code.max()) + 1)
                best = pd.Series(c).groupby(node).max().sum()
                row[f"purity_{name}"] = float(best / n)
            rows.append(row)
            parent_counts = (ids, sizes)
        return pd.DataFrame(rows)


__all__ = ["TreeConfig", "HierarchicalKMeans", "node_index", "node_prefix", "prefix_indices"]
