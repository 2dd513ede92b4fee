"""Training step time: anchor + FFN-memory versus a dense model with the same active FLOPs.

Both models train a few steps on CPU, measured side by side in one run (steps interleaved so machine
noise hits both alike). The memory model fetches about 10% of the anchor's parameters per sequence
from a bank with >= 64 leaf blocks (every sequence has its own path: gather + batched matmul), with the
sparse bank optimizer; the dense model's SwiGLU is widened by the fetched units, so both do the same
matmul FLOPs per token. Prints the median step times and their ratio; the last line is JSON with
`ratio_vs_dense_equal_flops` (target on CPU: <= 1.15).

`--cpu-throughput` measures the fast paths of `hiermem.kernels` instead: on the main job's batches
(its memory-stage sequences, 32 x 128 tokens packed by leaf, padding included; `--synthetic`: random
packed rows of the same shape), vocabulary 4,096, FFN memory of ~9.4% of the anchor over two levels of
an 8-ary tree, dense bank AdamW) it times the memory step and the dense equal-FLOPs step at tiny-d2
and tiny-d4, each with the plain path (`model.fast = False`, the code before) and the fast path, all
interleaved in one process; the last line's JSON has `memory_speedup_vs_before` (target >= 2) and
`ratio_vs_dense_equal_flops` (fast memory / fast dense, target <= 1.15), for the demo's tiny-d2. It
runs twice: first with glibc's allocator as the process found it (before = the plain path there),
then after `hiermem.kernels.keep_freed_memory()`, which the training loop now calls (after = the
fast path there); each phase also shows what the code alone and the allocator alone bring. Where the
CPU multiplies bfloat16 natively (`hiermem.kernels.cpu_bf16_native`: AMX / AVX512-BF16), the second
phase also times the fast path in bf16 mixed precision (`precision: bf16`, a numerics choice, not the
same results), interleaved with the others; the JSON then has `memory_speedup_vs_before_bf16` and
`ratio_vs_dense_equal_flops_bf16` beside the float32 figures.

    python bench/step_time.py [--depth 4] [--batch 8] [--seq-len 256] [--steps 12] [--device cuda]
    python bench/step_time.py --device cuda --depth 12 --batch 16 --seq-len 1024 --bank-dtype bfloat16 \
        --branching 11,19          # also the step's growth as the bank grows from 1.1B to 4.8B parameters
    python bench/step_time.py --cpu-throughput [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hiermem.accounting import count
from hiermem.config import MemoryConfig, tiny_config
from hiermem.kernels import cpu_bf16_native, keep_freed_memory
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
    parser.add_argument("--branching", default="8",
                        help="tree branching; several, comma-separated, time the same fetch over growing banks "
                             "(e.g. 11,19 at tiny-d12: 1.1B and 4.8B parameters)")
    parser.add_argument("--tree-depth", type=int, default=3, help="levels of the bank (leaves = k^depth)")
    parser.add_argument("--bank-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the bank's storage (bfloat16: as OptimConfig.bank_dtype on a GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU (default: 989 on an H100/H200, none elsewhere)")
    parser.add_argument("--gather-matmul", default="both", choices=["auto", "off", "both"],
                        help="FFN memory rows read in place by the matmuls (hiermem.gather_matmul: on CUDA with "
                             "triton); both: also time the first bank with the gathered copy, side by side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (bf16 autocast on CUDA, as in training)")
    parser.add_argument("--cpu-throughput", action="store_true",
                        help="tokens/s of the plain and fast paths on the main job's batches, tiny-d2 and tiny-d4")
    parser.add_argument("--synthetic", action="store_true",
                        help="with --cpu-throughput: random packed rows instead of the main job's batches")
    args = parser.parse_args()
    if args.cpu_throughput:
        return cpu_throughput(args.steps, args.threads, args.synthetic)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: CUDA requested but torch.cuda.is_available() is False")
    try:
        branchings = [int(b) for b in str(args.branching).split(",")]
    except ValueError:
        raise SystemExit(f"--branching: expected integers separated by commas, got {args.branching!r}") from None
    torch.set_num_threads(args.threads)

    anchor_cfg = tiny_config(args.depth, max_seq_len=args.seq_len)
    anchor_params = count(anchor_cfg).anchor_params
    unit_params = 3 * anchor_cfg.d_model * anchor_cfg.n_layers
    units = split_units(round(args.fetch_ratio * anchor_params / unit_params), args.tree_depth)
    dense_cfg = anchor_cfg.replace(ffn_dim=anchor_cfg.ffn_dim + sum(units))
    dense_acc = count(dense_cfg, seq_len=args.seq_len)
    torch.manual_seed(0)
    steppers = {"dense": TrainStepper(HierMemLM(dense_cfg).to(device), lr=1e-3, weight_decay=0.0)}
    banks = {}
    for k in branchings:
        memory_cfg = MemoryConfig(type="ffn", multipliers=units, branching=k, generic=True)
        mem_acc = count(anchor_cfg, memory_cfg, seq_len=args.seq_len)
        assert mem_acc.flops_per_token == dense_acc.flops_per_token, "the two models must do the same FLOPs"
        model = HierMemLM(anchor_cfg, memory_cfg).to(device)
        if args.bank_dtype == "bfloat16":
            model.bank.store_as(torch.bfloat16)
        steppers[f"memory k={k}"] = TrainStepper(model, lr=1e-3, bank_lr=1e-3, weight_decay=0.0, bank_weight_decay=1e-3)
        banks[f"memory k={k}"] = (k, mem_acc)
        if args.gather_matmul == "off":
            model.bank.gather_matmul = False
    copy_name = None
    if args.gather_matmul == "both" and steppers[next(iter(banks))].model.bank.gather_matmul:
        k, mem_acc = banks[next(iter(banks))]
        model = HierMemLM(anchor_cfg, MemoryConfig(type="ffn", multipliers=units, branching=k, generic=True)).to(device)
        if args.bank_dtype == "bfloat16":
            model.bank.store_as(torch.bfloat16)
        copy_name = f"memory k={k} copy"
        steppers[copy_name] = TrainStepper(model, lr=1e-3, bank_lr=1e-3, weight_decay=0.0, bank_weight_decay=1e-3)
        model.bank.gather_matmul = False
        banks[copy_name] = (k, mem_acc)
    g = torch.Generator().manual_seed(0)

    def sync() -> None:  # CUDA kernels run asynchronously: time to completion
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in steppers}
    for step in range(args.steps + 2):
        tokens = torch.randint(0, anchor_cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
        segments = torch.zeros_like(tokens)
        for name in list(steppers) if step % 2 == 0 else list(reversed(steppers)):
            k = banks[name][0] if name in banks else 1
            paths = torch.randint(0, k, (args.batch, args.tree_depth), generator=g).to(device)
            sync()
            start = time.perf_counter()
            steppers[name].step(tokens, segments, paths if name in banks else None)
            sync()
            if step >= 2:  # the first steps warm allocator and kernels
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    grown = [name for name in banks if name != copy_name]
    first, last = grown[0], grown[-1]
    ratio = median[first] / median["dense"]
    fetched = banks[first][1].fetched_params
    print(f"anchor tiny-d{args.depth}: {anchor_params:,} params; memory {units} ({fetched:,} fetched, "
          f"{fetched / anchor_params:.1%}); bank stored as {args.bank_dtype}")
    print(f"dense equal-FLOPs model: ffn_dim {dense_cfg.ffn_dim}; training FLOPs/token {dense_acc.flops_per_token:,} (both)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"batch {args.batch} x {args.seq_len} tokens, {args.steps} timed steps each, interleaved, on {where}")
    peak = args.peak_tflops
    if peak is None and device.type == "cuda" and any(n in where for n in ("H100", "H200")):
        peak = 989.0
    tokens_per_step = args.batch * args.seq_len
    for name, t in median.items():
        extra = ""
        if name in banks:
            k, acc = banks[name]
            extra = f"  k={k}: {k ** args.tree_depth:,} leaves, bank {acc.bank_params / 1e9:.2f}B params"
        mfu = (f"  MFU {dense_acc.flops_per_token * tokens_per_step / t / (peak * 1e12):.1%}"
               if peak and name == "dense" else "")
        print(f"  {name:12s} median step {t * 1e3:8.1f} ms   ({tokens_per_step / t:,.0f} tokens/s){mfu}{extra}")
    print(f"  ratio memory / dense = {ratio:.3f}  (target <= 1.15 on CPU, <= 1.10 on a GPU)")
    result = {"ratio_vs_dense_equal_flops": round(ratio, 4), "memory_step_s": round(median[first], 5),
              "dense_step_s": round(median["dense"], 5), "fetched_params": fetched, "anchor_params": anchor_params,
              "bank_params": banks[first][1].bank_params, "leaves": banks[first][0] ** args.tree_depth,
              "bank_dtype": args.bank_dtype, "device": str(device), "device_name": where,
              "gather_matmul": bool(steppers[first].model.bank.gather_matmul)}
    if copy_name is not None:
        result["gather_vs_copy"] = round(median[first] / median[copy_name], 4)
        result["ratio_vs_dense_copy"] = round(median[copy_name] / median["dense"], 4)
        print(f"  rows read in place / gathered copy = {result['gather_vs_copy']:.3f}")
    if peak:
        result["dense_mfu"] = round(dense_acc.flops_per_token * tokens_per_step / median["dense"] / (peak * 1e12), 4)
    if len(banks) > 1:
        growth = median[last] / median[first]
        print(f"  bank {banks[first][1].bank_params / 1e9:.2f}B -> {banks[last][1].bank_params / 1e9:.2f}B params: "
              f"memory step x{growth:.3f} (target <= 1.05)")
        result.update({"bank_growth_ratio": round(growth, 4), "bank_params_largest": banks[last][1].bank_params,
                       "ratio_vs_dense_largest_bank": round(median[last] / median["dense"], 4)})
    print(json.dumps(result))


def demo_shaped(depth: int, fetch_ratio: float = 0.094, vocab: int = 4096, seq_len: int = 128):
    """The demo's anchor family at `depth`, FFN memory of ~`fetch_ratio` of it split evenly over two
    levels of an 8-ary tree (the demo's (64, 64) at tiny-d2), and the dense model of equal FLOPs."""
    anchor_cfg = tiny_config(depth, vocab_size=vocab, max_seq_len=seq_len)
    units = fetch_ratio * count(anchor_cfg).anchor_params / (3 * anchor_cfg.d_model * depth)
    per_level = max(8, 8 * round(units / 16))  # a multiple of 8 per level: the demo's (64, 64) at tiny-d2
    memory_cfg = MemoryConfig(type="ffn", multipliers=(per_level, per_level), branching=8, generic=True)
    dense_cfg = anchor_cfg.replace(ffn_dim=anchor_cfg.ffn_dim + 2 * per_level)
    assert count(anchor_cfg, memory_cfg, seq_len=seq_len).flops_per_token == count(dense_cfg, seq_len=seq_len).flops_per_token
    return anchor_cfg, memory_cfg, dense_cfg


def _time_steps(steppers: dict, batches, steps: int) -> dict[str, float]:
    """Median step time of every stepper, steps interleaved (alternating order) so noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for step in range(steps + 2):
        tokens, segments, paths = next(batches)
        for name in list(steppers) if step % 2 == 0 else list(reversed(steppers)):
            start = time.perf_counter()
            steppers[name].step(tokens, segments, paths if name.startswith("memory") else None)
            if step >= 2:  # the first steps warm the allocator and the optimizer state
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def _demo_batches(batch_size: int, seq_len: int, synthetic: bool):
    """Endless training batches: the main job's memory-stage sequences (its knowledge data, packed by
    leaf, built or read from the data cache), or random packed rows (`synthetic`)."""
    if synthetic:
        g = torch.Generator().manual_seed(0)
        while True:  # packed rows: documents of ~50 tokens on average, no padding
            yield (torch.randint(0, 4096, (batch_size, seq_len), generator=g),
                   torch.cumsum((torch.rand(batch_size, seq_len, generator=g) < 0.02).long(), dim=1),
                   torch.randint(0, 8, (batch_size, 2), generator=g))
    from hiermem.data.packing import SequenceLoader
    from hiermem.data.pipeline import build_data
    from hiermem.demo import SCALES
    data = build_data(SCALES["small"].data, progress=False)
    assert data.cfg.seq_len == seq_len and data.vocab_size == 4096, "the main job's data changed shape"
    yield from SequenceLoader(data.sequences("clustered"), batch_size=batch_size, seed=0)


def _matmul_rate(m: int, k: int, n: int, repeats: int = 12) -> float:
    """FLOP/s of an fp32 (m x k) @ (k x n) product on this machine (median of `repeats`, after a warm-up)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times)


