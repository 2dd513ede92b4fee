"""Training engine: stages, frozen anchor, generic sampling, exact resume, bad input."""

import json

import pytest
import torch

from hiermem.checkpoint import load_model
from hiermem.cli import main
from hiermem.config import MemoryConfig
from hiermem.train import TrainConfig, TrainingDiverged, _generic_mask, final_checkpoint, train

MEMORY = MemoryConfig(type="ffn", multipliers=(8, 2), branching=4)


def _memory_cfg(data, anchor_dir, stage="memory-cotrain", **kw):
    base = dict(stage=stage, anchor="tiny-d1", memory=MEMORY, data=data, init_from=str(anchor_dir),
                tokens=12 * 4 * 128, batch_size=4, checkpoint_every=5, log_every=2)
    base.update(kw)
    return TrainConfig(**base)


def test_pretrain_run_directory(pretrained_anchor):
    run = pretrained_anchor
    for name in ("config.yaml", "provenance.json", "metrics.jsonl", "summary.json", "final/anchor.safetensors"):
        assert (run / name).exists(), name
    prov = json.loads((run / "provenance.json").read_text())
    assert {"git_sha", "versions", "device", "accounting"} <= set(prov)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert not (run / "checkpoint").exists()  # the resume checkpoint is removed once final/ exists


