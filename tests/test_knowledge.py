"""Knowledge corpus: subject cards, roles (format / val / eval), question-format documents, and that
documents about one subject share a leaf."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from hiermem.data import knowledge as K
from hiermem.data.corpus import CorpusConfig, build_corpus, load_corpus, load_facts, load_probes
from hiermem.data.facts import RELATIONS
from hiermem.data.pipeline import DataConfig, build_data
from hiermem.data.synthetic import BIO_RELATIONS
from hiermem.kmeans import TreeConfig

KNOWLEDGE = CorpusConfig.preset("smoke", fact_layout="subjects", format_fraction=0.4, val_fraction=0.2,
                                synthetic_people=40, exposure_law="loguniform", max_exposures=6,
                                fact_relations=("atomic_number", "element_symbol", "capital", "country_continent",
                                                "city_country", "state_capital"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = build_corpus(KNOWLEDGE, tmp_path_factory.mktemp("knowledge"), progress=False)
    return load_corpus(out).to_pandas(), load_facts(out), load_probes(out)


def test_cards_state_every_fact_of_their_subject_once_per_exposure(built):
    """Bug caught: a card missing a relation, a wrong exposure count, or facts of two subjects mixed."""
    corpus, facts, _ = built
    cards = corpus[corpus["source"].isin(["facts", "bioS"])]
    per_subject = Counter(cards["fact_id"])
    for fact_id, part in facts.groupby("fact_id"):
        assert per_subject[fact_id] == part["exposures"].iloc[0], fact_id
        texts = cards.loc[cards["fact_id"] == fact_id, "text"]
        subject = part["subject"].iloc[0]
        for text in texts:
            assert all(answer in text for answer in part["answer"]), (fact_id, text)
            assert text.count(subject) >= len(part)  # the full name in every statement
    # elements carry atomic number, symbol and (where known) discovery year in one card
    helium = facts[facts["subject"] == "Helium"]
    assert {"atomic_number", "element_symbol"} == set(helium["relation"]) and helium["fact_id"].nunique() == 1


def test_format_subjects_are_never_probed_and_only_they_get_question_documents(built):
    """Bug caught: a probed fact leaking into training in the probe format, or roles ignored."""
    corpus, facts, probes = built
    roles = facts.drop_duplicates("fact_id").set_index("fact_id")["role"]
    qa = corpus[corpus["source"] == "qa"]
    assert len(qa) and set(roles[qa["fact_id"].unique()]) == {"format"}
    assert not set(probes["fact_id"]) & set(roles[roles == "format"].index)
    prompts = set(probes["prompt"])
    for text in qa["text"]:
        assert not any(p in text for p in prompts)  # no probe prompt appears verbatim in training
    # every relation's question format appears in training (the format is learnable)
    relations = {**RELATIONS, **BIO_RELATIONS}
    for rel in facts["relation"].unique():
        stem = relations[rel].probe_template.split("{subject}")[0]
        assert qa["text"].str.contains(stem, regex=False).any(), rel
    fact_probes = probes[probes["relation"] != "cloze"]
    assert set(fact_probes["split"]) == {"val", "eval"}


def test_roles_are_stratified_by_exposure():
    """Bug caught: roles dealt in id order (the rarest facts all in one role)."""
    rng = np.random.default_rng(0)
    exposures = np.repeat([1, 2, 4, 8, 16], 40)
    roles = K.assign_roles(exposures, 0.4, 0.2, rng)
    table = pd.crosstab(exposures, roles)
    assert (table["format"] == 16).all() and (table["val"] == 8).all() and (table["eval"] == 16).all()
    with pytest.raises(ValueError, match="format_fraction"):
        K.assign_roles(exposures, 0.6, 0.5, rng)


def test_documents_of_one_subject_share_a_leaf(tmp_path):
    """Subject cards embed by subject: nearly all documents of a subject go to one leaf, far more
    than its one-sentence statements do (the old layout clusters by template)."""
    def leaf_share(layout: str) -> float:
        corpus_cfg = KNOWLEDGE.replace(fact_layout=layout, format_fraction=0.0, val_fraction=0.0,
                                       synthetic_people=0, max_exposures=8, exposure_law="loguniform")
        cfg = DataConfig.preset("smoke", root=str(tmp_path / layout), corpus=corpus_cfg,
                                tree=TreeConfig(branching=4, depth=2))
        bundle = build_data(cfg, progress=False)
        corpus = bundle.corpus
        multi = bundle.facts.groupby("subject")["relation"].nunique()
        multi = set(multi[multi >= 2].index)  # subjects with several facts (elements, countries)
        rows = np.flatnonzero(((corpus["source"] == "facts") & corpus["title"].isin(multi)).to_numpy())
        leaf = bundle.doc_paths[rows, 0] * 4 + bundle.doc_paths[rows, 1]
        frame = pd.DataFrame({"subject": corpus["title"].to_numpy()[rows], "leaf": leaf})
        counts = frame.groupby("subject")["leaf"].agg(lambda s: s.value_counts().iloc[0] / len(s))
        sizes = frame.groupby("subject").size()
        return float(counts[sizes >= 3].mean())

    cards, statements = leaf_share("subjects"), leaf_share("statements")
    # measured on this corpus (16 leaves): 0.74 for cards, 0.55 for one-sentence statements
    assert cards >= 0.7 and cards > statements + 0.15, (cards, statements)


def test_a_tree_too_large_for_its_corpus_is_refused(tmp_path):
    """A 4-ary depth-4 tree (256 leaves) over the smoke corpus leaves leaves with a sequence or two."""
    cfg = DataConfig.preset("smoke", root=str(tmp_path), tree=TreeConfig(branching=4, depth=4), min_leaf_sequences=8)
    with pytest.raises(ValueError, match=r"tree too large for its corpus: k=4, depth=4 gives 256 leaves .*"
                                         r"min_leaf_sequences=8"):
        build_data(cfg, progress=False)


def test_data_stats_reports_the_memory_budget(smoke_data_config):
    """`hiermem data stats --tokens`: per level, sequences per node and the expected updates, which
    grow with the budget and never exceed the number of steps."""
    from hiermem.data.cli import data_stats
    bundle = build_data(smoke_data_config, progress=False)
    small = data_stats(bundle, tokens=20 * 4 * 128, batch_size=4)["blocks"].set_index("level")
    large = data_stats(bundle, tokens=80 * 4 * 128, batch_size=4)["blocks"].set_index("level")
    assert list(small.index) == [1, 2] and (small["steps"] == 20).all() and (large["steps"] == 80).all()
    assert (large["updates_median"] > small["updates_median"]).all()
    assert (large["updates_max"] <= 80).all()
    counts = np.unique(bundle.sequences("clustered").paths, axis=0, return_counts=True)[1]
    assert small.loc[2, "sequences_min"] == counts.min() and small.loc[2, "sequences_max"] == counts.max()
    assert "updates_min" not in data_stats(bundle)["blocks"].columns  # no budget given


def test_a_thin_budget_is_warned_about(smoke_data_config, pretrained_anchor, tmp_path, caplog):
    from hiermem.config import MemoryConfig
    from hiermem.train import TrainConfig, train
    cfg = TrainConfig(stage="memory-frozen", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                      memory=MemoryConfig(multipliers=(4, 4), branching=4), tokens=3 * 4 * 128, batch_size=4)
    with caplog.at_level("WARNING"):
        train(cfg, tmp_path / "thin", progress=False)
    assert "expected to be updated only" in caplog.text
