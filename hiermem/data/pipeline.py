"""The data pipeline: corpus -> tokenizer -> embeddings -> k-means tree -> routes -> packed sequences.

`build_data(DataConfig)` runs every stage that is not already on disk and returns a `DataBundle`.
Each stage lives in its own folder under `DataConfig.root`, named by a hash of exactly the settings
it depends on, so changing the sequence length re-packs but does not re-embed, and a corpus is
embedded once per embedder:

    root/corpus-<h>/   corpus.parquet, probes.parquet, facts.parquet, tokenizer.json (hiermem.data.corpus)
    root/tok-<h>/      tokens.npz: every document (train and heldout) encoded
    root/emb-<h>/      the fitted embedder and the document embeddings   (hiermem.embed)
    root/tree-<h>/     the hierarchical k-means tree and routes.npy      (hiermem.retriever)
    root/pack-<h>/     train_clustered.npz, train_plain.npz              (hiermem.data.packing)
    root/bundle-<h>.json   the manifest tying them together (config, stage folders, counts, provenance)

Every stage writes atomically; an interrupted build resumes at the first missing stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from hiermem.configbase import Config, added_field, require
from hiermem.data.corpus import CorpusConfig, build_corpus, corpus_tokenizer, load_corpus, load_facts, load_probes
from hiermem.data.packing import PackedSequences, pack_by_leaf, pack_plain
from hiermem.data.tokenizer import EOT_TOKEN, PAD_TOKEN, base_tokenizer_file, encode_batch, load_base_tokenizer
from hiermem.embed import Embedder, embed_cached, get_embedder, load_embedder
from hiermem.io import atomic_dir, atomic_path, atomic_write_json
from hiermem.kmeans import TreeConfig
from hiermem.provenance import provenance
from hiermem.scales import check
from hiermem.retriever import HierarchicalKMeans

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Everything that determines the training data of a run."""

    corpus: CorpusConfig = dataclasses.field(default_factory=lambda: CorpusConfig.preset("small"))
    root: str = "data"
    embedder: str = "fast"
    tree: TreeConfig = dataclasses.field(default_factory=lambda: TreeConfig(branching=16, depth=2))
    seq_len: int = 256
    min_leaf_sequences: int = 2  # a used leaf packing into fewer sequences is refused (tree too large)
    # a pretrained model's tokenizer.json (or its directory) to tokenize with instead of the corpus's own
    # BPE, so a Hugging Face base model reads the data in its vocabulary (hiermem.hf); "" = the corpus's
    tokenizer: str = added_field("")

    def validate(self) -> None:
        require(self.corpus.vocab_size > 0, "corpus.vocab_size", "a positive vocabulary size (the pipeline "
                "uses the tokenizer trained with the corpus)", self.corpus.vocab_size)
        require(self.seq_len >= 8, "seq_len", "an integer >= 8", self.seq_len)
        require(self.min_leaf_sequences >= 0, "min_leaf_sequences", "an integer >= 0", self.min_leaf_sequences)
        require(self.embedder in ("fast", "minilm", "tfidf"), "embedder", "'fast', 'minilm' or 'tfidf'",
                self.embedder)

    @classmethod
    def from_dict(cls, data: dict | None, _prefix: str = "") -> "DataConfig":
        """Also accepts `preset: <name>` (here or under `corpus:`) as a base that other keys override, and
        `regime: knowledge` beside it for the knowledge regime at that scale (`DataConfig.knowledge`)."""
        data = dict(data or {})
        regime = data.pop("regime", "plain")
        require(regime in REGIMES, _prefix + "regime", f"one of {list(REGIMES)}", regime)
        if regime != "plain":
            require("preset" in data, _prefix + "regime", "a `preset:` (scale) beside it", data)
        if "preset" in data:
            name = data.pop("preset")
            base = (cls.knowledge(name) if regime == "knowledge" else cls.preset(name)).to_dict()
            if isinstance(data.get("corpus"), dict):
                data["corpus"] = {**base["corpus"], **data["corpus"]}
            if isinstance(data.get("tree"), dict):
                data["tree"] = {**base["tree"], **data["tree"]}
            data = {**base, **data}
        return super().from_dict(data, _prefix)

    @classmethod
    def preset(cls, name: str, **overrides) -> "DataConfig":
        """Data presets matching the corpus presets, named by scale (`hiermem.scales`): smoke (tests),
        small (the CPU study: the demo's base, the CPU sweeps), full (every installed source)."""
        trees = {"smoke": TreeConfig(branching=4, depth=2), "small": TreeConfig(branching=16, depth=2),
                 "full": TreeConfig(branching=16, depth=3)}
        vocab = {"smoke": 1024, "small": 4096, "full": 8192}  # small vocabularies suit tiny anchors
        check(name, "data")
        base = dict(corpus=CorpusConfig.preset(name, vocab_size=vocab[name]), tree=trees[name],
                    seq_len=128 if name == "smoke" else 256)
        base.update(overrides)
        return cls(**base)


    @classmethod
    def knowledge(cls, scale: str, root: str = "data", embedder: str = "fast") -> "DataConfig":
        """The knowledge regime at a scale (smoke, small), over the data preset of that name: subject
        cards of real relations and a bioS world with log-uniform exposures, 40% of subjects also stated
        in the probe format, a validation split of probed subjects, an 8-ary (small) tree of depth 2
        balanced by tokens. Chosen by the pilots of configs/pilots/ on the validation split (README: "The
        knowledge regime and its pilots"); the demo and the study sweeps (`regime: knowledge`) use it."""
        check(scale, "knowledge")
        base = cls.preset(scale, root=root, embedder=embedder)
        if scale == "small":
            people, docs, subjects, cloze, exposures = 150, 150, 50, 300, (2, 64)
        else:
            people, docs, subjects, cloze, exposures = 60, 150, 12, 30, (1, 6)
        corpus = base.corpus.replace(
            fact_layout="subjects", synthetic_people=people, format_fraction=0.4, val_fraction=0.2,
            exposure_law="loguniform", min_exposures=exposures[0], max_exposures=exposures[1],
            max_facts_per_relation=subjects, max_docs_per_source=docs, max_windows_per_doc=1, cloze_probes=cloze,
            heldout_fraction=0.05, vocab_size=4096 if scale == "small" else base.corpus.vocab_size)
        tree = TreeConfig(branching=8 if scale == "small" else 4, depth=2, balance_by="tokens")
        return base.replace(corpus=corpus, tree=tree, seq_len=128)