def test_frozen_anchor_stays_frozen(smoke_data_config, pretrained_anchor, tmp_path):
    run = train(_memory_cfg(smoke_data_config, pretrained_anchor, stage="memory-frozen"), tmp_path / "frozen",
                progress=False)
    before, after = load_model(final_checkpoint(pretrained_anchor)), load_model(final_checkpoint(run))
    for (name, a), b in zip(before.anchor.state_dict().items(), after.anchor.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(p.abs().sum() > 0 for p in after.bank.levels)  # some down projections moved off zero
    touched = json.loads((run / "summary.json").read_text())["touched_blocks"]
    assert touched["0"] > 0 and touched["1"] > 0


def test_cotrain_moves_anchor(smoke_data_config, pretrained_anchor, tmp_path):
    run = train(_memory_cfg(smoke_data_config, pretrained_anchor), tmp_path / "cotrain", progress=False)
    before, after = load_model(final_checkpoint(pretrained_anchor)), load_model(final_checkpoint(run))
    assert not torch.equal(before.anchor.embed.weight, after.anchor.embed.weight)
    assert any(p.abs().sum() > 0 for p in after.bank.generic)  # the generic block was trained too


def test_generic_sampling_rate():
    draws = torch.cat([_generic_mask(0, step, 64, 1 / 17) for step in range(400)])
    assert abs(draws.float().mean().item() - 1 / 17) < 0.01
    assert torch.equal(_generic_mask(3, 7, 8, 0.5), _generic_mask(3, 7, 8, 0.5))  # a function of (seed, step)
    assert _generic_mask(0, 0, 8, 0.0) is None


def test_exact_resume(smoke_data_config, pretrained_anchor, tmp_path):
    cfg = _memory_cfg(smoke_data_config, pretrained_anchor, tokens=13 * 4 * 128)
    full = train(cfg, tmp_path / "full", progress=False)
    # "kill" after 8 steps (last checkpoint at step 5), then resume twice more
    train(cfg, tmp_path / "resumed", progress=False, stop_after_steps=8)
    assert (tmp_path / "resumed" / "checkpoint" / "train_state.safetensors").exists()
    train(cfg, tmp_path / "resumed", progress=False, stop_after_steps=6)
    train(cfg, tmp_path / "resumed", progress=False)
    a, b = load_model(final_checkpoint(full)), load_model(final_checkpoint(tmp_path / "resumed"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 13  # no duplicated rows after resuming


def test_finished_run_is_skipped_and_changed_config_refused(smoke_data_config, pretrained_anchor):
    cfg = TrainConfig.load(pretrained_anchor / "config.yaml")
    mtime = (pretrained_anchor / "summary.json").stat().st_mtime
    train(cfg, pretrained_anchor, progress=False)
    assert (pretrained_anchor / "summary.json").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="Differing fields: batch_size, optim.lr"):
        train(cfg.replace(batch_size=8, optim=cfg.optim.replace(lr=1.0)), pretrained_anchor, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(smoke_data_config, pretrained_anchor, tmp_path, monkeypatch):
    from hiermem import stepper as stepper_module
    original = stepper_module.TrainStepper.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        if calls["n"] == 7:
            out = {**out, "loss": float("nan"), "finite": False}
        return out

    monkeypatch.setattr(stepper_module.TrainStepper, "step", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite loss.*step 6.*Last good checkpoint: step 5"):
        train(_memory_cfg(smoke_data_config, pretrained_anchor), tmp_path / "nan", progress=False)
    assert (tmp_path / "nan" / "checkpoint" / "train_state.json").exists()
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_bad_configs_and_unwritable_run_dir(smoke_data_config, pretrained_anchor, tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        TrainConfig(stage="memory-frozen", memory=MEMORY, data=smoke_data_config)
    with pytest.raises(ValueError, match="memory"):
        TrainConfig(stage="memory-scratch", data=smoke_data_config)
    with pytest.raises(ValueError, match="memory.branching"):
        _memory_cfg(smoke_data_config, pretrained_anchor, memory=MEMORY.replace(branching=16))
    with pytest.raises(ValueError, match="memory.multipliers"):
        _memory_cfg(smoke_data_config, pretrained_anchor, memory=MEMORY.replace(multipliers=(4, 2, 1)))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="run directory .* is not writable"):
        train(_memory_cfg(smoke_data_config, pretrained_anchor), blocker / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="no final checkpoint"):
        train(_memory_cfg(smoke_data_config, tmp_path / "missing"), tmp_path / "x", progress=False)


def test_cli_train_and_eval_round_trip(smoke_data_config, pretrained_anchor, tmp_path, capsys):
    cfg = _memory_cfg(smoke_data_config, pretrained_anchor, stage="memory-scratch", init_from="",
                      tokens=4 * 4 * 128)
    cfg.save(tmp_path / "run.yaml")
    assert main(["train", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "cli"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "memory-scratch"
    assert main(["eval", str(tmp_path / "cli"), "--modes", "none,fetched", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fetched" in out and "drop-level1" in out
    assert (tmp_path / "cli" / "eval" / "summary.csv").exists()
    assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_continue_stage_and_rewarm(smoke_data_config, pretrained_anchor, tmp_path):
    """Bug caught: co-training restarting at the anchor's peak LR when rewarm is set; the continued
    control not starting from the anchor's weights or not using the memory stage's sequences."""
    parent = TrainConfig.load(pretrained_anchor / "config.yaml")
    cfg = _memory_cfg(smoke_data_config, pretrained_anchor, optim=TrainConfig().optim.replace(
        lr=1.0, final_lr=1e-6, rewarm=3.0, warmup_fraction=0.0))
    assert cfg.anchor_lr() == (pytest.approx(3.0 * parent.optim.final_lr), 1e-6)
    run = train(cfg, tmp_path / "rewarm", progress=False)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] <= 3.0 * parent.optim.final_lr  # never above the re-warmed peak (1.0 would be the restart)
    # the dense control: continue from the anchor with (almost) no learning keeps its weights
    still = TrainConfig(stage="continue", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                        tokens=2 * 4 * 128, batch_size=4, optim=TrainConfig().optim.replace(lr=1e-12, final_lr=0.0,
                                                                                             weight_decay=0.0))
    assert still.resolved_packing == "clustered" and not still.uses_memory
    run = train(still, tmp_path / "continued", progress=False)
    a, b = load_model(final_checkpoint(pretrained_anchor)), load_model(final_checkpoint(run))
    assert b.bank is None
    for (name, x), y in zip(a.anchor.state_dict().items(), b.anchor.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="memory"):
        TrainConfig(stage="continue", memory=MEMORY, data=smoke_data_config, init_from=str(pretrained_anchor))


def test_measured_block_updates_match_the_expected_replay(smoke_data_config, pretrained_anchor, tmp_path):
    """The optimizer's count of updates per block equals the loader replay of hiermem.data.packing
    (no generic draws: probability 0), level by level."""
    cfg = _memory_cfg(smoke_data_config, pretrained_anchor, stage="memory-frozen", generic_prob=0.0)
    run = train(cfg, tmp_path / "counted", progress=False)
    summary = json.loads((run / "summary.json").read_text())
    for expected, measured in zip(summary["expected_block_updates"], summary["block_updates"]):
        assert expected["updates_min"] == measured["updates_min"]
        assert expected["updates_median"] == measured["updates_median"]
        assert expected["updates_max"] == measured["updates_max"]


def test_a_pickled_resume_state_is_refused_and_never_run(smoke_data_config, pretrained_anchor, tmp_path):
    """Bug caught: a resume state loaded with pickle (a crafted checkpoint would run code)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    cfg = _memory_cfg(smoke_data_config, pretrained_anchor, tokens=8 * 4 * 128)
    train(cfg, tmp_path / "run", progress=False, stop_after_steps=6)
    (tmp_path / "run" / "checkpoint" / "train_state.pt").write_bytes(pickle.dumps({"stepper": Payload()}))
    with pytest.raises(ValueError, match="train_state.pt is a pickled resume state"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "pwned").exists()


def test_state_round_trip_keeps_types():
    from hiermem.state import load_state, save_state
    import tempfile
    state = {"step": 3, "opt": {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(2, 3)}},
                                "param_groups": [{"betas": (0.9, 0.95), "params": [0], "lr": 1e-3, "role": "anchor"}]},
             "lrs": torch.tensor([0.1, 0.2], dtype=torch.float64), "none": None, "flag": True}
    with tempfile.TemporaryDirectory() as d:
        save_state(state, d)
        back = load_state(d)
    assert back["opt"]["state"][0]["exp_avg"].shape == (2, 3) and isinstance(back["opt"]["param_groups"][0]["betas"], tuple)
    assert back["lrs"].dtype == torch.float64 and back["none"] is None and back["flag"] is True and back["step"] == 3
