"""GPU paths (bf16 autocast training step, batched fetch on device); skipped on CPU-only machines."""

import pytest
import torch

from hiermem.config import MemoryConfig, ModelConfig, tiny_config
from hiermem.model import HierMemLM
from hiermem.stepper import TrainStepper

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="requires CUDA: no CUDA device")]


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


def _trained_memory_model():
    """A tiny model whose bank (and anchor) took a few fp32 steps on CPU, so memory changes the output."""
    torch.manual_seed(0)
    model = HierMemLM(tiny_config(1, vocab_size=128, max_seq_len=32), MemoryConfig(multipliers=(4, 2), branching=4))
    stepper = TrainStepper(model, lr=1e-2, bank_lr=5e-2, weight_decay=0.0, bank_semantics="dense")
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        tokens = torch.randint(0, 128, (4, 32), generator=g)
        paths = torch.randint(0, 4, (4, 2), generator=g)
        use_generic = torch.tensor([False, False, False, True])
        assert stepper.step(tokens, torch.zeros_like(tokens), paths, use_generic)["finite"]
    stepper.finalize()
    return model.eval()


def test_cuda_matches_cpu_after_memory_training():
    """Bug caught: a CUDA-only error in the memory path (fetch, generic block, blocking, document
    mask) that a comparison at initialization cannot see, since memory contributes nothing there.
    The same trained weights give the same logits on CPU and CUDA (fp32), with memory that matters."""
    model = _trained_memory_model()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 128, (4, 24), generator=g)
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 24, [-1] * 4 + [0] * 20, [0] * 12 + [1] * 12])
    paths = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    use_generic = torch.tensor([False, True, False, False])
    blocked = torch.tensor([[False, False], [False, False], [True, False], [False, True]])
    with torch.no_grad():
        plain = model(tokens, segments)
        cpu = model(tokens, segments, paths=paths, use_generic=use_generic, blocked=blocked)
        assert (cpu - plain).abs().amax(dim=(1, 2)).min() > 1e-2  # memory matters in every row
        model = model.cuda()
        gpu = model(tokens.cuda(), segments.cuda(), paths=paths.cuda(), use_generic=use_generic.cuda(),
                    blocked=blocked.cuda()).cpu()
        gpu_plain = model(tokens.cuda(), segments.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu_plain, plain, rtol=1e-3, atol=1e-3)


def test_training_on_cuda_matches_cpu_fp32():
    """Bug caught: a training step (loss mask, sparse bank AdamW, generic block) that differs on CUDA.
    Autocast is switched off so both devices run fp32; the weights after a few steps agree."""
    def run(device):
        torch.manual_seed(0)
        model = HierMemLM(tiny_config(1, vocab_size=128, max_seq_len=32),
                          MemoryConfig(multipliers=(4, 2), branching=4)).to(device)
        # a large eps keeps Adam's update continuous in the gradient: a near-zero gradient component
        # whose sign differs by rounding between devices cannot flip a whole lr-sized step
        stepper = TrainStepper(model, lr=1e-2, bank_lr=5e-2, weight_decay=0.0, eps=1e-3, bank_semantics="dense")
        stepper.autocast = False
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            tokens = torch.randint(0, 128, (4, 32), generator=g).to(device)
            segments = torch.tensor([[0] * 16 + [1] * 16] * 4, device=device)
            paths = torch.randint(0, 4, (4, 2), generator=g).to(device)
            stepper.step(tokens, segments, paths, torch.tensor([False, True, False, False], device=device))
        stepper.finalize()
        return {name: t.detach().cpu() for name, t in model.state_dict().items()}

    cpu, gpu = run("cpu"), run("cuda")
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-3, atol=1e-4, msg=name)


def test_bfloat16_bank_on_cuda_follows_the_float32_bank():
    """Bug caught on the GPU path: a bf16 bank whose fetch is cast back to fp32 per step, whose
    update is lost, or whose moments are bf16. Reference: the same CUDA steps with a float32 bank."""
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, head_dim=32, ffn_dim=128, vocab_size=101, max_seq_len=32)
    g = torch.Generator().manual_seed(0)
    tokens, paths = torch.randint(0, 101, (4, 32), generator=g).cuda(), torch.randint(0, 3, (4, 2), generator=g).cuda()
    banks = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = HierMemLM(cfg, MemoryConfig(type="ffn", multipliers=(8, 4), branching=3)).cuda()
        with torch.no_grad():
            for p in model.bank.levels:
                p.copy_(p.to(torch.bfloat16).float())
        start = [p.detach().clone() for p in model.bank.levels]
        model.bank.store_as(dtype)
        stepper = TrainStepper(model, lr=1e-3, bank_lr=1e-2, freeze_anchor=True)
        losses = [stepper.step(tokens, None, paths)["loss"] for _ in range(8)]
        assert losses[-1] < losses[0]
        assert all(p.dtype == dtype for p in model.bank.levels)
        assert all(s.exp_avg.dtype == torch.float32 for s in stepper.bank_opt.levels.values())
        banks[dtype] = [p.detach().float() for p in model.bank.levels]
    for level, (a, b) in enumerate(zip(banks[torch.float32], banks[torch.bfloat16])):
        moved = float((b - start[level]).abs().max())
        assert moved > 1e-3
        assert float((a - b).abs().max()) < 0.1 * moved + 2 ** -7 * float(a.abs().max())


def test_rows_read_in_place_on_cuda_train_like_the_gathered_copy():
    """The Triton gather-matmul on a GPU (the trainer turns it on where triton runs): three bf16-autocast
    steps of an FFN memory model end where the same steps with the gathered copy end (bf16 rounding),
    and the kernel was really used."""
    pytest.importorskip("triton", reason="the gather-matmul kernel needs triton (pip install triton)")
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, head_dim=32, ffn_dim=128, vocab_size=101, max_seq_len=64)
    torch.manual_seed(0)
    base = HierMemLM(cfg, MemoryConfig(type="ffn", multipliers=(8, 8), branching=4, generic=True))
    with torch.no_grad():
        for p in base.bank.levels:
            p.normal_(0, 0.05)
    states = {}
    for in_place in (False, True):
        model = HierMemLM(cfg, MemoryConfig(type="ffn", multipliers=(8, 8), branching=4, generic=True))
        model.load_state_dict(base.state_dict())
        model = model.cuda()
        stepper = TrainStepper(model, lr=1e-3, bank_lr=1e-2)
        assert model.bank.gather_matmul  # the trainer's choice on CUDA with triton
        model.bank.gather_matmul = in_place
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            tokens = torch.randint(0, cfg.vocab_size, (4, 64), generator=g).cuda()
            paths = torch.randint(0, 4, (4, 2), generator=g).cuda()
            stepper.step(tokens, torch.zeros_like(tokens), paths)
        states[in_place] = {k: v.float().cpu() for k, v in model.state_dict().items()}
    for name, value in states[False].items():
        assert float((states[True][name] - value).abs().max()) < 2e-2, name
