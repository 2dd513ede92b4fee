"""The training step's pieces against independent computations: the LR schedule (torch's own
schedulers), the next-token loss (a hand loop over valid targets), and one bank update (Adam's
first step, sign of the gradient, computed with plain autograd)."""


import pytest
import torch
import torch.nn.functional as F

from helpers import reference_lr_schedule
from hiermem.config import MemoryConfig, ModelConfig
from hiermem.model import HierMemLM
from hiermem.stepper import TrainStepper, cosine_lr, next_token_loss

CFG = ModelConfig(d_model=16, n_layers=2, n_heads=2, head_dim=8, ffn_dim=32, vocab_size=41, max_seq_len=16)
MEM = MemoryConfig(type="ffn", multipliers=(2, 1), branching=3)


@pytest.mark.parametrize("total,warmup,peak,final", [(40, 4, 3e-3, 3e-5), (25, 0, 1.0, 0.1), (30, 2, 3e-3, 3e-5),
                                                     (7, 1, 2.0, 0.0)])
def test_cosine_lr_equals_torch_schedulers(total, warmup, peak, final):
    """Bug caught: an inverted cosine (1 - cos), a warmup off by one step, or a decay that does not end
    at `final`. Reference: torch's LinearLR + CosineAnnealingLR driven step by step."""
    want = reference_lr_schedule(total, warmup, peak, final)
    got = [cosine_lr(step, total, warmup, peak, final) for step in range(total)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    after = got[warmup:]
    assert after[0] == pytest.approx(peak) and all(a >= b for a, b in zip(after, after[1:]))  # decays from the peak
    assert cosine_lr(total, total, warmup, peak, final) == pytest.approx(final)


def _hand_loss(logits, tokens, segments):
    """Mean NLL of token t+1 over the positions t with segments[t] == segments[t+1] >= 0, by a loop."""
    total, n = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            s, s_next = int(segments[b, t]), int(segments[b, t + 1])
            if s == s_next and s >= 0:
                row = logits[b, t].double()
                total += float(torch.logsumexp(row, 0) - row[tokens[b, t + 1]])
                n += 1
    return total, n


def test_next_token_loss_counts_only_targets_inside_a_document():
    """Bug caught: the loss ignoring the document/padding mask (predicting the first token of the next
    document, or padding), or averaging over all positions instead of the valid ones."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (2, 8), generator=g)
    logits = torch.randn(2, 8, 11, generator=g)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1], [-1, -1, 0, 0, 0, 0, 0, 0]])
    total, n = _hand_loss(logits, tokens, segments)
    assert n == 4 + 5  # row 0: 0->0 (2) and 1->1 (2); row 1: the five pairs inside document 0
    assert float(next_token_loss(logits, tokens, segments)) == pytest.approx(total / n, rel=1e-6)
    assert float(next_token_loss(logits, tokens, segments, reduction="sum")) == pytest.approx(total, rel=1e-6)
    per_position = next_token_loss(logits, tokens, segments, reduction="none")
    assert float(per_position[0, 2]) == 0.0 and float(per_position[0, 5]) == 0.0 and float(per_position[1, 0]) == 0.0
    # without segments every position counts
    total_all, n_all = _hand_loss(logits, tokens, torch.zeros_like(tokens))
    assert float(next_token_loss(logits, tokens, None)) == pytest.approx(total_all / n_all, rel=1e-6)


def test_a_bank_step_moves_exactly_the_fetched_rows_by_adams_first_step():
    """Bug caught: a bank step that does nothing (or updates other rows, or the wrong sign). Adam's
    first step with no weight decay moves each coordinate by -lr * g / (|g| + eps), g the gradient;
    g is computed here with plain autograd on the bank parameters (not the sparse path). The step's
    loss is the masked next-token loss of the model before the update (a hand loop)."""
    torch.manual_seed(0)
    model = HierMemLM(CFG, MEM)
    with torch.no_grad():
        for p in model.bank.levels:
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (2, 10), generator=g)
    segments = torch.tensor([[0] * 6 + [1] * 4, [0] * 10])
    paths = torch.tensor([[1, 2], [1, 0]])
    before = [p.detach().clone() for p in model.bank.levels]

    # the reference gradient of the bank, through a dense forward (levels as ordinary parameters)
    for p in model.bank.levels:
        p.requires_grad_(True)
    logits = model(tokens, segments, paths=paths)
    total, n = _hand_loss(logits.detach(), tokens, segments)
    valid = torch.tensor([[s[t] == s[t + 1] and s[t] >= 0 for t in range(9)] for s in segments.tolist()])
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1), reduction="none")
    (ce * valid.reshape(-1)).sum().div(valid.sum()).backward()
    grads = [p.grad.clone() for p in model.bank.levels]
    model.zero_grad(set_to_none=True)

    lr, eps = 1e-2, 1e-8
    stepper = TrainStepper(model, lr=1e-3, bank_lr=lr, eps=eps, weight_decay=0.0, bank_weight_decay=0.0,
                           grad_clip=None, freeze_anchor=True, bank_semantics="lazy")
    out = stepper.step(tokens, segments, paths)
    assert out["loss"] == pytest.approx(total / n, rel=1e-5)
    assert out["bank_rows"] == 3  # level 1: node 1; level 2: nodes 1*3+2 and 1*3+0
    fetched = {0: {1}, 1: {5, 3}}
    for level, (p, b, grad) in enumerate(zip(model.bank.levels, before, grads)):
        for node in range(p.shape[0]):
            if node in fetched[level]:
                # bias-corrected first step: m_hat = g, v_hat = g^2 -> -lr * g / (|g| + eps)
                want = b[node] - lr * grad[node] / (grad[node].abs() + eps)
                torch.testing.assert_close(p.detach()[node], want, rtol=1e-5, atol=1e-7)
                assert (p.detach()[node] != b[node]).any()
            else:
                assert torch.equal(p.detach()[node], b[node]), (level, node)  # untouched rows bit-identical
