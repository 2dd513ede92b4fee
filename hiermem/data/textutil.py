"""Small text utilities shared by the corpus builder: normalisation, windowing, stable ids, word counts.

Everything here is pure Python and deterministic, so the same input always gives the same corpus.
"""

from __future__ import annotations

import bisect
import hashlib
import html
import math
import re
import unicodedata
from collections import Counter
from typing import Iterable

# Literal special-token strings must never reach the tokenizer as text (they would encode as the
# special ids), so normalisation removes them; the names match hiermem.data.tokenizer.
SPECIAL_TOKEN_LITERALS = ("<|endoftext|>", "<pad>")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_HTML_TAG = re.compile(r"<[^>]+>")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+|\n+")
_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """NFC-normalise, drop control characters and special-token literals, tidy whitespace."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    for literal in SPECIAL_TOKEN_LITERALS:
        text = text.replace(literal, "")
    text = _TRAILING_SPACE.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def strip_html(text: str) -> str:
    """Plain text from the small HTML fragments found in the CIA Factbook fields."""
    text = re.sub(r"<br\s*/?>", "\n", text, flags=re.IGNORECASE)
    text = re.sub(r"</?p>", "\n", text, flags=re.IGNORECASE)
    return html.unescape(_HTML_TAG.sub("", text))


def stable_hash(*parts: object, n: int = 16) -> str:
    """Hex digest of the parts (joined with a separator that cannot occur in them by accident)."""
    h = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8"))
    return h.hexdigest()[:n]


def slug(text: str) -> str:
    """Lower-case ASCII-ish identifier for ids ("Bosnia and Herzegovina" -> "bosnia_and_herzegovina")."""
    s = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    s = re.sub(r"[^a-z0-9]+", "_", s).strip("_")
    return s or stable_hash(text, n=10)


def chunk_text(text: str, window_chars: int) -> list[str]:
    """Split `text` into windows of about `window_chars` characters.

    Cuts prefer sentence ends (or newlines), then whitespace; a word is cut only if it alone is
    longer than the window. The number of windows is ceil(len / window_chars) or close to it, and
    the target size is balanced so that no tiny tail window is left over.
    """
    if len(text) <= window_chars:
        return [text] if text.strip() else []
    n_windows = math.ceil(len(text) / window_chars)
    target = len(text) / n_windows
    sentence_cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
    space_cuts = [m.end() for m in _WHITESPACE.finditer(text)]
    pieces, start = [], 0
    while len(text) - start > window_chars:
        lo, hi, aim = start + 0.5 * target, start + window_chars, start + target
        cut = (_nearest_cut(sentence_cuts, lo, hi, aim)
               or _nearest_cut(space_cuts, lo, hi, aim)
               or _nearest_cut(space_cuts, start + 1, hi, aim)
               or hi)
        pieces.append(text[start:cut].strip())
        start = cut
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def _nearest_cut(cuts: list[int], lo: float, hi: float, aim: float) -> int | None:
    """The cut position in [lo, hi] closest to `aim`, or None (`cuts` is sorted)."""
    i, j = bisect.bisect_left(cuts, lo), bisect.bisect_right(cuts, hi)
    if i >= j:
        return None
    k = bisect.bisect_left(cuts, aim, i, j)
    candidates = [cuts[m] for m in (k - 1, k) if i <= m < j]
    return min(candidates, key=lambda c: (abs(c - aim), c))


def words(text: str) -> list[str]:
    """Case-folded word tokens (Unicode \\w+ runs): the unit of the whole-word counts."""
    return _WORD.findall(text.casefold())


def count_phrases(texts: Iterable[str], phrases: Iterable[str]) -> dict[str, int]:
    """Whole-word, case-insensitive occurrence counts of each phrase over all texts.

    A phrase matches a run of consecutive word tokens, so "New York" matches "new york," and
    "New-York" but not "Newark"; punctuation inside a phrase is ignored. One pass over the text,
    indexed by each phrase's first word, so thousands of phrases cost little more than one.
    """
    phrases = list(dict.fromkeys(phrases))
    keyed: dict[str, tuple[str, ...]] = {p: tuple(words(p)) for p in phrases}
    by_first: dict[str, set[int]] = {}
    wanted: set[tuple[str, ...]] = set()
    for key in keyed.values():
        if key:
            by_first.setdefault(key[0], set()).add(len(key))
            wanted.add(key)
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        toks = words(text)
        for i, w in enumerate(toks):
            lengths = by_first.get(w)
            if lengths is None:
                continue
            for n in lengths:
                gram = tuple(toks[i:i + n])
                if gram in wanted:
                    counts[gram] += 1
    return {p: counts.get(k, 0) if k else 0 for p, k in keyed.items()}
