"""Training engine: stages, frozen anchor, generic sampling, exact resume, bad input."""

import json

import pytest
import torch

from hiermem.checkpoint import load_model
from hiermem.cli import main
from hiermem.config import MemoryConfig
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig, TrainingDiverged, _generic_mask, train

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


def _zero_init_part(bank, rows, level):
    """The down-projection part (zero at initialization) of each row of `rows` (n, block_numel) of a
    level: (n, numel of the down parts). Rows start non-zero (gate/up are random), so "the block was
    trained" is checked on this part, which only a gradient update moves off zero."""
    r = bank.units[level]
    view = rows.reshape(rows.shape[0], len(bank.memory_layers), -1)
    pieces = view.split([r * s.width for s in bank.specs], dim=2)
    zeros = [piece for s, piece in zip(bank.specs, pieces) if s.init == "zeros"]
    assert zeros, "this memory type has no zero-initialized tensor"
    return torch.cat(zeros, dim=2).reshape(rows.shape[0], -1)


def test_frozen_anchor_stays_frozen(smoke_data_config, pretrained_anchor, tmp_path, monkeypatch):
    """Bug caught: the anchor moving in a frozen run; a bank step that does nothing (or updates blocks
    no sequence fetched); the generic block never trained; a generic probability other than
    1/(k+1) (1/k, or 0) -- the probability the loop really draws with is recorded."""
    import hiermem.train as train_module
    from hiermem.data.pipeline import build_data
    drawn = []
    original = train_module._generic_mask

    def recording(seed, step, batch, prob):
        drawn.append(prob)
        return original(seed, step, batch, prob)

    monkeypatch.setattr(train_module, "_generic_mask", recording)
    run = train(_memory_cfg(smoke_data_config, pretrained_anchor, stage="memory-frozen"), tmp_path / "frozen",
                progress=False)
    before, after = load_model(RunDir(pretrained_anchor).final), load_model(RunDir(run).final)
    for (name, a), b in zip(before.anchor.state_dict().items(), after.anchor.state_dict().values()):
        assert torch.equal(a, b), name
    k = MEMORY.branching
    assert drawn and all(prob == pytest.approx(1 / (k + 1)) for prob in drawn), set(drawn)
    assert json.loads((run / "summary.json").read_text())["generic_prob"] == pytest.approx(1 / (k + 1))
    # every block on some training sequence's path may have moved; no other block's down part did
    paths = torch.as_tensor(build_data(smoke_data_config, progress=False).sequences("clustered").paths)
    touched = json.loads((run / "summary.json").read_text())["touched_blocks"]
    flat = torch.zeros(len(paths), dtype=torch.long)
    for level, p in enumerate(after.bank.levels):
        flat = flat * k + paths[:, level]
        moved = set(torch.nonzero(_zero_init_part(after.bank, p.detach(), level).abs().sum(dim=1)).flatten().tolist())
        assert moved, f"no block of level {level + 1} was updated"
        assert moved <= set(flat.tolist()), f"level {level + 1}: blocks no sequence fetches were updated"
        assert len(moved) == touched[str(level)]
    for level, g in enumerate(after.bank.generic):
        assert _zero_init_part(after.bank, g.detach(), level).abs().sum() > 0, "the generic block was not trained"


def test_cotrain_moves_anchor(smoke_data_config, pretrained_anchor, tmp_path):
    run = train(_memory_cfg(smoke_data_config, pretrained_anchor), tmp_path / "cotrain", progress=False)
    before, after = load_model(RunDir(pretrained_anchor).final), load_model(RunDir(run).final)
    assert not torch.equal(before.anchor.embed.weight, after.anchor.embed.weight)
    # the generic block was trained too: its zero-initialized down part moved (gate/up start non-zero)
    for level, g in enumerate(after.bank.generic):
        assert _zero_init_part(after.bank, g.detach(), level).abs().sum() > 0, level


def test_default_generic_probability_is_one_over_k_plus_one(smoke_data_config, pretrained_anchor):
    """Bug caught: the default generic probability 1/k or 0 instead of 1/(k+1) (the paper's 1/17, k=16)."""
    for k in (4, 16):
        cfg = TrainConfig(stage="memory-scratch", anchor="tiny-d1", memory=MEMORY.replace(branching=None),
                          data=smoke_data_config.replace(tree=smoke_data_config.tree.replace(branching=k)))
        assert cfg.memory.branching == k
        assert cfg.resolved_generic_prob == pytest.approx(1 / (k + 1))
    assert _memory_cfg(smoke_data_config, pretrained_anchor, generic_prob=0.3).resolved_generic_prob == 0.3
    assert TrainConfig(stage="pretrain", data=smoke_data_config).resolved_generic_prob == 0.0


