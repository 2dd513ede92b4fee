"""Evaluation: every mode on a smoke model, blocking isolation, scoring primitives."""

import numpy as np
import pandas as pd
import pytest
import torch

from hiermem.checkpoint import load_model
from hiermem.config import MemoryConfig
from hiermem.data.pipeline import build_data
from hiermem.evaluate import BASE_MODES, EvalConfig, eval_modes, evaluate_run, heldout_perplexity, score_probes
from hiermem.probing import (MemoryChoice, answer_matches, candidate_logprobs, continuation_logprobs, document_nll,
                             greedy_generate)
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig, train


@pytest.fixture(scope="module")
def memory_run(smoke_data_config, pretrained_anchor, tmp_path_factory):
    cfg = TrainConfig(stage="memory-cotrain", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                      memory=MemoryConfig(multipliers=(8, 2), branching=4), tokens=10 * 4 * 128, batch_size=4,
                      optim=TrainConfig().optim.replace(bank_lr=0.05))  # a large bank LR so memories matter
    return train(cfg, tmp_path_factory.mktemp("runs") / "memory", progress=False)


def test_every_mode_on_a_smoke_model(memory_run, smoke_data_config):
    summary = evaluate_run(memory_run, EvalConfig(heldout_docs_per_source=20, split="all"))
    modes = list(summary["mode"])
    assert modes == list(BASE_MODES) + ["drop-level1", "drop-level2"]
    results = pd.read_parquet(memory_run / "eval" / "probe_results.parquet")
    n_probes = len(build_data(smoke_data_config, progress=False).probes)
    assert len(results) == n_probes * len(modes)
    assert {"avg_sk", "avg_ck", "avg_sk_rank", "avg_sk_mc", "ppl", "atomic_all"} <= set(summary.columns)
    assert summary.set_index("mode").loc["fetched", "ppl"] > 1
    ppl = pd.read_csv(memory_run / "eval" / "perplexity.csv")
    assert set(ppl["source"]) >= {"wiki", "factbook"}
    logprob = results.pivot(index="probe_id", columns="mode", values="answer_logprob")
    assert not np.allclose(logprob["none"], logprob["fetched"])  # the trained memory matters
    assert np.allclose(logprob["blocked-drop"], logprob["none"], atol=1e-4)  # whole routed subtree dropped
    assert not np.allclose(logprob["blocked-reroute"], logprob["fetched"])  # another subtree's blocks
    # ranking beats every candidate, so it implies beating the multiple-choice subset
    assert (~results["rank_correct"] | results["mc_correct"]).all()
    routing = pd.read_csv(memory_run / "eval" / "routing.csv")
    assert "match_l1" in routing.columns


def test_dense_model_has_only_none_mode(pretrained_anchor):
    summary = evaluate_run(pretrained_anchor, EvalConfig(heldout_docs_per_source=10, mc_candidates=2, split="all"))
    assert list(summary["mode"]) == ["none"]


