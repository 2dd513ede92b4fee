"""Sparse AdamW for the memory bank: only the blocks fetched in a step are read, updated and given state.

Per step:
    active = opt.gather(model.bank, paths, use_generic, blocked)   # touched rows as small leaf tensors
    loss = model(..., active=active) ; loss.backward()
    opt.step(active, lr)                                            # AdamW on those rows, written back

Optimizer state lives per block and is allocated lazily, the first time a block is fetched, so an
untouched block costs nothing (one dictionary entry per touched block, rows of state in a growable
table). The cost of a step is proportional to the blocks fetched, not to the bank size.

Documented choice: a block's AdamW step counter (and so its bias correction) advances only on the steps
where that block is fetched, and weight decay is applied only then. On the steps where a block is used,
the update is exactly `torch.optim.AdamW`'s, as if that optimizer had seen only those steps' gradients
(tested against torch in tests/test_optim.py).
"""

from __future__ import annotations

import logging

import torch

from hiermem.memory import ActiveRows, MemoryBank

log = logging.getLogger(__name__)


class _LevelState:
    """Lazily grown AdamW state for the touched blocks of one level."""

    def __init__(self, numel: int, device: torch.device, dtype: torch.dtype):
        self.slot_of: dict[int, int] = {}
        self.exp_avg = torch.zeros(0, numel, device=device, dtype=dtype)
        self.exp_avg_sq = torch.zeros(0, numel, device=device, dtype=dtype)
        self.steps = torch.zeros(0, dtype=torch.long, device=device)

    def slots(self, ids: list[int]) -> torch.Tensor:
        new = [i for i in ids if i not in self.slot_of]
        if new:
            start = len(self.slot_of)
            for offset, node in enumerate(new):
                self.slot_of[node] = start + offset
            needed = len(self.slot_of)
            if needed > self.exp_avg.shape[0]:  # grow geometrically so appends are amortized O(1)
                capacity = max(needed, 2 * self.exp_avg.shape[0], 8)
                self.exp_avg = _grow(self.exp_avg, capacity)
                self.exp_avg_sq = _grow(self.exp_avg_sq, capacity)
                self.steps = _grow(self.steps, capacity)
        return torch.tensor([self.slot_of[i] for i in ids], dtype=torch.long, device=self.steps.device)

    def state_dict(self) -> dict:
        n = len(self.slot_of)
        order = sorted(self.slot_of, key=self.slot_of.get)
        return {"ids": torch.tensor(order, dtype=torch.long), "exp_avg": self.exp_avg[:n].clone(),
                "exp_avg_sq": self.exp_avg_sq[:n].clone(), "steps": self.steps[:n].clone()}

    def load_state_dict(self, state: dict) -> None:
        ids = state["ids"].tolist()
        self.slot_of = {node: i for i, node in enumerate(ids)}
        device = self.exp_avg.device
        self.exp_avg = state["exp_avg"].to(device).clone()
        self.exp_avg_sq = state["exp_avg_sq"].to(device).clone()
        self.steps = state["steps"].to(device).clone()


def _grow(t: torch.Tensor, capacity: int) -> torch.Tensor:
    out = torch.zeros((capacity,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


class SparseBankAdamW:
    """AdamW over the blocks of a `MemoryBank`, touching only the fetched rows."""

    def __init__(self, bank: MemoryBank, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 1e-3):
        self.bank, self.lr, self.betas, self.eps, self.weight_decay = bank, lr, betas, eps, weight_decay
        self.levels = {level: _LevelState(p.shape[1], p.device, p.dtype)
                       for level, p in enumerate(bank.levels) if p.numel()}
        log.info("sparse bank AdamW: per-block state allocated on first fetch; a block's step counter "
                 "and weight decay advance only on steps that fetch it")

    def gather(self, paths: torch.Tensor, use_generic: torch.Tensor | None = None,
               blocked: torch.Tensor | None = None) -> dict[int, ActiveRows]:
        """The rows this batch really reads (not generic, not blocked), as leaf tensors with grad."""
        nodes = self.bank.node_indices(paths)
        active = {}
        for level in self.levels:
            keep = ~getattr(self.bank, f"blocked_{level}")[nodes[:, level]]
            if blocked is not None:
                keep &= ~blocked[:, level].to(keep.device)
            if use_generic is not None:
                keep &= ~use_generic.to(keep.device)
            ids = torch.unique(nodes[keep, level])
            rows = self.bank.levels[level].detach()[ids].clone().requires_grad_(True)
            active[level] = ActiveRows(ids=ids, rows=rows)
        return active

    @torch.no_grad()
    def step(self, active: dict[int, ActiveRows], lr: float | None = None) -> int:
        """Apply AdamW to the active rows and write them back into the bank; returns rows updated."""
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        updated = 0
        for level, rows in active.items():
            if rows.rows.grad is None or not len(rows.ids):
                continue
            state = self.levels[level]
            slots = state.slots(rows.ids.tolist())
            grad = rows.rows.grad
            param = rows.rows.detach().clone()
            steps = state.steps[slots] + 1
            state.steps[slots] = steps
            exp_avg = state.exp_avg[slots].mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq = state.exp_avg_sq[slots].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            state.exp_avg[slots], state.exp_avg_sq[slots] = exp_avg, exp_avg_sq
            # bias corrections in float64, as torch computes them in Python floats
            bias1 = 1 - beta1 ** steps.double()
            bias2_sqrt = (1 - beta2 ** steps.double()).sqrt()
            param.mul_(1 - lr * self.weight_decay)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt.to(param.dtype)[:, None]).add_(self.eps)
            param.add_((exp_avg / denom) * (-lr / bias1).to(param.dtype)[:, None])
            self.bank.levels[level].data[rows.ids] = param
            updated += len(rows.ids)
        return updated

    def state_dict(self) -> dict:
        return {"levels": {level: s.state_dict() for level, s in self.levels.items()},
                "hyper": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                          "weight_decay": self.weight_decay}}

    def load_state_dict(self, state: dict) -> None:
        for level, level_state in state["levels"].items():
            self.levels[int(level)].load_state_dict(level_state)

    def state_bytes(self) -> int:
        return sum(s.exp_avg.numel() * s.exp_avg.element_size() * 2 for s in self.levels.values())

    def touched_blocks(self) -> dict[int, int]:
        return {level: len(s.slot_of) for level, s in self.levels.items()}
