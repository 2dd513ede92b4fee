"""Routing diagnostics: do probe prompts reach the memories that learned their facts?

A fact is stated by some training documents; those documents were routed down the tree and
trained the memory blocks on their paths. A probe (a prompt asking for the fact) can only use
those blocks if its own route reaches the same nodes. For every probe and level l, this module
asks: is the probe's level-l node the node where most of the fact's documents went (the modal
node; with a tie, any of the tied nodes counts), and what share of the documents went to the
probe's node? Summaries are per level and per frequency bucket.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

_PROBE_COLUMNS = ("probe_id", "fact_id", "relation", "subject", "group", "bucket", "exposures")


def majority_path(paths: np.ndarray) -> np.ndarray:
    """Most common full path among a fact's documents (ties: the lexicographically smallest).
    Used as the "oracle path" of a probe."""
    paths = np.asarray(paths)
    if paths.ndim != 2 or len(paths) == 0:
        raise ValueError(f"majority_path needs a non-empty (n, depth) array, got shape {paths.shape}")
    uniq, counts = np.unique(paths, axis=0, return_counts=True)
    return uniq[int(np.argmax(counts))].astype(np.int64)


def _level_codes(paths: np.ndarray, level: int) -> np.ndarray:
    """One integer per row identifying its length-`level` prefix (paths entries are >= 0)."""
    base = int(paths.max()) + 1 if paths.size else 1
    code = np.zeros(len(paths), dtype=np.int64)
    for j in range(level):
        code = code * base + paths[:, j]
    return code


def routing_diagnostics(probe_paths: np.ndarray, fact_doc_paths: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                        probes: pd.DataFrame) -> pd.DataFrame:
    """One row per probe: its identifying columns, `n_fact_docs`, and per level l = 1..depth
    `match_l{l}` (probe node is a modal node of the fact's documents; <NA> without documents) and
    `doc_share_l{l}` (share of the fact's documents in the probe's node).

    `fact_doc_paths` maps fact_id -> (m, depth) document paths, or is a list aligned with the
    probe rows."""
    probe_paths = np.asarray(probe_paths)
    if probe_paths.ndim != 2:
        raise ValueError(f"probe_paths must be (n_probes, depth), got shape {probe_paths.shape}")
    n, depth = probe_paths.shape
    if len(probes) != n:
        raise ValueError(f"{len(probes)} probes but {n} probe paths")
    if isinstance(fact_doc_paths, Mapping):
        if "fact_id" not in probes.columns:
            raise ValueError("probes need a fact_id column to look up fact_doc_paths by fact")
        docs_of = [fact_doc_paths.get(f) if isinstance(f, str) and f else None for f in probes["fact_id"]]
    else:
        docs_of = list(fact_doc_paths)
        if len(docs_of) != n:
            raise ValueError(f"fact_doc_paths has {len(docs_of)} entries for {n} probes")

    match = np.zeros((n, depth), dtype=bool)
    share = np.full((n, depth), np.nan)
    n_docs = np.zeros(n, dtype=np.int64)
    for i, docs in enumerate(docs_of):
        if docs is None or len(docs) == 0:
            continue
        docs = np.asarray(docs)
        if docs.ndim != 2 or docs.shape[1] != depth:
            raise ValueError(f"probe {i}: fact document paths have shape {docs.shape}, expected (m, {depth})")
        n_docs[i] = len(docs)
        both = np.concatenate([docs, probe_paths[i:i + 1]])
        for level in range(1, depth + 1):
            codes = _level_codes(both, level)
            doc_codes, probe_code = codes[:-1], codes[-1]
            uniq, counts = np.unique(doc_codes, return_counts=True)
            mine = counts[uniq == probe_code]
            here = int(mine[0]) if len(mine) else 0
            match[i, level - 1] = here == counts.max()
            share[i, level - 1] = here / len(docs)

    out = pd.DataFrame({c: probes[c].to_numpy() for c in _PROBE_COLUMNS if c in probes.columns})
    out["n_fact_docs"] = n_docs
    has_docs = n_docs > 0
    for level in range(1, depth + 1):
        out[f"match_l{level}"] = pd.array(np.where(has_docs, match[:, level - 1], False), dtype="boolean")
        out.loc[~has_docs, f"match_l{level}"] = pd.NA
        out[f"doc_share_l{level}"] = share[:, level - 1]
    if not has_docs.all():
        log.info("routing diagnostics: %d of %d probes have no fact documents", int((~has_docs).sum()), n)
    return out


def summarize_routing(df: pd.DataFrame, by: Sequence[str] = ("bucket",)) -> pd.DataFrame:
    """Match rate and mean document share per level, per group of `by` (default: frequency
    bucket, ordered by median exposures when known), plus an "all" row. Only probes with fact
    documents enter the rates; `n_probes` counts all of them."""
    by = [c for c in by if c in df.columns]
    levels = sorted(int(c[len("match_l"):]) for c in df.columns if c.startswith("match_l"))
    if not levels:
        raise ValueError("summarize_routing expects the output of routing_diagnostics (match_l* columns)")

    def summary(part: pd.DataFrame) -> dict:
        with_docs = part[part["n_fact_docs"] > 0]
        row = {"n_probes": len(part), "n_with_docs": len(with_docs)}
        for level in levels:
            row[f"match_l{level}"] = float(with_docs[f"match_l{level}"].astype(float).mean()) if len(with_docs) else np.nan
        for level in levels:
            row[f"doc_share_l{level}"] = float(with_docs[f"doc_share_l{level}"].mean()) if len(with_docs) else np.nan
        return row

    rows = []
    if by:
        keys = df[by].drop_duplicates()
        if "exposures" in df.columns:  # rare buckets first
            med = df.groupby(by, dropna=False)["exposures"].median().rename("_med").reset_index()
            keys = keys.merge(med, on=by, how="left").sort_values(["_med", *by]).drop(columns="_med")
        else:
            keys = keys.sort_values(by)
        for key in keys.itertuples(index=False):
            mask = np.ones(len(df), dtype=bool)
            for col, val in zip(by, key):
                mask &= (df[col] == val).to_numpy() if pd.notna(val) else df[col].isna().to_numpy()
            rows.append({**dict(zip(by, key)), **summary(df[mask])})
    rows.append({**{c: "all" for c in by}, **summary(df)})
    return pd.DataFrame(rows)


__all__ = ["majority_path", "routing_diagnostics", "summarize_routing"]