def test_perplexity_uses_the_probes_mode_objects(memory_run, smoke_data_config):
    """Bug caught: blocking switched on for probes only (perplexity under blocking equal to fetched),
    or perplexity scored with another mode's memory. Checked against document_nll with the blocked
    path built by hand."""
    data = build_data(smoke_data_config, progress=False)
    model = load_model(RunDir(memory_run).final).eval()
    cfg = EvalConfig(heldout_docs_per_source=8, split="all", seed=0)
    modes = ["none", "fetched", "blocked-drop", "blocked-reroute"]
    with torch.no_grad():
        ppl = heldout_perplexity(model, data, cfg, modes).set_index(["source", "mode"])["nll"]
    source = "wiki"
    assert ppl[(source, "blocked-reroute")] != pytest.approx(ppl[(source, "fetched")], rel=1e-6)
    assert ppl[(source, "blocked-drop")] == pytest.approx(ppl[(source, "none")], rel=1e-6)
    # independent: the first sampled wiki docs rerouted by hand around their own level-1 subtree
    corpus = data.corpus
    heldout = corpus.index[(corpus["split"] == "heldout")].to_numpy()
    rng = np.random.default_rng(cfg.seed)
    by_source = corpus.iloc[heldout].groupby("source").indices
    for name, idx in by_source.items():  # replay the sampler in heldout_perplexity's order
        chosen = heldout[idx]
        if len(chosen) > cfg.heldout_docs_per_source:
            chosen = np.sort(rng.choice(chosen, cfg.heldout_docs_per_source, replace=False))
        if name == source:
            break
    vectors = np.load(data.dirs["emb"] / "embeddings.npy")[chosen]
    paths = np.stack([data.tree.route(vectors[i:i + 1], blocked=[(int(p[0]),)])[0]
                      for i, p in enumerate(data.doc_paths[chosen])])
    nll, counts = document_nll(model, [data.doc_tokens[i] for i in chosen], MemoryChoice(paths=paths), data.pad_id)
    assert ppl[(source, "blocked-reroute")] == pytest.approx(nll.sum() / counts.sum(), rel=1e-5)


def test_bank_wide_blocking_changes_only_the_blocked_subtrees(memory_run, smoke_data_config):
    data = build_data(smoke_data_config, progress=False)
    model = load_model(RunDir(memory_run).final).eval()
    probes = data.probes.sample(150, random_state=0).reset_index(drop=True)
    cfg = EvalConfig(modes=("fetched", "blocked-drop"), level_ablation=False, block_fraction=0.25,
                     block_choice="random", seed=1)
    blocked = eval_modes(model, data, cfg, ["blocked-drop"], probes)["blocked-drop"].blocking.prefixes
    assert len(blocked) == 1
    results = score_probes(model, data, probes, cfg, ["fetched", "blocked-drop"])
    wide = results.pivot(index="probe_id", columns="mode", values="answer_logprob").loc[probes["probe_id"]]
    first_level = np.array([int(p.split(",")[0]) for p in results[results["mode"] == "fetched"]["routed_path"]])
    untouched = first_level != blocked[0][0]
    assert untouched.any() and (~untouched).any()
    np.testing.assert_allclose(wide["fetched"].to_numpy()[untouched], wide["blocked-drop"].to_numpy()[untouched])
    assert not np.allclose(wide["fetched"].to_numpy()[~untouched], wide["blocked-drop"].to_numpy()[~untouched])


def test_candidate_scores_equal_one_continuation_at_a_time(memory_run):
    """Bug caught: the cached candidate scorer misaligning positions, counting padding, or reusing one
    row's cache for another row's candidates."""
    model = load_model(RunDir(memory_run).final).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    candidates = [[[13, 14], [15], [16, 17, 18]], [[15]], [[20, 21], [22]]]
    memory = MemoryChoice(paths=np.array([[0, 1], [2, 3], [1, 1]]))
    cached = candidate_logprobs(model, prompts, candidates, memory, pad_id=1, batch_size=2)
    for i, (prompt, cands) in enumerate(zip(prompts, candidates)):
        row = MemoryChoice(paths=memory.paths[[i] * len(cands)])
        direct = continuation_logprobs(model, [prompt] * len(cands), cands, row, pad_id=1)
        np.testing.assert_allclose(cached[i], direct, rtol=1e-5, atol=1e-5)


def test_answer_matching():
    assert answer_matches(" 43.", "43") and answer_matches(" 43 and", "43")
    assert not answer_matches(" 430", "43") and not answer_matches(" none", "43")
    assert answer_matches(" Paris, France", "Paris") and answer_matches(" paris", "Paris")
    assert not answer_matches(" Parisian", "Paris") and not answer_matches("", "Paris")