REGIMES = ("plain", "knowledge")  # `regime:` in a data config: the preset as is, or DataConfig.knowledge


def _hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class DataBundle:
    """A built dataset: corpus, probes, tokenizer, embedder, tree, routes and packed sequences."""

    def __init__(self, cfg: DataConfig, dirs: dict[str, Path]):
        self.cfg, self.dirs = cfg, dirs

    def __getstate__(self) -> dict:
        """A bundle crosses process boundaries as its config and directories; tables load where it lands."""
        return {"cfg": self.cfg, "dirs": self.dirs}

    # -------------------------------------------------------------------------------- contents
    @cached_property
    def corpus(self) -> pd.DataFrame:
        corpus = load_corpus(self.dirs["corpus"])
        return corpus if isinstance(corpus, pd.DataFrame) else corpus.to_pandas()

    @cached_property
    def probes(self) -> pd.DataFrame:
        return load_probes(self.dirs["corpus"])

    @cached_property
    def facts(self) -> pd.DataFrame:
        return load_facts(self.dirs["corpus"])

    @cached_property
    def _special(self) -> tuple:
        """(tokenizer, end-of-text id, padding id): the corpus's own, or `cfg.tokenizer`'s."""
        if self.cfg.tokenizer:
            return load_base_tokenizer(self.cfg.tokenizer)
        tok = corpus_tokenizer(self.dirs["corpus"])
        return tok, tok.token_to_id(EOT_TOKEN), tok.token_to_id(PAD_TOKEN)

    @property
    def tokenizer(self):
        return self._special[0]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self._special[1]

    @property
    def pad_id(self) -> int:
        return self._special[2]

    @cached_property
    def doc_tokens(self) -> list[np.ndarray]:
        return _load_token_lists(self.dirs["tok"] / "tokens.npz")

    @cached_property
    def embedder(self) -> Embedder:
        return load_embedder(self.dirs["emb"] / "embedder")

    @cached_property
    def tree(self) -> HierarchicalKMeans:
        return HierarchicalKMeans.load(self.dirs["tree"] / "tree")

    @cached_property
    def doc_paths(self) -> np.ndarray:
        """(n_docs, depth) route of every corpus row (train and heldout), by its own text."""
        return np.load(self.dirs["tree"] / "routes.npy")

    @property
    def depth(self) -> int:
        return self.cfg.tree.depth

    @property
    def branching(self) -> int:
        return self.cfg.tree.branching

    def sequences(self, packing: str = "clustered") -> PackedSequences:
        require(packing in ("clustered", "plain"), "packing", "'clustered' or 'plain'", packing)
        return PackedSequences.load(self.dirs["pack"] / f"train_{packing}.npz")

    def route_texts(self, texts: list[str]) -> np.ndarray:
        """Route arbitrary text (prompts, documents) down the tree: (n, depth) int64."""
        if not texts:
            return np.zeros((0, self.depth), dtype=np.int64)
        return self.tree.route(self.embedder.encode(list(texts)))

    def fact_paths(self) -> dict[str, np.ndarray]:
        """fact_id -> (n_docs, depth) routes of that fact's training documents."""
        corpus = self.corpus
        rows = np.flatnonzero((corpus["fact_id"] != "").to_numpy())
        groups = corpus.iloc[rows].groupby("fact_id").indices
        return {fact: self.doc_paths[rows[idx]] for fact, idx in groups.items()}

    def manifest(self) -> dict:
        return json.loads(Path(self.dirs["manifest"]).read_text())


