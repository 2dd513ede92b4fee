"""`hiermem demo`: the main end-to-end job, 10 minutes on 2 CPU cores (598 s measured);
its claims table says whether the paper's findings show.

1. builds the knowledge data: Wikipedia leads and Factbook sections (common text), subject cards of
   real relations (elements, countries, US states, cities, airports) and a bioS world of invented
   people, each subject exposed 2..64 times (log-uniform), routed with the fast embedder down an
   8-ary tree of depth 2 balanced by tokens; a share of the subjects is also stated in the probe
   format (never probed), the others are probed on held-out templates, split into a validation set
   (regime choice) and an evaluation set (the claims);
2. pretrains a tiny anchor (the paper's row A1);
3. trains FFN memories of about 10% of the anchor on it, frozen (A3) and co-trained (A2);
4. trains the controls: the anchor continued dense on the same sequences and schedule as the memory
   stage, a dense model with the runtime parameters of anchor + fetched memory, and one with about
   2x the anchor's parameters, both on the same total tokens;
5. evaluates every model in every memory mode, the anchor and the frozen memory model also with the
   RAG baseline (`rag`, `rag+fetched`: the nearest training document of the routed cluster before the
   prompt, hiermem.rag), greedy exact match and answer ranking, with each mode's forward FLOPs per
   answer (`flops_x`), and writes
   results/demo/summary.csv (one row per model and mode) and results/demo/claims.csv (one row per
   claim with a 95% bootstrap CI, its target and whether it holds; analysis.claims states the rules).

Runs are resumable and skipped once finished, so a second `make demo` only re-prints the tables.
`--scale small` (the default) is the main job; `--scale smoke` runs the same pipeline in about a minute
(25-72 s measured on the same 2 cores; used by the tests); the scale names are those of `hiermem.scales`.
`--config FILE` runs a recipe (a YAML of DemoConfig fields over `scale: <name>`), as the pilots in
configs/pilots/ do.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd

from analysis.attribution import load_probe_results
from analysis.claims import demo_claims, format_claims
from hiermem.accounting import count
from hiermem.config import MemoryConfig, model_preset
from hiermem.configbase import Config, added_field, require
from hiermem.data.pipeline import DataConfig, build_data
from hiermem.evaluate import BASE_MODES, EvalConfig, evaluate_run
from hiermem.io import atomic_write_text
from hiermem.rag import RAG_MODES
from hiermem.scales import accepted, check
from hiermem.stepper import PRECISIONS
from hiermem.rundir import RunDir
from hiermem.train import OptimConfig, TrainConfig, train

SCALE_NAMES = accepted("demo")  # smoke, small (hiermem.scales)
RUNS = ("anchor", "memory-frozen", "memory-cotrain", "continued", "dense-same-active", "dense-2x")
# the paper's Figure 1 (right): accuracy against exposures, with and without memory, and the controls
FIGURE1_SERIES = {
    "anchor (A1)": ("anchor", "none"), "A3, no memory": ("memory-frozen", "none"),
    "A3, generic": ("memory-frozen", "generic"), "A3, fetched": ("memory-frozen", "fetched"),
    "A2, fetched": ("memory-cotrain", "fetched"), "anchor continued (dense)": ("continued", "none"),
    "dense, same runtime params": ("dense-same-active", "none"), "dense, 2x params": ("dense-2x", "none"),
}
CLAIM_ROLES = {"memory": "memory-frozen", "anchor": "anchor", "continued": "continued", "dense2x": "dense-2x"}


@dataclasses.dataclass(frozen=True)
class DemoConfig(Config):
    """The main job's recipe. Named scales are presets; a YAML file overrides fields of one."""

    scale: str = "small"
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig.knowledge("small"))
    anchor: str = "tiny-d2"
    anchor_tokens: int = 1_500_000
    memory_tokens: int = 1_500_000
    batch_size: int = 32
    memory: MemoryConfig = dataclasses.field(default_factory=lambda: MemoryConfig(
        type="ffn", multipliers=(64, 64)))
    anchor_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=3e-3, final_lr=3e-5, weight_decay=0.05))
    memory_optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-4, final_lr=1e-5, rewarm=3.0, warmup_fraction=0.02, weight_decay=0.05,
        bank_lr=3e-3, bank_final_lr=3e-5, bank_weight_decay=1e-3, bank_semantics="dense"))
    runs: tuple[str, ...] = RUNS
    rag_runs: tuple[str, ...] = ("anchor", "memory-frozen")  # evaluated with the RAG modes too (eval.modes)
    eval: EvalConfig = dataclasses.field(default_factory=lambda: EvalConfig(
        modes=BASE_MODES + RAG_MODES, max_probes_per_relation=200, heldout_docs_per_source=100, split="eval"))
    n_boot: int = 1000
    precision: str = added_field("auto")  # every run's TrainConfig.precision (bf16: mixed precision on CPU too)

    def validate(self) -> None:
        require(self.scale in SCALE_NAMES, "scale", f"one of {list(SCALE_NAMES)}", self.scale)
        unknown = [r for r in self.runs if r not in RUNS]
        require(not unknown and "anchor" in self.runs, "runs", f"'anchor' and names among {list(RUNS)}", self.runs)
        require(all(r in RUNS for r in self.rag_runs), "rag_runs", f"names among {list(RUNS)}", self.rag_runs)
        require(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}", self.precision)
        require(self.anchor_tokens > 0 and self.memory_tokens > 0, "anchor_tokens/memory_tokens", "positive",
                (self.anchor_tokens, self.memory_tokens))
        require(self.memory.branching in (None, self.data.tree.branching), "memory.branching",
                f"null or the tree's branching {self.data.tree.branching} (it is taken from data.tree)",
                self.memory.branching)

    @classmethod
    def from_dict(cls, data: dict | None, _prefix: str = "") -> "DemoConfig":
        """`scale: <name>` (default "small") gives the base; the other keys override it (nested
        configs field by field)."""
        data = dict(data or {})
        name = data.get("scale", "small")
        require(name in SCALE_NAMES, _prefix + "scale", f"one of {list(SCALE_NAMES)}", name)
        base = SCALES[name].to_dict()
        for key, value in list(data.items()):
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                data[key] = _merge(base[key], value)
        return super().from_dict({**base, **data}, _prefix)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


