"""The compiled nearest-centroid kernel: exact argmin, tie rule, position independence, agreement
with the numpy/BLAS path, argument checks, and the fallback when no compiler is available."""

import logging
import tempfile

import numpy as np
import pytest

import hiermem.native as native
from hiermem.native import LANES, pad_sets
from hiermem.kmeans import TreeConfig
from hiermem.retriever import HierarchicalKMeans

kern = native.kernel()
# not an allowed CI skip (tests/conftest.py): the kernel must build in CI; the numpy path is tested
# against a brute-force descent either way (test_retriever.py::test_numpy_routing_path_equals_brute_force_descent)
needs_kernel = pytest.mark.skipif(kern is None, reason="no C compiler: the compiled routing kernel is not built")


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_sets(n_sets, d, k, seed):
    c = np.random.default_rng(seed).standard_normal((n_sets, k, d)).astype(np.float32) * 0.5
    ct = np.ascontiguousarray(np.swapaxes(c, 1, 2) * np.float32(-2.0))
    cn = np.einsum("skd,skd->sk", c, c).astype(np.float32)
    return ct, cn


@needs_kernel
@pytest.mark.parametrize("k", [1, 5, 16])
def test_kernel_equals_float64_argmin_over_groups(k):
    d, n = 37, 900  # d not a multiple of any SIMD width; groups not multiples of the tile
    x = unit_rows(n, d, seed=k)
    ct, cn = random_sets(4, d, k, seed=10 + k)
    if k > 1:
        cn[1, 0] = np.inf  # an unusable child is never chosen
    rng = np.random.default_rng(k)
    sizes = [0, 1, 7, 8, 9, 250, 0, 613]
    starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    sets = rng.integers(0, 4, size=len(sizes)).astype(np.int64)
    sets[3] = 1
    idx = rng.integers(0, n, size=starts[-1]).astype(np.int64)  # repeats allowed
    ct16, cn16 = pad_sets(ct, cn)
    got = kern.nearest_groups(x, idx, starts, sets, ct16, cn16, np.empty(starts[-1], dtype=np.int64))
    want = np.empty_like(got)
    margin = np.empty(len(got))
    for g in range(len(sizes)):
        s = slice(starts[g], starts[g + 1])
        scores = cn[sets[g]][None, :].astype(np.float64) + x[idx[s]].astype(np.float64) @ ct[sets[g]].astype(np.float64)
        want[s] = scores.argmin(axis=1)
        part = np.sort(scores, axis=1)
        margin[s] = part[:, 1] - part[:, 0] if k > 1 else np.inf
    clear = margin > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], want[clear])
    assert got.max() < k
    if k > 1:
        assert not (got[starts[3]:starts[4]] == 0).any()


@needs_kernel
def test_ties_go_to_the_first_index_like_numpy_argmin():
    x = unit_rows(20, 24, seed=1)
    c = np.random.default_rng(2).standard_normal((16, 24)).astype(np.float32)
    c[3] = c[9] = x[0] * 3  # two identical children, the nearest for row 0: bitwise equal scores
    ct = np.ascontiguousarray(c.T * np.float32(-2.0))[None]
    cn = np.einsum("kd,kd->k", c, c).astype(np.float32)[None]
    got = kern.nearest_groups(x, None, np.array([0, 20]), np.zeros(1, dtype=np.int64), ct, cn,
                              np.empty(20, dtype=np.int64))
    assert got[0] == 3
    everything_inf = np.full((1, LANES), np.inf, dtype=np.float32)
    none = kern.nearest_groups(x, None, np.array([0, 20]), np.zeros(1, dtype=np.int64), ct, everything_inf,
                               np.empty(20, dtype=np.int64))
    assert (none == 0).all()  # np.argmin of an all-inf row is 0 too


@needs_kernel
def test_a_row_gets_the_same_child_wherever_it_sits():
    # the tile a row lands in must not change its rounding: build and route see it in different places
    x = unit_rows(3000, 40, seed=3)
    ct, cn = random_sets(1, 40, 16, seed=4)
    starts, sets = np.array([0, 3000]), np.zeros(1, dtype=np.int64)
    base = kern.nearest_groups(x, None, starts, sets, ct, cn, np.empty(3000, dtype=np.int64))
    perm = np.random.default_rng(5).permutation(3000)
    moved = kern.nearest_groups(x, perm, starts, sets, ct, cn, np.empty(3000, dtype=np.int64))
    np.testing.assert_array_equal(moved, base[perm])
    odd = np.array([0, 1, 1001, 3000])  # other group boundaries, same set
    split = kern.nearest_groups(x, None, odd, np.zeros(3, dtype=np.int64), ct, cn, np.empty(3000, dtype=np.int64))
    np.testing.assert_array_equal(split, base)


