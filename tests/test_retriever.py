"""Hierarchical k-means: routing = brute-force descent, balancing, save/load, blocking, fallbacks."""

import logging

import numpy as np
import pytest

from hiermem.embed import Embedder
from hiermem.kmeans import _balance
from hiermem.kmeans import TreeConfig
from hiermem.retriever import HierarchicalKMeans, node_index, node_prefix, prefix_indices


def mixture(n, d=16, comps=12, seed=0, spread=0.6):
    """Unit vectors from a Gaussian mixture with very unequal component weights."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(comps, 0.4))
    centers = rng.standard_normal((comps, d))
    label = rng.choice(comps, size=n, p=weights)
    x = centers[label] + spread * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), label


CFG = TreeConfig(branching=4, depth=3, sample_size=1000, em_steps=10, seed=3)


@pytest.fixture(scope="module")
def data():
    return mixture(6000)


@pytest.fixture(scope="module")
def tree(data):
    return HierarchicalKMeans.build(data[0], CFG, progress=False)


def brute_force(tree, x, blocked_dead=None):
    """Greedy descent in float64, one query at a time; also the smallest score margin seen."""
    k = tree.branching
    out = np.zeros((len(x), tree.depth), dtype=np.int64)
    margin = np.full(len(x), np.inf)
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    for i, q in enumerate(xn):
        flat = 0
        for level, lv in enumerate(tree.levels):
            r = int(np.searchsorted(lv.node_ids, flat))
            c = lv.centroids[r].astype(np.float64)
            dist = ((c - q) ** 2).sum(axis=1)
            dist[lv.counts[r] == 0] = np.inf
            if blocked_dead is not None:
                dist[blocked_dead[level][r]] = np.inf
            order = np.argsort(dist)
            out[i, level] = order[0]
            if np.isfinite(dist[order[1]]):
                margin[i] = min(margin[i], dist[order[1]] - dist[order[0]])
            flat = flat * k + int(order[0])
    return out, margin


def test_route_equals_brute_force_descent(tree, data):
    x = data[0][:1500]
    # unnormalized and float64 input must route like its unit float32 version
    got = tree.route(x.astype(np.float64) * 3.0)
    want, margin = brute_force(tree, x)
    clear = margin > 1e-5  # float32 vs float64 may only disagree on exact ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], want[clear])
    assert got.dtype == np.int64 and got.shape == (1500, CFG.depth)
    assert got.min() >= 0 and got.max() < CFG.branching


@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_routing_path_equals_brute_force_descent(tree, data, monkeypatch, threads):
    """Bug caught: a wrong numpy/BLAS routing path (scores, grouping or scatter) that passes wherever
    the compiled kernel is built, because only the kernel is compared with the brute force. Here the
    kernel is switched off (HIERMEM_NATIVE=0), whatever the machine, for routing and for a build."""
    import hiermem.native as native
    monkeypatch.setenv("HIERMEM_NATIVE", "0")
    assert native.kernel() is None
    x = data[0][:1500]
    want, margin = brute_force(tree, x)
    clear = margin > 1e-5
    assert clear.mean() > 0.99
    got = tree.route(x.astype(np.float64) * 3.0, threads=threads)
    np.testing.assert_array_equal(got[clear], want[clear])
    # a tree built on the numpy path assigns its training points by that same descent
    built = HierarchicalKMeans.build(data[0][:2000], CFG, progress=False, threads=threads)
    want, margin = brute_force(built, data[0][:2000])
    clear = margin > 1e-5
    np.testing.assert_array_equal(built.train_paths[clear], want[clear])


def test_build_paths_equal_routes(tree, data):
    np.testing.assert_array_equal(tree.train_paths, tree.route(data[0]))


def test_parallel_routing_equals_serial():
    x, _ = mixture(40000, d=8, comps=5, seed=1)
    t = HierarchicalKMeans.build(x[:5000], TreeConfig(branching=4, depth=3, sample_size=800, em_steps=5), progress=False)
    np.testing.assert_array_equal(t.route(x, threads=1), t.route(x, threads=2))


def test_build_is_deterministic(data, tree):
    again = HierarchicalKMeans.build(data[0], CFG, progress=False, threads=1)
    for a, b in zip(tree.levels, again.levels):
        np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(tree.train_paths, again.train_paths)


def test_balance_step_caps_every_cluster():
    rng = np.random.default_rng(0)
    for k in (4, 16):
        for _ in range(20):
            a = rng.choice(k, size=3000, p=rng.dirichlet(np.full(k, 0.2)))
            counts = np.bincount(_balance(a.copy(), k, 1.5, rng), minlength=k)
            assert counts.sum() == 3000
            assert counts.max() <= 1.5 * 3000 / k


def share_of_largest_child(paths, k, min_points):
    """Largest child share of every node with >= min_points points, over all levels."""
    shares = []
    for level in range(paths.shape[1]):
        parent = prefix_indices(paths, level, k)
        child = prefix_indices(paths, level + 1, k)
        pids, psize = np.unique(parent, return_counts=True)
        cids, csize = np.unique(child, return_counts=True)
        tot = psize[np.searchsorted(pids, cids // k)]
        shares.append((csize / tot)[tot >= min_points])
    return np.concatenate(shares)


def test_balancing_holds_in_the_built_tree(data, tree):
    k = CFG.branching
    shares = share_of_largest_child(tree.train_paths, k, 4 * k)
    assert len(shares) > 10
    assert shares.max() <= CFG.balance_factor / k
    stats = tree.level_stats()
    assert (stats["max_share_of_parent"].dropna() <= CFG.balance_factor / k).all()
    # control: the same data without effective balancing does exceed the limit
    loose = HierarchicalKMeans.build(data[0], CFG.replace(balance_factor=50.0), progress=False)
    assert share_of_largest_child(loose.train_paths, k, 4 * k).max() > CFG.balance_factor / k


def test_save_load_gives_identical_routes(tree, data, tmp_path):
    path = tree.save(tmp_path / "tree.safetensors")
    loaded = HierarchicalKMeans.load(path)
    assert loaded.cfg == tree.cfg and loaded.dim == tree.dim
    queries = data[0] + 0.05 * np.random.default_rng(5).standard_normal(data[0].shape).astype(np.float32)
    np.testing.assert_array_equal(loaded.route(queries), tree.route(queries))
    np.testing.assert_array_equal(loaded.route(queries, blocked=[(1,), (0, 2)]), tree.route(queries, blocked=[(1,), (0, 2)]))
    with pytest.raises(FileNotFoundError):
        HierarchicalKMeans.load(tmp_path / "missing")


def test_blocked_subtrees_are_never_entered(tree, data):
    x = data[0]
    free = tree.route(x)
    # block the most used level-1 node, a level-2 node and a leaf
    top = int(np.bincount(free[:, 0]).argmax())
    other = tuple(int(v) for v in free[free[:, 0] != top][0, :2])
    leaf = tuple(int(v) for v in free[(free[:, 0] != top) & ~(free[:, :2] == other).all(1)][0])
    blocked = [(top,), other, leaf]
    got = tree.route(x, blocked=blocked)
    for prefix in blocked:
        assert not (got[:, :len(prefix)] == np.array(prefix)).all(axis=1).any()
    # queries whose free route touches no blocked node keep their route
    touched = np.zeros(len(x), dtype=bool)
    for prefix in blocked:
        touched |= (free[:, :len(prefix)] == np.array(prefix)).all(axis=1)
    np.testing.assert_array_equal(got[~touched], free[~touched])
    # a diverted query takes the nearest unblocked child (brute force with the same mask)
    dead = tree._dead_mask(blocked)
    want, margin = brute_force(tree, x[touched][:300], dead)
    clear = margin > 1e-5
    np.testing.assert_array_equal(got[touched][:300][clear], want[clear])


def test_blocking_everything_or_bad_prefixes_raise(tree):
    with pytest.raises(ValueError, match="every leaf is blocked"):
        tree.route(np.ones((1, tree.dim), np.float32), blocked=[(i,) for i in range(tree.branching)])
    with pytest.raises(ValueError, match="length"):
        tree.route(np.ones((1, tree.dim), np.float32), blocked=[()])
    with pytest.raises(ValueError, match="outside"):
        tree.route(np.ones((1, tree.dim), np.float32), blocked=[(tree.branching,)])


def test_underfilled_nodes_fall_back_to_child_zero(caplog):
    x, _ = mixture(60, d=8, comps=3, seed=2)
    with caplog.at_level(logging.WARNING, logger="hiermem.retriever"):
        t = HierarchicalKMeans.build(x, TreeConfig(branching=4, depth=4, sample_size=100, em_steps=5), progress=False)
    assert "under-filled" in caplog.text
    assert t.train_paths.shape == (60, 4)  # paths always have full depth
    stats = t.level_stats()
    assert stats["n_unsplit_parents"].iloc[-1] > 0
    # below an unsplit node, everything (training points and new queries) goes to child 0
    for level, lv in enumerate(t.levels):
        for r in np.flatnonzero(~lv.split):
            prefix = node_prefix(int(lv.node_ids[r]), level, 4)
            rows = (t.train_paths[:, :level] == np.array(prefix, dtype=np.int64)).all(axis=1)
            assert (t.train_paths[rows, level:] == 0).all()
    routed = t.route(x + 0.01)
    assert routed.shape == (60, 4)


def test_bad_input_raises_clear_errors(tree):
    k = CFG.branching
    with pytest.raises(ValueError, match="at least branching"):
        HierarchicalKMeans.build(np.zeros((0, 8), np.float32), CFG, progress=False)
    with pytest.raises(ValueError, match="at least branching"):
        HierarchicalKMeans.build(np.eye(k - 1, 8, dtype=np.float32), CFG, progress=False)
    bad = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        HierarchicalKMeans.build(bad, CFG, progress=False)
    with pytest.raises(ValueError, match="row 7"):
        tree.route(np.pad(bad, ((0, 0), (0, tree.dim - 8))))
    with pytest.raises(ValueError, match="zero vector"):
        tree.route(np.zeros((2, tree.dim), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        tree.route(np.ones((2, tree.dim + 1), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        tree.route(np.ones(tree.dim, np.float32))
    assert tree.route(np.zeros((0, tree.dim), np.float32)).shape == (0, CFG.depth)


@pytest.mark.parametrize("field,value", [("branching", 1), ("depth", 0), ("sample_size", 2), ("em_steps", 0),
                                         ("balance_factor", 1.0), ("seed", -1)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TreeConfig(**{field: value})
    assert TreeConfig.from_yaml(TreeConfig().to_yaml()) == TreeConfig()


def test_node_addressing_is_row_major():
    assert node_index((), 16) == 0
    assert node_index((3,), 16) == 3
    assert node_index((1, 2), 16) == 18
    assert node_index((1, 2, 3), 4) == 1 * 16 + 2 * 4 + 3
    assert node_prefix(27, 3, 4) == (1, 2, 3)
    paths = np.array([[1, 2, 3], [0, 0, 1]])
    np.testing.assert_array_equal(prefix_indices(paths, 2, 4), [6, 0])
    with pytest.raises(ValueError):
        node_index((4,), 4)


def test_level_stats_sizes_and_purity(tree, data):
    x, label = data
    stats = tree.level_stats(labels={"component": label})
    assert list(stats["level"]) == [0, 1, 2, 3]
    assert stats["n_nonempty"].iloc[0] == 1 and stats["size_max"].iloc[0] == len(x)
    assert stats["purity_component"].iloc[0] == pytest.approx(np.bincount(label).max() / len(x))
    assert stats["purity_component"].is_monotonic_increasing
    assert stats["purity_component"].iloc[-1] > 0.9
    assert (stats["n_nonempty"].iloc[1:] <= stats["n_possible"].iloc[1:]).all()


class HashEmbedder(Embedder):
    """Deterministic toy embedder: bag of hashed words."""

    name = "hash"

    def __init__(self, dim, salt=""):
        self.dim, self.salt = dim, salt

    def encode(self, texts, batch_size=64, progress=False):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in (t.lower().split() or ["<empty>"]):
                out[i, hash(self.salt + w) % self.dim] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def fingerprint(self):
        return f"hash-{self.dim}-{self.salt}"

    def save(self, dir):
        return dir


def test_route_texts_embeds_and_checks_the_embedder(tree):
    emb = HashEmbedder(tree.dim)
    texts = ["the atomic number of iron is", "paris is the capital of france"]
    np.testing.assert_array_equal(tree.route_texts(texts, emb), tree.route(emb.encode(texts)))
    with pytest.raises(ValueError, match="dim"):
        tree.route_texts(texts, HashEmbedder(tree.dim + 1))
    pinned = HierarchicalKMeans(tree.cfg, tree.dim, tree.levels, embedder_fingerprint=emb.fingerprint())
    pinned.route_texts(texts, emb)
    with pytest.raises(ValueError, match="differs"):
        pinned.route_texts(texts, HashEmbedder(tree.dim, salt="x"))


def test_fit_node_returns_the_nearest_assignment_of_its_centroids(caplog):
    # few EM steps and several polish steps: the returned assignment must still be exactly the
    # nearest-centroid assignment of the returned centroids (what routing will compute)
    from hiermem.kmeans import fit_node
    from hiermem.routing import nearest, scorer, sqnorms
    with caplog.at_level(logging.DEBUG, logger="hiermem.kmeans"):
        for seed in range(12):
            x, _ = mixture(700, d=8, comps=5, seed=seed, spread=0.3)
            cfg = TreeConfig(branching=8, depth=1, sample_size=200, em_steps=1, polish_steps=4)
            c, a, _ = fit_node(x, np.arange(len(x)), cfg, np.random.default_rng(seed))
            np.testing.assert_array_equal(a, nearest(x, scorer(c), sqnorms(c)))
    assert "polish step 2" in caplog.text  # the polish loop did run several steps


def test_routing_equals_a_faiss_exact_search_descent():
    """An independent reference: greedy descent with faiss's exact L2 search (IndexFlatL2) at each node."""
    import faiss  # a dependency (pyproject): never skipped
    x, _ = mixture(3000, seed=5)
    tree = HierarchicalKMeans.build(x, CFG, progress=False)
    q, _ = mixture(2000, seed=6)
    ref = np.zeros((len(q), tree.depth), dtype=np.int64)
    flat = np.zeros(len(q), dtype=np.int64)
    for level, lv in enumerate(tree.levels):
        for node in np.unique(flat):
            rows = np.flatnonzero(flat == node)
            r = int(np.searchsorted(lv.node_ids, node))
            usable = np.flatnonzero(lv.counts[r] > 0)
            index = faiss.IndexFlatL2(x.shape[1])
            index.add(np.ascontiguousarray(lv.centroids[r][usable]))
            _, nearest = index.search(np.ascontiguousarray(q[rows]), 1)
            ref[rows, level] = usable[nearest[:, 0]]
        flat = flat * tree.branching + ref[:, level]
    _, margin = brute_force(tree, q)
    clear = margin > 1e-5  # float32 ties aside, both must agree
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(tree.route(q)[clear], ref[clear])