def test_left_padding_scores_like_the_prompt_alone(memory_run):
    model = load_model(RunDir(memory_run).final).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    answers = [[13, 14], [15]]
    paths = np.array([[0, 1], [2, 3]])
    together = continuation_logprobs(model, prompts, answers, MemoryChoice(paths=paths), pad_id=1)
    alone = [continuation_logprobs(model, [p], [a], MemoryChoice(paths=paths[i:i + 1]), pad_id=1)[0]
             for i, (p, a) in enumerate(zip(prompts, answers))]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    gen = greedy_generate(model, prompts, MemoryChoice(paths=paths), 3, pad_id=1)
    assert gen[1] == greedy_generate(model, prompts[1:], MemoryChoice(paths=paths[1:]), 3, pad_id=1)[0]
    with torch.no_grad():
        assert len(gen[0]) == 3


def test_probe_sample_keeps_every_bucket():
    from hiermem.evaluate import select_probes
    probes = pd.DataFrame({"relation": ["a"] * 50 + ["b"] * 10,
                           "bucket": ["b0"] * 40 + ["b1"] * 5 + ["b2"] * 5 + ["b0"] * 10,
                           "probe_id": range(60)})
    picked = select_probes(probes, 6, seed=0)
    with pytest.raises(ValueError, match="no probes in split 'val'"):
        select_probes(probes.assign(split="eval"), 6, seed=0, split="val")
    assert picked.groupby("relation").size().to_dict() == {"a": 6, "b": 6}
    assert picked[picked.relation == "a"].groupby("bucket").size().to_dict() == {"b0": 2, "b1": 2, "b2": 2}
    assert list(picked["probe_id"]) == sorted(picked["probe_id"])
    assert len(select_probes(probes, 0, seed=0)) == 60


# ----- modes, metrics and perplexity checked against independent computations ----------------------

def _hand_oracle(fact_doc_paths):
    """The most common full path of a fact's documents, ties to the lexicographically smallest."""
    from collections import Counter
    counts = Counter(tuple(int(i) for i in p) for p in fact_doc_paths)
    return min(counts, key=lambda p: (-counts[p], p))


def _without_level(model, level):
    """A copy of the model whose level-`level` (1-based) bank blocks are all zero: an FFN memory
    block of zeros adds exactly nothing, an independent way to drop that level."""
    import copy
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.bank.levels[level - 1].zero_()
    return other


def _paths(column):
    return np.array([[int(i) for i in p.split(",")] for p in column])


