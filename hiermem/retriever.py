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
by their current node and each group meets its node's k centroids at once, in a small compiled
kernel (`hiermem.native`, built on first use with the system C compiler) or, without one, in one
BLAS matmul per group, with the first levels computed on cache-sized chunks (see `Router`).

Why not faiss for the search: with k = 16 centroids per node, faiss's exact search
(`IndexFlatL2.search`) is slower than our kernel on both the cache-sized blocks and the small
per-node groups (`bench/retriever.py` prints the ratio; measured figures in the README's benchmark
section), and faiss.Kmeans has neither k-means++ seeding nor the per-step balancing. faiss serves as
the independent reference in the tests (a descent with `IndexFlatL2` at every node gives the same paths).

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
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from hiermem.io import atomic_path
from hiermem.kmeans import BALANCE_MIN, TreeConfig, fit_node
from hiermem.routing import (Level, Router, blas_single_thread, check_vectors, default_threads, group_rows,
                             row_norms, unit_rows, node_index, node_prefix, prefix_indices)

if TYPE_CHECKING:  # imported lazily: pandas and the embedders are not needed for routing
    import pandas as pd

    from hiermem.embed import Embedder

log = logging.getLogger(__name__)

FORMAT = "hiermem.tree/1"


# ----------------------------------------------------------------------------------------------

class HierarchicalKMeans:
    """A fitted k-ary tree of centroids with greedy routing (see module docstring)."""

    def __init__(self, cfg: TreeConfig, dim: int, levels: list[Level], embedder_fingerprint: str | None = None):
        if len(levels) != cfg.depth:
            raise ValueError(f"tree has {len(levels)} levels, config says depth {cfg.depth}")
        self.cfg = cfg
        self.dim = int(dim)
        self.levels = levels
        self.embedder_fingerprint = embedder_fingerprint
        self.train_paths: np.ndarray | None = None  # set by build(): paths of the build vectors
        self.router = Router(levels, cfg.branching)  # the public router (`hiermem.routing.Router`)

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
              threads: int | None = None, embedder_fingerprint: str | None = None,
              weights: np.ndarray | None = None) -> "HierarchicalKMeans":
        """Fit the tree root to leaves on `vectors` (n, dim), normalized first; `tree.train_paths`
        holds their paths (equal to `tree.route(vectors)`). Nodes of a level are fitted in
        parallel on `threads` threads; results do not depend on the thread count.

        weights: (n,) positive weights of the vectors (tokens per document), required when
        `cfg.balance_by == "tokens"`: the balancing then evens out weight per child, so that every
        leaf gets a comparable share of training tokens (the paper's windows are all 2,048 tokens,
        so its count balance is a token balance)."""
        cfg = cfg or TreeConfig()
        threads = threads or default_threads()
        x = check_vectors(vectors, None, "build")
        n, d = x.shape
        if cfg.balance_by == "tokens":
            if weights is None:
                raise ValueError("build: balance_by='tokens' needs weights (tokens per vector)")
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (n,) or not np.isfinite(weights).all() or (weights <= 0).any():
                raise ValueError(f"build: weights must be {n} positive finite numbers, got shape {weights.shape}")
        else:
            weights = None
        k = cfg.branching
        if n < k:
            raise ValueError(f"build: need at least branching={k} vectors, got {n}")
        x = unit_rows(x, row_norms(x, "build"))
        t_start = time.perf_counter()
        flat = np.zeros(n, dtype=np.int64)
        paths = np.empty((n, cfg.depth), dtype=np.int64)
        levels: list[Level] = []
        parallel = threads > 1
        with blas_single_thread(True), (ThreadPoolExecutor(threads) if parallel else nullcontext()) as pool:
            run = pool.map if pool is not None else map
            for level in range(cfg.depth):
                t0 = time.perf_counter()
                order, starts, ends, node_ids = group_rows(flat)
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
                    centroids[r], child[idx], balanced[r] = fit_node(x, idx, cfg, rng, weights)
                    split[r] = True

                by_size = np.argsort(-(ends - starts), kind="stable")  # big nodes first: better load balance
                list(tqdm(run(fit, by_size), total=r_count, disable=not progress, leave=False,
                          desc=f"k-means level {level + 1}/{cfg.depth}", unit="node"))
                counts = np.bincount(np.repeat(np.arange(r_count), ends - starts) * k + child[order],
                                     minlength=r_count * k).reshape(r_count, k)
                lv = Level(node_ids=node_ids, centroids=centroids, counts=counts, split=split)
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
        x = check_vectors(vectors, self.dim, "route")
        blocked = list(blocked)
        router = self.router if not blocked else Router(self.levels, self.branching, self._dead_mask(blocked))
        return router.route(x, threads or default_threads())

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
                lv = Level(node_ids=f.get_tensor(f"level{i}.node_ids"), centroids=f.get_tensor(f"level{i}.centroids"),
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
                ok = was_split & (tot >= BALANCE_MIN * k)
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


__all__ = ["HierarchicalKMeans", "node_index", "node_prefix", "prefix_indices"]
