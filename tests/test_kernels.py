"""The fast paths (`hiermem.kernels`, `HierMemLM.fast`) against the plain path they replace.

Each test builds two identical models, one with `fast = False`, and compares what training sees:
the loss, every gradient (anchor, generic block and the active bank rows) and the parameters after
a few optimizer steps, for every memory kind, with packed documents, padding, generic rows and
blocked levels in the batch. The fused cross-entropy is also checked against a float64 reference.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import packed_batch, small_memory_model

from hiermem.kernels import fused_linear_cross_entropy, fused_next_token_loss, keep_freed_memory, rotate_pairs
from hiermem.memory_kinds import MEMORY_KINDS
from hiermem.stepper import TrainStepper, next_token_loss

UNITS = ("ffn", "lora-ffn", "lora-qk", "lora-vo", "kv")


def _batch(seed: int = 0):
    return packed_batch(seed=seed)


def _pair(kind: str):
    plain = small_memory_model(kind)
    fast = copy.deepcopy(plain)
    plain.fast, fast.fast = False, True
    return plain, fast


def test_fused_cross_entropy_equals_a_float64_reference():
    """Bug caught: a softmax not normalised per row, the one-hot subtracted at the wrong column, a
    chunk boundary dropping or double-counting rows, or the weight gradient missing a chunk.
    Reference: logits and cross-entropy in float64 with autograd."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (37,), generator=g)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk=5)  # 8 chunks, the last one short
    (2.5 * loss).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), targets, reduction="sum")
    (2.5 * ref).backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="37 hidden rows but targets of shape"):  # a row/target mismatch
        fused_linear_cross_entropy(hidden, weight, targets[:-1])


def test_fused_next_token_loss_counts_the_same_targets_as_the_plain_loss():
    """Bug caught: the fused loss sending padding or cross-document targets through the head, or
    averaging over all positions. Reference: `next_token_loss` on the full logits."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 9, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    tokens = torch.randint(0, 11, (3, 9), generator=g)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1, -1], [-1, -1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    for seg in (segments, None):
        want = next_token_loss(hidden @ weight.t(), tokens, seg)
        got = fused_next_token_loss(hidden, weight, tokens, seg)
        assert float(got) == pytest.approx(float(want), rel=1e-6)
    # a batch whose every target is masked has loss 0 and zero gradients, as the plain path
    h = hidden.clone().requires_grad_()
    none = fused_next_token_loss(h, weight, tokens, torch.arange(9).repeat(3, 1))
    none.backward()
    assert float(none.detach()) == 0.0 and float(h.grad.abs().sum()) == 0.0


def test_rotate_pairs_equals_the_strided_rotation():
    """Bug caught: pairs taken as halves (rotate-half) instead of interleaved, or the sine's sign
    flipped. Reference: x1 cos - x2 sin, x1 sin + x2 cos on x[..., 0::2], x[..., 1::2]."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 8, generator=g)
    angles = torch.rand(5, 4, generator=g) * 6
    x1, x2 = x[..., 0::2], x[..., 1::2]
    want = torch.stack((x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()), -1).flatten(-2)
    torch.testing.assert_close(rotate_pairs(x, angles.cos(), angles.sin()), want, rtol=0, atol=1e-6)
    half = rotate_pairs(x.bfloat16(), angles.cos(), angles.sin())
    assert half.dtype == torch.bfloat16 and half.shape == x.shape


@pytest.mark.parametrize("kind", sorted(UNITS))
def test_fast_and_plain_paths_give_the_same_loss_and_gradients(kind):
    """Bug caught: a fast path that changes the model -- the fetch's strided views reading the wrong
    rows or layers, the per-layer views not reaching every memory layer, the fused loss or rotary
    differing -- for any memory kind. Generic rows and a blocked level are in the batch."""
    assert set(UNITS) == set(MEMORY_KINDS)
    plain, fast = _pair(kind)
    tokens, segments, paths = _batch()
    use_generic = torch.tensor([False, True, False, False, False, False])
    grads = {}
    for model in (plain, fast):
        model.bank.block([tuple(paths[2].tolist())])  # row 2's leaf is blocked (bank-wide)
        stepper = TrainStepper(model, lr=1e-2, bank_lr=1e-2)
        active = stepper.bank_opt.gather(paths, use_generic=use_generic)
        hidden_loss = stepper.loss(tokens, segments, paths, use_generic, active)
        hidden_loss.backward()
        grads[model.fast] = ({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                             {lv: a.rows.grad.clone() for lv, a in active.items()}, float(hidden_loss.detach()))
    (p_grads, p_rows, p_loss), (f_grads, f_rows, f_loss) = grads[False], grads[True]
    assert f_loss == pytest.approx(p_loss, rel=1e-5)
    assert p_grads.keys() == f_grads.keys() and any("generic" in n for n in p_grads)
    for name in p_grads:
        torch.testing.assert_close(f_grads[name], p_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for level in p_rows:
        assert float(p_rows[level].abs().sum()) > 0, "the memory must receive gradients"
        torch.testing.assert_close(f_rows[level], p_rows[level], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["ffn", "kv"])
def test_fast_and_plain_paths_train_to_the_same_parameters(kind):
    """Bug caught: a fast path that only agrees at the first step (e.g. the fused AdamW, or the bank
    rows written back differently). Three steps each; every parameter is compared after."""
    plain, fast = _pair(kind)
    for model in (plain, fast):
        stepper = TrainStepper(model, lr=1e-2, bank_lr=1e-2, weight_decay=0.1, bank_semantics="dense")
        for seed in range(3):
            tokens, segments, paths = _batch(seed)
            stepper.step(tokens, segments, paths)
        stepper.finalize()
    # Adam divides by sqrt(v): where a gradient is ~0 the rounding of the two paths can move a weight
    # by a small fraction of the learning rate (1e-2); a wrong path moves weights by the order of it
    for (name, a), (_, b) in zip(plain.state_dict().items(), fast.state_dict().items()):
        assert float((b - a).abs().max()) < 2e-4, name


def test_keep_freed_memory_applies_on_glibc_and_is_idempotent():
    """Bug caught: a mallopt call glibc rejects (a wrong parameter number or an out-of-range value
    returns 0, and the setting silently does nothing), or a second call (every train and evaluate in a
    process makes one) failing."""
    import sys
    first = keep_freed_memory()
    assert first == sys.platform.startswith("linux")  # CI and this machine: Linux with glibc
    assert keep_freed_memory() == first
