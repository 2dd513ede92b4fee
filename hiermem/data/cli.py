"""`hiermem data build` and `hiermem data stats`.

    hiermem data build --preset small [--embedder minilm] [--root data] [--seed 0] [--config data.yaml]
    hiermem data stats --preset small [--json]

`build` runs every missing stage of the pipeline (corpus, tokenizer, embeddings, tree, routes, packed
sequences); `stats` prints sizes, per-level cluster statistics (sizes, balance, purity against source
and topic), the probes per group and frequency bucket, and routing diagnostics: how often a probe's
prompt routes to the node where most of its fact's documents went, per level and bucket.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from hiermem.data.pipeline import DataBundle, DataConfig, build_data
from hiermem.diagnostics import routing_diagnostics, summarize_routing


def _config(args: argparse.Namespace) -> DataConfig:
    if args.config:
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


def data_stats(bundle: DataBundle) -> dict[str, pd.DataFrame]:
    """Tables describing a built dataset (sizes, clusters, probes, routing)."""
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
    return {"sizes": sizes, "clusters": clusters, "probes": buckets, "routing": routing}


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
    tables = data_stats(bundle)
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
        q.add_argument("--preset", default="small", help="smoke | small | full (default small)")
        q.add_argument("--config", default=None, help="a DataConfig YAML instead of a preset")
        q.add_argument("--root", default=None, help="data directory (default ./data)")
        q.add_argument("--embedder", default=None, help="fast | minilm (the paper's all-MiniLM-L6-v2)")
        q.add_argument("--seed", type=int, default=None, help="corpus seed (fact exposures, splits)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        if verb == "stats":
            q.add_argument("--json", action="store_true", help="print JSON instead of tables")
        q.set_defaults(func=func)
    p.set_defaults(func=lambda args: p.print_help() or 2)
