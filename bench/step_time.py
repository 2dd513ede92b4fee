"""Training step time: anchor + FFN-memory versus a dense model with the same active FLOPs.

Both models train a few steps on CPU, measured side by side in one run (steps interleaved so machine
noise hits both alike). The memory model fetches about 10% of the anchor's parameters per sequence
from a bank with >= 64 leaf blocks (every sequence has its own path: gather + batched matmul), with the
sparse bank optimizer; the dense model's SwiGLU is widened by the fetched units, so both do the same
matmul FLOPs per token. Prints the median step times and their ratio; the last line is JSON with
`ratio_vs_dense_equal_flops` (target on CPU: <= 1.15).

    python bench/step_time.py [--depth 4] [--batch 8] [--seq-len 256] [--steps 12] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hiermem.accounting import count
from hiermem.config import MemoryConfig, tiny_config
from hiermem.model import HierMemLM
from hiermem.stepper import TrainStepper


def split_units(total: int, depth: int, ratio: int = 4) -> tuple[int, ...]:
    """Spread `total` units over levels with r_{l+1} = r_l / ratio (the paper's (256,64,16) shape)."""
    weights = [ratio ** (depth - 1 - level) for level in range(depth)]
    units = [max(1, round(total * w / sum(weights))) for w in weights]
    units[0] += total - sum(units)
    return tuple(units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="tiny-d<depth> anchor (default 4)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per model")
    parser.add_argument("--fetch-ratio", type=float, default=0.10, help="fetched params / anchor params")
    parser.add_argument("--branching", type=int, default=8)
    parser.add_argument("--tree-depth", type=int, default=3, help="levels of the bank (leaves = k^depth)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (bf16 autocast on CUDA, as in training)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: CUDA requested but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    anchor_cfg = tiny_config(args.depth, max_seq_len=args.seq_len)
    anchor_params = count(anchor_cfg).anchor_params
    unit_params = 3 * anchor_cfg.d_model * anchor_cfg.n_layers
    units = split_units(round(args.fetch_ratio * anchor_params / unit_params), args.tree_depth)
    memory_cfg = MemoryConfig(type="ffn", multipliers=units, branching=args.branching, generic=True)
    mem_acc = count(anchor_cfg, memory_cfg, seq_len=args.seq_len)
    dense_cfg = anchor_cfg.replace(ffn_dim=anchor_cfg.ffn_dim + sum(units))
    dense_acc = count(dense_cfg, seq_len=args.seq_len)
    assert mem_acc.flops_per_token == dense_acc.flops_per_token, "the two models must do the same FLOPs"

    memory_model, dense_model = HierMemLM(anchor_cfg, memory_cfg).to(device), HierMemLM(dense_cfg).to(device)
    steppers = {
        "memory": TrainStepper(memory_model, lr=1e-3, bank_lr=1e-3, weight_decay=0.0, bank_weight_decay=1e-3),
        "dense": TrainStepper(dense_model, lr=1e-3, weight_decay=0.0),
    }
    g = torch.Generator().manual_seed(0)
    leaves = args.branching ** args.tree_depth

    def batch():
        tokens = torch.randint(0, anchor_cfg.vocab_size, (args.batch, args.seq_len), generator=g)
        segments = torch.zeros_like(tokens)
        paths = torch.randint(0, args.branching, (args.batch, args.tree_depth), generator=g)
        return tokens.to(device), segments.to(device), paths.to(device)

    def sync() -> None:  # CUDA kernels run asynchronously: time to completion
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {"memory": [], "dense": []}
    for step in range(args.steps + 2):
        for name in ("memory", "dense") if step % 2 == 0 else ("dense", "memory"):
            tokens, segments, paths = batch()
            sync()
            start = time.perf_counter()
            steppers[name].step(tokens, segments, paths if name == "memory" else None)
            sync()
            if step >= 2:  # the first steps warm allocator and kernels
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["memory"] / median["dense"]
    print(f"anchor tiny-d{args.depth}: {anchor_params:,} params; memory {units} x k={args.branching} "
          f"({leaves} leaves): fetched {mem_acc.fetched_params:,} ({mem_acc.fetched_params / anchor_params:.1%}), "
          f"bank {mem_acc.bank_params:,}")
    print(f"dense equal-FLOPs model: ffn_dim {dense_cfg.ffn_dim}; training FLOPs/token "
          f"{dense_acc.flops_per_token:,} (both)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"batch {args.batch} x {args.seq_len} tokens, {args.steps} timed steps each, on {where}")
    for name in ("memory", "dense"):
        tok_s = args.batch * args.seq_len / median[name]
        print(f"  {name:7s} median step {median[name] * 1e3:8.1f} ms   ({tok_s:,.0f} tokens/s)")
    print(f"  ratio memory / dense = {ratio:.3f}  (target <= 1.15)")
    print(json.dumps({"ratio_vs_dense_equal_flops": round(ratio, 4), "memory_step_s": round(median["memory"], 5),
                      "dense_step_s": round(median["dense"], 5), "fetched_params": mem_acc.fetched_params,
                      "anchor_params": anchor_params, "bank_params": mem_acc.bank_params, "leaves": leaves,
                      "device": str(device)}))


if __name__ == "__main__":
    main()
