"""The run directory owner: layout, refusals, the parent run recorded explicitly, data bundles passed in."""

import json
import pickle

import pytest

from hiermem.cli import main
from hiermem.config import MemoryConfig
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig, train

MEMORY = MemoryConfig(type="ffn", multipliers=(4, 2))


def _memory_cfg(data, anchor_dir, **kw):
    base = dict(stage="memory-frozen", anchor="tiny-d1", memory=MEMORY, data=data, init_from=str(anchor_dir),
                tokens=3 * 4 * 128, batch_size=4, checkpoint_every=50, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_layout_matches_what_training_writes(pretrained_anchor):
    """Bug caught: RunDir and training disagreeing on a file name (every reader would miss the file)."""
    run = RunDir.open(pretrained_anchor)
    written = {p.name for p in pretrained_anchor.iterdir()}
    assert {RunDir.CONFIG, RunDir.PROVENANCE, RunDir.METRICS, RunDir.FINAL, RunDir.SUMMARY} <= written
    assert run.is_started and run.is_finished and run.final == pretrained_anchor / "final"
    assert run.summary() == json.loads((pretrained_anchor / "summary.json").read_text())
    assert [m["step"] for m in run.metrics()] == [5, 10, 15, 20, 25, 30]
    assert run.parent is None and run.total_tokens() == run.summary()["tokens"] == 30 * 4 * 128


def test_not_a_run_directory_is_refused_naming_it(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match=r"notes' is not a run directory \(no config.yaml"):
        RunDir.open(tmp_path / "notes")
    with pytest.raises(FileNotFoundError, match="absent' does not exist"):
        RunDir.open(tmp_path / "absent")
    assert main(["eval", str(tmp_path / "notes"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is not a run directory" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="not finished"):
        RunDir(tmp_path / "notes").final
    with pytest.raises(ValueError, match="evaluation table must be one of"):
        RunDir(tmp_path).eval_path("logits")


def test_memory_run_records_its_parent_and_total_tokens(smoke_data_config, pretrained_anchor, tmp_path):
    """Bug caught: the anchor of a memory run recovered by parsing directory names (today's runs are
    named freely, so a name that does not follow <role>-<id> lost the anchor's tokens)."""
    run = RunDir(train(_memory_cfg(smoke_data_config, pretrained_anchor), tmp_path / "any name", progress=False))
    parent = run.provenance()["parent"]
    assert parent["run_dir"] == str(pretrained_anchor.resolve())
    assert parent["run_id"] == pretrained_anchor.name  # no sweep record: the directory name
    assert run.parent == RunDir(str(pretrained_anchor.resolve()))
    anchor_tokens = RunDir(pretrained_anchor).summary()["tokens"]
    assert run.summary()["total_tokens"] == run.summary()["tokens"] + anchor_tokens == 3 * 512 + anchor_tokens
    # a grandchild adds both generations
    cont = TrainConfig(stage="continue", anchor="tiny-d1", data=smoke_data_config, init_from=str(run.path),
                       tokens=3 * 4 * 128, batch_size=4, checkpoint_every=50, log_every=1)
    child = RunDir(train(cont, tmp_path / "grandchild", progress=False))
    assert child.total_tokens() == 3 * 512 + 3 * 512 + anchor_tokens


def test_sweep_record_id_is_the_parent_id(tmp_path, pretrained_anchor):
    import shutil
    copy = tmp_path / "anchor-copy"
    shutil.copytree(pretrained_anchor, copy)
    (copy / RunDir.RESULT).write_text(json.dumps({"run_id": "abc123", "status": "ok"}))
    assert RunDir(copy).run_id == "abc123"
    assert RunDir(copy).parent_record()["run_id"] == "abc123"
    (copy / RunDir.RESULT).write_text("{broken")
    with pytest.raises(ValueError, match="result.json' is unreadable"):
        RunDir(copy).record()


def test_train_uses_the_given_data_bundle(smoke_data_config, pretrained_anchor, tmp_path, monkeypatch):
    """train(cfg, data=bundle) never rebuilds data (sweeps build once in the driver); a bundle of
    another data config is refused naming the differing fields."""
    from hiermem.data.pipeline import build_data
    import hiermem.train as train_module
    bundle = build_data(smoke_data_config, progress=False)

    def no_build(*a, **k):
        raise AssertionError("train() rebuilt the data although a bundle was given")
    monkeypatch.setattr(train_module, "build_data", no_build)
    run = train(_memory_cfg(smoke_data_config, pretrained_anchor), tmp_path / "given", data=bundle, progress=False)
    assert RunDir(run).is_finished
    other = smoke_data_config.replace(seq_len=smoke_data_config.seq_len // 2)
    with pytest.raises(ValueError, match="differing fields: seq_len"):
        train(_memory_cfg(other, pretrained_anchor), tmp_path / "other", data=bundle, progress=False)


def test_data_bundle_pickles_as_config_and_directories(smoke_data_config):
    """A bundle crosses to sweep workers: loaded tables (the corpus, tokens) must not travel with it."""
    from hiermem.data.pipeline import build_data
    bundle = build_data(smoke_data_config, progress=False)
    bare = len(pickle.dumps(bundle))
    _ = bundle.corpus, bundle.doc_tokens
    assert len(pickle.dumps(bundle)) == bare < 20_000
    clone = pickle.loads(pickle.dumps(bundle))
    assert clone.cfg == bundle.cfg and len(clone.corpus) == len(bundle.corpus)


def test_branching_is_taken_from_the_tree(smoke_data_config):
    """The bank's branching is the data tree's: unset in the config, set by TrainConfig; a different
    explicit value is refused."""
    cfg = _memory_cfg(smoke_data_config, "anchor")
    assert cfg.memory.branching == smoke_data_config.tree.branching
    with pytest.raises(ValueError, match="memory.branching"):
        _memory_cfg(smoke_data_config, "anchor", memory=MEMORY.replace(branching=smoke_data_config.tree.branching + 1))
    with pytest.raises(ValueError, match="memory.branching"):
        MEMORY.nodes_at_level(0)
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
