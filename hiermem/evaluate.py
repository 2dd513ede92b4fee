"""Evaluation of a finished run: held-out perplexity per source and knowledge probes under memory modes.

Retrieval at evaluation uses only the prompt (probes) or the document itself (perplexity), routed
down the run's k-means tree with the run's embedder. Modes, all scored on the same probes:

    none             the anchor alone
    generic          anchor + the generic (context-independent) block
    fetched          anchor + the blocks on the prompt's routed path
    fetched+blocked  as fetched, with the routed subtree blocked from `blocked_level` down (its blocks
                     dropped; blocked_level 1 = the paper's 1/16 of the bank around the prompt), or,
                     with block_fraction > 0, a random fraction of level-1 subtrees blocked bank-wide
    wrong-path       anchor + the blocks of a random path (differing at level 1)
    oracle-path      anchor + the blocks of the path where most of the fact's documents went
    drop-level<l>    fetched with level l's block dropped (one per level with memory)

Probe scores: `correct` (greedy generation, exact integer/string match, as the paper scores atomic
numbers), `answer_logprob` (log-likelihood of the answer), and `mc_correct` (the answer outscores
`mc_candidates - 1` (default 3, 4-way like ARC) other answers of the same relation by log-likelihood). Avg-SK / Avg-CK are macro
averages over relations of `correct` within each group.

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

from hiermem.checkpoint import load_model
from hiermem.configbase import Config, require
from hiermem.data.pipeline import DataBundle, build_data
from hiermem.diagnostics import majority_path, routing_diagnostics, summarize_routing
from hiermem.io import atomic_path, atomic_write_text
from hiermem.model import HierMemLM
from hiermem.probing import (MemoryChoice, answer_matches, continuation_logprobs, document_nll,
                             greedy_generate)
from hiermem.train import TrainConfig, device_for, final_checkpoint

log = logging.getLogger(__name__)
BASE_MODES = ("none", "generic", "fetched", "fetched+blocked", "wrong-path", "oracle-path")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    modes: tuple[str, ...] = BASE_MODES
    level_ablation: bool = True
    blocked_level: int = 1
    block_fraction: float = 0.0
    max_new_tokens: int = 12
    mc_candidates: int = 4
    heldout_docs_per_source: int = 300
    max_probes_per_relation: int = 0  # 0 = all; else a seeded sample per relation (atomic numbers: 118)
    perplexity_modes: tuple[str, ...] = ("all",)  # "all" = every evaluated mode
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        for mode in self.modes:
            require(mode in BASE_MODES, "modes", f"modes among {list(BASE_MODES)}", mode)
        for mode in self.perplexity_modes:
            require(mode in BASE_MODES + ("all",), "perplexity_modes", f"'all' or modes among {list(BASE_MODES)}",
                    mode)
        require(self.blocked_level >= 1, "blocked_level", "a level >= 1", self.blocked_level)
        require(0 <= self.block_fraction <= 1, "block_fraction", "a fraction in [0, 1]", self.block_fraction)
        require(self.max_new_tokens >= 1, "max_new_tokens", "a positive integer", self.max_new_tokens)
        require(self.mc_candidates >= 2, "mc_candidates", "an integer >= 2", self.mc_candidates)
        require(self.max_probes_per_relation >= 0, "max_probes_per_relation", "0 (all) or a positive integer",
                self.max_probes_per_relation)
        require(self.heldout_docs_per_source >= 1, "heldout_docs_per_source", "a positive integer",
                self.heldout_docs_per_source)


def available_modes(model: HierMemLM, cfg: EvalConfig) -> list[str]:
    """Modes that make sense for this model: a dense model has only 'none'."""
    if model.bank is None:
        return ["none"]
    modes = [m for m in cfg.modes if m != "generic" or model.bank.cfg.generic]
    if cfg.level_ablation:
        modes += [f"drop-level{level + 1}" for level, r in enumerate(model.bank.units) if r > 0]
    return modes


class _ModeBuilder:
    """Turns a mode name into the per-row `MemoryChoice` (and bank-level blocking) for a set of rows."""

    def __init__(self, model: HierMemLM, cfg: EvalConfig, routed: np.ndarray, oracle: np.ndarray):
        self.model, self.cfg, self.routed, self.oracle = model, cfg, routed, oracle
        self.depth = model.bank.cfg.depth if model.bank is not None else 0

    def __call__(self, mode: str) -> MemoryChoice:
        n = len(self.routed)
        depth = self.depth
        routed = self.routed[:, :depth] if depth else None
        if mode == "none" or self.model.bank is None:
            return MemoryChoice()
        if mode == "generic":
            return MemoryChoice(paths=routed, use_generic=np.ones(n, dtype=bool))
        if mode in ("fetched",):
            return MemoryChoice(paths=routed)
        if mode == "fetched+blocked":
            if self.cfg.block_fraction > 0:
                return MemoryChoice(paths=routed)  # bank-level blocking is switched on by the caller
            blocked = np.zeros((n, depth), dtype=bool)
            blocked[:, min(self.cfg.blocked_level, depth) - 1:] = True
            return MemoryChoice(paths=routed, blocked=blocked)
        if mode == "wrong-path":
            rng = np.random.default_rng(self.cfg.seed)
            k = self.model.bank.cfg.branching
            wrong = rng.integers(0, k, size=(n, depth))
            wrong[:, 0] = (routed[:, 0] + rng.integers(1, k, size=n)) % k  # never the routed subtree
            return MemoryChoice(paths=wrong)
        if mode == "oracle-path":
            return MemoryChoice(paths=self.oracle[:, :depth])
        if mode.startswith("drop-level"):
            level = int(mode.removeprefix("drop-level")) - 1
            blocked = np.zeros((n, depth), dtype=bool)
            blocked[:, level] = True
            return MemoryChoice(paths=routed, blocked=blocked)
        raise ValueError(f"unknown evaluation mode {mode!r}")


def _bank_blocking(model: HierMemLM, cfg: EvalConfig, mode: str):
    """Context manager-ish: switch on bank-wide random blocking for fetched+blocked with a fraction."""
    if model.bank is not None and mode == "fetched+blocked" and cfg.block_fraction > 0:
        return model.bank.block_fraction(cfg.block_fraction, level=0, seed=cfg.seed)
    return None


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


def score_probes(model: HierMemLM, data: DataBundle, probes: pd.DataFrame, cfg: EvalConfig,
                 modes: list[str]) -> pd.DataFrame:
    """One row per (probe, mode) with correct, mc_correct, answer_logprob and the generated text."""
    tok = data.tokenizer
    prompts = [e.ids for e in tok.encode_batch(probes["prompt"].tolist())]
    answers = probes["answer"].astype(str).tolist()
    answer_ids = [e.ids for e in tok.encode_batch([" " + a for a in answers])]
    max_new = [min(cfg.max_new_tokens, len(a) + 1) for a in answer_ids]  # the answer and one token more
    routed = data.route_texts(probes["prompt"].tolist())
    oracle = _oracle_paths(data, probes, routed)
    build = _ModeBuilder(model, cfg, routed, oracle)

    # multiple choice: the answer against other answers of the same relation
    rng = np.random.default_rng(cfg.seed)
    candidates: list[list[int]] = []  # per probe: indices into `answers` (first is the true one)
    by_relation = probes.groupby("relation").indices
    for i, relation in enumerate(probes["relation"]):
        pool = [j for j in by_relation[relation] if answers[j] != answers[i]]
        distinct = list({answers[j]: j for j in pool}.values())
        picks = rng.choice(distinct, size=min(cfg.mc_candidates - 1, len(distinct)), replace=False) if distinct else []
        candidates.append([i] + [int(j) for j in picks])
    flat_probe = np.array([i for i, c in enumerate(candidates) for _ in c])
    flat_answer = [answer_ids[j] for c in candidates for j in c]

    frames = []
    for mode in modes:
        blocked_prefixes = _bank_blocking(model, cfg, mode)
        try:
            memory = build(mode)
            generated = greedy_generate(model, prompts, memory, max_new, data.pad_id, cfg.batch_size)
            texts = tok.decode_batch(generated)
            flat_memory = MemoryChoice(
                paths=memory.paths[flat_probe] if memory.paths is not None else None,
                use_generic=memory.use_generic[flat_probe] if memory.use_generic is not None else None,
                blocked=memory.blocked[flat_probe] if memory.blocked is not None else None)
            cand_scores = continuation_logprobs(model, [prompts[i] for i in flat_probe], flat_answer, flat_memory,
                                                data.pad_id, cfg.batch_size * 2)
        finally:
            if blocked_prefixes is not None:
                model.bank.unblock_all()
        offsets = np.cumsum([0] + [len(c) for c in candidates])
        logprob = cand_scores[offsets[:-1]]  # the true answer is each probe's first candidate
        mc_correct = [bool(len(c) > 1 and np.argmax(cand_scores[offsets[i]:offsets[i + 1]]) == 0)
                      for i, c in enumerate(candidates)]
        frame = probes[["probe_id", "relation", "subject", "group", "bucket", "exposures"]].copy()
        frame["mode"] = mode
        frame["generated"] = texts
        frame["correct"] = [answer_matches(t, a) for t, a in zip(texts, answers)]
        frame["answer_logprob"] = logprob
        frame["mc_correct"] = mc_correct
        frame["routed_path"] = [",".join(map(str, p)) for p in routed]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def heldout_perplexity(model: HierMemLM, data: DataBundle, cfg: EvalConfig, modes: list[str]) -> pd.DataFrame:
    """Per source and mode: tokens, mean NLL and perplexity on held-out documents, routed by their text."""
    corpus = data.corpus
    heldout = corpus.index[corpus["split"] == "heldout"].to_numpy()
    rows = []
    rng = np.random.default_rng(cfg.seed)
    for source, idx in corpus.iloc[heldout].groupby("source").indices.items():
        chosen = heldout[idx]
        if len(chosen) > cfg.heldout_docs_per_source:
            chosen = np.sort(rng.choice(chosen, cfg.heldout_docs_per_source, replace=False))
        docs = [data.doc_tokens[i] for i in chosen]
        paths = data.doc_paths[chosen]
        build = _ModeBuilder(model, cfg, paths, paths)
        for mode in modes:
            nll, counts = document_nll(model, docs, build(mode), data.pad_id, batch_size=16)
            total = int(counts.sum())
            mean = float(nll.sum() / max(total, 1))
            rows.append({"source": source, "mode": mode, "docs": len(docs), "tokens": total, "nll": mean,
                         "ppl": float(np.exp(mean))})
    return pd.DataFrame(rows)


def select_probes(probes: pd.DataFrame, per_relation: int, seed: int) -> pd.DataFrame:
    """All probes, or a seeded sample of at most `per_relation` per relation, spread evenly over the
    relation's frequency buckets so that every bucket stays represented (original order kept)."""
    if per_relation <= 0:
        return probes.reset_index(drop=True)
    shuffled = probes.sample(frac=1.0, random_state=seed)
    rank_in_bucket = shuffled.groupby(["relation", "bucket"]).cumcount()
    order = shuffled.assign(_rank=rank_in_bucket).sort_values("_rank", kind="stable")
    keep = order.groupby("relation").head(per_relation).index
    return probes.loc[sorted(keep)].reset_index(drop=True)


