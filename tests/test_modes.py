"""Evaluation modes as data: what each mode fetches, blocking by drop and by reroute."""

import numpy as np
import pytest

from hiermem.modes import Blocking, EvalMode, Rows, check_mode_name, choose_blocked_nodes, mode_names
from hiermem.kmeans import TreeConfig
from hiermem.retriever import HierarchicalKMeans

K, DEPTH = 4, 2


@pytest.fixture(scope="module")
def tree_and_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 12)).astype(np.float32)
    tree = HierarchicalKMeans.build(x, TreeConfig(branching=K, depth=DEPTH, seed=0), progress=False)
    queries = rng.standard_normal((300, 12)).astype(np.float32)
    routed = tree.route(queries)
    oracle = rng.integers(0, K, size=(300, DEPTH))
    return tree, Rows(routed=routed, oracle=oracle, vectors=queries)


def mode(name, tree, blocking=Blocking(level=1)):
    return EvalMode(name, DEPTH, K, blocking, lambda v, b: tree.route(v, blocked=b), seed=3)


def test_each_mode_fetches_what_it_says(tree_and_rows):
    """Bug caught: wrong-path or oracle-path silently using the routed path; drop-level dropping the
    wrong level; generic not flagged."""
    tree, rows = tree_and_rows
    assert mode("none", tree).choose(rows).paths is None
    fetched = mode("fetched", tree).choose(rows)
    np.testing.assert_array_equal(fetched.paths, rows.routed)
    assert fetched.blocked is None and fetched.use_generic is None
    assert mode("generic", tree).choose(rows).use_generic.all()
    wrong = mode("wrong-path", tree).choose(rows).paths
    assert (wrong[:, 0] != rows.routed[:, 0]).all()
    np.testing.assert_array_equal(mode("oracle-path", tree).choose(rows).paths, rows.oracle)
    drop2 = mode("drop-level2", tree).choose(rows)
    np.testing.assert_array_equal(drop2.paths, rows.routed)
    assert drop2.blocked[:, 1].all() and not drop2.blocked[:, 0].any()


def test_reroute_never_fetches_a_blocked_block(tree_and_rows):
    """Bug caught: rerouting that keeps the blocked subtree (a blocked mode equal to fetched), or a drop
    mode that blocks nothing."""
    tree, rows = tree_and_rows
    # each row's own routed level-1 subtree
    reroute = mode("blocked-reroute", tree).choose(rows)
    assert reroute.blocked is None
    assert (reroute.paths[:, 0] != rows.routed[:, 0]).all()
    # ... which is the nearest other subtree: the row's second-nearest level-1 centroid
    centroids = tree.levels[0].centroids[0]
    unit = rows.vectors / np.linalg.norm(rows.vectors, axis=1, keepdims=True)
    dist = ((unit[:, None, :] - centroids[None]) ** 2).sum(-1)
    dist[np.arange(len(unit)), rows.routed[:, 0]] = np.inf
    np.testing.assert_array_equal(reroute.paths[:, 0], dist.argmin(axis=1))
    drop = mode("blocked-drop", tree).choose(rows)
    np.testing.assert_array_equal(drop.paths, rows.routed)
    assert drop.blocked.all()  # the whole routed subtree, levels 1 and 2
    # a bank-wide set of blocked nodes
    prefixes = ((1,), (2, 3))
    bank = Blocking(level=1, prefixes=prefixes)
    paths = mode("blocked-reroute", tree, bank).choose(rows).paths
    assert not (paths[:, 0] == 1).any() and not ((paths[:, 0] == 2) & (paths[:, 1] == 3)).any()
    untouched = (rows.routed[:, 0] != 1) & ~((rows.routed[:, 0] == 2) & (rows.routed[:, 1] == 3))
    np.testing.assert_array_equal(paths[untouched], rows.routed[untouched])
    mask = mode("blocked-drop", tree, bank).choose(rows).blocked
    under1, under23 = rows.routed[:, 0] == 1, (rows.routed[:, 0] == 2) & (rows.routed[:, 1] == 3)
    assert mask[under1].all() and (mask[under23] == [False, True]).all() and not mask[untouched].any()


def test_best_match_blocking_takes_the_nodes_holding_most_fact_documents():
    docs = np.array([[2, 0], [2, 1], [2, 3], [0, 1], [3, 3], [3, 0]])
    assert choose_blocked_nodes(0.25, 1, 4, "best-match", docs) == ((2,),)
    assert choose_blocked_nodes(0.5, 1, 4, "best-match", docs) == ((2,), (3,))
    assert len(choose_blocked_nodes(1 / 16, 2, 4, "random", seed=1)) == 1
    assert choose_blocked_nodes(0.0, 1, 4, "random") == ()


def test_mode_names_and_bad_names():
    assert mode_names(("none", "generic", "fetched"), (4, 0, 2), generic=False, level_ablation=True) == \
        ["none", "fetched", "drop-level1", "drop-level3"]
    check_mode_name("drop-level3")
    with pytest.raises(ValueError, match="fetched\\+blocked"):
        check_mode_name("fetched+blocked")
