"""Forget and learn: edit a trained memory bank into a new run directory (`hiermem forget`, `hiermem learn`).

The paper claims that because training documents map to specific memory blocks, memories "can be
deleted, edited or blocked, and new memories can be built from private data after pretraining". This
module does both operations on the saved checkpoint files and measures what they do.

**Forget** (`forget(run, out, nodes=... | subjects=...)`) copies a finished memory run into a new run
directory whose final checkpoint has the named blocks *removed*: every parameter of a removed block is
set to exactly 0.0 in its level's `bank/level_<l>.safetensors` (the rows stay, so node indices keep
their meaning, but hold zeros). For FFN memories a zero row is a hidden unit with zero gate, up and
down weights, whose output silu(0 . x) * (0 . x) * 0 is exactly 0 for every input: the block
contributes exactly nothing, bit for bit the same as blocking it at evaluation (`blocked-drop`), and
its data is gone from the file. LoRA memories (A = B = 0) likewise add exactly 0. KV memories are
refused: a zeroed key still takes softmax mass from the other units, so zeroing does not remove it.
Everything else -- anchor, generic block, the other levels' files, config -- is copied byte for byte
(the record lists every file's SHA-256 before and after, and a hash of each removed row).

`subjects=` resolves subjects to nodes: the training documents of a subject (its cards and question
documents, all sharing its `fact_id`) were routed to leaves; forgetting deletes the **leaf-level**
blocks (deepest memory level) on those documents' paths, by default. Shallower blocks are shared by
a whole subtree (at level 1, 1/k of the corpus) and deleting them would remove far more than the
subject; what they still hold about the subject is measured as leakage. `level=` chooses another
single level.

**Leakage** (`forgetting_table`): per deleted subject and model, on the probes of that subject,

    before         accuracy of the source run with its fetched memory
    after          accuracy of the forgotten run with its fetched memory (what a deployed model answers)
    anchor         accuracy of the pretrained anchor alone (A1, mode none): what was known without any memory
    leakage        after - anchor: subject knowledge that survives deletion of its blocks, beyond
                   what the anchor knew before memory training -- in the co-trained anchor (A2) and
                   in the shallower, undeleted levels
    anchor_leakage own_none - anchor, with own_none the edited model without memory: the part of it
                   that lives in the model's own anchor (always 0 up to noise for a frozen anchor, A3)
    removed        before - after

**Learn** (`learn(run, docs, out)`) trains only the blocks that new documents route to: each text file
is tokenized with the run's tokenizer, routed with the run's embedder and tree, packed by leaf, and
the blocks on those paths at the chosen levels (default: the leaf level only, the most local edit)
are trained with the sparse bank AdamW (lazy semantics: a block not fetched is not touched, no weight
decay elsewhere) for `steps` steps; the anchor, the generic block and every other block stay
bit-identical (checked before saving). `learned_fact_table` scores invented facts with and without
memory, `probe_change_table` the run's own probes before and after (exactly unchanged where the
probe's path does not touch an edited block).

The edit record (kind, source run, nodes, levels, subjects or documents, checksums) is stored under
the key "edit" in the new run's provenance.json and summary.json (`edit_record(run)`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hiermem.checkpoint import BANK_DIR, load_model, read_config
from hiermem.config import MemoryConfig
from hiermem.data.packing import SequenceLoader, pack_by_leaf
from hiermem.data.pipeline import DataBundle, build_data
from hiermem.data.synthetic import BIO_RELATIONS, BIRTH_CITIES, EMPLOYERS
from hiermem.data.tokenizer import encode_batch
from hiermem.diagnostics import majority_path
from hiermem.evaluate import EvalConfig, probe_rows, score_probes, select_probes
from hiermem.io import atomic_dir, atomic_path, atomic_write_json
from hiermem.modes import Rows
from hiermem.optim import SparseBankAdamW
from hiermem.rundir import RunDir
from hiermem.stepper import cosine_lr, next_token_loss
from hiermem.train import TrainConfig

log = logging.getLogger(__name__)
EDIT_KEY = "edit"
REMOVABLE = ("ffn", "lora-ffn", "lora-qk", "lora-vo")  # zero rows add exactly nothing for these kinds
METRICS = ("correct", "rank_correct")


# ------------------------------------------------------------------------------------------ files
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_checksums(ckpt_dir: str | Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint directory, by path relative to it."""
    root = Path(ckpt_dir)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def level_files(ckpt_dir: str | Path) -> dict[int, Path]:
    """level (1-based) -> the safetensors file holding its blocks, found by the files' own metadata."""
    out = {}
    for path in sorted((Path(ckpt_dir) / BANK_DIR).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            level = (f.metadata() or {}).get("level")
        if level is not None:
            out[int(level)] = path
    return out


def _read_blocks(path: Path) -> tuple[torch.Tensor, dict]:
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        if names != ["blocks"]:
            raise ValueError(f"{path}: expected one tensor 'blocks', found {names}")
        return f.get_tensor("blocks"), dict(f.metadata() or {})


def _write_blocks(path: Path, blocks: torch.Tensor, metadata: dict) -> None:
    with atomic_path(path) as tmp:
        save_file({"blocks": blocks.contiguous()}, str(tmp), metadata=metadata)


def edit_record(run_dir: str | Path) -> dict:
    """The edit record of a run written by `forget` or `learn` ({} for any other run)."""
    return RunDir.open(run_dir).provenance().get(EDIT_KEY) or {}


# ------------------------------------------------------------------------------------------ nodes
@dataclasses.dataclass(frozen=True, order=True)
class Node:
    """One memory block: level (1-based) and path prefix (i1..il); `index` is its row in the level."""

    level: int
    path: tuple[int, ...]

    def index(self, branching: int) -> int:
        flat = 0
        for i in self.path:
            flat = flat * branching + i
        return flat

    def name(self) -> str:
        return ".".join(map(str, self.path))

    def to_dict(self, branching: int) -> dict:
        return {"level": self.level, "path": list(self.path), "node": self.index(branching), "name": self.name()}


def parse_node(text: str) -> Node:
    """'3' (level-1 node 3), '3.1', '3,1' or '3/1' (level-2 node 1 under 3)."""
    parts = [p for p in str(text).replace(",", ".").replace("/", ".").split(".") if p.strip() != ""]
    try:
        path = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"node {text!r} is not a path of cluster indices like '3' or '3.1'") from None
    if not path:
        raise ValueError(f"node {text!r} is empty")
    return Node(len(path), path)


