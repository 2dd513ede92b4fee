"""Cluster packing: leaves never mix, segments mark every document, loader resumes exactly."""

from collections import Counter

import numpy as np
import pytest
import torch

from hiermem.data.packing import PackedSequences, SequenceLoader, pack_by_leaf, pack_plain
from hiermem.masks import document_attention_mask, loss_mask

EOT, PAD, T = 1, 0, 16


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    n = 300
    lengths = rng.integers(0, 12, size=n)
    lengths[:5] = [15, 16, 17, 40, 33]  # around and over T (with EOT)
    docs = [rng.integers(2, 1000, size=m).astype(np.int32) for m in lengths]
    paths = rng.integers(0, 3, size=(n, 2))
    return docs, paths


def reassemble(packed):
    """Document -> its tokens, read back piece by piece in sequence order of the pieces' offsets."""
    pieces = {}
    for s in range(len(packed)):
        seg, doc, tok = packed.segment_ids[s], packed.doc_index[s], packed.tokens[s]
        for g in np.unique(seg[seg >= 0]):
            where = np.flatnonzero(seg == g)
            assert (np.diff(where) == 1).all(), "a segment must be contiguous"
            assert len(np.unique(doc[where])) == 1, "a segment holds one document"
            pieces.setdefault(int(doc[where[0]]), []).append(tok[where])
    return pieces


def check_layout(packed, docs):
    seg = packed.segment_ids
    # segments are numbered 0, 1, 2, ... in order, padding (-1) only at the end, pad tokens there
    for row in seg:
        used = row[row >= 0]
        assert (np.diff(used) >= 0).all() and (np.unique(used) == np.arange(len(np.unique(used)))).all()
        if (row < 0).any():
            assert (row[np.argmax(row < 0):] < 0).all()
    assert (packed.tokens[seg < 0] == PAD).all() and (packed.doc_index[seg < 0] == -1).all()
    # a boundary between two segments is exactly where the document changes
    same_seg = seg[:, 1:] == seg[:, :-1]
    same_doc = packed.doc_index[:, 1:] == packed.doc_index[:, :-1]
    assert (same_seg == same_doc).all()
    pieces = reassemble(packed)
    assert sorted(pieces) == list(range(len(docs)))
    for i, d in enumerate(docs):
        parts = pieces[i]
        # pieces in a split document: full T-token pieces, then the remainder ending in EOT
        parts.sort(key=lambda p: (len(p) != T, 0))
        whole = np.concatenate(parts)
        if len(d) + 1 <= T:
            assert len(parts) == 1, "a document that fits is never cut"
        np.testing.assert_array_equal(np.sort(whole), np.sort(np.append(d, EOT)))
        if len(parts) == 1:
            np.testing.assert_array_equal(whole, np.append(d, EOT))


def test_pack_by_leaf_never_mixes_leaves(corpus):
    docs, paths = corpus
    packed = pack_by_leaf(docs, paths, T, EOT, PAD, seed=0)
    assert packed.tokens.shape[1] == T and packed.paths.shape == (len(packed), 2)
    assert packed.tokens.dtype == np.int32 and packed.segment_ids.dtype == np.int32 and packed.paths.dtype == np.int64
    for s in range(len(packed)):
        used = packed.doc_index[s][packed.doc_index[s] >= 0]
        np.testing.assert_array_equal(paths[used], np.broadcast_to(packed.paths[s], (len(used), 2)))
    check_layout(packed, docs)
    assert packed.fill_rate > 0.8


def test_pack_plain_and_shuffle(corpus):
    docs, _ = corpus
    plain = pack_plain(docs, T, EOT, PAD, seed=1, depth=3)
    assert (plain.paths == -1).all() and plain.paths.shape == (len(plain), 3)
    check_layout(plain, docs)
    again = pack_plain(docs, T, EOT, PAD, seed=1, depth=3)
    np.testing.assert_array_equal(plain.tokens, again.tokens)
    other = pack_plain(docs, T, EOT, PAD, seed=2, depth=3)
    assert not np.array_equal(plain.tokens, other.tokens)


def test_bad_packing_input(corpus):
    docs, paths = corpus
    with pytest.raises(ValueError, match="paths"):
        pack_by_leaf(docs, paths[:10], T, EOT, PAD, 0)
    with pytest.raises(ValueError, match="no documents"):
        pack_plain([], T, EOT, PAD, 0)
    with pytest.raises(ValueError, match="negative"):
        pack_by_leaf(docs, -np.ones_like(paths), T, EOT, PAD, 0)
    with pytest.raises(ValueError, match="integers"):
        pack_plain([np.array([0.5, 1.5])], T, EOT, PAD, 0)


