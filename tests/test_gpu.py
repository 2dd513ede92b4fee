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