def test_probe_modes_score_the_memory_they_name(memory_run, smoke_data_config):
    """Bug caught: wrong-path or oracle-path silently using the routed path (in the mode or in the
    probes' oracle paths), drop-level<l> always dropping level 1, or a mode scored with another
    mode's memory. Independent: the oracle path recomputed from the fact documents' routes, the
    routed path from the prompt's route, and each mode's answer log-likelihood rescored with
    continuation_logprobs on the hand-built memory (a dropped level = a model with that level zeroed)."""
    data = build_data(smoke_data_config, progress=False)
    model = load_model(RunDir(memory_run).final).eval()
    facts = data.fact_paths()
    probes = data.probes[data.probes["fact_id"].isin(list(facts))].sample(40, random_state=0).reset_index(drop=True)
    cfg = EvalConfig(rank_candidates=5, mc_candidates=3, max_new_tokens=2, batch_size=64, seed=0)
    modes = ["fetched", "wrong-path", "oracle-path", "drop-level1", "drop-level2"]
    with torch.no_grad():
        results = score_probes(model, data, probes, cfg, modes)
    by_mode = {m: f.set_index("probe_id").loc[probes["probe_id"]] for m, f in results.groupby("mode")}

    routed = data.route_texts(probes["prompt"].tolist())
    oracle = np.array([_hand_oracle(facts[f]) for f in probes["fact_id"]])
    assert (oracle != routed).any(axis=1).sum() >= 5  # otherwise an oracle = routed bug could hide
    np.testing.assert_array_equal(_paths(by_mode["fetched"]["routed_path"]), routed)
    np.testing.assert_array_equal(_paths(by_mode["fetched"]["used_path"]), routed)
    np.testing.assert_array_equal(_paths(by_mode["oracle-path"]["used_path"]), oracle)
    wrong = _paths(by_mode["wrong-path"]["used_path"])
    assert (wrong[:, 0] != routed[:, 0]).all()

    tok = data.tokenizer
    prompts = [e.ids for e in tok.encode_batch(probes["prompt"].tolist())]
    answers = [e.ids for e in tok.encode_batch([" " + str(a) for a in probes["answer"]])]

    def rescored(m, paths):
        return continuation_logprobs(m, prompts, answers, MemoryChoice(paths=paths), data.pad_id)

    want = {"fetched": rescored(model, routed), "wrong-path": rescored(model, wrong),
            "oracle-path": rescored(model, oracle), "drop-level1": rescored(_without_level(model, 1), routed),
            "drop-level2": rescored(_without_level(model, 2), routed)}
    for mode in modes:
        np.testing.assert_allclose(by_mode[mode]["answer_logprob"].to_numpy(), want[mode], rtol=1e-4, atol=1e-4,
                                   err_msg=mode)
    # the memories really differ, so each comparison above can tell the modes apart
    for a, b in (("drop-level1", "drop-level2"), ("drop-level1", "fetched"), ("drop-level2", "fetched"),
                 ("oracle-path", "fetched"), ("wrong-path", "fetched")):
        assert not np.allclose(want[a], want[b], rtol=1e-4, atol=1e-4), (a, b)


def test_rank_and_multiple_choice_follow_the_candidates_scores(memory_run, smoke_data_config, monkeypatch):
    """Bug caught: multiple choice picking the least likely answer (or comparing with the wrong
    candidates), ranking not requiring the true answer to beat every other. The candidates' scores
    are planted (the scorer is replaced) and the metrics compared with their definitions by hand:
    rank = true answer strictly above all others; mc = strictly above the first mc_candidates - 1."""
    import hiermem.evaluate as evaluate_module
    data = build_data(smoke_data_config, progress=False)
    model = load_model(RunDir(memory_run).final).eval()
    cfg = EvalConfig(rank_candidates=6, mc_candidates=3, max_new_tokens=1, seed=0)
    probes = data.probes[data.probes["relation"] == "atomic_number"].head(8).reset_index(drop=True)
    patterns = [[5, 1, 2, 3, 4, 0],   # best of all: rank and mc
                [3, 1, 2, 9, 0, 0],   # best of the mc set, not of all: mc only
                [2, 1, 3, 0, 0, 0],   # in the middle of the mc set: neither (beats the least likely)
                [0, 1, 2, 3, 4, 5],   # the least likely: neither
                [2, 2, 1, 0, 0, 0]]   # a tie with a distractor: neither
    planted = {}

    def fake_scores(model, prompts, candidates, memory, pad_id, batch_size=16):
        out = []
        for i, cands in enumerate(candidates):
            assert len(cands) == cfg.rank_candidates
            out.append(np.array(patterns[i % len(patterns)], dtype=float))
        planted["scores"] = out
        return out

    monkeypatch.setattr(evaluate_module, "candidate_logprobs", fake_scores)
    monkeypatch.setattr(evaluate_module, "greedy_generate", lambda m, prompts, *a, **k: [[] for _ in prompts])
    results = score_probes(model, data, probes, cfg, ["fetched"])
    for row, sc in zip(results.itertuples(), planted["scores"]):
        true, others, mc_others = sc[0], list(sc[1:]), list(sc[1:cfg.mc_candidates])
        assert row.rank_correct == all(true > o for o in others), (row.Index, sc)
        assert row.mc_correct == all(true > o for o in mc_others), (row.Index, sc)
        assert row.answer_logprob == true and row.n_candidates == len(sc)
    assert list(results["rank_correct"][:5]) == [True, False, False, False, False]
    assert list(results["mc_correct"][:5]) == [True, True, False, False, False]


