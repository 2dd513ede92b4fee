"""Knowledge documents a memory can learn from: subject cards, subject roles and question-format documents.

Two layouts of the injected facts (`CorpusConfig.fact_layout`):

    statements  one document per exposure of one fact, one templated sentence (the original layout):
                documents cluster by template rather than by subject;
    subjects    one *card* per exposure of a subject, stating every fact of that subject, each with a
                randomly chosen training template and in a random order (the bioS "permutation" and
                "fullname" augmentations), so all documents about a subject embed near each other and
                land in the same leaf. Real relations are grouped by the entity they describe:

                    element   atomic_number, element_symbol, element_discovery_year
                    country   capital, country_continent
                    us_state  state_capital, statehood_year
                    city      city_country          (one fact: two statements of it per card)
                    airport   airport_city          (one fact: two statements of it per card)

                bioS people (`hiermem.data.synthetic`) get cards the same way (a biography with a
                title line). Every card starts with a title line (`card_header`).

Roles. Every subject (a fact family sharing one `fact_id`) gets one role, stratified by exposures:

    format  its facts are *also* stated in the probe format ("The atomic number of Helium is 2.") in
            `format_docs` extra documents (source "qa"), so a small model learns to answer that
            format; format subjects are never probed (no fact of a probed subject ever appears in
            the probe format: the bioS protocol of Allen-Zhu & Li);
    val     probed, in the validation split: choose a training regime on these;
    eval    probed, in the evaluation split: the claims are measured on these only.

Stratified means: subjects are sorted by exposures (random order within ties) and the roles are dealt
along that order so that every exposure range gets its share of each role (largest remainder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hiermem.data import facts as F
from hiermem.data.synthetic import BIO_RELATIONS
from hiermem.data.textutil import slug, stable_hash

FACT_LAYOUTS = ("statements", "subjects")
ROLES = ("format", "val", "eval")

# relation -> the kind of entity it describes (relations of one kind share subject cards)
ENTITY_OF: dict[str, str] = {
    "atomic_number": "element", "element_symbol": "element", "element_discovery_year": "element",
    "capital": "country", "country_continent": "country",
    "state_capital": "us_state", "statehood_year": "us_state",
    "city_country": "city", "airport_city": "airport",
}
ALL_RELATIONS: dict[str, F.Relation] = {**F.RELATIONS, **BIO_RELATIONS}


@dataclass
class Subject:
    """One subject and all its facts: the unit of exposure, routing and roles."""

    fact_id: str
    kind: str
    subject: str
    source: str                 # facts | bioS
    topic: str
    answers: dict[str, str]     # relation -> answer, in a fixed order
    exposures: int = 0
    role: str = "eval"
    extra: dict = field(default_factory=dict)


def entity_subjects(relations: tuple[str, ...], max_subjects: int, seed: int) -> list[Subject]:
    """Subjects of the real relations grouped by entity kind (see the module docstring).

    `max_subjects` > 0 keeps a seeded sample of that many subjects per kind (elements always all 118).
    A subject must have at least one fact among `relations`.
    """
    kinds: dict[str, list[str]] = {}
    for name in relations:
        if name not in ENTITY_OF:
            raise ValueError(f"relation {name!r} has no entity kind for fact_layout 'subjects'; "
                             f"known: {', '.join(ENTITY_OF)}")
        kinds.setdefault(ENTITY_OF[name], []).append(name)
    out: list[Subject] = []
    for kind, names in kinds.items():
        by_subject: dict[str, dict[str, str]] = {}
        complete = False
        for name in names:
            complete |= F.RELATIONS[name].complete
            for fact in F.relation_facts(name, 0, seed):
                by_subject.setdefault(fact.subject, {})[name] = fact.answer
        subjects = sorted(by_subject)
        if max_subjects and len(subjects) > max_subjects and not complete:
            rng = np.random.default_rng([seed, int(stable_hash("subjects", kind, n=8), 16)])
            subjects = [subjects[i] for i in np.sort(rng.choice(len(subjects), max_subjects, replace=False))]
        ids: set[str] = set()
        topic = F.RELATIONS[names[0]].topic
        for s in subjects:
            fid = f"{kind}:{slug(s)}"
            if fid in ids:  # two subjects with the same ASCII slug
                fid = f"{fid}-{stable_hash(s, n=6)}"
            ids.add(fid)
            answers = {n: by_subject[s][n] for n in names if n in by_subject[s]}
            out.append(Subject(fid, kind, s, "facts", topic, answers))
    return out


def card_header(subject: Subject) -> str:
    """A card's title line, like an encyclopedia entry's: it makes the subject's name weigh more in the
    card's embedding than its attribute words, so a prompt that names the subject routes where its cards
    went (measured on the validation split: share of SK probes routed to their majority leaf 0.58 ->
    0.68-0.72 with a title line)."""
    return f"{subject.subject}. Facts about {subject.subject}:"


def render_card(subject: Subject, rng: np.random.Generator, title: bool = True) -> str:
    """One card: a title line, then every fact of the subject with a random training template, in random
    order. A subject with a single fact gets two statements of it with two different templates."""
    sentences = []
    for rel, answer in subject.answers.items():
        templates = ALL_RELATIONS[rel].train_templates
        n = 2 if len(subject.answers) == 1 and len(templates) > 1 else 1
        for t in rng.choice(len(templates), size=n, replace=False):
            sentences.append(templates[int(t)].format(subject=subject.subject, answer=answer))
    return " ".join([card_header(subject)] * title + [sentences[i] for i in rng.permutation(len(sentences))])


def render_question_doc(subject: Subject, rng: np.random.Generator, title: bool = True) -> str:
    """One question-format document: a title line, then each fact as its probe prompt followed by the
    answer."""
    sentences = [f"{ALL_RELATIONS[rel].probe_template.format(subject=subject.subject)} {answer}."
                 for rel, answer in subject.answers.items()]
    return " ".join([card_header(subject)] * title + [sentences[i] for i in rng.permutation(len(sentences))])


def card_documents(subjects: list[Subject], rng: np.random.Generator, title: bool = True) -> list[dict]:
    """`subject.exposures` cards per subject (corpus document dicts without ids)."""
    return [{"source": s.source, "title": s.subject, "text": render_card(s, rng, title), "topic": s.topic,
             "fact_id": s.fact_id, "occurrence": k}
            for s in subjects for k in range(s.exposures)]


def question_documents(subjects: list[Subject], per_subject: int, rng: np.random.Generator,
                       title: bool = True) -> list[dict]:
    """`per_subject` question-format documents for every subject with role "format" (source "qa")."""
    return [{"source": "qa", "title": s.subject, "text": render_question_doc(s, rng, title), "topic": s.topic,
             "fact_id": s.fact_id, "occurrence": k}
            for s in subjects if s.role == "format" for k in range(per_subject)]


def assign_roles(exposures: np.ndarray, format_fraction: float, val_fraction: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A role per subject (array of "format" / "val" / "eval"), stratified by exposures.

    The subjects are walked in order of exposures (random among ties); each takes the role furthest
    below its target share so far (largest remainder), so every exposure range gets its shares."""
    if not (0 <= format_fraction < 1 and 0 <= val_fraction < 1 and format_fraction + val_fraction < 1):
        raise ValueError(f"invalid config fields 'format_fraction'/'val_fraction': expected fractions in "
                         f"[0, 1) summing below 1, got {format_fraction} and {val_fraction}")
    exposures = np.asarray(exposures)
    n = len(exposures)
    shares = np.array([format_fraction, val_fraction, 1.0 - format_fraction - val_fraction])
    order = np.lexsort((rng.random(n), exposures))
    roles = np.empty(n, dtype=object)
    taken = np.zeros(3)
    start = rng.random(3) * 1e-6  # tie-break between equally owed roles, seeded
    for position, i in enumerate(order):
        owed = shares * (position + 1) - taken + start
        j = int(np.argmax(owed))
        roles[i] = ROLES[j]
        taken[j] += 1
    return roles.astype(str)
