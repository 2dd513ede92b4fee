"""Sparse AdamW for the memory bank: only the blocks a step reads are updated and given state.

`SparseBankAdamW(bank, lr, betas, eps, weight_decay, semantics)` is bound to one `MemoryBank`. Per step:

    active = opt.gather(paths, use_generic, blocked)  # {level: ActiveRows}: the rows read, as leaf tensors
    loss = loss_fn(model(tokens, segment_ids, paths=paths, use_generic=use_generic, blocked=blocked,
                         active=active))
    loss.backward()                                   # gradients land in active[level].rows.grad
    opt.step(active, lr)                              # AdamW on those rows, written back into the bank

The rows gathered, and so updated, are exactly those `MemoryBank.read_mask` marks: on the batch's
paths, not blocked, not replaced by the generic block (the generic block itself is an ordinary
parameter, trained by a dense optimizer; see `hiermem.stepper`).

Optimizer state lives per block and is allocated lazily, the first time a block is read, so an
untouched block costs nothing (one dictionary entry per touched block, rows of state in a growable
table). The cost of a step is proportional to the blocks read, not to the bank size.

Two semantics (`semantics=`, `OptimConfig.bank_semantics`; `SEMANTICS` lists them):

    lazy   a block's AdamW step counter (and so its bias correction) advances only on the steps where
           that block is read, and weight decay is applied only then: the update is
           `torch.optim.AdamW`'s as if that optimizer had seen only those steps' gradients.
    dense  exactly `torch.optim.AdamW` over the whole bank, where a block that is not read in a step
           has a zero gradient: its moments decay, its momentum keeps moving it and weight decay
           applies. Computed lazily all the same: when a block is on a batch's paths again, the steps
           it skipped are replayed with zero gradients (their learning rates are kept; torch's fused
           AdamW once per replayed step over the rows behind) in `gather`,
           before the forward reads it, and `finalize()` brings every block up to date at the end of
           training. A rarely read block moves further per read than under `lazy`.

The bank may be stored in bfloat16 (`OptimConfig.bank_dtype`, for GPUs): the moments stay float32,
each update is computed on a float32 copy of the touched rows and rounded back.

Both are tested against `torch.optim.AdamW` in tests/test_optim.py (the touched rows for `lazy`; the
whole bank, step for step, for `dense`). On the steps where a block is read the update is torch's
own fused AdamW run on views of the touched rows.

Also: `state_dict()` / `load_state_dict()` (resume exactly, replay bookkeeping included),
`updates` (per level, the number of steps that updated each block), `touched_blocks()` (blocks with
state per level) and `state_bytes()` (memory held by the moments).
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


SEMANTICS = ("lazy", "dense")


def _float32_rows(bank: torch.Tensor, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The rows `ids` of a level as float32 tensors for torch's fused AdamW: views of a float32 bank
    (updated in place), or of a float32 copy of a half bank, returned second to be rounded back after."""
    if bank.dtype == torch.float32:
        return [bank[node] for node in ids.tolist()], None
    work = bank[ids].float()
    return list(work.unbind(0)), work