SCALES: dict[str, DemoConfig] = {"small": DemoConfig()}  # the main job: p9's recipe (configs/pilots/)
SCALES["smoke"] = DemoConfig(
    scale="smoke", data=DataConfig.knowledge("smoke"), anchor="tiny-d1", anchor_tokens=40_000, memory_tokens=40_000,
    batch_size=8, memory=MemoryConfig(type="ffn", multipliers=(8, 8)),
    eval=EvalConfig(modes=BASE_MODES + RAG_MODES, max_probes_per_relation=12, heldout_docs_per_source=10, split="eval",
                    rank_candidates=20),
    n_boot=200)


def layers_for_double(anchor: str, vocab_size: int) -> int:
    """Depth at the anchor's width that gives about twice the anchor's parameters (embeddings included)."""
    cfg = model_preset(anchor, vocab_size=vocab_size)
    acc = count(cfg)
    per_layer = (acc.anchor_non_embedding_params - cfg.d_model) / cfg.n_layers
    return max(cfg.n_layers + 1, round((2 * acc.anchor_params - acc.embedding_params - cfg.d_model) / per_layer))


def demo_runs(cfg: DemoConfig, runs_dir: Path, vocab_size: int) -> dict[str, TrainConfig]:
    """The runs of the demo, in training order (names double as run directory names)."""
    fetched_units = sum(cfg.memory.multipliers)
    total = cfg.anchor_tokens + cfg.memory_tokens
    anchor_dir = str(runs_dir / "anchor")
    common = dict(anchor=cfg.anchor, data=cfg.data, batch_size=cfg.batch_size, log_every=20, checkpoint_every=200,
                  precision=cfg.precision)
    all_runs = {
        "anchor": TrainConfig(stage="pretrain", tokens=cfg.anchor_tokens, optim=cfg.anchor_optim, **common),
        "memory-frozen": TrainConfig(stage="memory-frozen", memory=cfg.memory, init_from=anchor_dir,
                                     tokens=cfg.memory_tokens, optim=cfg.memory_optim, **common),
        "memory-cotrain": TrainConfig(stage="memory-cotrain", memory=cfg.memory, init_from=anchor_dir,
                                      tokens=cfg.memory_tokens, optim=cfg.memory_optim, **common),
        # the control the A3 row implies: the same extra tokens, sequences and schedule, no memory
        "continued": TrainConfig(stage="continue", init_from=anchor_dir, tokens=cfg.memory_tokens,
                                 optim=cfg.memory_optim, **common),
        "dense-same-active": TrainConfig(stage="pretrain", tokens=total, optim=cfg.anchor_optim,
                                         model={"ffn_dim": model_preset(cfg.anchor).ffn_dim + fetched_units}, **common),
        "dense-2x": TrainConfig(stage="pretrain", tokens=total, optim=cfg.anchor_optim,
                                model={"n_layers": layers_for_double(cfg.anchor, vocab_size)}, **common),
    }
    return {name: run for name, run in all_runs.items() if name in cfg.runs}


COMPACT = ["model", "mode", "runtime_params", "train_tokens", "avg_sk", "avg_sk_rank", "avg_ck", "avg_ck_rank", "ppl",
           "flops_x"]