def cpu_throughput(steps: int, threads: int, synthetic: bool = False, batch_size: int = 32, seq_len: int = 128) -> None:
    """Phase 1 runs with the allocator as the process found it (the code before: plain path, glibc
    defaults), phase 2 after `keep_freed_memory()` (the training loop's setting now); in each, the
    plain and fast paths of both models are interleaved. Before = phase 1 plain, after = phase 2 fast."""
    torch.set_num_threads(threads)
    batches = _demo_batches(batch_size, seq_len, synthetic)
    print(f"CPU, {threads} threads; batch {batch_size} x {seq_len} tokens "
          f"{'of random packed rows' if synthetic else 'of the main job memory stage (its data, packed by leaf)'}; "
          f"{steps} timed steps per model and path, interleaved")
    configs = {depth: demo_shaped(depth, seq_len=seq_len) for depth in (2, 4)}
    bf16 = cpu_bf16_native()
    print(f"bf16 mixed precision: {'timed too (this CPU multiplies bfloat16 natively)' if bf16 else 'not timed (no native bfloat16 products on this CPU)'}")
    medians: dict[tuple[int, str], dict[str, float]] = {}
    for phase in ("default allocator", "keep_freed_memory"):
        if phase == "keep_freed_memory":
            print(f"keep_freed_memory(): {'applied' if keep_freed_memory() else 'not available here'}")
        paths = [("plain", False, "fp32"), ("fast", True, "fp32")]
        if bf16 and phase == "keep_freed_memory":
            paths.append(("bf16", True, "bf16"))
        for depth, (anchor_cfg, memory_cfg, dense_cfg) in configs.items():
            steppers = {}
            for path, fast, precision in paths:
                torch.manual_seed(0)
                memory_model, dense_model = HierMemLM(anchor_cfg, memory_cfg), HierMemLM(dense_cfg)
                memory_model.fast = dense_model.fast = fast
                steppers[f"memory/{path}"] = TrainStepper(memory_model, lr=1e-3, weight_decay=0.05, bank_lr=3e-3,
                                                          bank_weight_decay=1e-3, bank_semantics="dense",
                                                          precision=precision)
                steppers[f"dense/{path}"] = TrainStepper(dense_model, lr=1e-3, weight_decay=0.05, precision=precision)
                frozen = HierMemLM(anchor_cfg, memory_cfg)  # the main job's A3 stage: anchor frozen
                frozen.fast = fast
                steppers[f"memory-frozen/{path}"] = TrainStepper(frozen, lr=1e-3, bank_lr=3e-3, bank_weight_decay=1e-3,
                                                                 freeze_anchor=True, bank_semantics="dense",
                                                                 precision=precision)
            median = medians[depth, phase] = _time_steps(steppers, batches, steps)
            print(f"[{phase}] tiny-d{depth}: memory {memory_cfg.multipliers} x k=8 (fetched "
                  f"{count(anchor_cfg, memory_cfg).fetched_params:,} of {count(anchor_cfg).anchor_params:,} anchor "
                  f"params); dense ffn_dim {dense_cfg.ffn_dim}")
            for name, t in median.items():
                print(f"  {name:20s} median step {t * 1e3:7.1f} ms  {batch_size * seq_len / t:9,.0f} tokens/s")
    result: dict = {}
    for depth in configs:
        before, after = medians[depth, "default allocator"], medians[depth, "keep_freed_memory"]
        speedup = before["memory/plain"] / after["memory/fast"]
        ratio = after["memory/fast"] / after["dense/fast"]
        print(f"tiny-d{depth}: memory step {speedup:.2f}x the tokens/s before (target >= 2): fast path alone "
              f"{before['memory/plain'] / before['memory/fast']:.2f}x, allocator alone "
              f"{before['memory/plain'] / after['memory/plain']:.2f}x; dense {before['dense/plain'] / after['dense/fast']:.2f}x; "
              f"memory / dense (after) = {ratio:.3f} (target <= 1.15); frozen-anchor memory step (A3) "
              f"{before['memory-frozen/plain'] / after['memory-frozen/fast']:.2f}x")
        # the roofline: the step's training FLOPs per second against this machine's fp32 matmul rate at
        # the model's largest product (the output head: tokens x d_model x vocabulary)
        anchor_cfg, memory_cfg, _ = configs[depth]
        flops = count(anchor_cfg, memory_cfg, seq_len=seq_len).flops_per_token
        achieved = flops * batch_size * seq_len / after["memory/fast"]
        peak = _matmul_rate(batch_size * seq_len, anchor_cfg.d_model, anchor_cfg.vocab_size)
        needed = 2 * flops * batch_size * seq_len / before["memory/plain"]
        print(f"tiny-d{depth}: the memory step runs {achieved / 1e9:.0f} GFLOP/s of training FLOPs, "
              f"{achieved / peak:.0%} of this machine's fp32 matmul rate at the head's shape ({peak / 1e9:.0f} "
              f"GFLOP/s); 2x the tokens/s before would need {needed / 1e9:.0f} GFLOP/s ({needed / peak:.0%} of it)")
        result[f"tiny-d{depth}"] = {
            "achieved_gflops_after": round(achieved / 1e9, 1), "matmul_gflops_head_shape": round(peak / 1e9, 1),
            "needed_gflops_for_2x": round(needed / 1e9, 1),
            "memory_speedup_vs_before": round(speedup, 3), "ratio_vs_dense_equal_flops": round(ratio, 4),
            "memory_speedup_fast_path_only": round(before["memory/plain"] / before["memory/fast"], 3),
            "tokens_per_s_memory_before": round(batch_size * seq_len / before["memory/plain"]),
            "tokens_per_s_memory_after": round(batch_size * seq_len / after["memory/fast"]),
            "tokens_per_s_dense_before": round(batch_size * seq_len / before["dense/plain"]),
            "tokens_per_s_dense_after": round(batch_size * seq_len / after["dense/fast"]),
            "frozen_memory_speedup_vs_before": round(before["memory-frozen/plain"] / after["memory-frozen/fast"], 3)}
        if "memory/bf16" in after:
            speedup16 = before["memory/plain"] / after["memory/bf16"]
            ratio16 = after["memory/bf16"] / after["dense/bf16"]
            print(f"tiny-d{depth}, bf16 mixed precision: memory step {speedup16:.2f}x the tokens/s before "
                  f"({after['memory/fast'] / after['memory/bf16']:.2f}x the float32 fast path); memory / dense "
                  f"(both bf16) = {ratio16:.3f}; frozen-anchor memory step "
                  f"{before['memory-frozen/plain'] / after['memory-frozen/bf16']:.2f}x")
            result[f"tiny-d{depth}"].update({
                "memory_speedup_vs_before_bf16": round(speedup16, 3), "ratio_vs_dense_equal_flops_bf16": round(ratio16, 4),
                "tokens_per_s_memory_bf16": round(batch_size * seq_len / after["memory/bf16"]),
                "tokens_per_s_dense_bf16": round(batch_size * seq_len / after["dense/bf16"]),
                "frozen_memory_speedup_vs_before_bf16": round(before["memory-frozen/plain"] / after["memory-frozen/bf16"], 3)})
    d2 = result["tiny-d2"]
    print(json.dumps({"memory_speedup_vs_before": d2["memory_speedup_vs_before"],
                      "ratio_vs_dense_equal_flops": d2["ratio_vs_dense_equal_flops"],
                      "memory_speedup_vs_before_bf16": d2.get("memory_speedup_vs_before_bf16"),
                      "ratio_vs_dense_equal_flops_bf16": d2.get("ratio_vs_dense_equal_flops_bf16"),
                      "bf16_native": bf16, "threads": threads, "batches": "synthetic" if synthetic else "main job",
                      **result}))


if __name__ == "__main__":
    main()
