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
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

from hiermem.masks import loss_mask

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # rows of logits alive at once: 1024 x V floats (16 MiB at V = 4096)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(weight @ hidden_i, target_i); gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros_like(weight) if needs_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        buffer = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])  # reused: no page faults per chunk
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = torch.mm(h, weight.t(), out=buffer[:h.shape[0]])
            # in place: shift by the row max, exponentiate, normalise (a fresh (chunk, V) tensor per op
            # costs more in page faults than the arithmetic)
            logits.sub_(logits.amax(dim=1, keepdim=True))
            picked = logits.gather(1, t[:, None]).squeeze(1)
            sums = logits.exp_().sum(dim=1)
            total += (sums.log() - picked).sum(dtype=torch.float64)
            if needs_h or needs_w:
                probs = logits.div_(sums[:, None])  # softmax
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d CE / d logits
                if needs_h:
                    torch.mm(probs, weight, out=grad_h[start:start + chunk])
                if needs_w:
                    grad_w.addmm_(probs.t(), h)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (needs_h, needs_w)
        return total.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.has[0] else None
        grad_w = saved.pop(0) * grad_out if ctx.has[1] else None
        return grad_h, grad_w, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T` (hidden (N, d), weight (V, d), targets (N,))."""
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk)


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
                          segment_ids: torch.Tensor | None) -> torch.Tensor:
    """`hiermem.stepper.next_token_loss` (mean) from the final hidden states (B, T, d) and the head.

    Only the positions whose target counts (same document, not padding) are sent through the head.
    """
    targets = tokens[:, 1:]
    if segment_ids is None:
        rows, kept = hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    else:
        mask = loss_mask(segment_ids)
        rows, kept = hidden[:, :-1][mask], targets[mask]
    return fused_linear_cross_entropy(rows, weight, kept) / max(1, kept.numel())


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
