"""Knowledge probes: fact probes with held-out templates, and Lambada-style cloze from held-out prose.

Splits: a probe's `split` is "val" (choose a training regime on these) or "eval" (report on these);
subjects with role "format" (hiermem.data.knowledge) are stated in the probe format in training and
are never probed.

SK/CK rule (mirrors the paper's Avg-SK / Avg-CK split, decided per probe):
    CK (common knowledge) = every cloze probe (general prose, predictable from context), and every
                            injected fact (real or bioS) in the top exposure bucket ("b{n-1}-frequent").
    SK (specific knowledge) = every other injected fact: the long tail, including "unseen" facts.

Cloze probes: from each "heldout" document (never trained on) a sentence-final word of at least 4
letters is chosen; the prompt is the text before it (at most `max_context_chars`, starting at a
sentence start) and the answer is the word. Words that already occur earlier in the prompt are
preferred, as in Lambada, so that the answer is recoverable from context. For cloze probes the
`subject` is the answer word, `measured_count` is its whole-word count in the train split,
`exposures` is 0, `bucket` is "cloze" and `source_doc_id` names the held-out document.

Prompts never end with a space and answers never start with one: score " " + answer after prompt.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import pandas as pd

from hiermem.data.facts import ExposureBuckets, Fact, Relation, probe_group
from hiermem.data.textutil import count_phrases, stable_hash, words

PROBE_COLUMNS = ("probe_id", "relation", "subject", "prompt", "answer", "group", "exposures",
                 "measured_count", "bucket", "fact_id", "source_doc_id", "source", "split")
FACT_COLUMNS = ("fact_id", "relation", "subject", "answer", "exposures", "bucket", "group",
                "measured_count", "source", "package", "role")

_FINAL_WORD = re.compile(r"(?<![\w'’-])([A-Za-z][a-z]{3,})(?=[.!?][\"')\]]*(\s|$))")
_SENTENCE_START = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z\"'(])|\n+")


def fact_rows(facts: list[Fact], exposures: Iterable[int], relation: Relation, source: str,
              buckets: ExposureBuckets, roles: Iterable[str] | None = None) -> list[dict]:
    """One facts-table row per fact (measured_count is filled in once the corpus is final).

    roles: per fact "format" (stated in the probe format in training, never probed), "val" or
    "eval" (probed; hiermem.data.knowledge); default "eval"."""
    rows = []
    roles = list(roles) if roles is not None else ["eval"] * len(facts)
    for fact, e, role in zip(facts, exposures, roles):
        bucket = buckets.label(int(e))
        rows.append({"fact_id": fact.fact_id, "relation": fact.relation, "subject": fact.subject,
                     "answer": fact.answer, "exposures": int(e), "bucket": bucket,
                     "group": probe_group(bucket, buckets), "measured_count": 0,
                     "source": source, "package": relation.package, "role": role})
    return rows


def fact_probe(row: dict, relation: Relation) -> dict:
    """The held-out-template probe of one fact row."""
    return {"probe_id": f"{row['relation']}:{row['fact_id'].split(':', 1)[1]}",
            "relation": row["relation"], "subject": row["subject"],
            "prompt": relation.probe_template.format(subject=row["subject"]),
            "answer": row["answer"], "group": row["group"], "exposures": row["exposures"],
            "measured_count": row["measured_count"], "bucket": row["bucket"],
            "fact_id": row["fact_id"], "source_doc_id": "", "source": row["source"],
            "split": row["role"]}


def _cloze_candidates(text: str, max_context_chars: int, min_context_chars: int) -> list[tuple]:
    """(prefers_context, prompt, answer, position) for each usable sentence-final word."""
    out = []
    for m in _FINAL_WORD.finditer(text):
        start = max(0, m.start(1) - max_context_chars)
        if start > 0:  # begin the prompt at a sentence start inside the window
            s = _SENTENCE_START.search(text, start, m.start(1))
            if s is None:
                continue
            start = s.end()
        prompt = text[start:m.start(1)].rstrip()
        if len(prompt) < min_context_chars:
            continue
        answer = m.group(1)
        out.append((answer.casefold() in set(words(prompt)), prompt, answer, m.start(1)))
    return out


def cloze_probes(heldout_docs: list[dict], n: int, seed: int, max_context_chars: int = 600,
                 min_context_chars: int = 80, val_fraction: float = 0.0) -> list[dict]:
    """Up to `n` cloze probes, spread over the held-out documents round-robin (deterministic).

    A seeded `val_fraction` of them (whole held-out documents) form the validation split ("val")."""
    if n <= 0 or not heldout_docs:
        return []
    rng = np.random.default_rng([seed, 7])
    per_doc = []
    for i in rng.permutation(len(heldout_docs)):
        doc = heldout_docs[int(i)]
        cands = _cloze_candidates(doc["text"], max_context_chars, min_context_chars)
        order = rng.permutation(len(cands)) if cands else []
        ranked = sorted((cands[j] for j in order), key=lambda c: not c[0])  # stable: preferred first
        if ranked:
            per_doc.append((doc, ranked))
    probes, depth = [], 0
    while len(probes) < n and any(depth < len(r) for _, r in per_doc):
        for doc, ranked in per_doc:
            if depth < len(ranked) and len(probes) < n:
                _, prompt, answer, pos = ranked[depth]
                probes.append({"probe_id": f"cloze:{stable_hash(doc['doc_id'], pos)}",
                               "relation": "cloze", "subject": answer, "prompt": prompt,
                               "answer": answer, "group": "CK", "exposures": 0,
                               "measured_count": 0, "bucket": "cloze", "fact_id": "",
                               "source_doc_id": doc["doc_id"], "source": doc["source"]})
        depth += 1
    docs = sorted({p["source_doc_id"] for p in probes})
    val = set(np.random.default_rng([seed, 8]).permutation(docs)[:round(val_fraction * len(docs))].tolist())
    for p in probes:
        p["split"] = "val" if p["source_doc_id"] in val else "eval"
    return probes


def add_measured_counts(table: pd.DataFrame, train_texts: list[str]) -> pd.DataFrame:
    """Fill `measured_count`: whole-word, case-insensitive count of `subject` in the train texts."""
    counts = count_phrases(train_texts, table["subject"].tolist())
    table = table.copy()
    table["measured_count"] = [counts[s] for s in table["subject"]]
    return table


def as_table(rows: list[dict], columns: tuple[str, ...]) -> pd.DataFrame:
    """A DataFrame with exactly `columns`, in order, and integer counts as int64."""
    df = pd.DataFrame(rows, columns=list(columns))
    for col in ("exposures", "measured_count"):
        if col in df:
            df[col] = df[col].astype("int64")
    return df
