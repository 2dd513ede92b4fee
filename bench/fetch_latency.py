"""Per-block read latency from the per-level bank files on this disk, beside the tier model's estimate.

    .venv/bin/python bench/fetch_latency.py                       # a synthetic bank written here (~350 MB)
    .venv/bin/python bench/fetch_latency.py --ckpt runs/demo/memory-frozen/final   # a real checkpoint
    .venv/bin/python bench/fetch_latency.py --tier laptop:flash   # compare with another tier of hiermem.tiers

Reads one block (one row of `blocks` in `bank/level_<l>.safetensors`) the way a deployed model would:
the file's header gives the row's byte range, the range is memory-mapped and copied out. Each level's
file is read at `--reads` random blocks, cold and warm:

- cold: the block's pages are dropped from this machine's page cache first with
  posix_fadvise(POSIX_FADV_DONTNEED) on the block's byte range (no root needed; the file is fsynced
  when written so its pages are clean, and no mapping is held while dropping). This is "not in this
  kernel's page cache": on a virtual machine the host may still cache the virtual disk underneath, so
  cold here can be faster than a physical device; caches inside the device are not reached either;
- warm: the same block read again at once (page cache).

Beside the measurements: the tier model's estimate `L + bytes / B` for the chosen tier, and the
(latency, bandwidth) fitted to the cold reads by least squares (`time = L + bytes / B`), printed as a
`--tier-spec` for `hiermem count --tiers`. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiermem.edit import level_files  # noqa: E402
from hiermem.tiers import TIER_PRESETS  # noqa: E402


def block_ranges(path: Path) -> tuple[int, int, int]:
    """(data start, row bytes, rows) of the 'blocks' tensor of a level file (safetensors header)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    entry = header["blocks"]
    start, end = entry["data_offsets"]
    rows = entry["shape"][0]
    return 8 + n + start, (end - start) // max(rows, 1), rows


def read_block(fd: int, offset: int, nbytes: int) -> bytes:
    """Memory-map the pages of [offset, offset + nbytes) and copy the block out."""
    page = mmap.ALLOCATIONGRANULARITY
    base = offset - offset % page
    with mmap.mmap(fd, nbytes + (offset - base), access=mmap.ACCESS_READ, offset=base) as m:
        return bytes(m[offset - base: offset - base + nbytes])


def drop_cache(fd: int, offset: int, nbytes: int) -> None:
    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def measure(path: Path, reads: int, rng: np.random.Generator) -> dict:
    start, row_bytes, rows = block_ranges(path)
    picks = rng.choice(rows, size=min(reads, rows), replace=False)
    cold, warm = [], []
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in picks:
            offset = start + int(i) * row_bytes
            drop_cache(fd, offset, row_bytes)
            t0 = time.perf_counter()
            data = read_block(fd, offset, row_bytes)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            read_block(fd, offset, row_bytes)
            warm.append(time.perf_counter() - t0)
            assert len(data) == row_bytes
    finally:
        os.close(fd)
    return {"file": path.name, "block_bytes": row_bytes, "blocks": rows, "reads": len(picks),
            "cold_median_s": statistics.median(cold), "cold_p90_s": float(np.percentile(cold, 90)),
            "warm_median_s": statistics.median(warm), "cold_s": cold}


def synthetic_checkpoint(folder: Path, anchor: str, memory: str, k: int) -> Path:
    """A checkpoint with a random bank in bf16, written by the real checkpoint writer (fsynced)."""
    import torch

    from hiermem.checkpoint import save_checkpoint
    from hiermem.config import MemoryConfig, model_preset, parse_multipliers
    from hiermem.model import HierMemLM
    torch.manual_seed(0)
    model = HierMemLM(model_preset(anchor, vocab_size=256), MemoryConfig(multipliers=parse_multipliers(memory),
                                                                          branching=k, generic=False))
    model = model.to(torch.bfloat16)
    save_checkpoint(model, folder)
    for path in folder.rglob("*.safetensors"):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return folder


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (latency s, bandwidth bytes/s) of time = L + bytes / B."""
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if len(set(x)) < 2:
        return float(np.median(y)), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    return max(float(intercept), 0.0), (1.0 / slope if slope > 0 else float("inf"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a checkpoint directory (e.g. RUN/final); default: a synthetic bank")
    p.add_argument("--anchor", default="tiny-d8", help="synthetic bank: anchor preset (default tiny-d8, d=512, 8 layers)")
    p.add_argument("--memory", default="256,64,16", help="synthetic bank: multipliers (default 256,64,16)")
    p.add_argument("--k", type=int, default=8, help="synthetic bank: branching (default 8)")
    p.add_argument("--reads", type=int, default=24, help="blocks read per level (default 24)")
    p.add_argument("--tier", default="laptop:flash", help="PRESET:TIER of hiermem.tiers to compare with")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset, _, tier_name = args.tier.partition(":")
    tier = TIER_PRESETS[preset][tier_name]
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as tmp:
        start = time.perf_counter()
        ckpt = Path(args.ckpt) if args.ckpt else synthetic_checkpoint(Path(tmp) / "ckpt", args.anchor, args.memory,
                                                                      args.k)
        written = time.perf_counter() - start
        files = level_files(ckpt)
        if not files:
            raise SystemExit(f"{ckpt} has no bank level files")
        results = {level: measure(path, args.reads, rng) for level, path in sorted(files.items())}
    latency, bandwidth = fit([(r["block_bytes"], t) for r in results.values() for t in r["cold_s"]])
    print(f"bank: {ckpt if args.ckpt else f'synthetic {args.anchor} + ({args.memory}), k={args.k}, bf16'}"
          + ("" if args.ckpt else f" (written in {written:.1f} s)"))
    print(f"{'level':>5} {'block':>10} {'blocks':>7} {'cold med':>10} {'cold p90':>10} {'warm med':>10} "
          f"{'model ' + args.tier:>20} {'fit':>9}")
    rows = []
    for level, r in results.items():
        model_s = tier.read_time(r["block_bytes"])
        fitted = latency + r["block_bytes"] / bandwidth
        print(f"{level:>5} {r['block_bytes'] / 1e6:>8.2f}MB {r['blocks']:>7} {r['cold_median_s'] * 1e3:>8.3f}ms "
              f"{r['cold_p90_s'] * 1e3:>8.3f}ms {r['warm_median_s'] * 1e3:>8.3f}ms {model_s * 1e3:>18.3f}ms "
              f"{fitted * 1e3:>7.3f}ms")
        rows.append({k: v for k, v in r.items() if k != "cold_s"} | {"level": level, "model_s": model_s})
    print(f"fitted to the cold reads: latency {latency * 1e3:.3f} ms, bandwidth {bandwidth / 1e9:.2f} GB/s "
          f"(hiermem count --tiers --tier-spec here={bandwidth:.3g}:{latency:.3g} --flat-tier here ...)")
    print(json.dumps({"bench": "fetch_latency", "tier": args.tier, "tier_bandwidth": tier.bandwidth,
                      "tier_latency": tier.latency, "fit_latency_s": latency, "fit_bandwidth_Bps": bandwidth,
                      "levels": rows, "machine": platform.machine(), "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
