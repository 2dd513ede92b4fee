"""Fact tables, templates, exposure laws, buckets and the synthetic bioS world."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

from hiermem.data import facts as F
from hiermem.data.sources import MissingSourceError
from hiermem.data.synthetic import BIO_RELATIONS, biography, invent_people, max_people, synthetic_world


@pytest.mark.parametrize("name", list(F.RELATIONS) + list(BIO_RELATIONS))
def test_templates_state_the_answer_and_probe_is_held_out(name):
    rel = {**F.RELATIONS, **BIO_RELATIONS}[name]
    F.check_templates(rel)
    assert len(rel.train_templates) >= 4
    stem = rel.probe_template.format(subject="").strip()
    assert not any(stem in t.format(subject="", answer="") for t in rel.train_templates)


def test_check_templates_rejects_leaky_probe():
    leaky = F.Relation("x", "pkg", "t", ("The atomic number of {subject} is {answer}.",),
                       "The atomic number of {subject} is", lambda: [])
    with pytest.raises(ValueError, match="not held out"):
        F.check_templates(leaky)


def test_relation_tables():
    atomic = F.relation_facts("atomic_number", max_facts=10, seed=0)  # complete: never subsampled
    assert len(atomic) == 118 and atomic[42].subject == "Technetium" and atomic[42].answer == "43"
    caps = {f.subject: f.answer for f in F.relation_facts("capital")}
    assert caps["France"] == "Paris" and len(caps) > 200
    states = {f.subject: f.answer for f in F.relation_facts("state_capital")}
    assert len(states) == 50 and states["Ohio"] == "Columbus"
    cities = F.relation_facts("city_country", max_facts=50, seed=3)
    assert len(cities) == 50 and cities == F.relation_facts("city_country", max_facts=50, seed=3)
    assert cities != F.relation_facts("city_country", max_facts=50, seed=4)
    for name in F.RELATIONS:
        fs = F.relation_facts(name, max_facts=200)
        assert fs and len({f.fact_id for f in fs}) == len(fs)
        assert not any(F._contains_words(f.subject, f.answer) for f in fs)
    with pytest.raises(ValueError, match="unknown fact relation"):
        F.relation_facts("mass")


def test_missing_fact_package_is_a_clear_error(monkeypatch):
    F._elements.cache_clear()
    monkeypatch.setitem(sys.modules, "mendeleev.fetch", None)  # import now fails
    try:
        with pytest.raises(MissingSourceError, match="pip install mendeleev"):
            F.relation_facts("atomic_number")
    finally:
        F._elements.cache_clear()


@pytest.mark.parametrize("law", F.EXPOSURE_LAWS)
def test_exposure_laws(law):
    kw = dict(law=law, exponent=1.0, max_exposures=64, min_exposures=1)
    e = F.assign_exposures(500, rng=F.relation_rng(0, "r"), **kw)
    assert e.min() == 1 and e.max() == 64 and e.dtype == np.int64
    assert np.array_equal(e, F.assign_exposures(500, rng=F.relation_rng(0, "r"), **kw))
    assert not np.array_equal(e, F.assign_exposures(500, rng=F.relation_rng(1, "r"), **kw))
    sizes = Counter(F.ExposureBuckets(1, 64, 5).label(int(x)) for x in e)
    if law == "zipf":  # the long tail: rare facts dominate, rank r has round(64 / r)
        assert sorted(e)[::-1][:4] == [64, 32, 21, 16] and sizes["b0-rarest"] > 400
    else:  # log-uniform: buckets are about balanced
        assert max(sizes.values()) < 2 * min(sizes.values())


def test_bucket_edges():
    b = F.ExposureBuckets(1, 64, 5)
    assert [(r["lo"], r["hi"]) for r in b.ranges()] == [(1, 2), (3, 5), (6, 12), (13, 27), (28, 64)]
    assert b.label(1) == "b0-rarest" and b.label(64) == "b4-frequent" == b.top_label
    assert F.probe_group("b4-frequent", b) == "CK" and F.probe_group("b3", b) == "SK"
    unseen = F.ExposureBuckets(0, 8, 3)
    assert unseen.label(0) == "unseen" and unseen.ranges()[0]["bucket"] == "unseen"
    assert F.probe_group("unseen", unseen) == "SK"


def test_fact_documents_cycle_templates():
    fact = F.Fact("capital:france", "capital", "France", "Paris")
    rel = F.RELATIONS["capital"]
    docs = F.render_fact_docs(fact, 9, rel.train_templates, np.random.default_rng(0), "facts", "geo")
    assert len(docs) == 9 and all("Paris" in d["text"] and "France" in d["text"] for d in docs)
    assert Counter(Counter(d["text"] for d in docs).values()) == Counter({3: 1, 2: 3})


def test_bios_world():
    people = invent_people(200, seed=0)
    assert len({p.name for p in people}) == 200 and people == invent_people(200, seed=0)
    assert people != invent_people(200, seed=1)
    p = people[0]
    bio = biography(p, np.random.default_rng(0))
    assert all(answer in bio for answer in p.attributes.values())
    assert bio.count(p.name) == len(BIO_RELATIONS)
    folks, exposures, docs = synthetic_world(30, seed=2, law="zipf", exponent=1.0,
                                             max_exposures=16, min_exposures=1)
    per_person = Counter(d["fact_id"] for d in docs)
    assert [per_person[q.fact_id] for q in folks] == list(exposures)
    with pytest.raises(ValueError, match="synthetic_people"):
        invent_people(max_people() + 1, seed=0)
