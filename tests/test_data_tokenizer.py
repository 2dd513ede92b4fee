"""Byte-level BPE: exact round trip, single-digit tokens, special ids, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from hiermem.data.tokenizer import (EOT_ID, EOT_TOKEN, PAD_ID, PAD_TOKEN, decode, encode_batch,
                                    load_tokenizer, train_tokenizer)

TEXTS = [
    "Technetium is a chemical element with atomic number 43. It was discovered in 1937.",
    "Oganesson has the atomic number 118; its symbol is Og.",
    "Paris is the capital of France, and 2,165,423 people lived there in 2019.",
    "Ünïcödé text: 東京, Zürich, Kraków — and emoji 🙂 are bytes too.",
    "  leading spaces, tabs\tand\nnew lines\n\n are kept exactly.  ",
] * 20


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TEXTS, 400, path)
    return path


def test_save_load_round_trip_is_exact(tok_path):
    tok = load_tokenizer(tok_path)
    probes = TEXTS[:5] + ["", " 43", "x" * 500, "New text with unseen words: quixotic zephyr 9876."]
    ids = encode_batch(tok, probes)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.int32 for a in ids)
    assert [decode(tok, a) for a in ids] == probes
    assert len(ids[probes.index("")]) == 0


def test_digits_are_split_individually(tok_path):
    tok = load_tokenizer(tok_path)
    for number in ("43", "118", "2165423", "1937"):
        pieces = [tok.id_to_token(int(i)) for i in encode_batch(tok, [number])[0]]
        assert pieces == list(number)
    # the same digits inside a sentence are the same single-digit tokens
    sentence = encode_batch(tok, ["atomic number 43."])[0]
    digit_ids = [int(i) for i in sentence if tok.id_to_token(int(i)) in "0123456789"]
    assert digit_ids == [tok.token_to_id("4"), tok.token_to_id("3")]


def test_special_tokens_have_fixed_ids_and_never_come_from_text(tok_path):
    tok = load_tokenizer(tok_path)
    assert tok.token_to_id(EOT_TOKEN) == EOT_ID == 0
    assert tok.token_to_id(PAD_TOKEN) == PAD_ID == 1
    text = f"a literal {EOT_TOKEN} and {PAD_TOKEN} in text"
    ids = encode_batch(tok, [text])[0]
    assert EOT_ID not in ids and PAD_ID not in ids and decode(tok, ids) == text


def test_training_is_deterministic(tmp_path, tok_path):
    again = tmp_path / "again.json"
    train_tokenizer(list(TEXTS), 400, again)
    assert again.read_text() == tok_path.read_text()


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no text to train on"):
        train_tokenizer(["", ""], 400, tmp_path / "t.json")
    with pytest.raises(ValueError, match="no text to train on"):
        train_tokenizer([], 400, tmp_path / "t.json")
    with pytest.raises(ValueError, match="text #1 cannot be encoded as UTF-8"):
        train_tokenizer(["fine", "bad \ud800 surrogate"], 400, tmp_path / "t.json")
    with pytest.raises(TypeError, match="text #0 is bytes"):
        train_tokenizer([b"bytes"], 400, tmp_path / "t.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, 100, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "corrupt.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        load_tokenizer(tmp_path / "corrupt.json")


def _hf_tokenizer_dir(folder, texts, eos="</s>", config=True):
    """A Hugging Face-style model folder: tokenizer.json (a BPE with `eos` as a special token) and,
    optionally, tokenizer_config.json naming it."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", eos],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos}}))
    return folder


def test_a_pretrained_models_tokenizer_reads_the_corpus(smoke_data_config, tmp_path):
    """DataConfig.tokenizer: the corpus tokenized in a base model's vocabulary, its end-of-text token between
    packed documents and as padding; the field left out of the config dict at its default, so no earlier
    run id changes. Bugs caught: the corpus's own BPE still used, the old EOT id (0) packed between
    documents, a cached tokenization of the other tokenizer reused, run ids changed by the new field."""
    from hiermem.data.pipeline import DataConfig, build_data
    from hiermem.data.tokenizer import load_base_tokenizer
    base = build_data(smoke_data_config, progress=False)
    texts = base.corpus["text"].tolist()
    folder = _hf_tokenizer_dir(tmp_path / "base-model", texts)
    tok, eot, pad = load_base_tokenizer(folder)
    assert eot == tok.token_to_id("</s>") == 1 and pad == eot
    assert "tokenizer" not in smoke_data_config.to_dict()
    cfg = smoke_data_config.replace(tokenizer=str(folder))
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    data = build_data(cfg, progress=False)
    assert data.vocab_size == tok.get_vocab_size() != base.vocab_size and data.eot_id == eot and data.pad_id == eot
    assert data.dirs["tok"] != base.dirs["tok"] and data.dirs["corpus"] == base.dirs["corpus"]
    np.testing.assert_array_equal(data.doc_tokens[0], tok.encode(texts[0]).ids)
    packed = data.sequences("clustered")
    tokens, segments = np.asarray(packed.tokens), np.asarray(packed.segment_ids)
    boundary = (segments[:, 1:] != segments[:, :-1]) & (segments[:, 1:] >= 0)
    assert boundary.any() and (tokens[:, :-1][boundary] == eot).all()  # EOT closes each document
    # the eos name comes from tokenizer_config.json; without it, the known names are tried
    other = _hf_tokenizer_dir(tmp_path / "llama-like", texts[:50], eos="<|end_of_text|>", config=False)
    assert load_base_tokenizer(other / "tokenizer.json")[1] == 1
    with pytest.raises(FileNotFoundError, match="invalid config field 'tokenizer'"):
        build_data(smoke_data_config.replace(tokenizer=str(tmp_path / "nowhere")), progress=False)
