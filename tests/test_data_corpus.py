"""Corpus builder on the smoke preset: determinism, exact fact exposures, probes, splits, reuse."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from hiermem.data import sources
from hiermem.data.corpus import (CORPUS_COLUMNS, CorpusConfig, build_corpus, corpus_tokenizer,
                                 is_built, load_corpus, load_facts, load_manifest, load_probes)
from hiermem.data.facts import RELATIONS
from hiermem.data.probes import PROBE_COLUMNS
from hiermem.data.synthetic import BIO_RELATIONS
from hiermem.data.tokenizer import decode, encode_batch

SMOKE = CorpusConfig.preset("smoke")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    return build_corpus(SMOKE, tmp_path_factory.mktemp("smoke"), progress=False)


@pytest.fixture(scope="module")
def corpus(smoke_dir):
    return load_corpus(smoke_dir).to_pandas()


@pytest.fixture(scope="module")
def probes(smoke_dir):
    return load_probes(smoke_dir)


@pytest.fixture(scope="module")
def facts(smoke_dir):
    return load_facts(smoke_dir)


def test_schema_and_ids(corpus, probes, smoke_dir):
    assert list(corpus.columns) == list(CORPUS_COLUMNS)
    assert list(probes.columns) == list(PROBE_COLUMNS)
    assert corpus["doc_id"].is_unique and probes["probe_id"].is_unique
    assert all(d.startswith(f"{s}:") for d, s in zip(corpus["doc_id"], corpus["source"]))
    assert set(corpus["split"]) == {"train", "heldout"}
    assert (corpus["text"].str.strip().str.len() > 0).all()
    assert not corpus["text"].str.contains("<|endoftext|>", regex=False).any()
    assert set(probes["group"]) == {"SK", "CK"}
    # the smoke preset is small: about a thousand real windows plus the fact documents
    real = corpus[corpus["fact_id"] == ""]
    assert 500 <= len(real) <= 1500 and len(corpus) - len(real) > 300
    assert len(load_corpus(smoke_dir, split="heldout")) == (corpus["split"] == "heldout").sum()


def test_windows_are_bounded_and_cover_whole_documents(corpus):
    real = corpus[corpus["fact_id"] == ""]
    assert real["text"].str.len().max() <= SMOKE.window_chars
    assert (real["chunk"] > 0).any()  # long Factbook sections were windowed
    # every window of a source document shares its parent and its split
    per_parent = real.groupby("parent_id").agg(splits=("split", "nunique"), n=("chunk", "size"),
                                               top=("chunk", "max"))
    assert (per_parent["splits"] == 1).all() and (per_parent["top"] == per_parent["n"] - 1).all()


def test_every_fact_has_exactly_its_exposures(corpus, facts):
    fact_docs = corpus[corpus["fact_id"] != ""]
    assert (fact_docs["split"] == "train").all()
    by_fact = fact_docs.groupby("fact_id")["text"].apply(list).to_dict()
    for row in facts.itertuples():
        texts = by_fact.get(row.fact_id, [])
        assert len(texts) == row.exposures, row.fact_id
        assert all(row.answer in t for t in texts), (row.fact_id, row.answer)
    assert set(by_fact) == set(facts["fact_id"])


def test_probes_match_facts_and_use_heldout_templates(corpus, probes, facts):
    fact_probes = probes[probes["relation"] != "cloze"]
    merged = fact_probes.merge(facts, on=["fact_id", "relation"], suffixes=("", "_fact"))
    assert len(merged) == len(fact_probes) == len(facts)
    for col in ("subject", "answer", "exposures", "bucket", "group", "measured_count"):
        assert (merged[col] == merged[f"{col}_fact"]).all(), col
    fact_texts = corpus.loc[corpus["fact_id"] != "", "text"]
    templates = {**RELATIONS, **BIO_RELATIONS}
    for rel, group in fact_probes.groupby("relation"):
        stem = templates[rel].probe_template.replace("{subject}", "").strip()
        assert not fact_texts.str.contains(stem, regex=False).any(), rel
        assert all(not p.endswith(" ") and p for p in group["prompt"])


def test_atomic_numbers_cover_all_elements(probes):
    atomic = probes[probes["relation"] == "atomic_number"]
    assert len(atomic) == 118
    assert sorted(atomic["answer"].astype(int)) == list(range(1, 119))
    tc = atomic[atomic["subject"] == "Technetium"].iloc[0]
    assert tc["prompt"] == "The atomic number of Technetium is" and tc["answer"] == "43"


def test_buckets_and_groups_follow_the_documented_rule(probes):
    b = SMOKE.buckets
    fact_probes = probes[probes["relation"] != "cloze"]
    assert all(b.label(e) == lab for e, lab in zip(fact_probes["exposures"], fact_probes["bucket"]))
    expected = ["CK" if lab == b.top_label else "SK" for lab in fact_probes["bucket"]]
    assert list(fact_probes["group"]) == expected
    assert {"b0-rarest", b.top_label} <= set(fact_probes["bucket"])
    assert fact_probes["exposures"].between(SMOKE.min_exposures, SMOKE.max_exposures).all()
    cloze = probes[probes["relation"] == "cloze"]
    assert (cloze["group"] == "CK").all() and (cloze["exposures"] == 0).all()


def test_measured_counts_are_whole_word_counts_in_train(corpus, probes):
    train = "\n".join(corpus.loc[corpus["split"] == "train", "text"])
    for row in probes[probes["relation"] == "atomic_number"].head(30).itertuples():
        expected = len(re.findall(rf"(?<!\w){re.escape(row.subject)}(?!\w)", train, re.IGNORECASE))
        assert row.measured_count == expected, row.subject
        assert row.measured_count >= row.exposures


def test_cloze_probes_come_from_heldout_prose(corpus, probes):
    cloze = probes[probes["relation"] == "cloze"]
    assert len(cloze) == SMOKE.cloze_probes
    docs = corpus.set_index("doc_id")
    for row in cloze.itertuples():
        doc = docs.loc[row.source_doc_id]
        assert doc["split"] == "heldout" and row.source == doc["source"]
        assert re.search(re.escape(row.prompt) + r"\s+" + re.escape(row.answer), doc["text"])


def test_heldout_covers_every_real_source(corpus, smoke_dir):
    heldout = corpus[corpus["split"] == "heldout"]
    assert set(heldout["source"]) == {"wiki", "factbook"}
    manifest = load_manifest(smoke_dir)
    assert manifest["counts"]["per_source"]["wiki"]["heldout"]["docs"] == (heldout["source"] == "wiki").sum()
    assert manifest["source_kinds"]["wiki"] == "encyclopedic"


def test_same_seed_identical_other_seed_different(tmp_path, smoke_dir, corpus, probes):
    again = build_corpus(SMOKE, tmp_path / "again", progress=False)
    c2, p2 = load_corpus(again).to_pandas(), load_probes(again)
    pd.testing.assert_frame_equal(corpus, c2)
    pd.testing.assert_frame_equal(probes, p2)
    assert (again / "tokenizer.json").read_text() == (smoke_dir / "tokenizer.json").read_text()
    other = build_corpus(SMOKE.replace(seed=1), tmp_path / "seed1", progress=False)
    p3 = load_probes(other)
    joined = probes.merge(p3, on="probe_id", suffixes=("", "_1"))
    atomic = joined[joined["relation"] == "atomic_number"]
    assert len(atomic) == 118 and (atomic["exposures"] != atomic["exposures_1"]).any()


def test_reuse_and_rebuild(tmp_path, smoke_dir):
    parquet = smoke_dir / "corpus.parquet"
    before = parquet.stat().st_mtime_ns
    assert is_built(smoke_dir, SMOKE)
    assert build_corpus(SMOKE, smoke_dir, progress=False) == smoke_dir
    assert parquet.stat().st_mtime_ns == before  # reused, not rewritten
    assert not is_built(smoke_dir, SMOKE.replace(cloze_probes=3))


def test_tokenizer_saved_with_the_corpus(smoke_dir, corpus):
    tok = corpus_tokenizer(smoke_dir)
    texts = corpus["text"].head(50).tolist()
    assert [decode(tok, ids) for ids in encode_batch(tok, texts)] == texts
    assert load_manifest(smoke_dir)["tokenizer"]["vocab_size"] == SMOKE.vocab_size


def test_text_dir_source_and_skipped_optional_source(tmp_path, monkeypatch, caplog):
    prose = tmp_path / "prose"
    prose.mkdir()
    for i in range(6):
        (prose / f"story{i}.txt").write_text(
            f"Story {i}. The sailor walked to the harbour every morning. " * 20, encoding="utf-8")
    monkeypatch.setattr(sources, "_deb_roots", lambda: [tmp_path / "no-debs"])
    cfg = CorpusConfig.preset("smoke", sources=(f"text:{prose}", "gcide?"), heldout_fraction=0.34,
                              fact_relations=("state_capital",), synthetic_people=0, cloze_probes=4,
                              vocab_size=0)
    with caplog.at_level("WARNING"):
        out = build_corpus(cfg, tmp_path / "out", progress=False)
    assert "dict-gcide" in caplog.text
    manifest = load_manifest(out)
    assert manifest["skipped_sources"] == ["gcide?"]
    corpus = load_corpus(out).to_pandas()
    assert set(corpus["source"]) == {"text:prose", "facts"}
    assert set(corpus.loc[corpus["split"] == "heldout", "source"]) == {"text:prose"}
    assert (load_probes(out)["relation"] == "cloze").sum() == 4
    assert not (out / "tokenizer.json").exists() and is_built(out, cfg)
    with pytest.raises(FileNotFoundError, match="vocab_size=0"):
        corpus_tokenizer(out)


def test_bad_inputs_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="corpus is empty"):
        build_corpus(CorpusConfig.preset("smoke", sources=(), fact_relations=(),
                                         synthetic_people=0), tmp_path / "empty", progress=False)
    monkeypatch.setattr(sources, "_deb_roots", lambda: [tmp_path / "no-debs"])
    with pytest.raises(sources.MissingSourceError, match="apt-get install wordnet-base"):
        build_corpus(CorpusConfig.preset("smoke", sources=("wordnet",)), tmp_path / "wn",
                     progress=False)
    bad = tmp_path / "latin1"
    bad.mkdir()
    (bad / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(sources.SourceFormatError, match=r"a\.txt.*not valid UTF-8"):
        build_corpus(CorpusConfig.preset("smoke", sources=(f"text:{bad}",)), tmp_path / "b",
                     progress=False)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(sources.SourceFormatError, match="no non-empty documents"):
        build_corpus(CorpusConfig.preset("smoke", sources=(f"text:{blank}",)), tmp_path / "c",
                     progress=False)
    with pytest.raises(FileNotFoundError, match="no corpus"):
        load_probes(tmp_path / "nothing-here")
    assert not (tmp_path / "b" / "corpus_manifest.json").exists()


def test_config_presets_validation_and_yaml():
    assert SMOKE.preset == "smoke" and SMOKE.max_exposures == 8
    assert CorpusConfig.from_dict({"preset": "smoke", "seed": 3}) == SMOKE.replace(seed=3)
    assert CorpusConfig.from_yaml(SMOKE.to_yaml()) == SMOKE
    assert CorpusConfig().preset == "small" and CorpusConfig.preset("full").vocab_size == 16384
    assert "gcide?" in CorpusConfig.preset("full").sources
    for bad, field in [({"n_buckets": 1}, "n_buckets"), ({"sources": ["nope"]}, "sources"),
                       ({"min_exposures": 99}, "min_exposures"), ({"seed": -1}, "seed"),
                       ({"fact_relations": ["mass"]}, "fact_relations"),
                       ({"preset": "huge"}, "preset"), ({"vocab": 3}, "vocab")]:
        with pytest.raises(ValueError, match=field):
            CorpusConfig.from_dict(bad)
    with pytest.raises(ValueError, match="window"):
        CorpusConfig.preset("smoke", windows=3)
