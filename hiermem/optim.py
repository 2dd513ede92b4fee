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
the update is `torch.optim.AdamW`'s (its fused kernel, run on views of the touched rows), as if that
optimizer had seen only those steps' gradients (tested against torch in tests/test_optim.py).
"""

from __future__ import annotations

import logging

import torch
from torch.optim.adamw import adamw

from hiermem.memory import ActiveRows, MemoryBank

log = logging.getLogger(__name__)


class _LevelState:
    """Lazily grown AdamW state for the touched blocks of one level."""

    def __init__(self, numel: int, device: torch.device, dtype: torch.dtype):
        self.slot_of: dict[int, int] = {}
        self.exp_avg = torch.zeros(0, numel, device=device, dtype=dtype)
        self.exp_avg_sq = torch.zeros(0, numel, device=device, dtype=dtype)
        self.steps = torch.zeros(0, dtype=torch.float32, device=device)  # float (torch's fused AdamW): exact to 2**24 steps

    def slots(self, ids: list[int]) -> list[int]:
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
        return [self.slot_of[i] for i in ids]

    def state_dict(self) -> dict:
        n = len(self.slot_of)
        order = sorted(self.slot_of, key=self.slot_of.get)
        return {"ids": torch.tensor(order, dtype=torch.long), "exp_avg": self.exp_avg[:n].clone(),
                "exp_avg_sq": self.exp_avg_sq[:n].clone(), "steps": self.steps[:n].round().long()}

    def load_state_dict(self, state: dict) -> None:
        ids = state["ids"].tolist()
        self.slot_of = {node: i for i, node in enumerate(ids)}
        device = self.exp_avg.device
        self.exp_avg = state["exp_avg"].to(device).clone()
        self.exp_avg_sq = state["exp_avg_sq"].to(device).clone()
        self.steps = state["steps"].to(device=device, dtype=torch.float32).clone()


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
        """Apply AdamW to the active rows, in place in the bank; returns the number of rows updated.

        The update is torch's own fused AdamW (`torch.optim.adamw.adamw(fused=True)`) over a list of
        row views -- bank rows, their gradients, their state rows and per-row step counters -- so no
        state or parameter is gathered or scattered, and the whole step is a few kernel launches
        (on CUDA the per-op version cost ~25% of a step). The bank rows still hold the values the
        forward read: `gather` cloned them, and nothing writes the bank between gather and step.
        """
        lr = self.lr if lr is None else lr
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for level, rows in active.items():
            if rows.rows.grad is None or not len(rows.ids):
                continue
            state, bank, grad = self.levels[level], self.bank.levels[level].data, rows.rows.grad
            ids = rows.ids.tolist()
            for j, (node, slot) in enumerate(zip(ids, state.slots(ids))):
                params.append(bank[node])
                grads.append(grad[j])
                exp_avgs.append(state.exp_avg[slot])
                exp_avg_sqs.append(state.exp_avg_sq[slot])
                steps.append(state.steps[slot])
        if params:
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False,
                  beta1=self.betas[0], beta2=self.betas[1], lr=lr, weight_decay=self.weight_decay,
                  eps=self.eps, maximize=False)
        return len(params)

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
