"""The vanilla RAG baseline (hiermem.rag): what is retrieved, what the model reads, what it costs."""

import numpy as np
import pandas as pd
import pytest

from hiermem.accounting import count
from hiermem.config import MemoryConfig, tiny_config
from hiermem.data.pipeline import build_data
from hiermem.evaluate import EvalConfig, evaluate_run, probe_rows
from hiermem.rag import flops_ratio, memory_flops_ratio, rag_prompts, retrieve
from hiermem.train import TrainConfig, train


def test_retrieves_the_nearest_training_document_of_the_routed_leaf(smoke_data_config):
    """Bug caught: a document from another cluster, a held-out document (a cloze probe's own source),
    or the farthest instead of the nearest. Independent: brute force over every training document
    whose path equals the probe's routed path, by cosine similarity."""
    data = build_data(smoke_data_config, progress=False)
    probes = data.probes.reset_index(drop=True)
    rows = probe_rows(data, probes)
    got = retrieve(data, rows.vectors, rows.routed)
    vectors = np.load(data.dirs["emb"] / "embeddings.npy")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    train_rows = np.flatnonzero((data.corpus["split"] == "train").to_numpy())
    q = rows.vectors / np.linalg.norm(rows.vectors, axis=1, keepdims=True)
    found = 0
    for i in range(len(probes)):
        same = [r for r in train_rows if tuple(data.doc_paths[r]) == tuple(rows.routed[i])]
        if not same:
            assert got.doc_row[i] == -1 and got.doc_tokens[i] == []
            continue
        want = same[int(np.argmax(unit[same] @ q[i]))]
        assert got.doc_row[i] == want
        assert data.corpus["split"].iloc[want] == "train"
        source = probes["source_doc_id"].iloc[i] if "source_doc_id" in probes else ""
        assert data.corpus["doc_id"].iloc[want] != source
        assert got.doc_tokens[i] == list(map(int, data.doc_tokens[want]))
        found += 1
    assert found > len(probes) // 2
    prompts = [[1, 2], [3]]
    assert rag_prompts(prompts, type(got)(doc_row=np.array([0, -1]), doc_tokens=[[9, 8, 7], []])) == [[9, 8, 7, 1, 2], [3]]


def test_flops_accounting_on_a_hand_computed_case():
    """Bug caught: the RAG ratio computed over the prompt only (not prompt + answer), or the memory
    ratio dividing by the non-embedding FLOPs only. By hand: prompt 10, document 20, answer 2 tokens
    -> (20 + 10 + 2) / (10 + 2); tiny-d2 at 128 tokens with FFN memory (64, 64)."""
    assert flops_ratio([10], [20], [2]) == pytest.approx([32 / 12])
    assert flops_ratio([10, 5], [0, 5], [2, 5]) == pytest.approx([1.0, 1.5])
    model = tiny_config(2, vocab_size=4096, max_seq_len=128)
    acc = count(model, MemoryConfig(type="ffn", multipliers=(64, 64), branching=8), seq_len=128)
    d, layers = 128, 2
    fetched = 2 * (64 + 64) * 3 * d * layers                     # forward: 2 FLOPs per fetched parameter
    anchor = 2 * layers * (4 * d * d + 3 * d * 4 * d) + layers * 4 * 128 * d + 2 * 4096 * d
    assert memory_flops_ratio(acc) == pytest.approx(1 + fetched / anchor)


def test_rag_modes_in_evaluation(smoke_data_config, pretrained_anchor, tmp_path):
    """Bug caught: rag rows scored without the document (equal to 'none'), the memory missing from
    'rag+fetched', perplexity asked for rag modes, or the cost column missing; a dense model offered
    'rag+fetched'."""
    cfg = TrainConfig(stage="memory-cotrain", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                      memory=MemoryConfig(multipliers=(8, 2), branching=4), tokens=6 * 4 * 128, batch_size=4,
                      optim=TrainConfig().optim.replace(bank_lr=0.05))
    run = train(cfg, tmp_path / "memory", progress=False)
    ecfg = EvalConfig(split="all", max_probes_per_relation=4, rank_candidates=8, heldout_docs_per_source=3,
                      modes=("none", "fetched", "rag", "rag+fetched"), level_ablation=False)
    summary = evaluate_run(run, ecfg).set_index("mode")
    assert list(summary.index) == ["none", "fetched", "rag", "rag+fetched"]
    results = pd.read_parquet(run / "eval" / "probe_results.parquet")
    lp = results.pivot(index="probe_id", columns="mode", values="answer_logprob")
    assert not np.allclose(lp["rag"], lp["none"]) and not np.allclose(lp["rag+fetched"], lp["rag"])
    assert (results.loc[results["mode"] == "rag+fetched", "used_path"] != "").all()
    assert summary.loc["none", "flops_x"] == 1.0
    assert summary.loc["rag", "flops_x"] > 1.5 and summary.loc["fetched", "flops_x"] > 1.0
    assert summary.loc["rag+fetched", "flops_x"] == pytest.approx(summary.loc["rag", "flops_x"]
                                                                   * summary.loc["fetched", "flops_x"])
    ppl = pd.read_csv(run / "eval" / "perplexity.csv")
    assert set(ppl["mode"]) == {"none", "fetched"}
    dense = evaluate_run(pretrained_anchor, ecfg)
    assert list(dense["mode"]) == ["none", "rag"]
