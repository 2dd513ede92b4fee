"""The fetch fused with the memory matmuls (`hiermem.gather_matmul`): the same loss and gradients as the
gathered copy, with generic rows and blocked rows in the batch; the Triton kernel (run by triton's
interpreter on this CPU) equals the index_select + bmm reference in values and gradients."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hiermem.config import MemoryConfig, ModelConfig
from hiermem.gather_matmul import GatheredFFN, GatheredLevel, gather_matmul
from hiermem.memory_kinds import ffn_memory
from hiermem.model import HierMemLM
from hiermem.stepper import TrainStepper

CFG = ModelConfig(d_model=32, n_layers=3, n_heads=2, head_dim=16, ffn_dim=64, vocab_size=97, max_seq_len=24)


def _batch(seed: int = 0, batch: int = 6, t: int = 24):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (batch, t), generator=g)
    segments = torch.cumsum((torch.rand(batch, t, generator=g) < 0.15).long(), dim=1)
    paths = torch.randint(0, 3, (batch, 2), generator=g)
    return tokens, segments, paths


def _pair(multipliers=(3, 2)):
    torch.manual_seed(0)
    gathered = HierMemLM(CFG, MemoryConfig(type="ffn", multipliers=multipliers, branching=3, generic=True))
    with torch.no_grad():  # non-zero memory, so that it changes the outputs and gets gradients everywhere
        for p in list(gathered.bank.levels) + list(gathered.bank.generic):
            p.normal_(0, 0.1)
    copied = copy.deepcopy(gathered)
    gathered.bank.gather_matmul = True
    return copied, gathered


@pytest.mark.parametrize("multipliers", [(3, 2), (0, 4)])
def test_rows_read_in_place_give_the_gathered_copys_loss_and_row_gradients(multipliers):
    """Bugs caught: a wrong column offset (another layer's or tensor's weights), levels concatenated in the
    wrong order or not summed, blocked rows still read, the generic row not used, row gradients added at
    the wrong node. Reference: the copy path's loss and the gradients of its active rows."""
    results = {}
    tokens, segments, paths = _batch()
    use_generic = torch.tensor([False, True, False, False, False, False])
    for model in _pair(multipliers):
        model.bank.block([tuple(paths[2].tolist())])  # row 2's leaf is blocked (bank-wide)
        stepper = TrainStepper(model, lr=1e-2, bank_lr=1e-2)
        active = stepper.bank_opt.gather(paths, use_generic=use_generic)
        loss = stepper.loss(tokens, segments, paths, use_generic, active)
        loss.backward()
        results[model.bank.gather_matmul] = (
            float(loss.detach()), {lv: a.rows.grad.clone() for lv, a in active.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (c_loss, c_rows, c_grads), (g_loss, g_rows, g_grads) = results[False], results[True]
    assert g_loss == pytest.approx(c_loss, rel=1e-6)
    for level in c_rows:
        assert float(c_rows[level].abs().sum()) > 0
        torch.testing.assert_close(g_rows[level], c_rows[level], rtol=1e-5, atol=1e-7)
    assert c_grads.keys() == g_grads.keys()
    for name in c_grads:
        torch.testing.assert_close(g_grads[name], c_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_training_run_in_place_ends_at_the_same_parameters():
    """Bug caught: agreement at one step only (the rows written back by the sparse optimizer differ)."""
    copied, gathered = _pair()
    for model in (copied, gathered):
        stepper = TrainStepper(model, lr=1e-2, bank_lr=1e-2, weight_decay=0.1, bank_semantics="dense")
        for seed in range(3):
            stepper.step(*_batch(seed))
        stepper.finalize()
    # as in test_kernels: Adam's 1/sqrt(v) can move a weight whose gradient is ~0 by a small fraction of the
    # learning rate (1e-2) between two roundings; a wrong path moves weights by the order of it
    for (name, a), (_, b) in zip(copied.state_dict().items(), gathered.state_dict().items()):
        assert float((b - a).abs().max()) < 2e-4, name


def test_gather_matmul_equals_matmuls_on_gathered_rows():
    """Reference computed independently: index the rows, slice, reshape, matmul (float64)."""
    g = torch.Generator().manual_seed(4)
    table = torch.randn(7, 5 * 6 + 11, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([3, 0, 3, 6])
    a = torch.randn(4, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out = gather_matmul(a, table, pos, offset=11, units=5, width=6, transpose=True, use_kernel=False)
    w = torch.stack([table[p, 11:].reshape(5, 6) for p in pos.tolist()])
    torch.testing.assert_close(out, a @ w.transpose(1, 2))
    assert torch.autograd.gradcheck(lambda a_, t_: gather_matmul(a_, t_, pos, 11, 5, 6, True, use_kernel=False),
                                    (a, table))
    h = torch.randn(4, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h_, t_: gather_matmul(h_, t_, pos, 11, 5, 6, False, use_kernel=False),
                                    (h, table))
    one = GatheredFFN([GatheredLevel(table.detach().float(), pos, None, {"gate": 0, "up": 6, "down": 12}, 1, 6)])
    with pytest.raises(ValueError, match="5 rows cannot share 4 fetched memories"):
        ffn_memory(torch.randn(5, 2, 6), one)


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from hiermem.gather_matmul import gather_matmul, kernel_available
    assert kernel_available("cpu")
    g = torch.Generator().manual_seed(5)
    table = torch.randn(9, 3 * 70 * 40 + 13, generator=g)   # units 70, width 40: blocks of 64 x 64 x 32 cut
    pos = torch.tensor([8, 1, 1])
    for transpose, k in ((True, 40), (False, 70)):
        a = torch.randn(3, 75, k, generator=g)
        t1, a1 = table.clone().requires_grad_(), a.clone().requires_grad_()
        t2, a2 = table.clone().requires_grad_(), a.clone().requires_grad_()
        out1 = gather_matmul(a1, t1, pos, 13 + 70 * 40, 70, 40, transpose, use_kernel=True)
        out2 = gather_matmul(a2, t2, pos, 13 + 70 * 40, 70, 40, transpose, use_kernel=False)
        torch.testing.assert_close(out1, out2, rtol=1e-4, atol=1e-4)
        grad = torch.randn_like(out1)
        out1.backward(grad); out2.backward(grad)
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-4, atol=1e-4)
    print("kernel ok")
""")


def test_the_triton_kernel_equals_the_reference_under_the_interpreter():
    """The kernel a GPU runs, executed by triton's interpreter (TRITON_INTERPRET=1) on this CPU, in a fresh
    process (the interpreter is chosen when triton compiles). Shapes are not multiples of the blocks, so
    the masks at the edges are exercised. Bugs caught: a wrong stride or offset, the transposed orientation
    swapped, a row index not widened (int32 overflow is not tested), edge blocks read or written outside."""
    pytest.importorskip("triton", reason="triton is in the dev extra; without it this test cannot run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "kernel ok" in out.stdout, out.stderr[-3000:]