class SparseBankAdamW:
    """AdamW over the blocks of a `MemoryBank`, touching only the fetched rows."""

    def __init__(self, bank: MemoryBank, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 1e-3, semantics: str = "lazy"):
        if semantics not in SEMANTICS:
            raise ValueError(f"invalid config field 'bank_semantics': expected one of {SEMANTICS}, got {semantics!r}")
        self.bank, self.lr, self.betas, self.eps, self.weight_decay = bank, lr, betas, eps, weight_decay
        self.semantics = semantics
        # moments in float32 whatever the bank's storage (a bfloat16 bank is updated in float32 and
        # rounded back, see `step`)
        self.levels = {level: _LevelState(p.shape[1], p.device, torch.float32)
                       for level, p in enumerate(bank.levels) if p.numel()}
        self.t = 0                     # steps taken
        self.updates = {level: torch.zeros(p.shape[0], dtype=torch.long) for level, p in enumerate(bank.levels)
                        if p.numel()}  # steps that updated each block
        self.lrs: list[float] = []     # the learning rate of every step (dense: replayed for skipped steps)
        # dense: the step through which each block's weights and moments are current
        self.current = {level: torch.zeros(p.shape[0], dtype=torch.long) for level, p in enumerate(bank.levels)
                        if p.numel()} if semantics == "dense" else {}
        if semantics == "lazy":
            log.info("sparse bank AdamW (lazy): per-block state allocated on first fetch; a block's step "
                     "counter and weight decay advance only on steps that fetch it")
        else:
            log.info("sparse bank AdamW (dense-equivalent): skipped steps are replayed with zero gradients "
                     "when a block is fetched again, as torch.optim.AdamW over the whole bank would")

    # ------------------------------------------------------------------------------ dense replay
    @torch.no_grad()
    def _catch_up(self, level: int, ids: torch.Tensor, upto: int) -> None:
        """Replay steps (current, upto] of blocks `ids` with zero gradients (torch AdamW's arithmetic)."""
        current = self.current[level]
        ids_cpu = ids.detach().cpu()
        behind = ids_cpu[current[ids_cpu] < upto]
        if not len(behind):
            return
        state, bank = self.levels[level], self.bank.levels[level].data
        since = current[behind]
        order = torch.argsort(since)
        behind, since = behind[order], since[order]
        has_state = torch.tensor([int(i) in state.slot_of for i in behind.tolist()], dtype=torch.bool)
        dev_ids = behind.to(bank.device)
        if bool(has_state.any()):
            # blocks without state get zero moments: their replay is weight decay only, as torch's would be.
            # Each replayed step is torch's own fused AdamW with a zero gradient over the row views behind
            # at that step (a prefix: sorted by `since`), their counters set to where each row stopped
            slots = state.slots(behind.tolist())
            params, work = _float32_rows(bank, dev_ids)
            slot_index = torch.tensor(slots, dtype=torch.long, device=state.steps.device)
            state.steps[slot_index] = since.to(device=state.steps.device, dtype=torch.float32)
            m = [state.exp_avg[slot] for slot in slots]
            v = [state.exp_avg_sq[slot] for slot in slots]
            steps = [state.steps[slot] for slot in slots]
            zero = torch.zeros_like(state.exp_avg[0])
            counts = torch.searchsorted(since, torch.arange(int(since[0]) + 1, upto + 1), right=False).tolist()
            for step, n in zip(range(int(since[0]) + 1, upto + 1), counts):  # n: rows behind at this step
                adamw(params[:n], [zero] * n, m[:n], v[:n], [], steps[:n], fused=True, amsgrad=False,
                      beta1=self.betas[0], beta2=self.betas[1], lr=self.lrs[step - 1],
                      weight_decay=self.weight_decay, eps=self.eps, maximize=False)
            if work is not None:
                bank[dev_ids] = work.to(bank.dtype)
        else:
            decay = torch.ones(len(behind), dtype=torch.float32)
            for step in range(int(since[0]) + 1, upto + 1):
                decay[since < step] *= 1 - self.lrs[step - 1] * self.weight_decay
            bank[dev_ids] = (bank[dev_ids].float() * decay.to(bank.device)[:, None]).to(bank.dtype)
        current[behind] = upto

    @torch.no_grad()
    def finalize(self) -> None:
        """Dense semantics: bring every block up to the last step (what the bank would be under
        torch AdamW over the whole bank). Blocks never fetched only decay. A no-op for `lazy`."""
        if self.semantics != "dense" or self.t == 0:
            return
        for level, current in self.current.items():
            behind = torch.nonzero(current < self.t).flatten()
            state = self.levels[level]
            touched = torch.tensor([int(i) in state.slot_of for i in behind.tolist()], dtype=torch.bool)
            if bool(touched.any()):
                self._catch_up(level, behind[touched], self.t)
            cold = behind[~touched]
            if len(cold):  # no moments: replay is the product of the weight-decay factors
                factors = torch.tensor([1 - lr * self.weight_decay for lr in self.lrs], dtype=torch.float64)
                prefix = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(factors, 0)])
                decay = (prefix[self.t] / prefix[current[cold]]).to(self.bank.levels[level].dtype)
                bank = self.bank.levels[level].data
                dev = cold.to(bank.device)
                bank[dev] = bank[dev] * decay.to(bank.device)[:, None]
                current[cold] = self.t

    def gather(self, paths: torch.Tensor, use_generic: torch.Tensor | None = None,
               blocked: torch.Tensor | None = None) -> dict[int, ActiveRows]:
        """The rows this batch really reads (`MemoryBank.read_mask`), as leaf tensors with grad.

        Dense semantics first bring every block on the batch's paths up to the current step."""
        nodes = self.bank.node_indices(paths)
        read = self.bank.read_mask(nodes, use_generic, blocked)
        active = {}
        for level in self.levels:
            if self.semantics == "dense":  # the forward must read what dense AdamW would hold now
                self._catch_up(level, torch.unique(nodes[:, level]), self.t)
            ids = torch.unique(nodes[read[:, level], level])
            rows = self.bank.levels[level].detach().index_select(0, ids).requires_grad_(True)  # a copy
            active[level] = ActiveRows(ids=ids, rows=rows)
        return active

    @torch.no_grad()
    def step(self, active: dict[int, ActiveRows], lr: float | None = None) -> int:
        """Apply AdamW to the active rows, in place in the bank; returns the number of rows updated.

        The update is torch's own fused AdamW (`torch.optim.adamw.adamw(fused=True)`) over a list of
        row views -- bank rows, their gradients, their state rows and per-row step counters -- so no
        state or parameter is gathered or scattered, and the whole step is a few kernel launches.
        The bank rows still hold the values the forward read: `gather` cloned them, and nothing
        writes the bank between gather and step.
        """
        lr = self.lr if lr is None else lr
        self.t += 1
        self.lrs.append(float(lr))
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        write_back = []  # (bank, ids, float32 rows) of banks stored in lower precision
        for level, rows in active.items():
            if rows.rows.grad is None or not len(rows.ids):
                continue
            state, bank, grad = self.levels[level], self.bank.levels[level].data, rows.rows.grad
            ids = rows.ids.tolist()
            slots = state.slots(ids)
            self.updates[level][rows.ids.detach().cpu()] += 1
            if self.semantics == "dense":
                # a zero gradient elsewhere: the fetched rows' blocks were caught up in gather;
                # their step counter is the global one
                state.steps[torch.tensor(slots, dtype=torch.long, device=state.steps.device)] = float(self.t - 1)
                self.current[level][rows.ids.detach().cpu()] = self.t
            targets, work = _float32_rows(bank, rows.ids)
            if work is not None:
                write_back.append((bank, rows.ids, work))
                grad = grad.float()
            for j, (target, slot) in enumerate(zip(targets, slots)):
                params.append(target)
                grads.append(grad[j])
                exp_avgs.append(state.exp_avg[slot])
                exp_avg_sqs.append(state.exp_avg_sq[slot])
                steps.append(state.steps[slot])
        if params:
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False,
                  beta1=self.betas[0], beta2=self.betas[1], lr=lr, weight_decay=self.weight_decay,
                  eps=self.eps, maximize=False)
        for bank, ids, work in write_back:
            bank[ids] = work.to(bank.dtype)
        return len(params)

    def state_dict(self) -> dict:
        return {"levels": {level: s.state_dict() for level, s in self.levels.items()},
                "hyper": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                          "weight_decay": self.weight_decay, "semantics": self.semantics},
                "t": self.t, "lrs": torch.tensor(self.lrs, dtype=torch.float64),
                "updates": {level: u.clone() for level, u in self.updates.items()},
                "current": {level: c.clone() for level, c in self.current.items()}}

    def load_state_dict(self, state: dict) -> None:
        for level, level_state in state["levels"].items():
            self.levels[int(level)].load_state_dict(level_state)
        self.t = int(state.get("t", 0))
        self.lrs = [float(x) for x in state["lrs"].tolist()] if "lrs" in state else []
        for level, u in state.get("updates", {}).items():
            self.updates[int(level)] = u.clone().long()
        for level, c in state.get("current", {}).items():
            if int(level) in self.current:
                self.current[int(level)] = c.clone().long()

    def state_bytes(self) -> int:
        return sum(s.exp_avg.numel() * s.exp_avg.element_size() * 2 for s in self.levels.values())

    def touched_blocks(self) -> dict[int, int]:
        return {level: len(s.slot_of) for level, s in self.levels.items()}