def run_demo(cfg: DemoConfig | str = "small", runs_dir: str = "runs/demo", out_dir: str = "results/demo",
             progress: bool = True, data_root: str | None = None, embedder: str | None = None) -> pd.DataFrame:
    """Run (or resume) the demo; returns the summary table (one row per model and mode) and writes
    summary.csv and claims.csv to `out_dir`."""
    cfg = SCALES[check(cfg, "demo")] if isinstance(cfg, str) else cfg
    if data_root is not None or embedder is not None:
        cfg = cfg.replace(data=cfg.data.replace(root=data_root or cfg.data.root, embedder=embedder or cfg.data.embedder))
    runs_path, out_path = Path(runs_dir), Path(out_dir)
    start = time.perf_counter()
    bundle = build_data(cfg.data, progress=progress)
    print(f"[demo] data ready: {len(bundle.corpus):,} docs, {len(bundle.probes):,} probes "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    summaries, timings = [], {}
    for name, run_cfg in demo_runs(cfg, runs_path, bundle.vocab_size).items():
        t0 = time.perf_counter()
        run = train(run_cfg, runs_path / name, data=bundle, progress=progress)
        t1 = time.perf_counter()
        eval_cfg = cfg.eval if name in cfg.rag_runs else cfg.eval.replace(
            modes=tuple(m for m in cfg.eval.modes if m not in RAG_MODES))
        summary = evaluate_run(run, eval_cfg, reuse=True, data=bundle)
        acc = count(run_cfg.model_config(bundle.vocab_size), run_cfg.memory if run_cfg.uses_memory else None,
                    seq_len=cfg.data.seq_len)
        summary.insert(2, "runtime_params", acc.runtime_params)
        summary.insert(3, "anchor_params", acc.anchor_params)
        summary.insert(4, "bank_params", acc.bank_params)
        summary.insert(5, "train_tokens", RunDir(run).total_tokens())  # anchor + memory stage
        summaries.append(summary)
        timings[name] = (t1 - t0, time.perf_counter() - t1)
        print(f"[demo] {name}: trained in {t1 - t0:.0f} s, evaluated in {time.perf_counter() - t1:.0f} s", flush=True)
    table = pd.concat(summaries, ignore_index=True)
    out_path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path / "summary.csv", table.to_csv(index=False))
    results = load_probe_results({name: runs_path / name for name in cfg.runs})
    roles = {role: run for role, run in CLAIM_ROLES.items() if run in cfg.runs}
    claims = demo_claims(results, roles, n_boot=cfg.n_boot, seed=cfg.eval.seed)
    atomic_write_text(out_path / "claims.csv", claims.to_csv(index=False))
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 1):
        print()
        print(table[[c for c in COMPACT if c in table.columns]].to_string(index=False))
        print(f"(probe split {cfg.eval.split!r}; avg_*: greedy exact match %, avg_*_rank: true answer ranked first "
              f"among its relation's answers %, macro over relations)")
    print(f"\n[demo] total {time.perf_counter() - start:.0f} s; tables written to {out_path}/summary.csv, claims.csv\n")
    print(format_claims(claims))
    return table


def _run(args: argparse.Namespace) -> int:
    cfg = DemoConfig.load(args.config) if args.config else SCALES[args.scale]
    if args.precision is not None:
        cfg = cfg.replace(precision=args.precision)
    run_demo(cfg, args.runs_dir, args.out_dir, progress=not args.quiet, data_root=args.data_root,
             embedder=args.embedder)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main end-to-end job (data, anchor, memories, controls, eval, claims)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="small", choices=SCALE_NAMES,
                   help="small (default): the main job, 10 min on 2 cores; smoke: the same pipeline in about a minute")
    p.add_argument("--config", default=None, help="a DemoConfig YAML (e.g. configs/pilots/*.yaml); overrides --scale")
    p.add_argument("--data-root", default=None, help="data cache folder (default: data)")
    p.add_argument("--runs-dir", default="runs/demo", help="run directories, one per model (default: runs/demo)")
    p.add_argument("--out-dir", default="results/demo", help="summary.csv and claims.csv (default: results/demo)")
    p.add_argument("--embedder", default=None, choices=["fast", "minilm", "tfidf"],
                   help="router embedding: fast (default; distilled from MiniLM), minilm (the paper's "
                        "all-MiniLM-L6-v2) or tfidf (TF-IDF + SVD fitted on the corpus)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="training numerics of every run: auto (default; fp32 on CPU), bf16 (mixed precision, "
                        "~1.5-2x faster where the CPU multiplies bfloat16 natively: AMX / AVX512-BF16), fp32. "
                        "Give it its own --runs-dir and --out-dir (a run directory refuses another config)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