@needs_kernel
def test_bad_arguments_raise_instead_of_crashing():
    x = unit_rows(10, 8, seed=0)
    ct, cn = pad_sets(*random_sets(2, 8, 4, seed=0))
    out = np.empty(10, dtype=np.int64)
    ok = dict(starts=np.array([0, 10]), sets=np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match="row index"):
        kern.nearest_groups(x, np.full(10, 10, dtype=np.int64), ok["starts"], ok["sets"], ct, cn, out)
    with pytest.raises(ValueError, match="centroid set"):
        kern.nearest_groups(x, None, ok["starts"], np.array([2]), ct, cn, out)
    with pytest.raises(ValueError, match="starts"):
        kern.nearest_groups(x, None, np.array([0, 9]), ok["sets"], ct, cn, out)
    with pytest.raises(TypeError):
        kern.nearest_groups(x.astype(np.float64), None, ok["starts"], ok["sets"], ct, cn, out)
    with pytest.raises(TypeError):
        kern.nearest_groups(x, None, ok["starts"], ok["sets"], ct[:, :4], cn, out)
    with pytest.raises(ValueError, match="at most 16"):
        pad_sets(np.zeros((8, 17), np.float32), np.zeros(17, np.float32))


@needs_kernel
def test_compiled_and_numpy_paths_route_alike(monkeypatch):
    x = unit_rows(40000, 24, seed=7)  # above the threaded-routing threshold
    cfg = TreeConfig(branching=16, depth=3, sample_size=2000, em_steps=6, seed=1)
    tree = HierarchicalKMeans.build(x[:8000], cfg, progress=False)
    np.testing.assert_array_equal(tree.train_paths, tree.route(x[:8000]))  # build and route: one kernel
    fast = tree.route(x, threads=2)
    scaled = tree.route(x.astype(np.float64) * 2.5, threads=2)  # rows normalized before stage B reads them
    assert (scaled == fast).all(axis=1).mean() > 0.999
    perm = np.random.default_rng(0).permutation(len(x))
    np.testing.assert_array_equal(tree.route(x[perm], threads=2), fast[perm])
    monkeypatch.setenv("HIERMEM_NATIVE", "0")
    assert native.kernel() is None
    slow = tree.route(x, threads=2)
    # BLAS and the kernel round dot products differently: only exact near-ties may differ
    assert (fast == slow).all(axis=1).mean() > 0.999
    again = HierarchicalKMeans.build(x[:8000], cfg, progress=False)
    np.testing.assert_array_equal(again.train_paths, again.route(x[:8000]))  # and so does the numpy path


def test_without_a_compiler_routing_falls_back_to_numpy(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc/gcc/clang either
    with caplog.at_level(logging.WARNING, logger="hiermem.native"):
        assert native.kernel() is None
    assert "no C compiler" in caplog.text
    x = unit_rows(2000, 12, seed=8)
    tree = HierarchicalKMeans.build(x, TreeConfig(branching=4, depth=2, sample_size=500), progress=False)
    np.testing.assert_array_equal(tree.train_paths, tree.route(x))


@needs_kernel
def test_an_unwritable_cache_falls_back_to_the_temp_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("HIERMEM_NATIVE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native, "_state", {})
    k = native.kernel()
    assert k is not None and k.path.parent.parent == tmp_path / "tmp"
    assert k.variant in ("avx512", "avx2", "portable")


@needs_kernel
@pytest.mark.parametrize("march, variant", [("haswell", "avx2"), ("x86-64", "portable")])
def test_every_simd_variant_chooses_like_the_others(tmp_path, march, variant):
    """The AVX2 variant must equal the AVX-512 one bit for bit (both one FMA chain per score);
    the portable one (no FMA) may differ only on near-ties."""
    import ctypes
    import platform
    if platform.machine() not in ("x86_64", "AMD64") or (variant == "avx2" and kern.variant == "portable"):
        pytest.skip(f"requires an x86-64 CPU that can run the {variant} variant")
    cc = native._compiler()
    flags = [f if f != "-march=native" else f"-march={march}" for f in native._FLAGS]
    native._compile(cc, flags, tmp_path / "k.so")
    other = native.NearestKernel(ctypes.CDLL(str(tmp_path / "k.so")), tmp_path / "k.so")
    assert other.variant == variant
    x = unit_rows(5000, 384, seed=11)
    ct, cn = random_sets(3, 384, 16, seed=12)
    starts, sets = np.array([0, 1000, 1001, 5000]), np.array([2, 0, 1])
    a = kern.nearest_groups(x, None, starts, sets, ct, cn, np.empty(5000, dtype=np.int64))
    b = other.nearest_groups(x, None, starts, sets, ct, cn, np.empty(5000, dtype=np.int64))
    if variant == "avx2" and kern.variant in ("avx512", "avx2"):
        np.testing.assert_array_equal(a, b)
    else:
        assert (a == b).mean() > 0.999