def test_save_load_roundtrip(corpus, tmp_path):
    packed = pack_by_leaf(*corpus, T, EOT, PAD, seed=0)
    loaded = PackedSequences.load(packed.save(tmp_path / "p.npz"))
    for f in ("tokens", "segment_ids", "paths", "doc_index"):
        np.testing.assert_array_equal(getattr(loaded, f), getattr(packed, f))


def test_loss_and_attention_masks():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    np.testing.assert_array_equal(loss_mask(seg).numpy(), [[True, True, False, True, False, False]])
    att = document_attention_mask(seg)[0]
    assert att[2, 0] and not att[0, 2]          # causal
    assert not att[3, 2] and att[4, 3]          # no attention across documents
    assert att[5, 5] and not att[5, 4]          # padding only sees itself


def test_loader_batches_epochs_and_exact_resume(corpus):
    packed = pack_by_leaf(*corpus, T, EOT, PAD, seed=0)
    loader = SequenceLoader(packed, batch_size=8, seed=3)
    assert loader.batches_per_epoch == len(packed) // 8
    tokens, segs, paths = next(loader)
    assert tokens.shape == (8, T) and tokens.dtype == torch.int64
    assert segs.shape == (8, T) and paths.shape == (8, 2) and paths.dtype == torch.int64
    # one epoch visits distinct sequences; the next epoch uses another permutation
    loader = SequenceLoader(packed, batch_size=8, seed=3)
    seen = [next(loader)[0] for _ in range(loader.batches_per_epoch)]
    drawn = Counter(tuple(r) for b in seen for r in b.tolist())
    available = Counter(tuple(r) for r in packed.tokens.tolist())
    assert sum(drawn.values()) == 8 * loader.batches_per_epoch
    assert all(drawn[r] <= available[r] for r in drawn)  # no sequence twice within an epoch
    nxt = next(loader)
    assert loader.epoch == 1 and not torch.equal(nxt[0], seen[0])
    # resume: state after 5 batches reproduces the continuation exactly
    a = SequenceLoader(packed, batch_size=8, seed=3)
    for _ in range(loader.batches_per_epoch + 5):
        next(a)
    state = a.state_dict()
    cont = [next(a) for _ in range(4)]
    b = SequenceLoader(packed, batch_size=8, seed=3)
    b.load_state_dict(state)
    for x, y in zip(cont, (next(b) for _ in range(4))):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    with pytest.raises(ValueError, match="batch_size"):
        SequenceLoader(packed, batch_size=4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill"):
        SequenceLoader(packed, batch_size=len(packed) + 1, seed=0)
    last = SequenceLoader(packed, batch_size=len(packed) - 1, seed=0, drop_last=False)
    assert last.batches_per_epoch == 2 and len(next(last)[0]) == len(packed) - 1 and len(next(last)[0]) == 1


def test_block_updates_replay_the_loader():
    """Expected updates per block equal a count over the real SequenceLoader's batches; with a generic
    probability p a block with m sequences in a batch counts 1 - p^m."""
    import numpy as np
    from hiermem.data.packing import PackedSequences, SequenceLoader, block_updates

    rng = np.random.default_rng(0)
    n, k = 37, 3
    paths = rng.integers(0, k, size=(n, 2))
    packed = PackedSequences(tokens=np.zeros((n, 4), np.int32), segment_ids=np.zeros((n, 4), np.int32),
                             paths=paths, doc_index=np.zeros((n, 4), np.int32))
    steps, batch = 11, 5
    plain = block_updates(packed, k, batch, steps, seed=3)
    generic = block_updates(packed, k, batch, steps, seed=3, generic_prob=0.5)
    counts = [np.zeros(k), np.zeros(k * k)]
    weighted = [np.zeros(k), np.zeros(k * k)]
    loader = iter(SequenceLoader(packed, batch, seed=3))
    for _ in range(steps):
        _, _, p = next(loader)
        p = p.numpy()
        for level, flat in enumerate((p[:, 0], p[:, 0] * k + p[:, 1])):
            nodes, m = np.unique(flat, return_counts=True)
            counts[level][nodes] += 1
            weighted[level][nodes] += 1 - 0.5 ** m
    for level in range(2):
        np.testing.assert_array_equal(plain[level]["updates"], counts[level])
        np.testing.assert_allclose(generic[level]["updates"], weighted[level])
    assert plain[1]["sequences"].sum() == n
