"""Embedders: interface, normalization, save/load, the on-disk embedding cache, bad names."""

import numpy as np
import pytest

from hiermem.embed import (Embedder, MiniLMEmbedder, StaticEmbedder, TfidfEmbedder, _require, embed_cached,
                           get_embedder, load_embedder)

TEXTS = [
    "Hydrogen is a chemical element; it has symbol H and atomic number 1.",
    "Helium is a chemical element; it has symbol He and atomic number 2.",
    "Paris is the capital and largest city of France.",
    "Berlin is the capital and largest city of Germany.",
    "The violin is a wooden string instrument in the violin family.",
]


@pytest.fixture(scope="session")
def fast():
    # distilled once per machine (~20 s) into the default cache, then loaded in ~0.1 s
    return get_embedder("fast")


def cos(a, b):
    return float(a @ b)


def check_unit_rows(e, n, dim):
    assert e.shape == (n, dim) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_fast_embedder_is_normalized_deterministic_and_topical(fast):
    assert isinstance(fast, StaticEmbedder) and fast.name == "fast" and fast.dim == 256
    e = fast.encode(TEXTS)
    check_unit_rows(e, len(TEXTS), fast.dim)
    np.testing.assert_array_equal(e, fast.encode(TEXTS))
    assert cos(e[0], e[1]) > cos(e[0], e[4]) and cos(e[2], e[3]) > cos(e[2], e[4])
    # empty text -> the documented fallback unit vector; empty list -> (0, dim)
    check_unit_rows(fast.encode(["", "   "]), 2, fast.dim)
    assert fast.encode([]).shape == (0, fast.dim)
    with pytest.raises(TypeError):
        fast.encode("a single string")


def test_fast_embedder_save_load_roundtrip(fast, tmp_path):
    fast.save(tmp_path / "emb")
    loaded = load_embedder(tmp_path / "emb")
    assert loaded.fingerprint() == fast.fingerprint()
    np.testing.assert_array_equal(loaded.encode(TEXTS), fast.encode(TEXTS))
    # a tampered artifact is detected by its fingerprint
    meta = (tmp_path / "emb" / "embedder.json")
    meta.write_text(meta.read_text().replace(fast.fingerprint(), "fast-0000"))
    with pytest.raises(ValueError, match="fingerprint"):
        load_embedder(tmp_path / "emb")
    with pytest.raises(FileNotFoundError):
        load_embedder(tmp_path / "nothing")


def test_tfidf_embedder_fit_save_load(tmp_path):
    corpus = TEXTS * 3 + ["Iron is a chemical element with symbol Fe.", "Rome is the capital of Italy."]
    emb = get_embedder("tfidf", fit_texts=corpus)
    assert isinstance(emb, TfidfEmbedder)
    e = emb.encode(TEXTS + ["zzzz qqqq"])  # no known term -> fallback unit vector
    check_unit_rows(e, len(TEXTS) + 1, emb.dim)
    assert cos(e[2], e[3]) > cos(e[2], e[4])
    emb.save(tmp_path / "tfidf")
    loaded = load_embedder(tmp_path / "tfidf")
    assert loaded.fingerprint() == emb.fingerprint()
    np.testing.assert_array_equal(loaded.encode(TEXTS), emb.encode(TEXTS))
    with pytest.raises(ValueError, match="fit_texts"):
        get_embedder("tfidf")


def test_unknown_embedder_and_missing_package_errors():
    with pytest.raises(ValueError, match="allowed: minilm, fast, tfidf"):
        get_embedder("bert-large")
    with pytest.raises(ImportError, match="no-such-package"):
        _require("no_such_module_hiermem", "no-such-package")


class CountingEmbedder(Embedder):
    name = "counting"
    dim = 3

    def __init__(self):
        self.calls = 0

    def encode(self, texts, batch_size=64, progress=False):
        self.calls += 1
        out = np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def fingerprint(self):
        return "counting-v1"

    def save(self, dir):
        return dir


def test_embed_cached_computes_once_per_corpus_and_embedder(tmp_path):
    emb = CountingEmbedder()
    first = embed_cached(emb, TEXTS, tmp_path, "wiki/small", progress=False)
    assert emb.calls == 1
    second = embed_cached(emb, TEXTS, tmp_path, "wiki/small", progress=False)
    assert emb.calls == 1  # cache hit: no recomputation
    np.testing.assert_array_equal(first, second)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    embed_cached(emb, TEXTS[:-1] + ["changed text"], tmp_path, "wiki/small", progress=False)
    assert emb.calls == 2  # different texts -> different key
    embed_cached(emb, TEXTS, tmp_path, "another-corpus", progress=False)
    assert emb.calls == 3
    # a corrupt cache file is recomputed, not trusted
    for f in tmp_path.glob("another-corpus*.npy"):
        f.write_bytes(b"garbage")
    np.testing.assert_array_equal(embed_cached(emb, TEXTS, tmp_path, "another-corpus", progress=False), first)
    assert emb.calls == 4


@pytest.mark.slow
def test_minilm_embedder():
    emb = get_embedder("minilm")
    assert isinstance(emb, MiniLMEmbedder) and emb.dim == 384
    e = emb.encode(TEXTS[:4])
    check_unit_rows(e, 4, 384)
    assert cos(e[0], e[1]) > 0.5 > cos(e[0], e[2])
    assert emb.fingerprint().startswith("minilm-") and emb.fingerprint() == MiniLMEmbedder().fingerprint()