def test_weighted_balance_step_caps_every_cluster_by_weight():
    """Bug caught: the balancing counting points while the config says tokens."""
    rng = np.random.default_rng(1)
    for k in (4, 8):
        for _ in range(10):
            a = rng.choice(k, size=2000, p=rng.dirichlet(np.full(k, 0.3)))
            w = rng.integers(10, 300, size=2000).astype(float)
            out = _balance(a.copy(), k, 1.5, rng, w)
            weight = np.bincount(out, weights=w, minlength=k)
            assert weight.max() <= 1.5 * w.sum() / k + w.max()  # within one document of the cap


def test_token_balancing_evens_tokens_per_leaf_against_the_count_rule():
    """Long documents in one region: counting documents gives its leaves far more tokens; balancing
    by tokens caps every child's share of the tokens."""
    rng = np.random.default_rng(0)
    centers = 0.5 * rng.standard_normal((4, 16)).astype(np.float32)  # overlapping regions, as real embeddings
    x = np.concatenate([c + rng.standard_normal((1000, 16)).astype(np.float32) for c in centers])
    tokens = np.concatenate([np.full(1000, 250.0), np.full(3000, 20.0)])  # blob 0: long windows
    shares = {}
    for rule in ("count", "tokens"):
        cfg = TreeConfig(branching=4, depth=1, balance_by=rule, seed=0)
        tree = HierarchicalKMeans.build(x, cfg, progress=False, weights=tokens)
        per_leaf = np.bincount(tree.train_paths[:, 0], weights=tokens, minlength=4)
        shares[rule] = per_leaf.max() / per_leaf.sum()
    assert shares["tokens"] <= 1.5 / 4 + 0.02
    assert shares["count"] > shares["tokens"] + 0.1, shares
    with pytest.raises(ValueError, match="weights"):
        HierarchicalKMeans.build(x, TreeConfig(branching=4, depth=1, balance_by="tokens"), progress=False)
