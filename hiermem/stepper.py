"""One optimization step of anchor + memory: loss, backward, clipping, dense and sparse updates.

`TrainStepper` is what the training loop and the step-time benchmark both drive, so the benchmark
measures the real path:
- anchor parameters: `torch.optim.AdamW` (betas 0.9/0.95), weight decay on matrices only, or frozen;
- generic block: the same AdamW, in its own group with the bank's learning rate and weight decay;
- bank blocks: `SparseBankAdamW` over the rows the batch fetched (see `hiermem.optim`);
- global gradient-norm clipping over all three;
- precision (`PRECISIONS`): "auto" is bf16 autocast on CUDA and fp32 on CPU, where the output head and
  the cross-entropy are fused (`hiermem.kernels`; `model.fast = False` gives the plain path); "bf16"
  is bf16 autocast on CPU too (mixed precision: float32 weights, moments and loss; attention and the
  softmax in float32), where the CPU multiplies bfloat16 natively (`hiermem.kernels.cpu_bf16_native`;
  elsewhere one log line and fp32); "fp32" is float32 everywhere;
- on CUDA with triton installed, FFN memory rows are read in place by the memory's matmuls
  (`hiermem.gather_matmul`; `model.bank.gather_matmul = False` gathers them, same values).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from hiermem.kernels import cpu_bf16_native, fused_next_token_loss
from hiermem.masks import loss_mask
from hiermem.model import HierMemLM
from hiermem.optim import SparseBankAdamW

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device, low_bank: bool = False) -> str:
    """The precision a step really runs in, "fp32" or "bf16" (autocast), for the requested one.

    auto: bf16 on CUDA and wherever the bank is stored in a half type, fp32 elsewhere. bf16 on a CPU
    without native bfloat16 products falls back to fp32 with one log line (emulated bf16 is slower).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"invalid config field 'precision': expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" and low_bank:
        raise ValueError("invalid config field 'precision': expected auto or bf16 with a bank stored in "
                         "bfloat16 (optim.bank_dtype), got 'fp32'")
    if precision == "auto":
        return "bf16" if device.type == "cuda" or low_bank else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_native():
        log.info("precision bf16: this CPU has no native bfloat16 products (AMX or AVX512-BF16); training in fp32")
        return "fp32"
    return precision


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, segment_ids: torch.Tensor | None,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of token t+1 given the prefix, counted only inside a document.

    A target counts when segment_ids[t] == segment_ids[t+1] >= 0: never across a document boundary
    (the EOT closing a document is predicted; the first token of the next is not) nor on padding.
    reduction "none" returns (B, T-1) losses with zeros where masked; "sum"/"mean" reduce the valid ones.
    """
    targets = tokens[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none").view_as(targets)
    mask = torch.ones_like(targets, dtype=torch.bool) if segment_ids is None else loss_mask(segment_ids)
    losses = losses * mask
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / mask.sum().clamp(min=1)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Linear warmup to `peak`, then cosine decay to `final` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


class TrainStepper:
    """Owns the optimizers of a `HierMemLM` and performs one update per call to `step`."""

    def __init__(self, model: HierMemLM, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95),
                 eps: float = 1e-8, grad_clip: float | None = 1.0, bank_lr: float | None = None,
                 bank_weight_decay: float | None = None, freeze_anchor: bool = False,
                 bank_semantics: str = "lazy", precision: str = "auto"):
        self.model, self.grad_clip = model, grad_clip
        self.freeze_anchor = freeze_anchor
        bank_lr = lr if bank_lr is None else bank_lr
        bank_weight_decay = weight_decay if bank_weight_decay is None else bank_weight_decay
        for p in model.anchor.parameters():
            p.requires_grad_(not freeze_anchor)
        groups = []
        if not freeze_anchor:
            matrices = [p for p in model.anchor.parameters() if p.dim() >= 2]
            gains = [p for p in model.anchor.parameters() if p.dim() < 2]
            groups += [{"params": matrices, "weight_decay": weight_decay, "lr": lr, "role": "anchor"},
                       {"params": gains, "weight_decay": 0.0, "lr": lr, "role": "anchor"}]
        self.bank_opt = None
        if model.bank is not None:
            for p in model.bank.levels:
                p.requires_grad_(False)  # the bank is updated through the sparse path only
            generic = [p for p in model.bank.generic if p.numel()]
            if generic:
                groups.append({"params": generic, "weight_decay": bank_weight_decay, "lr": bank_lr, "role": "bank"})
            self.bank_opt = SparseBankAdamW(model.bank, lr=bank_lr, betas=betas, eps=eps,
                                            weight_decay=bank_weight_decay, semantics=bank_semantics)
        # fused: one kernel over all parameters (the fast path; `model.fast = False` keeps torch's default)
        self.opt = (torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if model.fast else None)
                    if groups else None)
        device = next(model.parameters()).device
        # bf16 autocast on CUDA, wherever the bank is stored in a half type (`MemoryBank.store_as`), or asked for
        low_bank = model.bank is not None and any(p.dtype != torch.float32 for p in model.bank.levels if p.numel())
        self.precision = resolve_precision(precision, device, low_bank)
        self.autocast, self.device_type = self.precision == "bf16", device.type
        if model.bank is not None and device.type == "cuda" and model.bank.cfg.type == "ffn":
            # FFN memory rows read in place by the matmuls (`hiermem.gather_matmul`), where triton runs
            from hiermem.gather_matmul import kernel_available
            model.bank.gather_matmul = kernel_available(device)
            if not model.bank.gather_matmul:
                log.info("gather-matmul: triton is not installed; the fetch gathers the rows (pip install triton)")

    def set_lr(self, lr: float, bank_lr: float | None = None) -> None:
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = bank_lr if group["role"] == "bank" and bank_lr is not None else lr
        if self.bank_opt is not None and bank_lr is not None:
            self.bank_opt.lr = bank_lr

    def loss(self, tokens, segment_ids, paths=None, use_generic=None, active=None) -> torch.Tensor:
        if self.model.fast and (self.device_type == "cpu" or not self.autocast):
            # head and cross-entropy fused (hiermem.kernels); under bf16 its products in bf16, the loss in fp32
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
                hidden = self.model.features(tokens, segment_ids, paths=paths, use_generic=use_generic, active=active)
            return fused_next_token_loss(hidden, self.model.anchor.head_weight, tokens, segment_ids,
                                         low=torch.bfloat16 if self.autocast else None)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(tokens, segment_ids, paths=paths, use_generic=use_generic, active=active)
        return next_token_loss(logits, tokens, segment_ids)

    def step(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None, paths: torch.Tensor | None = None,
             use_generic: torch.Tensor | None = None) -> dict:
        """Forward, backward, clip and update. Returns loss, gradient norm and bank rows updated.

        The loss is returned before the update; a non-finite loss skips the update (the caller decides
        whether to stop).
        """
        active = None
        if self.bank_opt is not None and paths is not None:
            active = self.bank_opt.gather(paths, use_generic=use_generic)
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        loss = self.loss(tokens, segment_ids, paths, use_generic, active)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            return {"loss": loss_value, "grad_norm": float("nan"), "bank_rows": 0, "finite": False}
        loss.backward()
        grads = [p for p in self.model.parameters() if p.grad is not None]
        if active is not None:
            grads += [a.rows for a in active.values() if a.rows.grad is not None]
        grad_norm = float("nan")
        if grads:
            max_norm = self.grad_clip if self.grad_clip else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
        if not math.isfinite(grad_norm):
            return {"loss": loss_value, "grad_norm": grad_norm, "bank_rows": 0, "finite": False}
        if self.opt is not None:
            self.opt.step()
        rows = self.bank_opt.step(active) if active is not None else 0
        return {"loss": loss_value, "grad_norm": grad_norm, "bank_rows": rows, "finite": True}

    def finalize(self) -> None:
        """End of training: bring the bank up to date (dense bank semantics replay skipped steps)."""
        if self.bank_opt is not None:
            self.bank_opt.finalize()

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict() if self.opt is not None else None,
                "bank_opt": self.bank_opt.state_dict() if self.bank_opt is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.opt is not None and state.get("opt") is not None:
            self.opt.load_state_dict(state["opt"])
        if self.bank_opt is not None and state.get("bank_opt") is not None:
            self.bank_opt.load_state_dict(state["bank_opt"])
