"""The fetch fused with the memory's batched matmul: each sequence's memory rows are read from the bank
where they lie, never gathered into a per-sequence copy.

A memory level's rows live in one table (the level's parameter, or the step's touched rows as a leaf:
`hiermem.memory.ActiveRows`), one row per node, each row the node's block: for every memory layer and
tensor an (units, width) matrix at a fixed column offset (`hiermem.memory.MemoryBank`'s layout). The
plain path gathers `table[pos]` (B rows) and slices it into per-layer tensors; here

    gather_matmul(a, table, pos, offset, units, width, transpose)  = a[b] @ W_b^T   (transpose=True)
                                                                      a[b] @ W_b     (transpose=False)
    with W_b = table[pos[b], offset : offset + units * width].view(units, width)

is one kernel per call. Its gradient to `a` is the same kernel with the other orientation; its gradient
to the table is (a[b]^T dC[b]) added at each sequence's row (`index_add_`), so the sparse bank optimizer
receives the same row gradients as from the gathered copy.

`GatheredFFN` is one memory layer's FFN memory in this form (one entry per memory level: its table, the
sequences' rows, which of them are read, and the column offsets of gate, up and down);
`hiermem.memory_kinds.ffn_memory` sums the levels' units (the gated units are independent, so the sum over
levels equals the concatenation the plain path builds). The kernel is a Triton program on CUDA (when
`triton` is installed; `TRITON_INTERPRET=1` runs it on a CPU for the tests); elsewhere the same function
computes with `index_select` + `bmm` (the reference the kernel is tested against).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # an optional dependency (GPU installs): pip install triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_available(device: torch.device | str) -> bool:
    """Whether the Triton kernel runs for tensors on `device` (CUDA with triton, or any device with
    triton's interpreter)."""
    return triton is not None and (INTERPRET or torch.device(device).type == "cuda")


if triton is not None:
    @triton.jit
    def _gather_matmul_kernel(a_ptr, table_ptr, pos_ptr, c_ptr, M, N, K, offset,
                              stride_ab, stride_am, stride_ak, stride_row, stride_wk, stride_wn,
                              stride_cb, stride_cm, stride_cn,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """C[b] (M, N) = A[b] (M, K) @ W_b (K, N), W_b read from the table row pos[b] at `offset` with
        strides (stride_wk, stride_wn): the gathered matrix is never written."""
        b = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(2)
        row = tl.load(pos_ptr + b).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_base = a_ptr + b * stride_ab
        w_base = table_ptr + row * stride_row + offset
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_base + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        c = c_ptr + b * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _launch(a: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, offset: int, units: int, width: int,
            transpose: bool) -> torch.Tensor:
    batch, m, k = a.shape
    n = units if transpose else width
    out = torch.empty(batch, m, n, dtype=a.dtype, device=a.device)
    # W_b (units, width) at row stride `width`; transposed it is (width, units)
    stride_wk, stride_wn = (1, width) if transpose else (width, 1)
    block_m, block_n, block_k = 64, 64, 32
    grid = (batch, triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gather_matmul_kernel[grid](a, table, pos, out, m, n, k, offset,
                                a.stride(0), a.stride(1), a.stride(2), table.stride(0), stride_wk, stride_wn,
                                out.stride(0), out.stride(1), out.stride(2),
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _rows(table: torch.Tensor, pos: torch.Tensor, offset: int, units: int, width: int) -> torch.Tensor:
    """The reference: the gathered (B, units, width) matrices (a copy)."""
    return table.index_select(0, pos)[:, offset:offset + units * width].view(-1, units, width)


def _product(a, table, pos, offset, units, width, transpose, use_kernel):
    if use_kernel:
        return _launch(a, table, pos, offset, units, width, transpose)
    w = _rows(table, pos, offset, units, width).to(a.dtype)
    return torch.bmm(a, w.transpose(1, 2) if transpose else w)


class _GatherMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, table, pos, offset, units, width, transpose, use_kernel):
        ctx.save_for_backward(a, table, pos)
        ctx.args = (offset, units, width, transpose, use_kernel)
        return _product(a, table, pos, offset, units, width, transpose, use_kernel)

    @staticmethod
    def backward(ctx, grad):
        a, table, pos = ctx.saved_tensors
        offset, units, width, transpose, use_kernel = ctx.args
        grad = grad.contiguous()
        grad_a = grad_table = None
        if ctx.needs_input_grad[0]:  # dA[b] = dC[b] @ W_b^T (the other orientation)
            grad_a = _product(grad, table, pos, offset, units, width, not transpose, use_kernel)
        if ctx.needs_input_grad[1]:  # dW_b = dC[b]^T a[b] (transpose) or a[b]^T dC[b]; added at row pos[b]
            dw = torch.bmm(grad.transpose(1, 2), a) if transpose else torch.bmm(a.transpose(1, 2), grad)
            grad_table = torch.zeros_like(table)
            grad_table[:, offset:offset + units * width].index_add_(0, pos, dw.reshape(len(pos), -1).to(table.dtype))
        return grad_a, grad_table, None, None, None, None, None, None


def gather_matmul(a: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, offset: int, units: int, width: int,
                  transpose: bool, use_kernel: bool | None = None) -> torch.Tensor:
    """a (B, M, K) times each sequence's matrix W_b = table[pos[b], offset:offset + units*width] as
    (units, width): a[b] @ W_b^T when `transpose` (K = width), else a[b] @ W_b (K = units).
    `use_kernel` None: the Triton kernel where it runs (`kernel_available`), else index_select + bmm."""
    if use_kernel is None:
        use_kernel = kernel_available(a.device)
    if use_kernel and triton is None:
        raise RuntimeError("gather_matmul(use_kernel=True) needs triton (pip install triton)")
    return _GatherMatmul.apply(a.contiguous(), table, pos, int(offset), int(units), int(width), bool(transpose),
                               bool(use_kernel))


@dataclasses.dataclass
class GatheredLevel:
    """One memory level's FFN units for one memory layer, left in the bank: rows `table[pos[b]]`, read
    where `keep[b]` (None: every sequence), gate/up/down at column `offsets[name]`, (units, width) each."""

    table: torch.Tensor
    pos: torch.Tensor
    keep: torch.Tensor | None
    offsets: dict[str, int]
    units: int
    width: int


@dataclasses.dataclass
class GatheredFFN:
    """One memory layer's FFN memory as levels left in the bank (`GatheredLevel`), for `ffn_memory`."""

    levels: list[GatheredLevel]
    use_kernel: bool | None = None

    @property
    def batch(self) -> int:
        return int(self.levels[0].pos.shape[0])

    def apply(self, x: torch.Tensor, act=F.silu) -> torch.Tensor:
        """sum over levels of keep * down_b^T [act(gate_b x) * (up_b x)]; x (B, T, d)."""
        out = None
        for lv in self.levels:
            def mm(a, name, transpose):
                return gather_matmul(a, lv.table, lv.pos, lv.offsets[name], lv.units, lv.width, transpose,
                                     self.use_kernel)
            hidden = act(mm(x, "gate", True)) * mm(x, "up", True)
            part = mm(hidden, "down", False)
            if lv.keep is not None:
                part = part * lv.keep.to(part.dtype)[:, None, None]
            out = part if out is None else out + part
        return out