def test_logged_learning_rates_follow_the_reference_schedule(pretrained_anchor):
    """Bug caught: an inverted or shifted schedule in the loop. Each logged row holds the LR of its
    last step; reference: torch's LinearLR + CosineAnnealingLR (tests/helpers.py)."""
    from helpers import reference_lr_schedule
    cfg = TrainConfig.load(pretrained_anchor / "config.yaml")
    steps = json.loads((pretrained_anchor / "summary.json").read_text())["steps"]
    want = reference_lr_schedule(steps, round(cfg.optim.warmup_fraction * steps), cfg.optim.lr, cfg.optim.final_lr)
    rows = [json.loads(line) for line in (pretrained_anchor / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([want[r["step"] - 1] for r in rows], rel=1e-9)
    assert rows[-1]["lr"] < rows[0]["lr"]


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
    a, b = load_model(RunDir(full).final), load_model(RunDir(tmp_path / "resumed").final)
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
    with pytest.raises(FileNotFoundError, match="missing.* does not exist"):
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
    a, b = load_model(RunDir(pretrained_anchor).final), load_model(RunDir(run).final)
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


def test_first_logged_loss_is_the_masked_loss_of_the_initial_model(smoke_data_config, tmp_path):
    """Bug caught: the training loop passing no segment ids (attention and loss crossing documents and
    counting padding) or another loss than the masked next-token NLL. One logged step holds the loss
    of the freshly initialized model on the first batch: recomputed by hand (plain cross-entropy over
    the targets inside one document) on the same batch."""
    import torch.nn.functional as F
    from hiermem.data.packing import SequenceLoader
    from hiermem.data.pipeline import build_data
    from hiermem.model import HierMemLM
    cfg = TrainConfig(stage="pretrain", anchor="tiny-d1", data=smoke_data_config, tokens=1 * 4 * 128, batch_size=4,
                      log_every=1, checkpoint_every=10)
    run = train(cfg, tmp_path / "one-step", progress=False)
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    data = build_data(smoke_data_config, progress=False)
    torch.manual_seed(cfg.seed)
    model = HierMemLM(cfg.model_config(data.vocab_size))
    sequences = data.sequences(cfg.resolved_packing)
    tokens, segments, _ = next(iter(SequenceLoader(sequences, batch_size=cfg.batch_size, seed=cfg.seed)))
    assert (segments[:, 1:] != segments[:, :-1]).any()  # the batch packs several documents (or padding)
    with torch.no_grad():
        logits = model(tokens, segments)
    ce = F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                         reduction="none").view(tokens.shape[0], -1)
    valid = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] >= 0)
    assert logged["loss"] == pytest.approx(float((ce * valid).sum() / valid.sum()), rel=1e-5)


def test_bfloat16_bank_on_cpu_falls_back_to_float32_with_one_line(smoke_data_config, pretrained_anchor, tmp_path,
                                                                   caplog):
    """Bug caught: `optim.bank_dtype: bfloat16` crashing on a machine without a GPU, or silently
    training a bf16 bank there; a misspelt dtype accepted. The fallback trains the same run as the
    float32 default (identical final bank) and says so in one log line."""
    with pytest.raises(ValueError, match="bank_dtype"):
        _memory_cfg(smoke_data_config, pretrained_anchor, optim=TrainConfig().optim.replace(bank_dtype="fp8"))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _memory_cfg(smoke_data_config, pretrained_anchor, tokens=4 * 4 * 128,
                          optim=TrainConfig().optim.replace(bank_dtype=dtype))
        with caplog.at_level("INFO", logger="hiermem.train"):
            runs[dtype] = load_model(RunDir(train(cfg, tmp_path / dtype, progress=False)).final)
    assert sum("bank_dtype bfloat16 is for GPUs" in r.getMessage() for r in caplog.records) == 1
    for a, b in zip(runs["float32"].bank.levels, runs["bfloat16"].bank.levels):
        assert b.dtype == torch.float32 and torch.equal(a, b)