def test_perplexity_is_exp_of_the_token_mean_nll(memory_run, smoke_data_config):
    """Bug caught: perplexity reported as the mean NLL (or the mean per document, or the summary's
    perplexity averaged without token weights). Independent: the held-out documents scored with a
    plain forward and torch's cross-entropy, one document at a time."""
    import torch.nn.functional as F
    from hiermem.evaluate import summarize
    data = build_data(smoke_data_config, progress=False)
    model = load_model(RunDir(memory_run).final).eval()
    corpus = data.corpus
    counts = corpus[corpus["split"] == "heldout"].groupby("source").size()
    cfg = EvalConfig(heldout_docs_per_source=int(counts.max()), split="all")  # every held-out document
    with torch.no_grad():
        ppl = heldout_perplexity(model, data, cfg, ["none"])
    max_len = model.model_cfg.max_seq_len
    for row in ppl.itertuples():
        docs = corpus.index[(corpus["split"] == "heldout") & (corpus["source"] == row.source)]
        total, n = 0.0, 0
        with torch.no_grad():
            for i in docs:
                tokens = torch.as_tensor(np.asarray(data.doc_tokens[i][:max_len]), dtype=torch.long)[None]
                logits = model(tokens)
                total += float(F.cross_entropy(logits[0, :-1].double(), tokens[0, 1:], reduction="sum"))
                n += tokens.shape[1] - 1
        assert row.docs == len(docs) and row.tokens == n
        assert row.nll == pytest.approx(total / n, rel=1e-5)
        assert row.ppl == pytest.approx(np.exp(total / n), rel=1e-5)
    # the summary's perplexity pools sources by tokens: exp(sum nll * tokens / sum tokens)
    results = pd.DataFrame({"mode": ["none", "none"], "group": ["SK", "CK"], "relation": ["capital", "cloze"],
                            "bucket": ["b0", "b0"], "correct": [True, False]})
    table = pd.DataFrame({"source": ["wiki", "factbook"], "mode": ["none", "none"], "docs": [1, 1],
                          "tokens": [100, 300], "nll": [2.0, 3.0], "ppl": [np.exp(2.0), np.exp(3.0)]})
    row = summarize(results, table, "m").iloc[0]
    assert row["ppl"] == pytest.approx(np.exp((2.0 * 100 + 3.0 * 300) / 400))
    assert row["ppl_wiki"] == pytest.approx(np.exp(2.0)) and row["ppl_factbook"] == pytest.approx(np.exp(3.0))


def test_fast_evaluation_equals_the_plain_path(memory_run, tmp_path):
    """Bug caught: the fast path mapping a deduplicated (probe, memory) pair back to the wrong probe or
    mode, scoring a 'none' row with memory, or computing perplexity on other positions than the plain
    path. Every mode (level ablations, generic, blocking, rerouting) on the plain and the fast path:
    the per-probe tables agree -- texts and correctness exactly, log-probabilities and perplexity to
    float rounding."""
    import shutil
    plain_run = tmp_path / "plain"
    shutil.copytree(memory_run, plain_run)
    cfg = EvalConfig(heldout_docs_per_source=12, split="all", rank_candidates=30)
    fast = evaluate_run(memory_run, cfg, fast=True)
    plain = evaluate_run(plain_run, cfg, fast=False)
    assert list(fast["mode"]) == list(plain["mode"]) and len(fast) >= 8
    a = pd.read_parquet(memory_run / "eval" / "probe_results.parquet")
    b = pd.read_parquet(plain_run / "eval" / "probe_results.parquet")
    assert list(a["probe_id"]) == list(b["probe_id"]) and list(a["mode"]) == list(b["mode"])
    for column in ("generated", "correct", "rank_correct", "mc_correct", "used_path", "n_candidates"):
        assert list(a[column]) == list(b[column]), column
    np.testing.assert_allclose(a["answer_logprob"], b["answer_logprob"], rtol=1e-4, atol=1e-4)
    pa, pb = pd.read_csv(memory_run / "eval" / "perplexity.csv"), pd.read_csv(plain_run / "eval" / "perplexity.csv")
    assert list(pa["tokens"]) == list(pb["tokens"])
    np.testing.assert_allclose(pa["nll"], pb["nll"], rtol=1e-5)


