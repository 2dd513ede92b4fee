"""Fast paths of the training step on CPU, each with the same result as the plain path it replaces.

- `fused_linear_cross_entropy(hidden, weight, targets)`: the output head and the cross-entropy in one
  autograd function, computed in row chunks. The plain path materialises the (N, V) logits, a sliced
  copy of them, their log-softmax and, in backward, a zero-filled gradient of the whole logits tensor
  and the log-softmax backward: at the demo's shapes (4,096 tokens x 4,096 words) that was half of a
  step. Here each chunk's logits become the chunk's gradient in place (softmax minus one-hot), which
  is multiplied into the gradients of the hidden states and of the head right away, so backward is
  a scale. Only the positions that count (`hiermem.masks.loss_mask`) reach the head at all.
- `rotate_pairs(x, cos, sin)`: rotary embeddings as one complex multiplication per call (and one in
  backward); the plain path's strided slices `x[..., 0::2]` each zero-fill a gradient of the whole
  tensor in backward, and its products, differences and stack are six more passes.

Both are used when `HierMemLM.fast` is True (the default); `fast = False` restores the plain path, so
`bench/step_time.py --cpu-throughput` times both in one process and tests/test_kernels.py checks
they agree in loss and gradients.

Mixed precision on CPU (`TrainConfig.precision: bf16`, a numerics choice, not a fast path with the same
results): where the CPU multiplies bfloat16 natively (`cpu_bf16_native`: AMX or AVX512-BF16; an AMX
core runs the demo's products ~6x faster than in float32), the step runs under bf16 autocast as on a
GPU, with two CPU-specific pieces:
- `attention(...)`: attention itself in float32 under CPU autocast (torch's CPU flash attention
  backward in bfloat16 took 5x its float32 time at the demo's shapes, more than all the products saved);
- `fused_linear_cross_entropy(..., low=torch.bfloat16)`: the head's three products in bfloat16 (as the
  GPU's autocast head), the softmax and the loss in float32.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch
import torch.nn.functional as F

from hiermem.masks import loss_mask

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # rows of logits alive at once: 1024 x V floats (16 MiB at V = 4096)
LOW_CHUNK_ROWS = 512  # the same with half-precision products (measured best at the demo's shapes)
ROW_ALIGN = 64  # half products: rows padded to a multiple of this (oneDNN compiles a kernel per new shape)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(weight @ hidden_i, target_i); gradients computed in forward, scaled in backward.

    low: None (every product in the inputs' float32) or a half type: the products run in it, the
    logits are widened to float32 for the softmax and the loss, the gradients accumulate in float32.
    With half products the rows are padded with zeros to a multiple of `ROW_ALIGN`: oneDNN compiles a
    kernel for each new matrix shape (~6 ms, more than the product), and the number of rows that count
    changes every step; padded rows get zero probabilities, so they add nothing to any gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                low: torch.dtype | None = None):
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros_like(weight) if needs_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        if low is None:
            rows, table = hidden, weight
        else:
            rows = hidden.new_zeros(-(-n // ROW_ALIGN) * ROW_ALIGN, hidden.shape[1], dtype=low)
            rows[:n] = hidden
            table = weight.to(low)
        buffer = hidden.new_empty(min(chunk, rows.shape[0]), weight.shape[0])  # reused: no page faults per chunk
        for start in range(0, n, chunk):
            h, t = rows[start:start + chunk], targets[start:start + chunk]
            valid = len(t)  # h has more rows only when padded
            if low is None:
                full = torch.mm(h, table.t(), out=buffer[:len(h)])
            else:  # torch's CPU mm has no float32 output for half inputs: one widening copy
                full = buffer[:len(h)].copy_(torch.mm(h, table.t()))
            # in place: shift by the row max, exponentiate, normalise (a fresh (chunk, V) tensor per op
            # costs more in page faults than the arithmetic)
            logits = full[:valid]
            logits.sub_(logits.amax(dim=1, keepdim=True))
            picked = logits.gather(1, t[:, None]).squeeze(1)
            sums = logits.exp_().sum(dim=1)
            total += (sums.log() - picked).sum(dtype=torch.float64)
            if not (needs_h or needs_w):
                continue
            probs = logits.div_(sums[:, None])  # softmax
            probs[torch.arange(valid, device=t.device), t] -= 1.0  # d CE / d logits
            if low is None:
                if needs_h:
                    torch.mm(probs, table, out=grad_h[start:start + valid])
                if needs_w:
                    grad_w.addmm_(probs.t(), h)
            else:
                full[valid:].zero_()  # padded rows: no gradient
                probs = full.to(low)
                if needs_h:
                    grad_h[start:start + valid] = torch.mm(probs, table)[:valid]
                if needs_w:
                    grad_w += torch.mm(probs.t(), h)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (needs_h, needs_w)
        return total.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.has[0] else None
        grad_w = saved.pop(0) * grad_out if ctx.has[1] else None
        return grad_h, grad_w, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int | None = None, low: torch.dtype | None = None) -> torch.Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T` (hidden (N, d), weight (V, d), targets (N,)).

    low: run the three products in this half type (bf16 mixed precision); softmax and sums in float32.
    chunk: rows of logits at once (default `CHUNK_ROWS`, `LOW_CHUNK_ROWS` with half products)."""
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: {hidden.shape[0]} hidden rows but targets of shape "
                         f"{tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0
    chunk = chunk or (CHUNK_ROWS if low is None else LOW_CHUNK_ROWS)
    return _FusedLinearCrossEntropy.apply(hidden.float(), weight, targets, chunk, low)


