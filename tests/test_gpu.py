"""GPU paths (bf16 autocast training step, batched fetch on device); skipped on CPU-only machines."""

import pytest
import torch

from hiermem.config import MemoryConfig, tiny_config
from hiermem.model import HierMemLM
from hiermem.stepper import TrainStepper

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_autocast_memory_step_on_cuda():
    torch.manual_seed(0)
    model = HierMemLM(tiny_config(2, vocab_size=512, max_seq_len=64), MemoryConfig(multipliers=(16, 4), branching=4))
    model.cuda()
    stepper = TrainStepper(model, lr=1e-3)
    assert stepper.autocast
    tokens = torch.randint(0, 512, (4, 64), device="cuda")
    paths = torch.randint(0, 4, (4, 2), device="cuda")
    out = stepper.step(tokens, torch.zeros_like(tokens), paths)
    assert out["finite"] and out["bank_rows"] > 0


def test_cuda_matches_cpu_at_init():
    torch.manual_seed(0)
    model = HierMemLM(tiny_config(1, vocab_size=128, max_seq_len=32), MemoryConfig(multipliers=(4, 2), branching=4))
    tokens = torch.randint(0, 128, (2, 16))
    paths = torch.randint(0, 4, (2, 2))
    cpu = model(tokens, paths=paths)
    gpu = model.cuda()(tokens.cuda(), paths=paths.cuda()).cpu()
    torch.testing.assert_close(cpu, gpu, rtol=1e-3, atol=1e-3)


def test_sparse_bank_optimizer_on_cuda_matches_cpu():
    """The same fp32 steps on CUDA and CPU give the same touched blocks and leave the rest alone."""
    from hiermem.optim import SparseBankAdamW

    def run(device):
        torch.manual_seed(0)
        model = HierMemLM(tiny_config(1, vocab_size=64, max_seq_len=16),
                          MemoryConfig(multipliers=(4, 2), branching=3)).to(device)
        with torch.no_grad():
            for p in model.bank.levels:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(device))
        before = [p.detach().clone() for p in model.bank.levels]
        opt = SparseBankAdamW(model.bank, lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            tokens = torch.randint(0, 64, (2, 8), generator=g).to(device)
            paths = torch.tensor([[1, 2], [0, 1]], device=device)
            active = opt.gather(paths)
            model(tokens, paths=paths, active=active).float().pow(2).mean().backward()
            opt.step(active)
        return [p.detach().cpu() for p in model.bank.levels], [b.cpu() for b in before]

    cpu, before = run("cpu")
    gpu, _ = run("cuda")
    for level, (c, g_, b) in enumerate(zip(cpu, gpu, before)):
        torch.testing.assert_close(g_, c, rtol=1e-4, atol=1e-5)
        changed = set(torch.nonzero((g_ != b).any(dim=1)).flatten().tolist())
        assert changed == ({0, 1} if level == 0 else {1 * 3 + 2, 0 * 3 + 1})


def test_memory_training_on_cuda_fits_a_batch():
    """A few bf16-autocast memory steps (frozen anchor) drive the loss on one batch down."""
    torch.manual_seed(0)
    model = HierMemLM(tiny_config(2, vocab_size=256, max_seq_len=64), MemoryConfig(multipliers=(32, 8), branching=4))
    model.cuda()
    stepper = TrainStepper(model, lr=3e-3, bank_lr=3e-2, freeze_anchor=True)
    anchor_before = [p.detach().clone() for p in model.anchor.parameters()]
    tokens = torch.randint(0, 256, (4, 64), device="cuda")
    paths = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], device="cuda")
    losses = [stepper.step(tokens, torch.zeros_like(tokens), paths)["loss"] for _ in range(30)]
    assert losses[-1] < losses[0] - 0.5, losses
    for p, q in zip(model.anchor.parameters(), anchor_before):
        assert torch.equal(p, q)


def test_kv_cache_decoding_on_cuda_matches_full_recompute():
    """Left-padded prompts decoded with the KV cache on CUDA give the logits of a full recompute."""
    from helpers import assert_cached_decoding_matches_recompute

    torch.manual_seed(0)
    cfg = tiny_config(2, vocab_size=128, max_seq_len=64)
    model = HierMemLM(cfg, MemoryConfig(multipliers=(8, 4), branching=4))
    with torch.no_grad():
        for p in model.bank.levels:
            p.add_(0.05 * torch.randn_like(p))
    model = model.cuda().eval()
    tokens = torch.randint(0, 128, (2, 6), device="cuda")
    segments = torch.tensor([[-1, -1, 0, 0, 0, 0], [0] * 6], device="cuda")
    fetched = model.fetch(torch.tensor([[0, 1], [2, 3]], device="cuda"))
    assert_cached_decoding_matches_recompute(model, tokens, segments, fetched, rtol=1e-4, atol=1e-4)
