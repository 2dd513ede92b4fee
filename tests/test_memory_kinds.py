"""Memory kinds registry and the one read rule (`MemoryBank.read_mask`) shared by fetch and optimizer."""

import itertools

import pytest
import torch

from hiermem.accounting import count
from hiermem.config import MEMORY_TYPES, MemoryConfig, ModelConfig
from hiermem.memory_kinds import MEMORY_KINDS, FFNMemory, MemoryKind, get_kind, register_kind
from hiermem.model import HierMemLM
from hiermem.optim import SparseBankAdamW

CFG = ModelConfig(d_model=16, n_layers=3, n_heads=2, head_dim=6, ffn_dim=40, vocab_size=31, max_seq_len=16)
D, F, A = CFG.d_model, CFG.ffn_dim, CFG.attn_dim
# per-unit widths per memory layer, written out by hand from the paper / the module docstring
HAND_WIDTH = {"ffn": 3 * D, "lora-ffn": 3 * D + 3 * F, "lora-qk": 2 * D + 2 * A, "lora-vo": 2 * D + 2 * A,
              "kv": 2 * A}


def test_registry_holds_exactly_the_five_kinds():
    assert list(MEMORY_KINDS) == ["ffn", "lora-ffn", "lora-qk", "lora-vo", "kv"]
    assert set(MEMORY_KINDS) == set(MEMORY_TYPES)  # what configs accept is what the registry knows
    for name, kind in MEMORY_KINDS.items():
        assert isinstance(kind, MemoryKind) and kind.name == name and get_kind(name) is kind
        assert get_kind(kind) is kind


@pytest.mark.parametrize("name", list(HAND_WIDTH))
@pytest.mark.parametrize("placement", ["uniform", "0,2"])
def test_specs_give_the_parameter_counts_of_accounting(name, placement):
    kind = get_kind(name)
    specs = kind.specs(CFG)
    assert sum(s.width for s in specs) == kind.unit_width(CFG) == HAND_WIDTH[name]
    mem = MemoryConfig(type=name, multipliers=(4, 2, 1), branching=3, placement=placement)
    n_mem_layers = 3 if placement == "uniform" else 2
    fetched = tuple(r * n_mem_layers * sum(s.width for s in specs) for r in mem.multipliers)
    acc = count(CFG, mem)
    assert acc.fetched_per_level == fetched
    assert acc.bank_per_level == tuple(3 ** (level + 1) * f for level, f in enumerate(fetched))
    # and the real bank holds tensors of exactly these widths
    torch.manual_seed(0)
    model = HierMemLM(CFG, mem)
    memory = model.fetch(torch.tensor([[0, 1, 2]]))
    assert {n: t.shape for n, t in memory.tensors.items()} == {
        s.name: (n_mem_layers, 1, sum(mem.multipliers), s.width) for s in specs}


def test_unknown_kind_is_refused_naming_it_and_the_choices():
    with pytest.raises(ValueError) as err:
        get_kind("lora-everything")
    message = str(err.value)
    assert "\n" not in message and "'lora-everything'" in message
    for name in MEMORY_KINDS:
        assert name in message


def test_register_kind_refuses_duplicates_and_bad_tensors():
    with pytest.raises(ValueError, match="already registered"):
        register_kind(FFNMemory("ffn", "again", (("gate", "d", "normal"),)))
    with pytest.raises(ValueError, match="dimension"):
        register_kind(FFNMemory("ffn-bad", "bad", (("gate", "x", "normal"),)))
    assert "ffn-bad" not in MEMORY_KINDS


def test_base_kind_hooks_leave_the_anchor_alone():
    kind = MemoryKind("none", "no memory", (("x", "d", "zeros"),))
    q, k, v, y = (torch.randn(2, 3, 4) for _ in range(4))
    assert kind.project_qkv(q, q, k, v, {}, 1.0) == (q, k, v)
    assert kind.attend(q, {}, None, 2, 2) is None
    assert kind.project_out(q, y, {}, 1.0) is y


# ----------------------------------------------------------------------------------- read rule
MEM = MemoryConfig(type="ffn", multipliers=(2, 1, 1), branching=3)
PATHS = torch.tensor([[0, 1, 2], [2, 0, 0], [0, 1, 0], [1, 1, 1], [2, 2, 1], [0, 0, 0]])
BANK_BLOCKED = [(2,), (0, 1, 0), (1, 1)]
USE_GENERIC = torch.tensor([False, False, False, True, False, False])
SEQ_BLOCKED = torch.tensor([[False] * 3, [False] * 3, [False] * 3, [False] * 3, [False] * 3, [False, True, False]])


def _bank_model(seed=0):
    torch.manual_seed(seed)
    model = HierMemLM(CFG, MEM)
    with torch.no_grad():
        for p in list(model.bank.levels) + list(model.bank.generic):
            p.add_(torch.randn_like(p) * 0.3)
    model.bank.block(BANK_BLOCKED)
    return model