def check_nodes(nodes: Iterable[Node], memory: MemoryConfig, run: str = "") -> list[Node]:
    """The nodes, validated against the bank: each exists (depth, indices) and its level holds blocks."""
    out, k = [], memory.branching
    for node in nodes:
        where = f" in run {run!r}" if run else ""
        if node.level > memory.depth:
            raise ValueError(f"node {node.name()!r} does not exist{where}: the bank has {memory.depth} level(s)")
        bad = [i for i in node.path if not 0 <= i < k]
        if bad:
            raise ValueError(f"node {node.name()!r} does not exist{where}: indices must be in [0, {k - 1}] "
                             f"(branching {k})")
        if memory.multipliers[node.level - 1] == 0:
            raise ValueError(f"node {node.name()!r}: level {node.level} has no memory blocks{where} (r = 0)")
        out.append(node)
    return sorted(set(out))


def subtree(node: Node, memory: MemoryConfig) -> list[Node]:
    """The node and every descendant with a block."""
    out, frontier = [], [node.path]
    for level in range(node.level, memory.depth + 1):
        if memory.multipliers[level - 1]:
            out += [Node(level, p) for p in frontier]
        frontier = [p + (i,) for p in frontier for i in range(memory.branching)]
    return out


def leaf_level(memory: MemoryConfig) -> int:
    """The deepest level with memory blocks (1-based)."""
    return max(level + 1 for level, r in enumerate(memory.multipliers) if r > 0)


