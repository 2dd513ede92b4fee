"""`hiermem demo`: the main end-to-end job, on CPU in under 30 minutes.

1. builds the `small` data (Wikipedia leads + CIA Factbook + injected long-tail facts with
   log-uniform exposure counts, so every frequency bucket holds as many facts), routed with the fast
   embedder down a 16-ary tree of depth 2;
2. pretrains a tiny anchor (the paper's row A1);
3. trains FFN memories of about 10% of the anchor on it, frozen (A3) and co-trained (A2);
4. trains a dense baseline with the same runtime parameters (SwiGLU widened by the fetched units,
   as many tokens as anchor + memory training) and one with about 2x the anchor's parameters
   (deeper at the same width, trained on the anchor's budget: the paper compares A2 with B1 so);
5. evaluates every model in every memory mode and prints a compact table, also written to
   results/demo/summary.csv (one row per model and mode).

Runs are resumable and skipped once finished, so a second `make demo` only re-prints the table.
`--scale smoke` runs the same pipeline in about a minute (used by the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd

from hiermem.accounting import count
from hiermem.config import MemoryConfig, model_preset
from hiermem.data.pipeline import DataConfig, build_data
from hiermem.evaluate import EvalConfig, evaluate_run
from hiermem.io import atomic_write_text
from hiermem.train import OptimConfig, TrainConfig, train


@dataclasses.dataclass(frozen=True)
class DemoScale:
    data: str
    anchor_tokens: int
    memory_tokens: int
    batch_size: int
    memory: tuple[int, ...]
    probes_per_relation: int
    heldout_docs: int


SCALES = {
    "default": DemoScale(data="small", anchor_tokens=2_000_000, memory_tokens=1_000_000, batch_size=16,
                         memory=(112, 28), probes_per_relation=120, heldout_docs=150),
    "smoke": DemoScale(data="smoke", anchor_tokens=40_000, memory_tokens=20_000, batch_size=8,
                       memory=(16, 4), probes_per_relation=8, heldout_docs=10),
}


def demo_data(scale: DemoScale, root: str, embedder: str = "fast") -> DataConfig:
    base = DataConfig.preset(scale.data, root=root, embedder=embedder)
    corpus = base.corpus.replace(exposure_law="loguniform",
                                 max_facts_per_relation=200 if scale.data == "small" else base.corpus.max_facts_per_relation)
    return base.replace(corpus=corpus)


def layers_for_double(anchor: str, vocab_size: int) -> int:
    """Depth at the anchor's width that gives about twice the anchor's parameters (embeddings included)."""
    cfg = model_preset(anchor, vocab_size=vocab_size)
    acc = count(cfg)
    per_layer = (acc.anchor_non_embedding_params - cfg.d_model) / cfg.n_layers
    return max(cfg.n_layers + 1, round((2 * acc.anchor_params - acc.embedding_params - cfg.d_model) / per_layer))


def demo_runs(scale: DemoScale, data: DataConfig, runs_dir: Path) -> dict[str, TrainConfig]:
    """The five runs of the demo, in training order (names double as run directory names)."""
    k = data.tree.branching
    memory = MemoryConfig(type="ffn", multipliers=scale.memory, branching=k)
    anchor = "tiny-d2"
    fetched_units = sum(scale.memory)
    total_tokens = scale.anchor_tokens + scale.memory_tokens
    pre = OptimConfig(lr=3e-3, final_lr=3e-5, weight_decay=0.05)
    mem = OptimConfig(lr=1e-3, final_lr=1e-5, weight_decay=0.05, bank_lr=3e-3, bank_final_lr=3e-5,
                      bank_weight_decay=1e-3)
    common = dict(anchor=anchor, data=data, batch_size=scale.batch_size, log_every=20, checkpoint_every=200)
    anchor_dir = str(runs_dir / "anchor")
    return {
        "anchor": TrainConfig(stage="pretrain", tokens=scale.anchor_tokens, optim=pre, **common),
        "memory-frozen": TrainConfig(stage="memory-frozen", memory=memory, init_from=anchor_dir,
                                     tokens=scale.memory_tokens, optim=mem, **common),
        "memory-cotrain": TrainConfig(stage="memory-cotrain", memory=memory, init_from=anchor_dir,
                                      tokens=scale.memory_tokens, optim=mem, **common),
        "dense-same-active": TrainConfig(stage="pretrain", tokens=total_tokens, optim=pre,
                                         model={"ffn_dim": model_preset(anchor).ffn_dim + fetched_units}, **common),
        "dense-2x": TrainConfig(stage="pretrain", tokens=scale.anchor_tokens, optim=pre,
                                model={"n_layers": layers_for_double(anchor, data.corpus.vocab_size)}, **common),
    }


COMPACT = ["model", "mode", "runtime_params", "avg_sk", "avg_ck", "avg_sk_mc", "ppl"]


def _short_name(column: str) -> str:
    for prefix, short in (("atomic_mc_", "atomMC_"), ("atomic_", "atom_")):
        if column.startswith(prefix):
            return short + column.removeprefix(prefix).split("-")[0]
    return {"runtime_params": "runtime", "avg_sk_mc": "avg_sk_mc"}.get(column, column)


def run_demo(scale_name: str = "default", data_root: str = "data", runs_dir: str = "runs/demo",
             out_dir: str = "results/demo", progress: bool = True, embedder: str = "fast") -> pd.DataFrame:
    """Run (or resume) the demo; returns the summary table (one row per model and mode).

    embedder: "fast" (static, distilled from MiniLM) or "minilm" (the paper's all-MiniLM-L6-v2; the
    corpus is embedded once, ~40 min on 2 cores, then cached).
    """
    scale = SCALES[scale_name]
    runs_path, out_path = Path(runs_dir), Path(out_dir)
    start = time.perf_counter()
    data_cfg = demo_data(scale, data_root, embedder)
    bundle = build_data(data_cfg, progress=progress)
    print(f"[demo] data ready: {len(bundle.corpus):,} docs, {len(bundle.probes):,} probes "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    eval_cfg = EvalConfig(max_probes_per_relation=scale.probes_per_relation, heldout_docs_per_source=scale.heldout_docs,
                          level_ablation=True)
    summaries = []
    for name, cfg in demo_runs(scale, data_cfg, runs_path).items():
        t0 = time.perf_counter()
        run = train(cfg, runs_path / name, progress=progress)
        t1 = time.perf_counter()
        summary = evaluate_run(run, eval_cfg, reuse=True)
        acc = count(cfg.model_config(bundle.vocab_size), cfg.memory if cfg.uses_memory else None,
                    seq_len=data_cfg.seq_len)
        summary.insert(2, "runtime_params", acc.runtime_params)
        summary.insert(3, "anchor_params", acc.anchor_params)
        summary.insert(4, "bank_params", acc.bank_params)
        summary.insert(5, "train_tokens", cfg.tokens)
        summaries.append(summary)
        print(f"[demo] {name}: trained in {t1 - t0:.0f} s, evaluated in {time.perf_counter() - t1:.0f} s", flush=True)
    table = pd.concat(summaries, ignore_index=True)
    out_path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path / "summary.csv", table.to_csv(index=False))
    bucket_cols = sorted(c for c in table.columns if c.startswith("atomic_b"))
    bucket_cols += sorted(c for c in table.columns if c.startswith("atomic_mc_b"))
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 1):
        print()
        shown = table[COMPACT + bucket_cols].rename(columns=_short_name)
        print(shown.to_string(index=False))
        print("(atom_<bucket>: atomic-number greedy exact match %; atomMC_<bucket>: 4-way multiple choice %; "
              "buckets b0 rarest .. b4 most exposed)")
    print(f"\n[demo] total {time.perf_counter() - start:.0f} s; table written to {out_path / 'summary.csv'}")
    return table


def _run(args: argparse.Namespace) -> int:
    run_demo(args.scale, args.data_root, args.runs_dir, args.out_dir, progress=not args.quiet, embedder=args.embedder)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main end-to-end job (data, anchor, memories, baselines, eval)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="default", choices=sorted(SCALES), help="default (~30 min) or smoke (~1 min)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--runs-dir", default="runs/demo")
    p.add_argument("--out-dir", default="results/demo")
    p.add_argument("--embedder", default="fast", choices=["fast", "minilm", "tfidf"],
                   help="router embedding: fast (default) or minilm, the paper's all-MiniLM-L6-v2")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
