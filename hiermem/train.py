"""Training: dense anchor pretraining and memory training, one flat loop with an explicit train state.

Stages (the paper's rows for the 160M anchor):
    pretrain         dense anchor or baseline from scratch (A1, B1, and dense ladders)
    continue         a pretrained dense run continued, dense (the control for a memory stage: same
                     extra tokens, same sequences, same schedule, no memory)
    memory-cotrain   anchor initialized from a pretrained run and trained together with the bank (A2)
    memory-frozen    anchor initialized from a pretrained run and frozen; only memories train (A3)
    memory-scratch   anchor and memories both from scratch (A4)

Stages that start from a pretrained run (continue, memory-cotrain) can continue its learning rate:
`optim.rewarm: x` sets the anchor's peak LR to x times that run's final LR (a short re-warm), instead of
`optim.lr`; without it the schedule restarts at `optim.lr`.

Memory runs use cluster-packed sequences; each sequence uses the generic block instead of its fetched
blocks with probability `generic_prob` (default 1/(k+1), the paper's 1/17 for k = 16; sampled per
sequence, also in frozen runs). The bank is updated by the sparse AdamW of `hiermem.optim`.

A run directory holds config.yaml, provenance.json (git SHA, versions, device; the parent run),
metrics.jsonl, checkpoint/ (resume state as safetensors + JSON, no pickles), final/ (the final
checkpoint) and summary.json (written last: the run is finished; total_tokens includes the parent's).
Resuming (`hiermem train CONFIG --run-dir DIR` again) continues from checkpoint/ and ends with exactly
the weights of an uninterrupted run on CPU; a changed config is refused, naming the differing fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hiermem.accounting import count
from hiermem.checkpoint import load_anchor_weights, load_weights, save_checkpoint
from hiermem.config import MemoryConfig, ModelConfig, model_preset
from hiermem.configbase import Config, added_field, require
from hiermem.data.packing import SequenceLoader, block_updates, update_report
from hiermem.data.pipeline import DataBundle, DataConfig, build_data
from hiermem.io import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, check_writable_dir
from hiermem.kernels import keep_freed_memory
from hiermem.model import HierMemLM
from hiermem.optim import SEMANTICS
from hiermem.provenance import provenance
from hiermem.rundir import RunDir
from hiermem.state import has_state, load_state, save_state
from hiermem.stepper import PRECISIONS, TrainStepper, cosine_lr

log = logging.getLogger(__name__)
MIN_EXPECTED_UPDATES = 10  # a memory block expected to be updated fewer times is warned about
STAGES = ("pretrain", "continue", "memory-cotrain", "memory-frozen", "memory-scratch")
INIT_STAGES = ("continue", "memory-cotrain", "memory-frozen")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

@dataclasses.dataclass(frozen=True)
class OptimConfig(Config):
    """AdamW with a cosine schedule; the bank (and generic block) has its own LR and weight decay."""

    lr: float = 3e-3
    final_lr: float = 3e-5
    warmup_fraction: float = 0.05
    weight_decay: float = 0.05
    bank_lr: float = 3e-3
    bank_final_lr: float = 3e-5
    bank_weight_decay: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    bank_semantics: str = "dense"  # lazy | dense (hiermem.optim)
    bank_dtype: str = "float32"  # float32 | bfloat16: the bank's storage on a GPU (moments stay float32)
    rewarm: float | None = None  # continue/cotrain: anchor peak LR = rewarm x the init run's final LR

    def validate(self) -> None:
        require(self.bank_semantics in SEMANTICS, "bank_semantics", f"one of {list(SEMANTICS)}", self.bank_semantics)
        require(self.bank_dtype in BANK_DTYPES, "bank_dtype", f"one of {list(BANK_DTYPES)}", self.bank_dtype)
        require(self.rewarm is None or self.rewarm > 0, "rewarm", "null or a positive factor", self.rewarm)
        for name in ("lr", "bank_lr", "eps"):
            require(getattr(self, name) > 0, name, "a positive number", getattr(self, name))
        for name in ("final_lr", "bank_final_lr", "weight_decay", "bank_weight_decay", "grad_clip"):
            require(getattr(self, name) >= 0, name, "a non-negative number", getattr(self, name))
        require(0 <= self.warmup_fraction < 1, "warmup_fraction", "a number in [0, 1)", self.warmup_fraction)
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", "numbers in [0, 1)",
                (self.beta1, self.beta2))


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """One training run. `anchor` names a preset; `model` (if given) overrides it field by field."""

    stage: str = "pretrain"
    anchor: str = "tiny-d2"
    model: dict = dataclasses.field(default_factory=dict)
    memory: MemoryConfig | None = None
    init_from: str = ""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    tokens: int = 1_000_000
    flops: float = 0.0
    batch_size: int = 16
    packing: str | None = None         # clustered | plain; None: clustered for memory and continue stages
    generic_prob: float | None = None  # None: 1/(k+1) with k the tree's branching
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    log_every: int = 10
    # a local Hugging Face causal LM directory: its decoder MLPs get the FFN memory (hiermem.hf) instead of a
    # hiermem anchor; memory-frozen trains the bank (checkpoints: the bank files, the base referenced by
    # path and config hash), memory-cotrain the base too. Read data with its tokenizer (data.tokenizer).
    base_model: str = added_field("")
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16: mixed precision on CPU too, where it multiplies bfloat16
    # natively (AMX / AVX512-BF16; else fp32 and one log line); fp32: float32 everywhere (hiermem.stepper)
    precision: str = added_field("auto")

    def __post_init__(self) -> None:
        # the bank has one block per tree node: its branching is the data tree's, set here once
        if self.memory is not None and self.memory.branching is None:
            object.__setattr__(self, "memory", self.memory.replace(branching=self.data.tree.branching))
        super().__post_init__()

    def validate(self) -> None:
        require(self.stage in STAGES, "stage", f"one of {list(STAGES)}", self.stage)
        memory_stage = self.stage.startswith("memory-")
        require(not memory_stage or (self.memory is not None and self.memory.enabled), "memory",
                f"a memory config with some r > 0 for stage {self.stage!r}", self.memory)
        require(memory_stage or self.memory is None or not self.memory.enabled, "memory",
                f"no memory for stage {self.stage!r} (use memory-scratch to train both from scratch)", self.memory)
        if self.base_model:
            require(self.stage in ("memory-frozen", "memory-cotrain"), "base_model",
                    "a Hugging Face base only with stage memory-frozen or memory-cotrain", self.stage)
            require(self.memory.type == "ffn", "memory.type", "ffn on a Hugging Face base (extra MLP units)",
                    self.memory.type)
        needs_init = self.stage in INIT_STAGES and not self.base_model
        require(bool(self.init_from) == needs_init, "init_from",
                "the run directory of a pretrained anchor" if needs_init else "empty for this stage", self.init_from)
        require(self.tokens > 0 or self.flops > 0, "tokens", "a positive token budget (or flops > 0)", self.tokens)
        require(self.flops >= 0, "flops", "a non-negative FLOP budget", self.flops)
        require(self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        require(self.packing in (None, "clustered", "plain"), "packing", "null (by stage), clustered or plain",
                self.packing)
        require(self.generic_prob is None or 0 <= self.generic_prob <= 1, "generic_prob",
                "null (= 1/(k+1)) or a probability in [0, 1]", self.generic_prob)
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
                "auto, cpu or cuda[:i]", self.device)
        require(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}", self.precision)
        require(self.precision != "fp32" or self.optim.bank_dtype == "float32", "precision",
                "auto or bf16 with optim.bank_dtype bfloat16 (a half bank needs bf16 autocast)", self.precision)
        require(self.checkpoint_every > 0 and self.log_every > 0, "checkpoint_every/log_every", "positive integers",
                (self.checkpoint_every, self.log_every))
        if self.memory is not None and self.memory.enabled:
            require(self.memory.depth <= self.data.tree.depth, "memory.multipliers",
                    f"at most {self.data.tree.depth} levels (the tree's depth)", self.memory.multipliers)
            require(self.memory.branching == self.data.tree.branching, "memory.branching",
                    f"null or the tree's branching {self.data.tree.branching} (it is taken from data.tree)",
                    self.memory.branching)
        ModelConfig.from_dict({**model_preset(self.anchor).to_dict(), **self.model})  # fails early on bad fields

    # ------------------------------------------------------------------------------ derived
    def model_config(self, vocab_size: int) -> ModelConfig:
        """The anchor's shapes (a Hugging Face base: read from its config.json, whatever `vocab_size`)."""
        if self.base_model:
            from hiermem.hf import hf_model_config
            path = Path(self.base_model) / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"invalid config field 'base_model': expected a Hugging Face model directory "
                                        f"with a config.json, got {self.base_model!r}")
            return hf_model_config(json.loads(path.read_text()))
        base = model_preset(self.anchor).to_dict()
        base.update({"vocab_size": vocab_size, "max_seq_len": self.data.seq_len})
        base.update(self.model)
        return ModelConfig.from_dict(base)

    @property
    def uses_memory(self) -> bool:
        return self.stage.startswith("memory-")

    @property
    def resolved_packing(self) -> str:
        """`packing`, else clustered for memory stages and for `continue` (the same sequences as the
        memory stage it controls) and plain for pretraining."""
        if self.packing is not None:
            return self.packing
        return "clustered" if self.uses_memory or self.stage == "continue" else "plain"

    def anchor_lr(self) -> tuple[float, float]:
        """(peak, final) LR of the anchor: with `optim.rewarm`, the peak continues the init run's final LR."""
        o = self.optim
        if o.rewarm is None or not self.init_from:
            return o.lr, o.final_lr
        parent = TrainConfig.load(RunDir(self.init_from).config_path)
        return o.rewarm * parent.anchor_lr()[1], o.final_lr

    @property
    def resolved_generic_prob(self) -> float:
        if not self.uses_memory or not self.memory.generic:
            return 0.0
        return 1.0 / (self.memory.branching + 1) if self.generic_prob is None else self.generic_prob

    def total_steps(self, flops_per_token: int) -> int:
        tokens_per_step = self.batch_size * self.data.seq_len
        if self.flops > 0:
            return max(1, math.ceil(self.flops / (flops_per_token * tokens_per_step)))
        return max(1, math.ceil(self.tokens / tokens_per_step))


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_same_config(run: RunDir, cfg: TrainConfig) -> None:
    stored = TrainConfig.load(run.config_path)
    diff = stored.diff(cfg)
    if diff:
        raise ValueError(f"run directory {str(run.path)!r} was started with a different config; refusing to "
                         f"resume. Differing fields: {', '.join(diff)}")


