"""`hiermem demo`: the main end-to-end job (grows as the workbench grows).

Current version: the paper's size table from configs alone, then a few steps of a tiny anchor with an
FFN memory bank trained through the sparse bank optimizer on random tokens, printing the loss.
"""

from __future__ import annotations

import argparse

import torch

from hiermem.accounting import count
from hiermem.config import MemoryConfig, model_preset, tiny_config
from hiermem.model import HierMemLM
from hiermem.stepper import TrainStepper

PAPER_ROWS = (("openlm-160m", (256, 64, 16, 0)), ("openlm-160m", (256, 64, 16, 4)),
              ("openlm-410m", (512, 128, 32, 0)), ("openlm-1b", (768, 256, 16, 0)), ("d1024-l12", (3840, 336, 6, 0)))


def paper_table() -> str:
    lines = [f"{'anchor':<12} {'config':<20} {'anchor':>15} {'fetched':>13} {'bank':>16}"]
    for name, multipliers in PAPER_ROWS:
        acc = count(model_preset(name), MemoryConfig(multipliers=multipliers))
        lines.append(f"{name:<12} {str(multipliers):<20} {acc.anchor_params:>15,} {acc.fetched_params:>13,} "
                     f"{acc.bank_params:>16,}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print("Paper configurations (counted, not built):")
    print(paper_table())
    torch.manual_seed(0)
    cfg = tiny_config(2, vocab_size=512, max_seq_len=64)
    model = HierMemLM(cfg, MemoryConfig(multipliers=(16, 4), branching=4))
    stepper = TrainStepper(model, lr=3e-3, bank_lr=3e-3)
    g = torch.Generator().manual_seed(0)
    print(f"\nTraining a tiny anchor + FFN memory for {args.steps} steps on random tokens:")
    for step in range(args.steps):
        tokens = torch.randint(0, cfg.vocab_size, (8, 64), generator=g)
        paths = torch.randint(0, 4, (8, 2), generator=g)
        out = stepper.step(tokens, torch.zeros_like(tokens), paths)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  step {step:3d}  loss {out['loss']:.3f}  bank rows updated {out['bank_rows']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main end-to-end job")
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=run)