def _save_token_lists(path: Path, lists: list[np.ndarray]) -> None:
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    flat = np.concatenate(lists).astype(np.int32) if lists else np.zeros(0, np.int32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, flat=flat, lengths=lengths)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file handle: np.save would add ".npy" to a name
        np.save(f, array, allow_pickle=False)


def _load_token_lists(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        flat, lengths = data["flat"], data["lengths"]
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def check_leaf_sizes(packed: PackedSequences, cfg: DataConfig) -> None:
    """Refuse a tree too large for its corpus: a used leaf with fewer than `min_leaf_sequences`
    packed sequences would hardly ever train its memory block."""
    _, per_leaf = np.unique(packed.paths, axis=0, return_counts=True)
    if len(per_leaf) and per_leaf.min() < cfg.min_leaf_sequences:
        k, depth = cfg.tree.branching, cfg.tree.depth
        raise ValueError(
            f"tree too large for its corpus: k={k}, depth={depth} gives {k ** depth} leaves ({len(per_leaf)} used) for "
            f"{len(packed):,} sequences of {cfg.seq_len} tokens; the smallest leaf packs {per_leaf.min()} sequence(s) "
            f"(median {np.median(per_leaf):.0f}), below min_leaf_sequences={cfg.min_leaf_sequences}. Use a smaller "
            f"tree (fewer levels or a smaller branching), a larger corpus, or lower data.min_leaf_sequences")


def _file_digest(path: str) -> str:
    """SHA-256 of the base model's tokenizer.json, so a changed file is new data."""
    return hashlib.sha256(base_tokenizer_file(path).read_bytes()).hexdigest()


def build_data(cfg: DataConfig, progress: bool = True) -> DataBundle:
    """Build (or reuse) every stage of `cfg` and return the bundle."""
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    corpus_key = _hash("corpus", cfg.corpus.to_dict())
    tok_key = _hash(corpus_key, "tok") if not cfg.tokenizer else _hash(corpus_key, "tok", _file_digest(cfg.tokenizer))
    emb_key = _hash(corpus_key, "emb", cfg.embedder)
    tree_key = _hash(emb_key, tok_key, "tree", cfg.tree.to_dict())
    pack_key = _hash(tree_key, tok_key, "pack", cfg.seq_len)
    dirs = {"corpus": root / f"corpus-{corpus_key}", "tok": root / f"tok-{tok_key}", "emb": root / f"emb-{emb_key}",
            "tree": root / f"tree-{tree_key}", "pack": root / f"pack-{pack_key}",
            "manifest": root / f"bundle-{pack_key}.json"}
    bundle = DataBundle(cfg, dirs)

    start = time.perf_counter()
    build_corpus(cfg.corpus, dirs["corpus"], progress=progress)
    timings["corpus_s"] = time.perf_counter() - start
    corpus = bundle.corpus
    if len(corpus) == 0:
        raise ValueError(f"the corpus in {dirs['corpus']} is empty: check the sources of preset "
                         f"{cfg.corpus.preset!r}")
    train_texts = corpus.loc[corpus["split"] == "train", "text"].tolist()

    start = time.perf_counter()
    if not (dirs["tok"] / "tokens.npz").exists():
        with atomic_dir(dirs["tok"]) as tmp:
            tokens = encode_batch(bundle.tokenizer, corpus["text"].tolist())
            empty = [corpus["doc_id"].iloc[i] for i, t in enumerate(tokens) if len(t) == 0]
            if empty:
                raise ValueError(f"{len(empty)} documents have no tokens (first: {empty[:3]}); the corpus "
                                 f"builder must drop empty documents")
            _save_token_lists(tmp / "tokens.npz", tokens)
    timings["tokenize_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if not (dirs["emb"] / "embeddings.npy").exists():
        with atomic_dir(dirs["emb"]) as tmp:
            embedder = get_embedder(cfg.embedder, fit_texts=train_texts, cache_dir=root / "cache")
            embedder.save(tmp / "embedder")
            vectors = embed_cached(embedder, corpus["text"].tolist(), root / "cache", corpus_key, progress=progress)
            _save_npy(tmp / "embeddings.npy", vectors.astype(np.float32))
    timings["embed_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if not (dirs["tree"] / "routes.npy").exists():
        vectors = np.load(dirs["emb"] / "embeddings.npy", mmap_mode="r")
        is_train = (corpus["split"] == "train").to_numpy()
        weights = np.array([len(t) + 1 for t in bundle.doc_tokens], dtype=np.float64)[is_train]  # + EOT
        with atomic_dir(dirs["tree"]) as tmp:
            tree = HierarchicalKMeans.build(np.ascontiguousarray(vectors[is_train]), cfg.tree, progress=progress,
                                            weights=weights)
            tree.save(tmp / "tree")
            _save_npy(tmp / "routes.npy", tree.route(np.ascontiguousarray(vectors)))
    timings["tree_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if not (dirs["pack"] / "train_plain.npz").exists():
        is_train = np.flatnonzero((corpus["split"] == "train").to_numpy())
        tokens = bundle.doc_tokens
        train_tokens = [tokens[i] for i in is_train]
        paths = bundle.doc_paths[is_train]
        seed = cfg.corpus.seed
        clustered = pack_by_leaf(train_tokens, paths, cfg.seq_len, bundle.eot_id, bundle.pad_id, seed)
        check_leaf_sizes(clustered, cfg)
        with atomic_dir(dirs["pack"]) as tmp:
            clustered.save(tmp / "train_clustered.npz")
            pack_plain(train_tokens, cfg.seq_len, bundle.eot_id, bundle.pad_id, seed, depth=cfg.tree.depth).save(
                tmp / "train_plain.npz")
    timings["pack_s"] = time.perf_counter() - start

    if not dirs["manifest"].exists():
        clustered = bundle.sequences("clustered")
        counts = corpus.groupby(["source", "split"]).size().reset_index(name="docs")
        atomic_write_json(dirs["manifest"], {
            "config": cfg.to_dict(), "dirs": {k: str(v) for k, v in dirs.items()},
            "docs": int(len(corpus)), "train_tokens": int(sum(len(t) + 1 for t, s in
                                                                zip(bundle.doc_tokens, corpus["split"]) if s == "train")),
            "sequences": int(len(clustered)), "vocab_size": bundle.vocab_size, "probes": int(len(bundle.probes)),
            "docs_by_source_split": counts.to_dict(orient="records"), "build_timings_s": timings,
            "provenance": provenance()})
    return bundle