def read_subjects(path: str | Path) -> list[str]:
    """Subjects, one per line (blank lines and '#' comments ignored); an empty file is refused."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    subjects = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not subjects:
        raise ValueError(f"subjects file {str(path)!r} names no subject (one per line)")
    return subjects


def subject_nodes(data: DataBundle, subjects: Sequence[str], level: int) -> dict[str, dict]:
    """Per subject: its fact ids, the number of its training documents and the distinct nodes at `level`
    on their routed paths. Unknown subjects are refused, naming them."""
    facts, corpus = data.facts, data.corpus
    names = facts["subject"].astype(str)
    lower = {s.lower(): s for s in names.unique()}
    is_train = (corpus["split"] == "train").to_numpy()
    out, unknown = {}, []
    for subject in subjects:
        name = subject if subject in set(names) else lower.get(subject.lower())
        if name is None:
            unknown.append(subject)
            continue
        ids = sorted(set(facts.loc[names == name, "fact_id"].astype(str)))
        rows = np.flatnonzero(corpus["fact_id"].isin(ids).to_numpy() & is_train)
        paths = data.doc_paths[rows][:, :level]
        nodes = sorted({Node(level, tuple(int(i) for i in p)) for p in paths})
        out[subject] = {"subject": name, "fact_ids": ids, "documents": int(len(rows)), "nodes": nodes}
    if unknown:
        raise ValueError(f"unknown subject(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: not a subject of "
                         f"the run's facts (e.g. {sorted(lower.values())[:3]})")
    empty = [s for s, v in out.items() if not v["nodes"]]
    if empty:
        raise ValueError(f"subject(s) {empty} have no training documents: nothing of them is in the bank")
    return out


# ------------------------------------------------------------------------------------------ run dirs
def _memory_run(run_dir: str | Path) -> tuple[RunDir, MemoryConfig]:
    run = RunDir.open(run_dir)
    _, memory = read_config(run.final)
    if memory is None or not memory.enabled:
        raise ValueError(f"run {str(run.path)!r} has no memory bank: there is no block to forget or learn")
    return run, memory


def _check_out(out: str | Path, source: RunDir) -> Path:
    out = Path(out)
    if out.resolve() == source.path.resolve():
        raise ValueError(f"--out {str(out)!r} is the source run: an edit writes a new run directory")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output run directory {str(out)!r} exists and is not empty; choose a new path")
    return out


def _write_edited_run(source: RunDir, out: Path, changed: Mapping[int, torch.Tensor], record: dict,
                      tokens: int = 0) -> Path:
    """A new run directory: the source's config and final checkpoint with the `changed` levels rewritten,
    provenance/summary naming the source as parent and holding the edit record."""
    src_files = level_files(source.final)
    before = checkpoint_checksums(source.final)
    with atomic_dir(out) as tmp:
        run = RunDir(tmp)
        shutil.copyfile(source.config_path, run.config_path)
        shutil.copytree(source.final, run.final_dir)
        new_files = level_files(run.final_dir)
        for level, blocks in changed.items():
            _, metadata = _read_blocks(src_files[level])
            _write_blocks(new_files[level], blocks, metadata)
        record = {**record, "source": source.parent_record(), "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "checksums": {"source": before, "edited": checkpoint_checksums(run.final_dir)}}
        parent = source.parent_record()
        provenance = {**source.provenance(), "parent": parent, EDIT_KEY: record}
        atomic_write_json(run.provenance_path, provenance)
        summary = {**source.summary(), "parent": parent, "tokens": tokens, "total_tokens": source.total_tokens() + tokens,
                   EDIT_KEY: {k: v for k, v in record.items() if k != "checksums"}}
        atomic_write_json(run.summary_path, summary)
    return out


# ------------------------------------------------------------------------------------------ forget
def forget(run_dir: str | Path, out: str | Path, nodes: Sequence[str | Node] | None = None,
           subjects: Sequence[str] | None = None, level: int | None = None, with_subtree: bool = False,
           data: DataBundle | None = None) -> Path:
    """Write `out`: the run `run_dir` with the blocks of `nodes` (paths like '3' or '3.1'; with
    `with_subtree` also every descendant) or of `subjects` (the blocks at `level`, default the leaf
    level, on the paths of their training documents) set to zero in the saved bank files."""
    source, memory = _memory_run(run_dir)
    if bool(nodes) == bool(subjects):
        raise ValueError("name either nodes or subjects to forget (exactly one of them)")
    if memory.type not in REMOVABLE:
        raise ValueError(f"run {str(source.path)!r} has {memory.type!r} memory: a zeroed KV unit still takes "
                         f"attention mass, so its blocks cannot be removed by zeroing; forget supports {REMOVABLE}")
    out = _check_out(out, source)
    k = memory.branching
    per_subject = {}
    if subjects:
        level = leaf_level(memory) if level is None else int(level)
        check_nodes([Node(level, (0,) * level)], memory, str(source.path))
        data = data or build_data(TrainConfig.load(source.config_path).data, progress=False)
        per_subject = subject_nodes(data, list(subjects), level)
        chosen = sorted({n for v in per_subject.values() for n in v["nodes"]})
    else:
        chosen = check_nodes([n if isinstance(n, Node) else parse_node(n) for n in nodes], memory, str(source.path))
        if with_subtree:
            chosen = sorted({d for n in chosen for d in subtree(n, memory)})
    files = level_files(source.final)
    changed, removed_rows = {}, {}
    for lvl in sorted({n.level for n in chosen}):
        blocks, _ = _read_blocks(files[lvl])
        idx = [n.index(k) for n in chosen if n.level == lvl]
        for n in (n for n in chosen if n.level == lvl):
            removed_rows[f"{lvl}:{n.name()}"] = hashlib.sha256(blocks[n.index(k)].numpy().tobytes()).hexdigest()
        blocks = blocks.clone()
        blocks[idx] = 0.0
        changed[lvl] = blocks
    record = {"kind": "forget", "removal": "zeroed rows: every parameter of a removed block is 0.0 in the saved "
                                           "level file (contributes exactly nothing for this memory type)",
              "memory_type": memory.type, "nodes": [n.to_dict(k) for n in chosen],
              "levels": sorted({n.level for n in chosen}), "subtree": bool(with_subtree),
              "subjects": {s: {"subject": v["subject"], "fact_ids": v["fact_ids"], "documents": v["documents"],
                               "nodes": [n.name() for n in v["nodes"]]} for s, v in per_subject.items()},
              "removed_rows_sha256": removed_rows}
    return _write_edited_run(source, out, changed, record)


def edited_nodes(run_dir: str | Path) -> list[Node]:
    """The blocks an edit removed or trained, from its record."""
    return [Node(int(n["level"]), tuple(n["path"])) for n in edit_record(run_dir).get("nodes", [])]


# ------------------------------------------------------------------------------------------ scoring
def _load(run_dir: str | Path, device: str = "cpu"):
    return load_model(RunDir.open(run_dir).final).to(device).eval()


def _score(run_dir, data: DataBundle, probes: pd.DataFrame, rows: Rows, modes: Sequence[str],
           cfg: EvalConfig) -> pd.DataFrame:
    model = _load(run_dir)
    modes = [m for m in modes if model.bank is not None or m == "none"]
    with torch.no_grad():
        return score_probes(model, data, probes.reset_index(drop=True), cfg, list(modes), rows)


def touches(used_paths: Iterable[str], nodes: Sequence[Node]) -> np.ndarray:
    """Per row: does its used path ("i1,i2,..." as in the probe tables; "" = no memory) fetch any of `nodes`?"""
    wanted = {(n.level, n.path) for n in nodes}
    out = []
    for text in used_paths:
        path = tuple(int(i) for i in str(text).split(",") if i != "")
        out.append(any((level, path[:level]) in wanted for level in range(1, len(path) + 1)))
    return np.array(out, dtype=bool)


def _bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5) * 100), float(np.percentile(means, 97.5) * 100)


def _data_for(run_dir, data: DataBundle | None) -> DataBundle:
    return data or build_data(TrainConfig.load(RunDir.open(run_dir).config_path).data, progress=False)


def forgetting_table(models: Mapping[str, tuple[str | Path, str | Path]], anchor: str | Path | None = None,
                     data: DataBundle | None = None, cfg: EvalConfig | None = None,
                     metrics: Sequence[str] = METRICS, n_boot: int = 1000) -> pd.DataFrame:
    """Per model (name -> (source run, forgotten run)) and deleted subject: accuracy before and after
    deletion, the anchor's, leakage and anchor leakage (module docstring), in percent, one row per
    (model, subject, metric) plus a subject "all" row over every probe with a bootstrap CI on leakage.

    anchor: the pretrained anchor run (default: the first source run's parent)."""
    if not models:
        raise ValueError("forgetting_table needs at least one (source, forgotten) pair")
    cfg = cfg or EvalConfig(split="all")
    first_source = next(iter(models.values()))[0]
    data = _data_for(first_source, data)
    if anchor is None:
        parent = RunDir.open(first_source).parent
        if parent is None:
            raise ValueError(f"run {str(first_source)!r} records no parent anchor; pass anchor=")
        anchor = parent.path
    subjects = sorted({v["subject"] for _, forgotten in models.values()
                       for v in edit_record(forgotten).get("subjects", {}).values()})
    if not subjects:
        raise ValueError("the forgotten runs record no deleted subjects (forget with subjects=...)")
    probes = data.probes[data.probes["subject"].isin(subjects)].reset_index(drop=True)
    if probes.empty:
        raise ValueError(f"no probe asks about the deleted subjects {subjects[:5]}")
    rows = probe_rows(data, probes)
    base = _score(anchor, data, probes, rows, ["none"], cfg)
    out = []
    for model, (source, forgotten) in models.items():
        before = _score(source, data, probes, rows, ["fetched"], cfg)
        after = _score(forgotten, data, probes, rows, ["none", "fetched"], cfg)
        for metric in metrics:
            frame = pd.DataFrame({
                "subject": probes["subject"].to_numpy(),
                "before": before.loc[before["mode"] == "fetched", metric].to_numpy(float),
                "after": after.loc[after["mode"] == "fetched", metric].to_numpy(float),
                "own_none": after.loc[after["mode"] == "none", metric].to_numpy(float),
                "anchor": base.loc[base["mode"] == "none", metric].to_numpy(float)})
            groups = [(s, part) for s, part in frame.groupby("subject", sort=True)] + [("all", frame)]
            for subject, part in groups:
                mean = part[["before", "after", "own_none", "anchor"]].mean() * 100
                row = {"model": model, "subject": subject, "metric": metric, "probes": len(part), **mean.to_dict(),
                       "leakage": mean["after"] - mean["anchor"], "anchor_leakage": mean["own_none"] - mean["anchor"],
                       "removed": mean["before"] - mean["after"]}
                if subject == "all":
                    lo, hi = _bootstrap_ci((part["after"] - part["anchor"]).to_numpy(), n_boot, cfg.seed)
                    row.update(leakage_ci_low=lo, leakage_ci_high=hi)
                out.append(row)
    return pd.DataFrame(out)


def choose_subjects(run_dir: str | Path, n: int = 3, metric: str = "correct") -> list[str]:
    """`n` subjects the evaluated memory run knows only with its memory: most probes right with the
    fetched memory and wrong without it (ties: most probes right with memory, then by name)."""
    probes = RunDir.open(run_dir).eval_table("probes")
    wide = probes.pivot_table(index=["probe_id", "subject", "group"], columns="mode", values=metric,
                              aggfunc="first").reset_index()
    if "fetched" not in wide or "none" not in wide:
        raise ValueError(f"run {str(run_dir)!r} was not evaluated in modes 'fetched' and 'none'")
    wide = wide[wide["group"] == "SK"]
    wide["memory_only"] = wide["fetched"].astype(bool) & ~wide["none"].astype(bool)
    score = wide.groupby("subject").agg(memory_only=("memory_only", "sum"), fetched=("fetched", "sum")).reset_index()
    score = score.sort_values(["memory_only", "fetched", "subject"], ascending=[False, False, True])
    return score["subject"].head(n).tolist()


# ------------------------------------------------------------------------------------------ learn
def read_documents(folder: str | Path, tokenizer=None) -> list[tuple[str, str]]:
    """(file name, text) of every `*.txt` in `folder`, sorted by name. A folder without documents, a file
    that is not UTF-8 text or that has no tokens is refused, naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"documents folder {str(folder)!r} does not exist")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"no documents: {str(folder)!r} has no *.txt files")
    docs = []
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"document {str(path)!r} cannot be tokenized: it is not UTF-8 text ({e.reason} at "
                             f"byte {e.start})") from None
        if not text:
            raise ValueError(f"document {str(path)!r} cannot be tokenized: it is empty")
        docs.append((path.name, text))
    if tokenizer is not None:
        for (name, _), ids in zip(docs, encode_batch(tokenizer, [t for _, t in docs])):
            if len(ids) == 0:
                raise ValueError(f"document {str(folder / name)!r} cannot be tokenized: it gives no tokens")
    return docs


def _levels(spec: str | Sequence[int] | None, memory: MemoryConfig) -> list[int]:
    if spec is None or spec == "leaf":
        return [leaf_level(memory)]
    if spec == "all":
        return [level + 1 for level, r in enumerate(memory.multipliers) if r > 0]
    levels = [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    for level in levels:
        if not 1 <= level <= memory.depth or memory.multipliers[level - 1] == 0:
            raise ValueError(f"level {level} has no memory blocks (multipliers {memory.multipliers})")
    return sorted(set(levels))


def learn(run_dir: str | Path, docs: str | Path | Sequence[tuple[str, str]], out: str | Path, steps: int = 150,
          lr: float = 1e-2, levels: str | Sequence[int] | None = "leaf", batch_size: int = 16,
          weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0, data: DataBundle | None = None) -> Path:
    """Write `out`: the run with only the blocks that `docs` route to (at `levels`) trained on them.

    docs: a folder of `*.txt` files or (name, text) pairs. The documents are tokenized with the run's
    tokenizer, routed with its embedder and tree, packed by leaf into the run's sequence length and
    trained for `steps` steps (batches of at most `batch_size` sequences, cosine LR from `lr` to lr/10)
    with the sparse bank AdamW in lazy semantics. Nothing but those blocks changes (verified)."""
    source, memory = _memory_run(run_dir)
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    out = _check_out(out, source)
    train_cfg = TrainConfig.load(source.config_path)
    data = data or build_data(train_cfg.data, progress=False)
    docs = read_documents(docs, data.tokenizer) if isinstance(docs, (str, Path)) else list(docs)
    if not docs:
        raise ValueError("no documents to learn")
    texts = [t for _, t in docs]
    tokens = encode_batch(data.tokenizer, texts)
    empty = [name for (name, _), ids in zip(docs, tokens) if len(ids) == 0]
    if empty:
        raise ValueError(f"document(s) {empty} cannot be tokenized: they give no tokens")
    paths = data.route_texts(texts)
    chosen = _levels(levels, memory)
    k = memory.branching
    nodes = sorted({Node(level, tuple(int(i) for i in p[:level])) for p in paths for level in chosen})
    packed = pack_by_leaf(tokens, paths, train_cfg.data.seq_len, data.eot_id, data.pad_id, seed)

    torch.manual_seed(seed)
    model = load_model(source.final)
    original = [p.detach().clone() for p in model.bank.levels]
    for p in model.parameters():
        p.requires_grad_(False)
    opt = SparseBankAdamW(model.bank, lr=lr, weight_decay=weight_decay, semantics="lazy")
    loader = SequenceLoader(packed, batch_size=min(batch_size, len(packed)), seed=seed)
    learned = {level - 1 for level in chosen}
    losses = []
    model.train()
    for step in range(steps):
        batch_tokens, segments, batch_paths = next(loader)
        active = {lvl: rows for lvl, rows in opt.gather(batch_paths).items() if lvl in learned}
        logits = model(batch_tokens, segments, paths=batch_paths, active=active)
        loss = next_token_loss(logits, batch_tokens, segments)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([a.rows for a in active.values()], grad_clip)
        opt.step(active, lr=cosine_lr(step, steps, 0, lr, lr / 10))
        losses.append(float(loss.detach()))
    model.eval()

    changed = {}
    allowed = {(n.level, n.index(k)) for n in nodes}
    for level, (before, param) in enumerate(zip(original, model.bank.levels), start=1):
        if not param.numel():
            continue
        diff = torch.nonzero((param.data != before).any(dim=1)).flatten().tolist()
        stray = [i for i in diff if (level, i) not in allowed]
        if stray:  # a bug, not a user error: refuse to write a run that changed other blocks
            raise RuntimeError(f"learning changed blocks outside the documents' paths: level {level} rows {stray[:5]}")
        if diff:
            changed[level] = param.data.detach().clone()
    seq_tokens = steps * loader.batch_size * train_cfg.data.seq_len
    record = {"kind": "learn", "memory_type": memory.type, "levels": chosen, "nodes": [n.to_dict(k) for n in nodes],
              "documents": [{"name": name, "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": int(len(ids)),
                             "path": [int(i) for i in p]} for (name, text), ids, p in zip(docs, tokens, paths)],
              "steps": steps, "lr": lr, "batch_size": loader.batch_size, "weight_decay": weight_decay,
              "sequences": len(packed), "bank_semantics": "lazy", "loss_first": losses[0], "loss_last": losses[-1]}
    return _write_edited_run(source, out, changed, record, tokens=seq_tokens)


# ------------------------------------------------------------------------------------------ invented facts
_SYLLABLES = ("zor", "vel", "quin", "thax", "mur", "dral", "oph", "kes", "yun", "bri", "tov", "lam", "ux", "fen",
              "gar", "wex", "ilo", "san", "dro", "pev")
LEARN_RELATIONS = ("bio_birth_city", "bio_employer")


def invent_facts(n: int = 6, docs_per_subject: int = 4, seed: int = 0) -> tuple[list[tuple[str, str]], pd.DataFrame]:
    """`n` invented people (names of made-up syllables, never in the corpus) with a birth city and an
    employer drawn from the bioS world's lists (so the answers are words the model can say; the facts,
    who was born where and works for whom, are new), as cards ("Name. Facts about Name: ...", the corpus's layout;
    every other card states the facts in the probe format, as the corpus's question documents do) and
    probes in the corpus's probe format. Returns ((file name, text) documents, probes)."""
    rng = np.random.default_rng([seed, 20260])
    used, docs, probes = set(), [], []
    while len(used) < n:
        first = "".join(rng.choice(_SYLLABLES, 2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES, 3)).capitalize()
        used.add(f"{first} {last}")
    for j, name in enumerate(sorted(used)):
        answers = {"bio_birth_city": BIRTH_CITIES[int(rng.integers(len(BIRTH_CITIES)))],
                   "bio_employer": EMPLOYERS[int(rng.integers(len(EMPLOYERS)))]}
        files = []
        for d in range(docs_per_subject):
            sentences = [BIO_RELATIONS[rel].train_templates[(d + i) % len(BIO_RELATIONS[rel].train_templates)].format(
                subject=name, answer=answer) for i, (rel, answer) in enumerate(answers.items())]
            if d % 2:  # every other card also states the facts in the probe format, as the corpus's question docs do
                sentences = [f"{BIO_RELATIONS[rel].probe_template.format(subject=name)} {answer}."
                             for rel, answer in answers.items()]
            files.append(f"fact{j:02d}_{d}.txt")
            docs.append((files[-1], f"{name}. Facts about {name}: " + " ".join(sentences)))
        for rel, answer in answers.items():
            probes.append({"probe_id": f"learned-{j}-{rel}", "relation": rel, "subject": name,
                           "prompt": BIO_RELATIONS[rel].probe_template.format(subject=name), "answer": answer,
                           "group": "SK", "exposures": docs_per_subject, "bucket": "learned", "split": "learned",
                           "fact_id": f"learned:{j}", "documents": ";".join(files)})
    return docs, pd.DataFrame(probes)


def write_documents(folder: str | Path, docs: Sequence[tuple[str, str]]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs:
        (folder / name).write_text(text + "\n", encoding="utf-8")
    return folder


def read_probes(path: str | Path) -> pd.DataFrame:
    """Probes of new facts from a CSV with columns prompt, answer (optional: relation, subject, documents:
    ';'-separated file names of the documents stating the fact)."""
    probes = pd.read_csv(path, dtype=str).fillna("")
    missing = {"prompt", "answer"} - set(probes.columns)
    if missing:
        raise ValueError(f"probes file {str(path)!r} lacks column(s) {sorted(missing)}")
    return _probe_frame(probes)


def _probe_frame(probes: pd.DataFrame) -> pd.DataFrame:
    probes = probes.copy().reset_index(drop=True)
    defaults = {"probe_id": [f"learned-{i}" for i in range(len(probes))], "relation": "learned",
                "subject": probes["prompt"], "group": "SK", "bucket": "learned", "exposures": 0, "split": "learned",
                "fact_id": "", "source_doc_id": "", "documents": ""}
    for column, value in defaults.items():
        if column not in probes.columns:
            probes[column] = value
    probes["exposures"] = pd.to_numeric(probes["exposures"], errors="coerce").fillna(0).astype(int)
    return probes


def _learned_rows(data: DataBundle, probes: pd.DataFrame, record: dict) -> Rows:
    """Routed by the prompt; oracle = the majority path of the documents that state the fact."""
    vectors = data.embedder.encode(probes["prompt"].tolist())
    routed = data.tree.route(vectors)
    doc_path = {d["name"]: d["path"] for d in record.get("documents", [])}
    oracle = routed.copy()
    for i, names in enumerate(probes["documents"].astype(str)):
        found = [doc_path[n] for n in names.split(";") if n in doc_path]
        if found:
            oracle[i] = majority_path(np.asarray(found))
    return Rows(routed=routed, oracle=oracle, vectors=vectors)


def learned_fact_table(models: Mapping[str, tuple[str | Path, str | Path]], probes: pd.DataFrame,
                       data: DataBundle | None = None, cfg: EvalConfig | None = None,
                       modes: Sequence[str] = ("none", "fetched", "oracle-path"),
                       metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Accuracy (%) on the new facts' probes per model (name -> (source run, learned run)), phase
    (before / after learning), mode and metric (and the mean answer log-likelihood); `oracle-path` fetches the blocks of the path the fact's
    documents were routed to (the learned blocks), `fetched` those of the prompt's own route."""
    probes = _probe_frame(probes)
    data = _data_for(next(iter(models.values()))[0], data)
    cfg = cfg or EvalConfig(split="all")
    out = []
    for model, (source, learned) in models.items():
        rows = _learned_rows(data, probes, edit_record(learned))
        for phase, run in (("before", source), ("after", learned)):
            scores = _score(run, data, probes, rows, modes, cfg)
            for (mode, metric) in ((m, x) for m in modes for x in metrics):
                chosen = scores[scores["mode"] == mode]
                part = chosen[metric].to_numpy(float)
                lo, hi = _bootstrap_ci(part, 1000, cfg.seed)
                out.append({"model": model, "phase": phase, "mode": mode, "metric": metric, "probes": len(part),
                            "accuracy": float(part.mean() * 100), "ci_low": lo, "ci_high": hi,
                            "answer_logprob": float(chosen["answer_logprob"].mean())})
    return pd.DataFrame(out)


def probe_change_table(source: str | Path, edited: str | Path, data: DataBundle | None = None,
                       cfg: EvalConfig | None = None, mode: str = "fetched",
                       metrics: Sequence[str] = METRICS, n_boot: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's own probes (cfg.split, cfg.max_probes_per_relation) scored on the source and the edited
    run in `mode`. Returns (summary, per_probe): the summary has one row per metric and part ("untouched":
    probes whose used path reaches no edited block, "touched", "all") with accuracy before and after, the
    paired difference and its bootstrap 95% CI, and the number of probes whose score or answer
    log-likelihood changed at all."""
    data = _data_for(source, data)
    cfg = cfg or EvalConfig()
    probes = select_probes(data.probes, cfg.max_probes_per_relation, cfg.seed, cfg.split)
    rows = probe_rows(data, probes)
    before = _score(source, data, probes, rows, [mode], cfg).reset_index(drop=True)
    after = _score(edited, data, probes, rows, [mode], cfg).reset_index(drop=True)
    touched = touches(before["used_path"], edited_nodes(edited))
    per_probe = before[["probe_id", "relation", "subject", "group", "bucket", "used_path"]].copy()
    per_probe["touched"] = touched
    for metric in metrics:
        per_probe[f"{metric}_before"] = before[metric].to_numpy()
        per_probe[f"{metric}_after"] = after[metric].to_numpy()
    per_probe["logprob_change"] = after["answer_logprob"].to_numpy() - before["answer_logprob"].to_numpy()
    out = []
    for metric in metrics:
        for part, mask in (("untouched", ~touched), ("touched", touched), ("all", np.ones_like(touched))):
            b = per_probe.loc[mask, f"{metric}_before"].to_numpy(float)
            a = per_probe.loc[mask, f"{metric}_after"].to_numpy(float)
            lo, hi = _bootstrap_ci(a - b, n_boot, cfg.seed)
            out.append({"metric": metric, "part": part, "probes": int(mask.sum()),
                        "before": float(b.mean() * 100) if len(b) else np.nan,
                        "after": float(a.mean() * 100) if len(a) else np.nan,
                        "diff": float((a - b).mean() * 100) if len(b) else np.nan, "ci_low": lo, "ci_high": hi,
                        "score_changed": int((a != b).sum()),
                        "logprob_changed": int((per_probe.loc[mask, "logprob_change"] != 0).sum())})
    return pd.DataFrame(out), per_probe


# ------------------------------------------------------------------------------------------ plots
def plot_forgetting(table: pd.DataFrame, path: str | Path, metric: str = "correct"):
    """Bars per model: accuracy on the deleted subjects' probes before and after deletion, and the
    anchor's; the leakage (after - anchor) written above. PNG + the CSV it plots."""
    from matplotlib.figure import Figure

    from analysis.plots import save_figure
    data = table[(table["subject"] == "all") & (table["metric"] == metric)].reset_index(drop=True)
    fig = Figure(figsize=(1.8 + 2.2 * max(len(data), 1), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(data))
    for j, (column, label) in enumerate((("before", "before (fetched)"), ("after", "after deletion (fetched)"),
                                         ("anchor", "anchor alone (A1)"))):
        ax.bar(x + (j - 1) * 0.27, data[column], width=0.27, label=label)
    for i, r in data.iterrows():
        ax.annotate(f"leakage {r['leakage']:+.1f}", (i, max(r["before"], r["after"], r["anchor"]) + 1), ha="center",
                    fontsize=8)
    ax.set_xticks(x, data["model"])
    ax.set_ylabel(f"{metric} on deleted subjects (%)")
    ax.set_title("Forgetting: deleted leaf blocks")
    ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, data, path)


def plot_learning(table: pd.DataFrame, path: str | Path, metric: str = "correct"):
    """Accuracy on the new facts per model and mode, before and after learning (95% bootstrap CIs)."""
    from matplotlib.figure import Figure

    from analysis.plots import save_figure
    data = table[table["metric"] == metric].reset_index(drop=True)
    keys = list(dict.fromkeys(zip(data["model"], data["mode"])))
    fig = Figure(figsize=(2 + 1.1 * max(len(keys), 1), 3.8), layout="constrained")
    ax = fig.subplots()
    for j, phase in enumerate(("before", "after")):
        part = data[data["phase"] == phase].set_index(["model", "mode"]).reindex(keys)
        xs = np.arange(len(keys)) + (j - 0.5) * 0.38
        err = np.vstack([part["accuracy"] - part["ci_low"], part["ci_high"] - part["accuracy"]]).clip(min=0)
        ax.bar(xs, part["accuracy"], width=0.38, yerr=np.nan_to_num(err), capsize=2, label=f"{phase} learning")
    ax.set_xticks(np.arange(len(keys)), [f"{m}\n{mode}" for m, mode in keys], fontsize=7)
    ax.set_ylabel(f"{metric} on the new facts (%)")
    ax.set_title("Learning new facts into their blocks")
    ax.legend(fontsize=7)
    return save_figure(fig, data, path)


# ------------------------------------------------------------------------------------------ CLI
def _print(frame: pd.DataFrame) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 1):
        print(frame.to_string(index=False))


def _run_forget(args: argparse.Namespace) -> int:
    subjects = read_subjects(args.subjects) if args.subjects else None
    out = forget(args.run_dir, args.out, nodes=args.nodes, subjects=subjects, level=args.level,
                 with_subtree=args.subtree)
    record = edit_record(out)
    print(f"wrote {out}: {len(record['nodes'])} block(s) removed at level(s) {record['levels']}")
    if args.report:
        if not subjects:
            raise ValueError("--report needs --subjects (leakage is measured on the deleted subjects' probes)")
        table = forgetting_table({RunDir(args.run_dir).name: (args.run_dir, out)}, anchor=args.anchor)
        _print(table)
    print(json.dumps({"out": str(out), "nodes": [n["name"] for n in record["nodes"]], "levels": record["levels"]}))
    return 0


def _run_learn(args: argparse.Namespace) -> int:
    out = learn(args.run_dir, args.docs, args.out, steps=args.steps, lr=args.lr, levels=args.levels,
                batch_size=args.batch_size)
    record = edit_record(out)
    print(f"wrote {out}: trained {len(record['nodes'])} block(s) at level(s) {record['levels']} on "
          f"{len(record['documents'])} document(s), loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}")
    if args.probes:
        _print(learned_fact_table({RunDir(args.run_dir).name: (args.run_dir, out)}, read_probes(args.probes)))
    if args.check_others:
        _print(probe_change_table(args.run_dir, out)[0])
    print(json.dumps({"out": str(out), "nodes": [n["name"] for n in record["nodes"]], "levels": record["levels"],
                      "loss_first": record["loss_first"], "loss_last": record["loss_last"]}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `forget` and `learn` (idempotent: both command names map to this module)."""
    if "forget" in sub.choices:
        return
    p = sub.add_parser("forget", help="a new run with memory blocks removed (zeroed in the saved files)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished memory run")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--nodes", nargs="+", help="node paths to remove, e.g. 3 (level 1) or 3.1 (level 2)")
    what.add_argument("--subjects", help="a file of subjects, one per line: remove the blocks of their documents")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--level", type=int, default=None, help="--subjects: the level whose blocks go (default: leaf)")
    p.add_argument("--subtree", action="store_true", help="--nodes: also remove every descendant's block")
    p.add_argument("--report", action="store_true", help="--subjects: print accuracy before/after and leakage")
    p.add_argument("--anchor", default=None, help="--report: the pretrained anchor run (default: the run's parent)")
    p.set_defaults(func=_run_forget)

    q = sub.add_parser("learn", help="a new run with only the blocks new documents route to trained on them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("run_dir", help="a finished memory run")
    q.add_argument("--docs", required=True, help="a folder of *.txt documents (UTF-8)")
    q.add_argument("--out", required=True, help="the new run directory")
    q.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    q.add_argument("--lr", type=float, default=1e-2, help="peak learning rate, cosine to lr/10 (default 1e-2)")
    q.add_argument("--levels", default="leaf", help="leaf (default) | all | comma list of levels, e.g. 1,2")
    q.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    q.add_argument("--probes", default=None, help="CSV (prompt, answer[, relation, documents]): score the new facts")
    q.add_argument("--check-others", action="store_true", help="score the run's own probes before and after")
    q.set_defaults(func=_run_learn)
