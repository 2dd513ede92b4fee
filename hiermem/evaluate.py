"""Evaluation of a finished run: held-out perplexity per source and knowledge probes under memory modes.

Retrieval at evaluation uses only the prompt (probes) or the document itself (perplexity), routed
down the run's k-means tree with the run's embedder. The modes (`hiermem.modes`: none, generic,
fetched, blocked-drop, blocked-reroute, wrong-path, oracle-path, drop-level<l>) are objects that give
every row its memory, used alike by the probe scorers and by perplexity.

Probe scores, per probe and mode:
    correct        greedy generation, exact integer/string match (the paper's metric, as it scores
                   atomic numbers); the generation budget is the relation's longest answer + 1 token
    rank_correct   the true answer has the highest log-likelihood among the answers of its relation
                   (all distinct answers of the relation's facts, at most `rank_candidates`, a seeded
                   sample always holding the true one): knowledge without the answer format
    mc_correct     the true answer beats `mc_candidates - 1` (default 3, 4-way like ARC) of those
    answer_logprob the answer's log-likelihood
Avg-SK / Avg-CK are macro averages over relations within each group (`avg_sk`, `avg_sk_rank`,
`avg_sk_mc`). `split` chooses the probes: "eval" (report), "val" (choose a regime) or "all".

Outputs in RUN_DIR/eval/: probe_results.parquet (one row per probe and mode), perplexity.csv (source x
mode), summary.csv (one row per mode), routing.csv (per-level routing agreement per bucket).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hiermem.accounting import count
from hiermem.checkpoint import load_model
from hiermem.configbase import Config, require
from hiermem.data.pipeline import DataBundle, build_data
from hiermem.diagnostics import majority_path, routing_diagnostics, summarize_routing
from hiermem.edit import forgetting_from_evaluations
from hiermem.io import atomic_path, atomic_write_text
from hiermem.kernels import keep_freed_memory
from hiermem.model import HierMemLM
from hiermem.modes import (BASE_MODES, Blocking, EvalMode, Rows, check_mode_name, choose_blocked_nodes,
                           mode_names)
from hiermem.probing import answer_matches, candidate_logprobs, document_nll, greedy_generate, merge_choices
from hiermem.rag import RAG_MODES, flops_ratio, is_rag_mode, memory_flops_ratio, rag_prompts, retrieve
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig, device_for

log = logging.getLogger(__name__)
SPLITS = ("eval", "val", "all")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    modes: tuple[str, ...] = BASE_MODES
    level_ablation: bool = True
    blocked_level: int = 1          # blocked-*: the level from which the routed subtree is blocked
    block_fraction: float = 0.0     # > 0: block this fraction of the nodes at blocked_level bank-wide instead
    block_choice: str = "best-match"  # bank-wide blocking: best-match (nodes of the probed facts first) | random
    max_new_tokens: int = 24        # cap on the per-relation generation budget
    mc_candidates: int = 4
    rank_candidates: int = 100
    heldout_docs_per_source: int = 300
    max_probes_per_relation: int = 0  # 0 = all; else a seeded sample per relation, spread over buckets
    split: str = "eval"
    perplexity_modes: tuple[str, ...] = ("all",)  # "all" = every evaluated mode
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        for mode in self.modes:
            check_mode_name(mode)
        for mode in self.perplexity_modes:
            if mode != "all":
                check_mode_name(mode)
        require(self.blocked_level >= 1, "blocked_level", "a level >= 1", self.blocked_level)
        require(0 <= self.block_fraction <= 1, "block_fraction", "a fraction in [0, 1]", self.block_fraction)
        require(self.block_choice in ("best-match", "random"), "block_choice", "'best-match' or 'random'",
                self.block_choice)
        require(self.max_new_tokens >= 1, "max_new_tokens", "a positive integer", self.max_new_tokens)
        require(self.mc_candidates >= 2, "mc_candidates", "an integer >= 2", self.mc_candidates)
        require(self.rank_candidates >= self.mc_candidates, "rank_candidates", f">= mc_candidates ({self.mc_candidates})",
                self.rank_candidates)
        require(self.max_probes_per_relation >= 0, "max_probes_per_relation", "0 (all) or a positive integer",
                self.max_probes_per_relation)
        require(self.heldout_docs_per_source >= 1, "heldout_docs_per_source", "a positive integer",
                self.heldout_docs_per_source)
        require(self.split in SPLITS, "split", f"one of {list(SPLITS)}", self.split)


def available_modes(model: HierMemLM, cfg: EvalConfig) -> list[str]:
    """Modes that make sense for this model: a dense model has only 'none' (and 'rag' when asked for)."""
    if model.bank is None:
        return ["none"] + (["rag"] if "rag" in cfg.modes else [])
    return mode_names(cfg.modes, model.bank.units, model.bank.cfg.generic, cfg.level_ablation)


def eval_modes(model: HierMemLM, data: DataBundle, cfg: EvalConfig, names: list[str],
               probes: pd.DataFrame | None = None) -> dict[str, EvalMode]:
    """The mode objects of a model; bank-wide blocking (block_fraction > 0) picks its nodes here."""
    if model.bank is None:
        return {name: EvalMode(name) for name in names}
    depth, k = model.bank.cfg.depth, model.bank.cfg.branching
    blocking = Blocking(level=min(cfg.blocked_level, depth))
    if cfg.block_fraction > 0:
        doc_paths = None
        if cfg.block_choice == "best-match":
            fact_paths = data.fact_paths()
            ids = [] if probes is None else [f for f, g in zip(probes["fact_id"], probes["group"]) if f and g == "SK"]
            found = [fact_paths[f] for f in dict.fromkeys(ids) if f in fact_paths]
            doc_paths = np.concatenate(found) if found else None
        blocking = Blocking(level=blocking.level, prefixes=choose_blocked_nodes(
            cfg.block_fraction, blocking.level, k, cfg.block_choice, doc_paths, cfg.seed))
    router = lambda vectors, blocked: data.tree.route(vectors, blocked=blocked)  # noqa: E731
    return {name: EvalMode(name, depth, k, blocking, router, cfg.seed) for name in names}


def _oracle_paths(data: DataBundle, probes: pd.DataFrame, routed: np.ndarray) -> np.ndarray:
    """The path of each probe's own fact documents (majority); cloze probes use their source doc."""
    fact_paths = data.fact_paths()
    doc_row = {doc_id: i for i, doc_id in enumerate(data.corpus["doc_id"])}
    oracle = routed.copy()
    for i, probe in enumerate(probes.itertuples(index=False)):
        if probe.fact_id and probe.fact_id in fact_paths:
            oracle[i] = majority_path(fact_paths[probe.fact_id])
        elif getattr(probe, "source_doc_id", "") in doc_row:
            oracle[i] = data.doc_paths[doc_row[probe.source_doc_id]]
    return oracle