@torch.no_grad()
def linear_cross_entropy_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-row cross-entropy of `hidden @ weight.T` (N,), computed chunk by chunk without gradients
    (evaluation: the (N, V) logits are never held at once)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    if hidden.shape[0] == 0:
        return out
    buffer = torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        logits = torch.mm(h.float(), weight.float().t(), out=buffer[:h.shape[0]])
        top = logits.amax(dim=1)
        picked = logits.gather(1, t[:, None]).squeeze(1)
        sums = logits.sub_(top[:, None]).exp_().sum(dim=1)  # in place, as in the training kernel
        out[start:start + chunk] = sums.log_() + top - picked
    return out


def fused_next_token_loss(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                          segment_ids: torch.Tensor | None, low: torch.dtype | None = None) -> torch.Tensor:
    """`hiermem.stepper.next_token_loss` (mean) from the final hidden states (B, T, d) and the head.

    Only the positions whose target counts (same document, not padding) are sent through the head.
    low: the head's products in this half type (see `fused_linear_cross_entropy`).
    """
    targets = tokens[:, 1:]
    if segment_ids is None:
        rows, kept = hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    else:
        mask = loss_mask(segment_ids)
        rows, kept = hidden[:, :-1][mask], targets[mask]
    return fused_linear_cross_entropy(rows, weight, kept, low=low) / max(1, kept.numel())


class _GatherRowsLow(torch.autograd.Function):
    """rows = table[pos] in a half type; the gradient of the table accumulates in float32."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, pos: torch.Tensor, low: torch.dtype):
        ctx.save_for_backward(pos)
        ctx.shape, ctx.dtype = table.shape, table.dtype
        return table.to(low).index_select(0, pos)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pos,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape, dtype=torch.float32)
        return out.index_add_(0, pos, grad.float()).to(ctx.dtype), None, None  # summed in float32


def gather_rows_low(table: torch.Tensor, pos: torch.Tensor, low: torch.dtype) -> torch.Tensor:
    """`table.index_select(0, pos)` in the half type `low` (mixed precision), cast before the gather:
    the table holds each touched block once, the gather repeats it per sequence, so the cast reads a
    fraction of the bytes and the gather moves half of them. Sequences sharing a block add their
    gradients in float32 (a bf16 index_add would round after every addition)."""
    return _GatherRowsLow.apply(table, pos, low)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """`scaled_dot_product_attention`, in float32 under CPU autocast (bf16 mixed precision on CPU): the
    CPU flash-attention backward is far slower in bfloat16 than in float32. Elsewhere unchanged."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                  is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16, through oneDNN); without it
    bf16 mixed precision would be emulated, slower than float32."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[..., 2i], x[..., 2i+1]) of x (..., T, dh) by the angles whose
    cos/sin (T, dh/2) are given: (x1 cos - x2 sin, x1 sin + x2 cos), as a complex product.

    Half precision has no complex multiply on every device: it goes through float32 and back."""
    dtype = x.dtype
    work = x if dtype in (torch.float32, torch.float64) else x.float()
    pairs = torch.view_as_complex(work.unflatten(-1, (-1, 2)))
    turned = pairs * torch.complex(cos.to(work.dtype), sin.to(work.dtype))
    return torch.view_as_real(turned).flatten(-2).to(dtype)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Let glibc's heap keep large freed blocks instead of returning them to the OS.

    By default glibc serves an allocation above the mmap threshold (at most 32 MiB) with a fresh
    mapping and unmaps it on free, and trims the heap top above the trim threshold: every step's
    large activations (16-64 MiB at the demo's shapes) are then page-faulted in again, which cost
    more than the arithmetic on them (a quarter of the plain step at tiny-d2, measured in
    bench/step_time.py --cpu-throughput). Raising both thresholds keeps them in the heap for reuse; the
    process's peak memory is unchanged. Returns whether it applied (glibc only; elsewhere one log line
    and nothing changes). Idempotent; the training loop and the evaluation call it.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        log.info("keep_freed_memory: not glibc (%s); the allocator is left as it is", sys.platform)
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 2**30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.info("keep_freed_memory: glibc's mallopt is not available; the allocator is left as it is")
    _allocator_tuned = ok
    return ok
