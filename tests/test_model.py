"""Anchor + memory equivalences: zero effect at init, FFN-memory = wider SwiGLU, batched fetch,
blocking, document-restricted attention and where gradients land."""

import pytest
import torch

from hiermem.config import MemoryConfig, ModelConfig
from hiermem.model import HierMemLM

MEMORY_TYPES = ["ffn", "lora-ffn", "lora-qk", "lora-vo", "kv"]
CFG = ModelConfig(d_model=32, n_layers=3, n_heads=2, head_dim=8, ffn_dim=48, vocab_size=97, max_seq_len=64)


def _model(memory_type="ffn", multipliers=(3, 2, 1), branching=3, seed=0, **kw):
    torch.manual_seed(seed)
    return HierMemLM(CFG, MemoryConfig(type=memory_type, multipliers=multipliers, branching=branching, **kw))


def _batch(b=4, t=12, depth=3, branching=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (b, t), generator=g)
    paths = torch.randint(0, branching, (b, depth), generator=g)
    return tokens, paths


def _perturb_bank(model, scale=0.5, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.bank.levels) + list(model.bank.generic):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_memory_has_no_effect_at_init(memory_type):
    model = _model(memory_type)
    tokens, paths = _batch()
    plain = model(tokens)
    with_memory = model(tokens, paths=paths)
    generic = model(tokens, paths=paths, use_generic=torch.ones(4, dtype=torch.bool))
    assert torch.equal(plain, with_memory)
    assert torch.equal(plain, generic)


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_memory_changes_output_once_trained(memory_type):
    model = _model(memory_type)
    _perturb_bank(model)
    tokens, paths = _batch()
    assert not torch.allclose(model(tokens), model(tokens, paths=paths))