def _brute_force_rows() -> list[set[int]]:
    """Per level, the nodes whose rows the batch reads, by walking each path by hand."""
    rows = [set() for _ in range(3)]
    for b, path in enumerate(PATHS.tolist()):
        for level in range(3):
            prefix = tuple(path[:level + 1])
            bank_blocked = any(prefix[:len(p)] == p for p in BANK_BLOCKED if len(p) <= level + 1)
            if bank_blocked or bool(SEQ_BLOCKED[b, level]) or bool(USE_GENERIC[b]):
                continue
            rows[level].add(sum(i * 3 ** (level - j) for j, i in enumerate(prefix)))
    return rows


def test_read_mask_agrees_with_brute_force_and_with_where_the_fetch_sends_gradients():
    model = _bank_model()
    bank = model.bank
    nodes = bank.node_indices(PATHS)
    read = bank.read_mask(nodes, USE_GENERIC, SEQ_BLOCKED)
    assert read.shape == (len(PATHS), 3) and read.dtype == torch.bool
    expected = _brute_force_rows()
    assert [set(nodes[read[:, level], level].tolist()) for level in range(3)] == expected
    # (0, 1, 0) is blocked bank-wide, (0, 1) is not: sequence 2 reads levels 1 and 2 only
    assert read[2].tolist() == [True, True, False]
    # the fetch reads exactly these rows: a gradient reaches them and no other row
    memory = bank.fetch(PATHS, use_generic=USE_GENERIC, blocked=SEQ_BLOCKED)
    g = torch.Generator().manual_seed(1)
    sum((t * torch.randn(t.shape, generator=g)).sum() for t in memory.tensors.values()).backward()
    for level, p in enumerate(bank.levels):
        assert set(torch.nonzero(p.grad.abs().sum(dim=1)).flatten().tolist()) == expected[level]


def test_read_mask_without_blocking_or_generic_reads_every_path():
    model = _bank_model()
    model.bank.unblock_all()
    nodes = model.bank.node_indices(PATHS)
    assert bool(model.bank.read_mask(nodes).all())


@pytest.mark.parametrize("semantics", ["lazy", "dense"])
def test_optimizer_updates_exactly_the_rows_read_mask_marks(semantics):
    model = _bank_model()
    bank = model.bank
    before = [p.detach().clone() for p in bank.levels]
    generic_before = [p.detach().clone() for p in bank.generic]
    opt = SparseBankAdamW(bank, lr=1e-2, weight_decay=0.1, semantics=semantics)
    expected = _brute_force_rows()
    active = opt.gather(PATHS, USE_GENERIC, SEQ_BLOCKED)
    assert [set(active[level].ids.tolist()) for level in range(3)] == expected
    tokens = torch.randint(0, CFG.vocab_size, (len(PATHS), 8), generator=torch.Generator().manual_seed(2))
    model(tokens, paths=PATHS, use_generic=USE_GENERIC, blocked=SEQ_BLOCKED, active=active).pow(2).mean().backward()
    assert opt.step(active) == sum(len(rows) for rows in expected)
    for level, p in enumerate(bank.levels):
        changed = (p.data != before[level]).any(dim=1)
        assert set(torch.nonzero(changed).flatten().tolist()) == expected[level]
        assert torch.equal(p.data[~changed], before[level][~changed])  # the rest bit-identical
    for p, b in zip(bank.generic, generic_before):
        assert torch.equal(p.data, b)  # the generic block is not the bank optimizer's
    assert opt.touched_blocks() == {level: len(rows) for level, rows in enumerate(expected)}


def test_every_kind_runs_through_its_hooks_and_starts_with_no_effect():
    tokens = torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    paths = torch.tensor([[0, 1, 2], [1, 1, 0]])
    for name in MEMORY_KINDS:
        torch.manual_seed(0)
        model = HierMemLM(CFG, MemoryConfig(type=name, multipliers=(2, 1, 1), branching=3))
        assert model.bank.kind is get_kind(name) and model.fetch(paths).kind is get_kind(name)
        assert torch.equal(model(tokens), model(tokens, paths=paths))
        with torch.no_grad():
            for p in model.bank.levels:
                p.add_(torch.randn_like(p) * 0.3)
        assert not torch.allclose(model(tokens), model(tokens, paths=paths))


def test_all_paths_of_a_tiny_tree_read_their_own_rows():
    """Every leaf path, unblocked: level-l row = the path's row-major prefix index, one per sequence."""
    model = _bank_model()
    model.bank.unblock_all()
    paths = torch.tensor(list(itertools.product(range(3), repeat=3)))
    nodes = model.bank.node_indices(paths)
    read = model.bank.read_mask(nodes)
    for level in range(3):
        assert sorted(set(nodes[read[:, level], level].tolist())) == list(range(3 ** (level + 1)))