def probe_rows(data: DataBundle, probes: pd.DataFrame) -> Rows:
    """Rows for the probes: routed by their prompt, oracle = where their fact's documents went."""
    vectors = data.embedder.encode(probes["prompt"].tolist()) if len(probes) else np.zeros((0, data.tree.dim))
    routed = data.tree.route(vectors) if len(probes) else np.zeros((0, data.depth), dtype=np.int64)
    return Rows(routed=routed, oracle=_oracle_paths(data, probes, routed), vectors=vectors)


def answer_candidates(data: DataBundle, probes: pd.DataFrame, cfg: EvalConfig) -> list[list[str]]:
    """Per probe: its true answer first, then the other distinct answers of its relation (a seeded
    sample of at most rank_candidates - 1; facts of every role count, cloze uses the probed words)."""
    rng = np.random.default_rng(cfg.seed)
    facts = data.facts
    pools: dict[str, list[str]] = {}
    for relation, part in probes.groupby("relation"):
        known = facts.loc[facts["relation"] == relation, "answer"] if len(facts) else pd.Series(dtype=str)
        pools[relation] = sorted(set(known.astype(str)) | set(part["answer"].astype(str)))
    out = []
    for relation, answer in zip(probes["relation"], probes["answer"].astype(str)):
        others = [a for a in pools[relation] if a != answer]
        if len(others) > cfg.rank_candidates - 1:
            others = [others[int(j)] for j in rng.choice(len(others), cfg.rank_candidates - 1, replace=False)]
        else:
            others = [others[int(j)] for j in rng.permutation(len(others))]
        out.append([answer] + others)
    return out