def test_ffn_memory_equals_wider_swiglu():
    model = _model("ffn", multipliers=(3, 2, 1))
    _perturb_bank(model)
    tokens, _ = _batch(b=2)
    path = torch.tensor([[1, 2, 0]])
    paths = path.expand(2, 3)
    fetched = model.bank.fetch(paths)
    extra = fetched.tensors["gate"].shape[2]
    wide = HierMemLM(CFG.replace(ffn_dim=CFG.ffn_dim + extra))
    state = model.anchor.state_dict()
    f = CFG.ffn_dim
    with torch.no_grad():
        for i, block in enumerate(wide.anchor.blocks):
            gate, up = state[f"blocks.{i}.ffn.w12.weight"].split(f)
            mem_gate, mem_up, mem_down = (fetched.tensors[n][i, 0] for n in ("gate", "up", "down"))
            state[f"blocks.{i}.ffn.w12.weight"] = torch.cat([gate, mem_gate, up, mem_up])
            state[f"blocks.{i}.ffn.w3.weight"] = torch.cat([state[f"blocks.{i}.ffn.w3.weight"], mem_down.T], dim=1)
    wide.anchor.load_state_dict(state)
    torch.testing.assert_close(model(tokens, paths=paths), wide(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_batched_fetch_equals_each_sequence_alone(memory_type):
    model = _model(memory_type)
    _perturb_bank(model)
    tokens, paths = _batch(b=5)
    use_generic = torch.tensor([False, True, False, False, True])
    batched = model(tokens, paths=paths, use_generic=use_generic)
    for i in range(5):
        alone = model(tokens[i:i + 1], paths=paths[i:i + 1], use_generic=use_generic[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_grouped_rows_share_their_memory_like_repeated_fetches(memory_type):
    """Rows i*g..i*g+g-1 against B fetched memories equal fetching memory i for each of them (the
    candidate scorer relies on it); a row count that is not a multiple is refused."""
    model = _model(memory_type)
    _perturb_bank(model)
    tokens, paths = _batch(b=6)
    blocked = torch.zeros(3, 3, dtype=torch.bool)
    blocked[1, 2] = True  # a blocked unit: the KV mask must follow the grouping too
    fetched = model.fetch(paths[:3], blocked=blocked)
    grouped = model.anchor(tokens, None, fetched)
    repeated = model(tokens, paths=paths[:3].repeat_interleave(2, dim=0), blocked=blocked.repeat_interleave(2, dim=0))
    torch.testing.assert_close(grouped, repeated, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot share"):
        model.anchor(tokens[:5], None, fetched)


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_blocked_blocks_contribute_nothing(memory_type):
    model = _model(memory_type, multipliers=(3, 2, 1))
    _perturb_bank(model)
    tokens, paths = _batch(b=3)
    paths[:] = torch.tensor([1, 2, 0])
    # blocking the whole path = the plain anchor
    model.bank.block([(1,)])
    torch.testing.assert_close(model(tokens, paths=paths), model(tokens), rtol=1e-6, atol=1e-6)
    model.bank.unblock_all()
    # blocking only the leaf = a bank whose leaf block is zero
    full = model(tokens, paths=paths)
    model.bank.block([(1, 2, 0)])
    blocked = model(tokens, paths=paths)
    model.bank.unblock_all()
    with torch.no_grad():
        node = 1 * 9 + 2 * 3 + 0
        saved = model.bank.levels[2][node].clone()
        model.bank.levels[2][node].zero_()
    if memory_type == "kv":  # a zero key still takes softmax mass, so compare against the mask instead
        per_seq = torch.zeros(3, 3, dtype=torch.bool)
        per_seq[:, 2] = True
        with torch.no_grad():
            model.bank.levels[2][node].copy_(saved)
        torch.testing.assert_close(blocked, model(tokens, paths=paths, blocked=per_seq))
    else:
        torch.testing.assert_close(blocked, model(tokens, paths=paths), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full, blocked)


def test_block_fraction_and_bad_prefix():
    model = _model()
    prefixes = model.bank.block_fraction(1 / 3, level=0, seed=0)
    assert len(prefixes) == 1
    assert int(model.bank.blocked_2.sum()) == 9
    with pytest.raises(ValueError, match="blocked path"):
        model.bank.block([(5,)])
    with pytest.raises(ValueError, match="paths"):
        model(torch.zeros(1, 4, dtype=torch.long), paths=torch.tensor([[0, 3, 0]]))
    with pytest.raises(ValueError, match="paths"):
        model(torch.zeros(1, 4, dtype=torch.long), paths=torch.tensor([[0, 1]]))


def test_document_restricted_attention():
    torch.manual_seed(0)
    model = HierMemLM(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (1, 10))
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    packed = model(tokens, segment_ids=segments)
    # each document alone gives the same logits: nothing crosses a boundary
    for start, end in ((0, 4), (4, 7), (7, 10)):
        alone = model(tokens[:, start:end])
        torch.testing.assert_close(packed[:, start:end], alone, rtol=1e-5, atol=1e-5)
    # and changing an earlier document does not move a later one
    other = tokens.clone()
    other[0, :4] = (other[0, :4] + 1) % CFG.vocab_size
    torch.testing.assert_close(model(other, segment_ids=segments)[:, 4:], packed[:, 4:])


def test_gradients_reach_only_fetched_blocks_and_generic():
    model = _model("ffn")
    _perturb_bank(model)
    tokens, _ = _batch(b=3)
    paths = torch.tensor([[0, 1, 2], [0, 1, 2], [2, 0, 1]])
    use_generic = torch.tensor([False, False, True])
    model(tokens, paths=paths, use_generic=use_generic).sum().backward()
    touched = {0: {0}, 1: {0 * 3 + 1}, 2: {0 * 9 + 1 * 3 + 2}}
    for level, p in enumerate(model.bank.levels):
        nonzero = set(torch.nonzero(p.grad.abs().sum(dim=1)).flatten().tolist())
        assert nonzero == touched[level], (level, nonzero)
    assert all(g.grad.abs().sum() > 0 for g in model.bank.generic)
    model.zero_grad(set_to_none=True)
    model(tokens, paths=paths).sum().backward()
    assert all(g.grad is None for g in model.bank.generic)


@pytest.mark.parametrize("memory_type", MEMORY_TYPES)
def test_kv_cache_decoding_equals_full_recompute(memory_type):
    from helpers import assert_cached_decoding_matches_recompute
    model = _model(memory_type)
    _perturb_bank(model)
    tokens, paths = _batch(b=3, t=7)
    segments = torch.tensor([[-1, -1, 0, 0, 0, 0, 0], [0] * 7, [-1, 0, 0, 0, 0, 0, 0]])  # left padding
    assert_cached_decoding_matches_recompute(model, tokens, segments, model.fetch(paths))
