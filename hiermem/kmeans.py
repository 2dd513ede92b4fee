"""Balanced k-means for one tree node: k-means++ seeding and EM on sampled subsets (paper App. C).

At every assignment step a cluster holding more than `balance_factor / k` of the step's points is
pooled with the smallest cluster and the pool is split evenly at random (Jegou et al.'s trick, as the
paper does). See `hiermem.retriever` for the tree built from these node fits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hiermem.configbase import Config, require
from hiermem.routing import PIECE, nearest, scorer, sqnorms

log = logging.getLogger(__name__)

BALANCE_MIN = 4       # balancing needs >= 4 points per cluster: below that the 1.5/k cap is under one point


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
    balance_by: str = "count"  # what the balancing evens out: "count" (points) or "tokens" (build weights)

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
        require(self.balance_by in ("count", "tokens"), "balance_by", "'count' or 'tokens'", self.balance_by)

    @property
    def min_points(self) -> int:
        """Fewest points a node needs to be split."""
        return max(self.branching, self.min_split_size)


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


def _balance(a: np.ndarray, k: int, factor: float, rng: np.random.Generator,
             w: np.ndarray | None = None) -> np.ndarray:
    """Paper's balancing: while a cluster holds more than factor/k of the points, its points and
    those of the currently smallest cluster are pooled and split evenly at random between the two.

    With weights `w` (e.g. tokens per document) "holds" and "evenly" count weight instead of points:
    the pool is split where its random order reaches half its weight.

    Each split lowers the sum of squared cluster sizes by at least (m/2k)^2 / 2, so the loop ends
    within 8k^2 splits (in practice a handful); a weighted pool whose heaviest point outweighs the
    rest cannot be split further and ends the loop."""
    weights = np.ones(len(a)) if w is None else np.asarray(w, dtype=np.float64)
    counts = np.bincount(a, weights=weights, minlength=k)
    limit = factor * weights.sum() / k
    for _ in range(8 * k * k):
        big = int(counts.argmax())
        if counts[big] <= limit:
            break
        small = int(counts.argmin())
        members = rng.permutation(np.flatnonzero((a == big) | (a == small)))
        if w is None:
            half = len(members) // 2
        else:
            cum = np.cumsum(weights[members])
            half = int(np.searchsorted(cum, cum[-1] / 2.0))
            half = min(max(half, 1), len(members) - 1) if len(members) > 1 else 0
        a[members[:half]] = small
        a[members[half:]] = big
        new_small, new_big = weights[members[:half]].sum(), weights[members[half:]].sum()
        if w is not None and max(new_small, new_big) >= counts[big]:
            counts[small], counts[big] = new_small, new_big
            break  # no progress possible (one point outweighs the pool)
        counts[small], counts[big] = new_small, new_big
    return a


def _over_limit(a: np.ndarray, k: int, factor: float, w: np.ndarray | None) -> bool:
    """Does some cluster hold more than factor/k of the points (or of the weight)?"""
    counts = np.bincount(a, weights=w, minlength=k)
    return counts.max() > factor * counts.sum() / k


def _onehot_sums(a: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster sums of the rows of `xb` assigned by `a` (a one-hot matmul beats np.add.at)."""
    return (a[None, :] == np.arange(k)[:, None]).astype(np.float32) @ xb


def fit_node(x: np.ndarray, idx: np.ndarray, cfg: TreeConfig, rng: np.random.Generator,
              weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Split the node holding rows `idx` of the unit vectors `x`.

    weights: optional per-row weights of `x` (all rows) that the balancing counts instead of points.
    Returns (centroids (k, d), nearest-child assignment of every point of the node, balanced?).
    """
    k, m = cfg.branching, len(idx)
    wn = None if weights is None else np.asarray(weights, dtype=np.float64)[idx]
    balance = m >= BALANCE_MIN * k
    full = m <= cfg.sample_size
    ws = wn
    if full:  # the whole node fits in one sample: every EM step sees all points
        xs = np.take(x, idx, axis=0, mode="clip")  # clip: no per-row bounds check (~2x faster)
    else:
        perm = rng.permutation(m)
        cursor = 0

        def next_sample() -> tuple[np.ndarray, np.ndarray | None]:
            nonlocal cursor, perm
            if cursor + cfg.sample_size > m:  # every point seen once: start a new pass
                perm, cursor = rng.permutation(m), 0
            pick = np.sort(perm[cursor:cursor + cfg.sample_size])
            cursor += cfg.sample_size
            return np.take(x, idx[pick], axis=0, mode="clip"), (None if wn is None else wn[pick])

        xs, ws = next_sample()
    c = _kmeans_pp(xs, k, rng)
    prev, sums = None, None
    for step in range(cfg.em_steps):
        if not full and step > 0:
            xs, ws = next_sample()
        a = nearest(xs, scorer(c), sqnorms(c))
        if balance and _over_limit(a, k, cfg.balance_factor, ws):
            a = _balance(a, k, cfg.balance_factor, rng, ws)
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
    total = m if wn is None else float(wn.sum())
    limit = cfg.balance_factor * total / k
    best = None
    for it in range(cfg.polish_steps + 1):
        ct, cn = scorer(c), sqnorms(c)
        if full:
            a = nearest(xs, ct, cn)
            sums = _onehot_sums(a, xs, k)
        else:
            a = np.empty(m, dtype=np.int64)
            sums = np.zeros((k, x.shape[1]), dtype=np.float32)
            for lo in range(0, m, PIECE):
                xb = np.take(x, idx[lo:lo + PIECE], axis=0, mode="clip")
                a[lo:lo + PIECE] = nearest(xb, ct, cn)
                sums += _onehot_sums(a[lo:lo + PIECE], xb, k)
        counts = np.bincount(a, weights=wn, minlength=k)
        if it:
            log.debug("polish step %d: largest child %.4f of %d points", it, counts.max() / total, m)
        if best is None or counts.max() < best[2]:
            best = (c.copy(), a, counts.max())
        if not balance or counts.max() <= limit or it == cfg.polish_steps:
            break
        before = a  # kept intact: `best` may hold it
        a = _balance(a.copy(), k, cfg.balance_factor, rng, wn)
        moved = np.flatnonzero(a != before)
        xm = np.take(x, idx[moved], axis=0, mode="clip")
        sums -= _onehot_sums(before[moved], xm, k)
        sums += _onehot_sums(a[moved], xm, k)
        counts = np.bincount(a, minlength=k)
        nz = counts > 0
        c[nz] = sums[nz] / counts[nz, None]
    c, a, biggest = best
    return c, a, not balance or biggest <= limit