def score_probes(model: HierMemLM, data: DataBundle, probes: pd.DataFrame, cfg: EvalConfig,
                 modes: list[str], rows: Rows | None = None) -> pd.DataFrame:
    """One row per (probe, mode) with correct, rank_correct, mc_correct, answer_logprob, generated text."""
    tok = data.tokenizer
    prompts = [e.ids for e in tok.encode_batch(probes["prompt"].tolist())]
    answers = probes["answer"].astype(str).tolist()
    candidates = answer_candidates(data, probes, cfg)
    vocab = sorted({a for c in candidates for a in c})
    ids_of = dict(zip(vocab, (e.ids for e in tok.encode_batch([" " + a for a in vocab]))))
    cand_ids = [[ids_of[a] for a in c] for c in candidates]
    longest = probes.assign(n=[len(ids_of[a]) for a in answers]).groupby("relation")["n"].transform("max")
    budgets = np.minimum(cfg.max_new_tokens, longest.to_numpy() + 1)  # the relation's longest answer + 1
    rows = rows or probe_rows(data, probes)
    mode_objects = eval_modes(model, data, cfg, modes, probes)

    choices = {mode: mode_objects[mode].choose(rows) for mode in modes}
    # the prompts each mode reads: the probe's own, or (rag modes) with the retrieved document before it
    variants = {"prompt": [m for m in modes if not is_rag_mode(m)], "rag": [m for m in modes if is_rag_mode(m)]}
    texts_of = {"prompt": prompts}
    retrieved = None
    if variants["rag"]:
        retrieved = retrieve(data, rows.vectors, rows.routed)
        texts_of["rag"] = rag_prompts(prompts, retrieved)
    scored = {}
    for variant, group in variants.items():
        if not group:
            continue
        these = texts_of[variant]
        if model.fast:  # each distinct (probe, memory) pair of the group's modes scored once, in shared batches
            merged = merge_choices({m: choices[m] for m in group}, len(probes),
                                   model.bank.cfg.depth if model.bank is not None else 0)
            unique_prompts = [these[i] for i in merged.row]
            unique_texts = tok.decode_batch(greedy_generate(model, unique_prompts, merged.choice,
                                                            list(budgets[merged.row]), data.pad_id, cfg.batch_size))
            unique_scores = candidate_logprobs(model, unique_prompts, [cand_ids[i] for i in merged.row],
                                               merged.choice, data.pad_id, max(1, cfg.batch_size // 2))
            scored.update({mode: ([unique_texts[j] for j in merged.where[mode]],
                                  [unique_scores[j] for j in merged.where[mode]]) for mode in group})
        else:  # the plain path: every mode on its own
            for mode in group:
                generated = greedy_generate(model, these, choices[mode], list(budgets), data.pad_id, cfg.batch_size)
                scored[mode] = (tok.decode_batch(generated), candidate_logprobs(
                    model, these, cand_ids, choices[mode], data.pad_id, max(1, cfg.batch_size // 2)))
    # forward FLOPs of an answer relative to the anchor answering the bare prompt (hiermem.rag)
    answer_len = [len(ids_of[a]) for a in answers]
    memory_x = memory_flops_ratio(count(model.model_cfg, model.memory_cfg)) if model.bank is not None else 1.0
    rag_x = (flops_ratio([len(p) for p in prompts], [len(d) for d in retrieved.doc_tokens], answer_len)
             if retrieved is not None else None)
    frames = []
    for mode in modes:
        memory = choices[mode]
        texts, scores = scored[mode]
        frame = probes[["probe_id", "relation", "subject", "group", "bucket", "exposures", "split"]].copy()
        frame["mode"] = mode
        frame["generated"] = texts
        frame["correct"] = [answer_matches(t, a) for t, a in zip(texts, answers)]
        frame["answer_logprob"] = [float(sc[0]) for sc in scores]
        frame["rank_correct"] = [bool(len(sc) > 1 and sc[0] > sc[1:].max()) for sc in scores]
        frame["mc_correct"] = [bool(len(sc) > 1 and sc[0] > sc[1:cfg.mc_candidates].max()) for sc in scores]
        frame["n_candidates"] = [len(sc) for sc in scores]
        frame["flops_x"] = ((rag_x if is_rag_mode(mode) else 1.0)
                            * (memory_x if memory.paths is not None or memory.use_generic is not None else 1.0))
        if retrieved is not None and is_rag_mode(mode):
            frame["rag_doc_id"] = [data.corpus["doc_id"].iloc[r] if r >= 0 else "" for r in retrieved.doc_row]
        frame["routed_path"] = [",".join(map(str, p)) for p in rows.routed]
        frame["oracle_path"] = [",".join(map(str, p)) for p in (rows.oracle if rows.oracle is not None else rows.routed)]
        frame["used_path"] = ([",".join(map(str, p)) for p in memory.paths] if memory.paths is not None
                              else [""] * len(frame))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def heldout_perplexity(model: HierMemLM, data: DataBundle, cfg: EvalConfig, modes: list[str],
                       probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per source and mode: tokens, mean NLL and perplexity on held-out documents, routed by their text.

    The modes are the probes' mode objects, so blocking blocks perplexity exactly as it blocks probes."""
    corpus = data.corpus
    heldout = corpus.index[corpus["split"] == "heldout"].to_numpy()
    vectors = np.load(data.dirs["emb"] / "embeddings.npy", mmap_mode="r")
    mode_objects = eval_modes(model, data, cfg, modes, probes)
    rows = []
    rng = np.random.default_rng(cfg.seed)
    for source, idx in corpus.iloc[heldout].groupby("source").indices.items():
        chosen = heldout[idx]
        if len(chosen) > cfg.heldout_docs_per_source:
            chosen = np.sort(rng.choice(chosen, cfg.heldout_docs_per_source, replace=False))
        docs = [data.doc_tokens[i] for i in chosen]
        paths = data.doc_paths[chosen]
        doc_rows = Rows(routed=paths, oracle=paths, vectors=np.asarray(vectors[chosen]))
        choices = {mode: mode_objects[mode].choose(doc_rows) for mode in modes}
        if model.fast:  # each distinct (document, memory) pair of all modes once
            merged = merge_choices(choices, len(docs), model.bank.cfg.depth if model.bank is not None else 0)
            unique_nll, unique_counts = document_nll(model, [docs[i] for i in merged.row], merged.choice,
                                                     data.pad_id, batch_size=cfg.batch_size)
            per_mode = {mode: (unique_nll[merged.where[mode]], unique_counts[merged.where[mode]]) for mode in modes}
        else:
            per_mode = {mode: document_nll(model, docs, choice, data.pad_id, batch_size=16)
                        for mode, choice in choices.items()}
        for mode in modes:
            nll, counts = per_mode[mode]
            total = int(counts.sum())
            mean = float(nll.sum() / max(total, 1))
            rows.append({"source": source, "mode": mode, "docs": len(docs), "tokens": total, "nll": mean,
                         "ppl": float(np.exp(mean))})
    return pd.DataFrame(rows)


def select_probes(probes: pd.DataFrame, per_relation: int, seed: int, split: str = "all") -> pd.DataFrame:
    """The probes of `split` ("eval", "val" or "all"): all of them, or a seeded sample of at most
    `per_relation` per relation, spread evenly over the relation's frequency buckets so that every
    bucket stays represented (original order kept)."""
    if split != "all" and "split" in probes.columns:
        probes = probes[probes["split"] == split]
        if probes.empty:
            raise ValueError(f"no probes in split {split!r}: the corpus has no such split (build it with "
                             f"corpus.val_fraction > 0 for 'val'), or use split 'all'")
    if per_relation <= 0:
        return probes.reset_index(drop=True)
    shuffled = probes.sample(frac=1.0, random_state=seed)
    rank_in_bucket = shuffled.groupby(["relation", "bucket"]).cumcount()
    order = shuffled.assign(_rank=rank_in_bucket).sort_values("_rank", kind="stable")
    keep = order.groupby("relation").head(per_relation).index
    return probes.loc[sorted(keep)].reset_index(drop=True)


METRICS = {"correct": "", "rank_correct": "_rank", "mc_correct": "_mc"}


def summarize(results: pd.DataFrame, perplexity: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """One row per mode: Avg-SK/CK (greedy, ranking and multiple choice), perplexities, accuracy per
    bucket (SK and atomic numbers), in percent."""
    rows = []
    metrics = [m for m in METRICS if m in results.columns]
    for mode, frame in results.groupby("mode", sort=False):
        per_relation = frame.groupby(["group", "relation"])[metrics].mean()
        row = {"model": model_name, "mode": mode}
        if "flops_x" in frame:  # forward FLOPs per answer relative to the bare anchor (hiermem.rag)
            row["flops_x"] = float(frame["flops_x"].mean())
        for group in ("SK", "CK"):
            part = per_relation.loc[group] if group in per_relation.index.get_level_values(0) else None
            for metric in metrics:
                row[f"avg_{group.lower()}{METRICS[metric]}"] = (float(part[metric].mean() * 100)
                                                                if part is not None else np.nan)
        ppl = perplexity[perplexity["mode"] == mode]
        if len(ppl):
            row["ppl"] = float(np.exp((ppl["nll"] * ppl["tokens"]).sum() / ppl["tokens"].sum()))
            for r in ppl.itertuples():
                row[f"ppl_{r.source}"] = r.ppl
        else:
            row["ppl"] = np.nan
        atomic = frame[frame["relation"] == "atomic_number"]
        row["atomic_all"] = float(atomic["correct"].mean() * 100) if len(atomic) else np.nan
        for metric in metrics:
            for bucket, part in atomic.groupby("bucket"):
                row[f"atomic{METRICS[metric]}_{bucket}"] = float(part[metric].mean() * 100)
        for metric in metrics:
            for bucket, part in frame[frame["group"] == "SK"].groupby("bucket"):
                row[f"sk{METRICS[metric]}_{bucket}"] = float(part[metric].mean() * 100)
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_model(model, data: DataBundle, cfg: EvalConfig, name: str = "model"
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Every mode of `cfg` that the model has, on the data's probes and held-out documents: (probe table,
    perplexity table, summary, routing summary), the tables `evaluate_run` writes. `model` is a
    `HierMemLM` or any model with its interface (`hiermem.hf.HFMemoryLM`: scored without a KV cache)."""
    modes = available_modes(model, cfg)
    ppl_modes = modes if "all" in cfg.perplexity_modes else [m for m in cfg.perplexity_modes if m in modes]
    ppl_modes = [m for m in ppl_modes if not is_rag_mode(m)]  # retrieval is for probes (hiermem.rag)
    probes = select_probes(data.probes, cfg.max_probes_per_relation, cfg.seed, cfg.split)
    rows = probe_rows(data, probes)
    with torch.no_grad():
        results = score_probes(model, data, probes, cfg, modes, rows)
        perplexity = heldout_perplexity(model, data, cfg, ppl_modes, probes)
    summary = summarize(results, perplexity, name)
    routing = summarize_routing(routing_diagnostics(rows.routed, data.fact_paths(), probes))
    return results, perplexity, summary, routing


def evaluate_run(run_dir: str | Path, cfg: EvalConfig | None = None, progress: bool = False,
                 reuse: bool = False, data: DataBundle | None = None, fast: bool = True) -> pd.DataFrame:
    """Evaluate a finished run; writes RUN_DIR/eval/*.{parquet,csv} atomically and returns the summary.

    reuse: return the existing summary when RUN_DIR/eval was written with the same EvalConfig after
    the final checkpoint (so re-running a pipeline does not re-evaluate). data: the run's built data
    bundle (built here when None). fast: the fast paths (`HierMemLM.fast`: each distinct probe-memory
    pair of all modes scored once, the head and cross-entropy in chunks); False gives the plain path,
    with the same scores (bench/eval_time.py times both).
    """
    cfg = cfg or EvalConfig()
    run = RunDir.open(run_dir)
    final = run.final
    if reuse and run.is_evaluated and run.eval_path("summary").is_file():
        same = EvalConfig.load(run.eval_config_path) == cfg
        fresh = run.eval_path("summary").stat().st_mtime >= (final / RunDir.CONFIG).stat().st_mtime
        if same and fresh:
            return run.eval_table("summary")
    train_cfg = TrainConfig.load(run.config_path)
    keep_freed_memory()  # large activations stay in the heap between batches (hiermem.kernels)
    model = load_model(final).to(device_for(cfg.device)).eval()
    model.fast = fast
    data = build_data(train_cfg.data, progress=progress) if data is None else data
    results, perplexity, summary, routing = evaluate_model(model, data, cfg, run.name)
    run.eval_dir.mkdir(exist_ok=True)
    run.eval_config_path.unlink(missing_ok=True)  # the tables below are being replaced
    with atomic_path(run.eval_path("probes")) as tmp:
        results.to_parquet(tmp, index=False)
    for name, frame in (("perplexity", perplexity), ("summary", summary), ("routing", routing)):
        atomic_write_text(run.eval_path(name), frame.to_csv(index=False))
    cfg.save(run.eval_config_path)  # written last: marks a complete evaluation
    return summary


# ------------------------------------------------------------------------------------------ CLI
def _run_eval(args: argparse.Namespace) -> int:
    cfg = EvalConfig.load(args.config) if args.config else EvalConfig()
    if args.modes:
        cfg = cfg.replace(modes=tuple(args.modes.split(",")))
    if args.block_fraction is not None:
        cfg = cfg.replace(block_fraction=args.block_fraction)
    if args.split is not None:
        cfg = cfg.replace(split=args.split)
    summary = evaluate_run(args.run_dir, cfg, progress=not args.quiet)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 2):
        print(summary.to_string(index=False))
    print(f"\ntables written to {RunDir(args.run_dir).eval_dir}")
    forgotten, notes = forgetting_from_evaluations(args.run_dir)
    if forgotten is not None or notes:
        print("\nforgotten subjects: accuracy (%) before deletion, after it, and the anchor's (leakage = after - anchor)")
        for note in notes:
            print(f"  {note}")
        if forgotten is not None:
            with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 1):
                print(forgotten.to_string(index=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run: perplexity and probes under every memory mode",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by `hiermem train`")
    p.add_argument("--config", default=None, help="EvalConfig YAML")
    p.add_argument("--modes", default=None,
                   help=f"comma list among {','.join(BASE_MODES + RAG_MODES)} and drop-level<l> (l = 1..depth)")
    p.add_argument("--block-fraction", type=float, default=None,
                   help="blocked-drop/blocked-reroute: block this fraction of the nodes at blocked_level bank-wide "
                        "(best-matching first; block_choice: random in --config) instead of each probe's own subtree")
    p.add_argument("--split", default=None, choices=list(SPLITS), help="probes to score (default: eval)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_eval)
