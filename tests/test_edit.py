"""Forget and learn: blocks removed from the saved files, only the learned blocks change, bad input refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hiermem.checkpoint import load_model
from hiermem.cli import main
from hiermem.config import MemoryConfig
from hiermem.data.pipeline import build_data
from hiermem.edit import (checkpoint_checksums, edit_record, forget, forgetting_from_evaluations, invent_facts, learn,
                          level_files, write_documents)
from hiermem.edit_eval import forgetting_table, learned_fact_table, probe_change_table
from hiermem.evaluate import EvalConfig, evaluate_run
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig, train

EVAL = EvalConfig(split="all", max_probes_per_relation=6, rank_candidates=20, max_new_tokens=6, batch_size=32)


@pytest.fixture(scope="module")
def memory_run(smoke_data_config, pretrained_anchor, tmp_path_factory):
    """A frozen-anchor memory run (A3) on the smoke anchor: levels of 4 and 32 units on a 4-ary tree."""
    cfg = TrainConfig(stage="memory-frozen", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                      memory=MemoryConfig(multipliers=(4, 32)), tokens=8 * 4 * 128, batch_size=4,
                      optim=TrainConfig().optim.replace(bank_lr=0.05))
    return train(cfg, tmp_path_factory.mktemp("runs") / "memory", progress=False)


@pytest.fixture(scope="module")
def data(smoke_data_config):
    return build_data(smoke_data_config, progress=False)


def _blocks(ckpt, level):
    with safe_open(str(level_files(ckpt)[level]), framework="pt") as f:
        return f.get_tensor("blocks")


def test_forget_zeroes_exactly_the_named_rows(memory_run, tmp_path):
    src = RunDir(memory_run).final
    out = forget(memory_run, tmp_path / "forgot", nodes=["2.3"])
    new = RunDir.open(out).final
    before, after = _blocks(src, 2), _blocks(new, 2)
    row = 2 * 4 + 3
    assert torch.count_nonzero(after[row]) == 0 and torch.count_nonzero(before[row]) > 0
    keep = torch.arange(len(before)) != row
    assert torch.equal(after[keep], before[keep])  # every other row bit-identical
    old_sums, new_sums = checkpoint_checksums(src), checkpoint_checksums(new)
    changed = {f for f in old_sums if old_sums[f] != new_sums[f]}
    assert changed == {str(level_files(new)[2].relative_to(new))}  # anchor, generic, level 1, config untouched
    record = edit_record(out)
    assert record["kind"] == "forget" and record["levels"] == [2]
    assert record["nodes"] == [{"level": 2, "path": [2, 3], "node": 11, "name": "2.3"}]
    assert record["checksums"]["source"] == old_sums and record["checksums"]["edited"] == new_sums
    assert RunDir(out).parent.path == RunDir(memory_run).path.resolve()
    assert RunDir(out).total_tokens() == RunDir(memory_run).total_tokens()
    # "removed" = exactly what blocking the block at evaluation does: the same logits, bit for bit
    tokens = torch.randint(2, 500, (2, 16))
    paths = torch.tensor([[2, 3], [2, 3]])
    with torch.no_grad():
        edited = load_model(new)(tokens, paths=paths)
        blocked = load_model(src)(tokens, paths=paths, blocked=torch.tensor([[False, True]] * 2))
        kept = load_model(src)(tokens, paths=paths)
    assert torch.equal(edited, blocked) and not torch.equal(edited, kept)


def _write(path, cfg):
    cfg.save(path)
    return path


def test_forget_subtree_and_subjects(memory_run, pretrained_anchor, data, tmp_path, capsys):
    out = forget(memory_run, tmp_path / "subtree", nodes=["1"], with_subtree=True)
    assert [n["name"] for n in edit_record(out)["nodes"]] == ["1", "1.0", "1.1", "1.2", "1.3"]
    assert torch.count_nonzero(_blocks(RunDir(out).final, 1)[1]) == 0
    assert torch.count_nonzero(_blocks(RunDir(out).final, 2)[4:8]) == 0
    probed = data.probes[data.probes["fact_id"] != ""]
    subjects = sorted(probed["subject"].unique())[:2]
    out = forget(memory_run, tmp_path / "subjects", subjects=subjects, data=data)
    record = edit_record(out)
    assert set(record["subjects"]) == set(subjects) and record["levels"] == [2]  # the leaf level
    corpus = data.corpus
    for subject in subjects:
        ids = set(data.facts.loc[data.facts["subject"] == subject, "fact_id"])
        rows = np.flatnonzero(corpus["fact_id"].isin(ids).to_numpy() & (corpus["split"] == "train").to_numpy())
        leaves = {".".join(map(str, p)) for p in data.doc_paths[rows]}
        assert set(record["subjects"][subject]["nodes"]) == leaves
    table = forgetting_table({"A3": (memory_run, out)}, anchor=pretrained_anchor, data=data, cfg=EVAL, n_boot=50)
    every = table[table["subject"] == "all"].set_index("metric")
    assert set(table["subject"]) == set(subjects) | {"all"}
    assert every.loc["correct", "probes"] == probed["subject"].isin(subjects).sum()
    for metric, row in every.iterrows():
        assert row["leakage"] == pytest.approx(row["after"] - row["anchor"])
        assert row["anchor_leakage"] == pytest.approx(0.0)  # a frozen anchor is the pretrained anchor
    # `hiermem eval` of the forgotten run joins the evaluation tables: the same numbers as scoring them here
    every_probe = EVAL.replace(max_probes_per_relation=10_000, modes=("none", "fetched"))
    for run in (memory_run, out, pretrained_anchor):
        evaluate_run(run, every_probe)
    joined, notes = forgetting_from_evaluations(out)
    assert notes == []
    joined = joined.set_index(["subject", "metric"])
    for row in table.itertuples():
        got = joined.loc[(row.subject, row.metric)]
        assert got["probes"] == row.probes
        assert (got["before"], got["after"], got["anchor"]) == pytest.approx((row.before, row.after, row.anchor))
    assert main(["eval", str(out), "--config", str(_write(tmp_path / "eval.yaml", every_probe)), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "forgotten subjects" in printed and subjects[0] in printed
    assert forgetting_from_evaluations(memory_run) == (None, [])  # not an edited run


def test_bad_forget_input_is_refused_naming_it(memory_run, pretrained_anchor, tmp_path, capsys):
    with pytest.raises(ValueError, match="node '7' does not exist"):
        forget(memory_run, tmp_path / "a", nodes=["7"])
    with pytest.raises(ValueError, match=r"node '1.2.3' does not exist.*2 level"):
        forget(memory_run, tmp_path / "a", nodes=["1.2.3"])
    with pytest.raises(ValueError, match="has no memory bank"):
        forget(pretrained_anchor, tmp_path / "a", nodes=["1"])
    with pytest.raises(ValueError, match=r"unknown subject\(s\) \['Nobody Atall'\]"):
        forget(memory_run, tmp_path / "a", subjects=["Nobody Atall"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        forget(memory_run, tmp_path / "full", nodes=["1"])
    assert main(["forget", str(memory_run), "--nodes", "9.9", "--out", str(tmp_path / "b")]) == 1
    assert "node '9.9' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_learn_changes_only_the_learned_blocks(memory_run, data, tmp_path, capsys):
    docs, probes = invent_facts(3, docs_per_subject=2)
    probes["relation"] = "learned"  # rank each answer among the invented facts' answers
    folder = write_documents(tmp_path / "docs", docs)
    assert main(["learn", str(memory_run), "--docs", str(folder), "--out", str(tmp_path / "learned"), "--steps", "400",
                 "--lr", "0.05", "--levels", "all"]) == 0
    out = tmp_path / "learned"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
    record = edit_record(out)
    assert record["kind"] == "learn" and record["loss_last"] < record["loss_first"]
    src, new = RunDir(memory_run).final, RunDir(out).final
    old_sums, new_sums = checkpoint_checksums(src), checkpoint_checksums(new)
    for name in ("anchor.safetensors", "bank/generic.safetensors", "config.yaml"):
        assert old_sums[name] == new_sums[name]  # bit-identical
    learned = {(n["level"], n["node"]) for n in record["nodes"]}
    assert {n["level"] for n in record["nodes"]} == {1, 2}
    for level in (1, 2):
        changed = torch.nonzero((_blocks(src, level) != _blocks(new, level)).any(dim=1)).flatten().tolist()
        assert changed and {(level, i) for i in changed} <= learned
    # the new facts: answerable with their memory, not without it (the anchor never changed)
    table = learned_fact_table({"A3": (memory_run, out)}, probes, data=data, cfg=EVAL).set_index(
        ["phase", "mode", "metric"])
    after_memory, after_none = table.loc[("after", "oracle-path", "rank_correct")], table.loc[("after", "none", "rank_correct")]
    print(table.to_string())
    before_memory = table.loc[("before", "oracle-path", "rank_correct")]
    # at smoke scale (tiny-d1, 4 + 32 units) accuracy is too coarse a probe (6 facts); the learned blocks
    # must raise the answers' log-likelihood well beyond noise (measured +3.6 nats at 400 steps)
    assert after_memory["answer_logprob"] > before_memory["answer_logprob"] + 1.0
    assert after_memory["answer_logprob"] > after_none["answer_logprob"] + 1.0
    assert after_none["accuracy"] == table.loc[("before", "none", "rank_correct"), "accuracy"]
    # the run's other probes: exactly unchanged where their path reaches no learned block
    summary, per_probe = probe_change_table(memory_run, out, data=data, cfg=EVAL, n_boot=50)
    untouched = summary[summary["part"] == "untouched"].set_index("metric")
    assert (untouched["probes"] > 0).all()
    assert (untouched["score_changed"] == 0).all() and (untouched["logprob_changed"] == 0).all()
    assert (per_probe.loc[~per_probe["touched"], "logprob_change"] == 0).all()
    every = summary[summary["part"] == "all"]
    assert ((every["ci_low"] <= 0) & (every["ci_high"] >= 0)).all()  # within the CI of no change


def test_bad_learn_input_is_refused_naming_it(memory_run, pretrained_anchor, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["learn", str(memory_run), "--docs", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "no documents" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("Zorblax was born in Kyoto.")
    (bad / "latin1.txt").write_bytes("Caf\xe9 \xff".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*not UTF-8"):
        learn(memory_run, bad, tmp_path / "o")
    (bad / "latin1.txt").unlink()
    (bad / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match="blank.txt.*empty"):
        learn(memory_run, bad, tmp_path / "o")
    with pytest.raises(ValueError, match="has no memory bank"):
        learn(pretrained_anchor, tmp_path / "docs", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    shutil.rmtree(bad)


def test_learn_with_replay_trains_the_same_blocks_on_new_and_own_documents(memory_run, data, tmp_path):
    """Bug caught: replayed documents that reach other blocks (their rows would change: refused by the
    check before saving), or a replay share that is not applied to the batches."""
    docs, _ = invent_facts(2, docs_per_subject=2)
    out = learn(memory_run, docs, tmp_path / "replayed", steps=20, lr=0.05, replay=0.5, data=data)
    record = edit_record(out)
    assert record["replay"] == 0.5 and record["replay_sequences_per_batch"] == 8
    src, new = RunDir(memory_run).final, RunDir(out).final
    learned = {n["node"] for n in record["nodes"]}
    changed = torch.nonzero((_blocks(src, 2) != _blocks(new, 2)).any(dim=1)).flatten().tolist()
    assert changed and set(changed) <= learned
    with pytest.raises(ValueError, match=r"replay must be a share in \[0, 1\), got 1.0"):
        learn(memory_run, docs, tmp_path / "bad", replay=1.0, data=data)