def _check_disk(run_dir: Path, bytes_needed: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < bytes_needed:
        raise OSError(f"run directory {str(run_dir)!r} has {free / 1e6:.1f} MB free; a checkpoint needs about "
                      f"{bytes_needed / 1e6:.1f} MB (twice that while one replaces another)")


def _generic_mask(seed: int, step: int, batch: int, prob: float) -> torch.Tensor | None:
    """Per-sequence generic-memory choice, a function of (seed, step) only, so resume is exact."""
    if prob <= 0:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(batch, generator=g) < prob


def train(cfg: TrainConfig, run_dir: str | Path, data: DataBundle | None = None, progress: bool = True,
          stop_after_steps: int | None = None) -> Path:
    """Run (or resume, or skip if finished) one training run into `run_dir`; returns run_dir.

    data: the built data bundle of `cfg.data` (`hiermem.data.pipeline.build_data`); built here when None.
    stop_after_steps: stop early without finishing (simulates a killed run; used by tests).
    """
    run = RunDir(check_writable_dir(run_dir, "run directory"))
    run_dir = run.path
    if run.is_started:
        _check_same_config(run, cfg)
        if run.is_finished:
            log.info("run %s is finished; skipping", run_dir)
            return run_dir
    parent = RunDir.open(cfg.init_from) if cfg.init_from else None
    if data is None:
        data = build_data(cfg.data, progress=progress)
    elif data.cfg != cfg.data:
        raise ValueError(f"the data bundle given to train() was built for another data config; differing fields: "
                         f"{', '.join(data.cfg.diff(cfg.data))}")
    device = device_for(cfg.device)
    keep_freed_memory()  # large activations stay in the heap between steps (hiermem.kernels)
    memory_cfg = cfg.memory if cfg.uses_memory else None
    torch.manual_seed(cfg.seed)
    if cfg.base_model:
        model = _hf_model(cfg, data)
        model_cfg = model.model_cfg
    else:
        model_cfg = cfg.model_config(data.vocab_size)
        model = HierMemLM(model_cfg, memory_cfg)
        if cfg.init_from:
            load_anchor_weights(model, parent.final)
    acc = count(model_cfg, memory_cfg, seq_len=cfg.data.seq_len)
    total_steps = cfg.total_steps(acc.flops_per_token)
    _check_disk(run_dir, 8 * (acc.anchor_params + acc.bank_params + acc.generic_params) * 2)
    model.to(device)
    o = cfg.optim
    if model.bank is not None and o.bank_dtype != "float32":
        if device.type == "cuda":
            model.bank.store_as(BANK_DTYPES[o.bank_dtype])
        else:
            log.info("bank_dtype %s is for GPUs (bf16 autocast); on %s the bank stays float32", o.bank_dtype, device)
    peak_lr, final_lr = cfg.anchor_lr()
    stepper = TrainStepper(model, lr=peak_lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps,
                           grad_clip=o.grad_clip or None, bank_lr=o.bank_lr, bank_weight_decay=o.bank_weight_decay,
                           freeze_anchor=cfg.stage == "memory-frozen", bank_semantics=o.bank_semantics,
                           precision=cfg.precision)
    sequences = data.sequences(cfg.resolved_packing)
    loader = SequenceLoader(sequences, batch_size=min(cfg.batch_size, len(sequences)), seed=cfg.seed)
    warmup = round(o.warmup_fraction * total_steps)
    generic_prob = cfg.resolved_generic_prob
    expected = None
    if cfg.uses_memory:
        expected = update_report(block_updates(sequences, cfg.memory.branching, cfg.batch_size, total_steps,
                                               cfg.seed, generic_prob, depth=cfg.memory.depth))
        for row in expected:
            if row["updates_min"] < MIN_EXPECTED_UPDATES:
                log.warning("memory level %d: the least fetched block is expected to be updated only %.1f times "
                            "in %d steps (median %.1f); raise the token budget or use a smaller tree",
                            row["level"], row["updates_min"], total_steps, row["updates_median"])

    start_step = 0
    ckpt_dir = run.checkpoint_dir
    if has_state(ckpt_dir):
        state = load_state(ckpt_dir, device=device)
        load_weights(model, ckpt_dir)
        stepper.load_state_dict(state["stepper"])
        loader.load_state_dict(state["loader"])
        start_step = state["step"]
        kept = [r for r in run.metrics() if r["step"] < start_step]
        atomic_write_text(run.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        log.info("resuming %s at step %d", run_dir, start_step)
    else:
        cfg.save(run.config_path)
        atomic_write_json(run.provenance_path, {**provenance(), "accounting": acc.to_dict(), "total_steps": total_steps,
                                                "precision": stepper.precision,
                                                "stage": cfg.stage, "parent": parent.parent_record() if parent else None})
        run.metrics_path.unlink(missing_ok=True)

    tokens_per_step = loader.batch_size * cfg.data.seq_len
    batches = iter(loader)  # continues from the restored position
    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step",
               desc=f"{cfg.stage} {run_dir.name}", dynamic_ncols=True)
    window: list[dict] = []
    tick = time.perf_counter()
    model.train()
    for step in range(start_step, total_steps):
        if stop_after_steps is not None and step >= start_step + stop_after_steps:
            bar.close()
            return run_dir
        tokens, segments, paths = (t.to(device) for t in next(batches))
        lr = cosine_lr(step, total_steps, warmup, peak_lr, final_lr)
        bank_lr = cosine_lr(step, total_steps, warmup, o.bank_lr, o.bank_final_lr)
        stepper.set_lr(lr, bank_lr)
        use_generic = _generic_mask(cfg.seed, step, tokens.shape[0], generic_prob) if cfg.uses_memory else None
        out = stepper.step(tokens, segments, paths if cfg.uses_memory else None,
                           use_generic.to(device) if use_generic is not None else None)
        if not out["finite"]:
            bar.close()
            last = f"step {_ckpt_step(ckpt_dir)}" if ckpt_dir.exists() else "none (no checkpoint was written yet)"
            raise TrainingDiverged(f"non-finite loss/gradient at step {step} (loss {out['loss']}, grad norm "
                                   f"{out['grad_norm']}); stopped. Last good checkpoint: {last} in {ckpt_dir}. "
                                   f"Lower optim.lr or raise optim.grad_clip.")
        window.append({**out, "lr": lr, "bank_lr": bank_lr})
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - tick
            record = {"step": done, "tokens": done * tokens_per_step, "loss": float(np.mean([w["loss"] for w in window])),
                      "grad_norm": float(np.mean([w["grad_norm"] for w in window])), "lr": lr, "bank_lr": bank_lr,
                      "bank_rows": int(sum(w["bank_rows"] for w in window)),
                      "tokens_per_s": len(window) * tokens_per_step / max(elapsed, 1e-9)}
            append_jsonl(run.metrics_path, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            window, tick = [], time.perf_counter()
        bar.update(1)
        if done % cfg.checkpoint_every == 0 and done < total_steps:
            _save_train_state(model, stepper, loader, done, ckpt_dir)
    bar.close()

    stepper.finalize()  # dense bank semantics: every block brought up to the last step
    with atomic_dir(run.final_dir) as tmp:
        save_checkpoint(model, tmp, extra={"stage": cfg.stage, "steps": total_steps})
    metrics = run.metrics()
    tokens = total_steps * tokens_per_step
    parent_tokens = parent.total_tokens() if parent else 0
    summary = {"stage": cfg.stage, "steps": total_steps, "tokens": tokens, "total_tokens": tokens + parent_tokens,
               "parent": parent.parent_record() if parent else None,
               "final_loss": metrics[-1]["loss"] if metrics else None, **acc.to_dict(),
               "generic_prob": generic_prob, "packing": cfg.resolved_packing,
               "touched_blocks": stepper.bank_opt.touched_blocks() if stepper.bank_opt else {},
               "bank_semantics": o.bank_semantics, "anchor_lr": [peak_lr, final_lr],
               "expected_block_updates": expected, "block_updates": _measured_updates(stepper, sequences, cfg)}
    atomic_write_json(run.summary_path, summary)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return run_dir


def _hf_model(cfg: TrainConfig, data: DataBundle):
    """The FFN memory of `cfg` on the Hugging Face base `cfg.base_model`; refused when the data's tokens
    do not fit the base's vocabulary (the data must be read with the base's tokenizer: data.tokenizer)."""
    from hiermem.hf import HFMemoryLM, load_base
    model = HFMemoryLM(load_base(cfg.base_model), cfg.memory, base_name=cfg.base_model)
    vocab = model.model_cfg.vocab_size
    require(data.vocab_size <= vocab, "data.tokenizer", f"the base model's tokenizer (its vocabulary has {vocab} "
            f"ids; the data's tokenizer {data.vocab_size})", cfg.data.tokenizer or "the corpus's own")
    return model


def _measured_updates(stepper: TrainStepper, sequences, cfg: TrainConfig) -> list[dict] | None:
    """Per level: min/median/max of the steps that updated each block, over blocks with sequences."""
    if stepper.bank_opt is None:
        return None
    k, flat, rows = cfg.memory.branching, np.zeros(len(sequences), dtype=np.int64), []
    for level in range(cfg.memory.depth):
        flat = flat * k + sequences.paths[:, level]
        if level not in stepper.bank_opt.updates:
            continue
        counts = stepper.bank_opt.updates[level]
        used = np.bincount(flat, minlength=len(counts)) > 0
        values = counts.numpy()[used]
        rows.append({"level": level + 1, "updates_min": int(values.min()), "updates_median": float(np.median(values)),
                     "updates_max": int(values.max())})
    return rows


def _ckpt_step(ckpt_dir: Path) -> int:
    try:
        return int(json.loads((ckpt_dir / "step.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _save_train_state(model, stepper, loader, step: int, ckpt_dir: Path) -> None:
    with atomic_dir(ckpt_dir) as tmp:
        save_checkpoint(model, tmp)
        save_state({"step": step, "stepper": stepper.state_dict(), "loader": loader.state_dict()}, tmp)
        atomic_write_json(tmp / "step.json", {"step": step})


# ------------------------------------------------------------------------------------------ CLI
def _run_train(args: argparse.Namespace) -> int:
    cfg = TrainConfig.load(args.config)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    train(cfg, run_dir, progress=not args.quiet)
    run = RunDir(run_dir)
    print(json.dumps(run.summary(), indent=2) if run.is_finished else run_dir)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one run from a YAML config (resumes an interrupted run)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="TrainConfig YAML (see configs/)")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)