def test_merge_choices_scores_each_distinct_pair_once():
    """Bug caught: pairs keyed without their generic flag or dropped levels (two different memories
    merged), 'none' rows given a path's memory, or a row mapped to another row's pair. Independent:
    the merged choice's memory for each mode's row, read back field by field."""
    from hiermem.probing import merge_choices
    paths = np.array([[0, 1], [2, 2], [1, 0]])
    choices = {
        "none": MemoryChoice(),
        "fetched": MemoryChoice(paths=paths),
        "oracle": MemoryChoice(paths=np.array([[0, 1], [2, 0], [1, 0]])),  # rows 0 and 2 as fetched
        "generic": MemoryChoice(paths=paths, use_generic=np.ones(3, dtype=bool)),
        "drop-all": MemoryChoice(paths=paths, blocked=np.ones((3, 2), dtype=bool)),  # = none
        "drop2": MemoryChoice(paths=paths, blocked=np.array([[False, True]] * 3)),
    }
    merged = merge_choices(choices, 3, 2)
    assert len(merged.row) == 3 + 3 + 1 + 3 + 3  # none, fetched, oracle's row 1, generic, drop2
    m = merged.choice
    for name, choice in choices.items():
        for i, j in enumerate(merged.where[name]):
            assert merged.row[j] == i
            generic = bool(m.use_generic[j])
            dropped = m.blocked[j] if m.blocked is not None else np.zeros(2, dtype=bool)
            if name in ("none", "drop-all"):
                assert not generic and dropped.all()
            else:
                assert list(m.paths[j]) == list(choice.paths[i])
                assert generic == (name == "generic")
                want = choice.blocked[i] if choice.blocked is not None else np.zeros(2, dtype=bool)
                assert list(dropped) == list(want) or generic
    assert (merged.where["oracle"][[0, 2]] == merged.where["fetched"][[0, 2]]).all()
    assert (merged.where["drop-all"] == merged.where["none"]).all()
    dense = merge_choices({"none": MemoryChoice()}, 3, 0)
    assert dense.choice.paths is None and list(dense.row) == [0, 1, 2]


def test_scoring_without_a_kv_cache_equals_the_cached_path(memory_run, smoke_data_config):
    """The path Hugging Face models are evaluated on (`kv_cache = False`: greedy decoding recomputes the
    whole sequence, each candidate is scored with its prompt in one forward). Independent reference: the
    same model through the KV-cache path. Bugs caught: a candidate scored with another prompt's memory,
    prompts cut differently, generated tokens appended with the wrong position or segment."""
    from hiermem.evaluate import evaluate_model
    model = load_model(RunDir.open(memory_run).final).eval()
    model.fast = False
    data = build_data(smoke_data_config, progress=False)
    cfg = EvalConfig(heldout_docs_per_source=6, split="all", rank_candidates=20, max_probes_per_relation=4)
    cached = evaluate_model(model, data, cfg)[0]
    model.kv_cache = False
    whole = evaluate_model(model, data, cfg)[0]
    assert len(cached) > 50 and list(cached["mode"]) == list(whole["mode"])
    for column in ("generated", "correct", "rank_correct", "mc_correct", "n_candidates"):
        assert list(cached[column]) == list(whole[column]), column
    np.testing.assert_allclose(whole["answer_logprob"], cached["answer_logprob"], rtol=1e-4, atol=1e-4)
