"""`hiermem data build` and `hiermem data stats`.

    hiermem data build --preset small [--embedder minilm] [--root data] [--seed 0] [--config data.yaml]
    hiermem data stats --preset small [--json]
    hiermem data stats --demo small --tokens 1500000 --batch-size 32      # the main job's data

Presets and demo scales are named by scale (README, "Scales"): smoke, small, full.

`build` runs every missing stage of the pipeline (corpus, tokenizer, embeddings, tree, routes, packed
sequences); `stats` prints sizes, per-level cluster statistics (sizes, balance, purity against source
and topic), the probes per group and frequency bucket, routing diagnostics (how often a probe's
prompt routes to the node where most of its fact's documents went, per level and bucket: at the last
level, the share routed to the fact's majority leaf), and the memory blocks' budget: packed sequences
per node and, given `--tokens` and `--batch-size`, the expected number of updates of each block
(min / median / max per level).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from hiermem.data.packing import block_updates, update_report
from hiermem.data.pipeline import DataBundle, DataConfig, build_data
from hiermem.diagnostics import routing_diagnostics, summarize_routing
from hiermem.scales import accepted


def _config(args: argparse.Namespace) -> DataConfig:
    if getattr(args, "demo", None):
        from hiermem.demo import SCALES
        cfg = SCALES[args.demo].data
    elif args.config:
        cfg = DataConfig.load(args.config)
    else:
        cfg = DataConfig.preset(args.preset)
    changes = {}
    if args.root:
        changes["root"] = args.root
    if args.embedder:
        changes["embedder"] = args.embedder
    if args.seed is not None:
        changes["corpus"] = cfg.corpus.replace(seed=args.seed)
    return cfg.replace(**changes) if changes else cfg


def data_stats(bundle: DataBundle, tokens: int = 0, batch_size: int = 32, generic_prob: float | None = None,
               seed: int = 0) -> dict[str, pd.DataFrame]:
    """Tables describing a built dataset (sizes, clusters, probes, routing, memory-block budget).

    tokens: a memory stage's token budget; with it, `blocks` also gives the expected updates of every
    block in `tokens / (batch_size * seq_len)` steps (generic_prob default 1/(k+1))."""
    corpus = bundle.corpus
    lengths = np.array([len(t) for t in bundle.doc_tokens])
    sizes = (corpus.assign(tokens=lengths, chars=corpus["text"].str.len())
             .groupby(["source", "split"]).agg(docs=("doc_id", "size"), chars=("chars", "sum"),
                                               tokens=("tokens", "sum")).reset_index())
    train = (corpus["split"] == "train").to_numpy()
    labels = {"source": corpus.loc[train, "source"].to_numpy()}
    if "topic" in corpus and (corpus["topic"] != "").any():
        labels["topic"] = corpus.loc[train, "topic"].to_numpy()
    clusters = bundle.tree.level_stats(bundle.doc_paths[train], labels)
    probes = bundle.probes
    buckets = (probes.groupby(["group", "relation", "bucket"])
               .agg(probes=("probe_id", "size"), exposures_min=("exposures", "min"),
                    exposures_max=("exposures", "max"), measured_median=("measured_count", "median"))
               .reset_index())
    routed = bundle.route_texts(probes["prompt"].tolist())
    routing = summarize_routing(routing_diagnostics(routed, bundle.fact_paths(), probes))
    k = bundle.branching
    steps = -(-tokens // (batch_size * bundle.cfg.seq_len)) if tokens else 0
    p = 1.0 / (k + 1) if generic_prob is None else generic_prob
    blocks = pd.DataFrame(update_report(block_updates(bundle.sequences("clustered"), k, batch_size, steps, seed, p)))
    blocks.insert(1, "steps", steps)
    if not steps:
        blocks = blocks.drop(columns=[c for c in blocks.columns if c.startswith("updates_")])
    return {"sizes": sizes, "clusters": clusters, "probes": buckets, "routing": routing, "blocks": blocks}


def _run_build(args: argparse.Namespace) -> int:
    cfg = _config(args)
    bundle = build_data(cfg, progress=not args.quiet)
    manifest = bundle.manifest()
    print(json.dumps({k: manifest[k] for k in ("docs", "train_tokens", "sequences", "vocab_size", "probes",
                                                "build_timings_s")}, indent=2))
    print(f"bundle manifest: {bundle.dirs['manifest']}")
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    bundle = build_data(_config(args), progress=not args.quiet)
    tables = data_stats(bundle, tokens=args.tokens, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({k: v.to_dict(orient="records") for k, v in tables.items()}, indent=2, default=str))
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        for name, table in tables.items():
            print(f"\n== {name} ==")
            print(table.to_string(index=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build the corpus, probes, tokenizer, tree and packed sequences; stats",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, func, help_text in (("build", _run_build, "build (or reuse) every stage"),
                                  ("stats", _run_stats, "sizes, clusters, frequency buckets, routing")):
        q = verbs.add_parser(verb, help=help_text)
        q.add_argument("--preset", default="small", choices=accepted("data"),
                       help="smoke (tests, seconds) | small (the CPU study) | full (every installed source); "
                            "default small")
        q.add_argument("--config", default=None, help="a DataConfig YAML instead of a preset")
        q.add_argument("--demo", default=None, choices=accepted("demo"),
                       help="the data of the main job (hiermem demo) at this scale instead of a preset")
        q.add_argument("--root", default=None, help="data directory (default ./data)")
        q.add_argument("--embedder", default=None, choices=("fast", "minilm", "tfidf"),
                       help="fast (distilled from MiniLM) | minilm (the paper's all-MiniLM-L6-v2) | tfidf "
                            "(TF-IDF + SVD fitted on the corpus); default: the preset's (fast)")
        q.add_argument("--seed", type=int, default=None, help="corpus seed (fact exposures, splits)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        if verb == "stats":
            q.add_argument("--json", action="store_true", help="print JSON instead of tables")
            q.add_argument("--tokens", type=int, default=0,
                           help="a memory stage's token budget: report the expected updates of every memory block")
            q.add_argument("--batch-size", type=int, default=32, help="sequences per step for --tokens (default 32)")
        q.set_defaults(func=func)
    p.set_defaults(func=lambda args: p.print_help() or 2)
