"""The vanilla RAG baseline of the paper (App. H, Table 3): one retrieved document before the prompt.

A probe is routed by its prompt (as for memory); the **nearest training document inside its routed
cluster** (the leaf; cosine similarity of the router's embeddings, no reranking) is prepended to the
prompt, in the same attention document, and the model answers from there. Evaluation modes
(`hiermem.modes`): `rag` (no memory) and `rag+fetched` (the retrieved document and the fetched memory
of the routed path). Only training documents are retrieved, so a probe never sees its own held-out
template or a held-out source document (cloze probes come from those).

Cost. What RAG adds is context: an answer reads (document + prompt + answer) tokens instead of
(prompt + answer), so its forward FLOPs grow by that ratio (`flops_ratio`), where a fetched memory
multiplies the anchor's FLOPs per token by 1 + fetched / anchor forward FLOPs (`memory_flops_ratio`);
the paper reports x1.7-2.3 for RAG against x1.1 for memory. `hiermem eval` writes both per probe
(`flops_x`) and their mean per mode in the summary.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RAG_MODES = ("rag", "rag+fetched")


def is_rag_mode(mode: str) -> bool:
    return mode in RAG_MODES


@dataclasses.dataclass
class Retrieved:
    """Per probe: the corpus row of its retrieved document (-1: the cluster has no training document)
    and the document's tokens as prepended."""

    doc_row: np.ndarray
    doc_tokens: list[list[int]]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieve(data, prompt_vectors: np.ndarray, routed: np.ndarray) -> Retrieved:
    """The nearest training document of each prompt's routed leaf (see the module docstring)."""
    corpus = data.corpus
    train = np.flatnonzero((corpus["split"] == "train").to_numpy())
    doc_vectors = _unit(np.load(data.dirs["emb"] / "embeddings.npy", mmap_mode="r")[train])
    doc_paths = np.asarray(data.doc_paths)[train]
    depth = routed.shape[1]
    by_leaf: dict[tuple, np.ndarray] = {}
    for j, path in enumerate(map(tuple, doc_paths[:, :depth])):
        by_leaf.setdefault(path, []).append(j)
    by_leaf = {leaf: np.asarray(idx) for leaf, idx in by_leaf.items()}
    queries = _unit(prompt_vectors)
    rows = np.full(len(routed), -1, dtype=np.int64)
    for i, leaf in enumerate(map(tuple, routed[:, :depth])):
        members = by_leaf.get(leaf)
        if members is not None and len(members):
            rows[i] = train[members[int(np.argmax(doc_vectors[members] @ queries[i]))]]
    tokens = [list(map(int, data.doc_tokens[r])) if r >= 0 else [] for r in rows]
    return Retrieved(doc_row=rows, doc_tokens=tokens)


def rag_prompts(prompts: list[list[int]], retrieved: Retrieved) -> list[list[int]]:
    """Each prompt with its retrieved document before it (one attention document; a prompt longer than
    the context later keeps its last tokens, so the document's beginning is what is cut)."""
    return [doc + list(prompt) for doc, prompt in zip(retrieved.doc_tokens, prompts)]


def flops_ratio(prompt_tokens: list[int] | np.ndarray, doc_tokens: list[int] | np.ndarray,
                answer_tokens: list[int] | np.ndarray) -> np.ndarray:
    """Forward FLOPs of answering with the document prepended over answering without it, per probe:
    (document + prompt + answer tokens) / (prompt + answer tokens)."""
    prompt, doc, answer = (np.asarray(x, dtype=np.float64) for x in (prompt_tokens, doc_tokens, answer_tokens))
    return (doc + prompt + answer) / (prompt + answer)


def memory_flops_ratio(accounting) -> float:
    """1 + the fetched memory's forward FLOPs per token over the anchor's (attention scores and output
    head included): what a fetched memory multiplies the cost of every token by."""
    anchor = (accounting.anchor_forward_flops_per_token + accounting.attention_score_flops_per_token
              + accounting.head_flops_per_token)
    return 1.0 + accounting.fetched_forward_flops_per_token / anchor