def summarize(results: pd.DataFrame, perplexity: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """One row per mode: Avg-SK/CK (greedy and multiple choice), perplexities, accuracy per bucket."""
    rows = []
    for mode, frame in results.groupby("mode", sort=False):
        per_relation = frame.groupby(["group", "relation"])[["correct", "mc_correct"]].mean()
        row = {"model": model_name, "mode": mode}
        for group in ("SK", "CK"):
            part = per_relation.loc[group] if group in per_relation.index.get_level_values(0) else None
            row[f"avg_{group.lower()}"] = float(part["correct"].mean() * 100) if part is not None else np.nan
            row[f"avg_{group.lower()}_mc"] = float(part["mc_correct"].mean() * 100) if part is not None else np.nan
        ppl = perplexity[perplexity["mode"] == mode]
        if len(ppl):
            row["ppl"] = float(np.exp((ppl["nll"] * ppl["tokens"]).sum() / ppl["tokens"].sum()))
            for r in ppl.itertuples():
                row[f"ppl_{r.source}"] = r.ppl
        else:
            row["ppl"] = np.nan
        atomic = frame[frame["relation"] == "atomic_number"]
        for bucket, part in atomic.groupby("bucket"):
            row[f"atomic_{bucket}"] = float(part["correct"].mean() * 100)
        row["atomic_all"] = float(atomic["correct"].mean() * 100) if len(atomic) else np.nan
        for bucket, part in atomic.groupby("bucket"):
            row[f"atomic_mc_{bucket}"] = float(part["mc_correct"].mean() * 100)
        for bucket, part in frame[frame["group"] == "SK"].groupby("bucket"):
            row[f"sk_{bucket}"] = float(part["correct"].mean() * 100)
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_run(run_dir: str | Path, cfg: EvalConfig | None = None, progress: bool = False,
                 reuse: bool = False) -> pd.DataFrame:
    """Evaluate a finished run; writes RUN_DIR/eval/*.{parquet,csv} atomically and returns the summary.

    reuse: return the existing summary when RUN_DIR/eval was written with the same EvalConfig after
    the final checkpoint (so re-running a pipeline does not re-evaluate).
    """
    cfg = cfg or EvalConfig()
    run_dir = Path(run_dir)
    out = run_dir / "eval"
    if reuse and (out / "summary.csv").exists() and (out / "eval_config.yaml").exists():
        same = EvalConfig.load(out / "eval_config.yaml") == cfg
        fresh = (out / "summary.csv").stat().st_mtime >= (final_checkpoint(run_dir) / "config.yaml").stat().st_mtime
        if same and fresh:
            return pd.read_csv(out / "summary.csv")
    train_cfg = TrainConfig.load(run_dir / "config.yaml")
    model = load_model(final_checkpoint(run_dir)).to(device_for(cfg.device)).eval()
    data = build_data(train_cfg.data, progress=progress)
    modes = available_modes(model, cfg)
    ppl_modes = modes if "all" in cfg.perplexity_modes else [m for m in cfg.perplexity_modes if m in modes]
    probes = select_probes(data.probes, cfg.max_probes_per_relation, cfg.seed)
    with torch.no_grad():
        results = score_probes(model, data, probes, cfg, modes)
        perplexity = heldout_perplexity(model, data, cfg, ppl_modes)
    summary = summarize(results, perplexity, run_dir.name)
    routed = data.route_texts(probes["prompt"].tolist())
    routing = summarize_routing(routing_diagnostics(routed, data.fact_paths(), probes))
    out.mkdir(exist_ok=True)
    (out / "eval_config.yaml").unlink(missing_ok=True)  # the tables below are being replaced
    with atomic_path(out / "probe_results.parquet") as tmp:
        results.to_parquet(tmp, index=False)
    for name, frame in (("perplexity", perplexity), ("summary", summary), ("routing", routing)):
        atomic_write_text(out / f"{name}.csv", frame.to_csv(index=False))
    cfg.save(out / "eval_config.yaml")  # written last: marks a complete evaluation
    return summary


# ------------------------------------------------------------------------------------------ CLI
def _run_eval(args: argparse.Namespace) -> int:
    cfg = EvalConfig.load(args.config) if args.config else EvalConfig()
    if args.modes:
        cfg = cfg.replace(modes=tuple(args.modes.split(",")))
    if args.block_fraction is not None:
        cfg = cfg.replace(block_fraction=args.block_fraction)
    summary = evaluate_run(args.run_dir, cfg, progress=not args.quiet)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 2):
        print(summary.to_string(index=False))
    print(f"\ntables written to {Path(args.run_dir) / 'eval'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run: perplexity and probes under every memory mode",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by `hiermem train`")
    p.add_argument("--config", default=None, help="EvalConfig YAML")
    p.add_argument("--modes", default=None, help=f"comma list among {','.join(BASE_MODES)}")
    p.add_argument("--block-fraction", type=float, default=None,
                   help="for fetched+blocked: block this random fraction of level-1 subtrees bank-wide")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_eval)
