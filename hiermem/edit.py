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

import dataclasses
import datetime as dt
import hashlib
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
from hiermem.io import atomic_dir, atomic_path, atomic_write_json
from hiermem.optim import SparseBankAdamW
from hiermem.rundir import RunDir
from hiermem.stepper import cosine_lr, next_token_loss
from hiermem.train import TrainConfig

log = logging.getLogger(__name__)
EDIT_KEY = "edit"
REMOVABLE = ("ffn", "lora-ffn", "lora-qk", "lora-vo")  # zero rows add exactly nothing for these kinds


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
          weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0, data: DataBundle | None = None,
          replay: float = 0.5) -> Path:
    """Write `out`: the run with only the blocks that `docs` route to (at `levels`) trained on them.

    docs: a folder of `*.txt` files or (name, text) pairs. The documents are tokenized with the run's
    tokenizer, routed with its embedder and tree, packed by leaf into the run's sequence length and
    trained for `steps` steps (batches of at most `batch_size` sequences, cosine LR from `lr` to lr/10)
    with the sparse bank AdamW in lazy semantics. Nothing but those blocks changes (verified).
    replay: the share of each batch drawn from the run's own training documents whose paths reach the
    trained blocks (rehearsal: what those blocks already hold is trained beside the new documents). On the
    demo's runs (6 invented people, 150 steps) replay 0 taught the new facts (oracle-path 0 -> 67% A3, 83% A2)
    but cost the run's other probes 1.9 [0.7, 3.1] points (A3), all on probes whose path reaches a learned
    block; replay 0.5 (the default) taught them to 58% / 75% and kept the other probes within their CI
    (-0.5 [-1.6, +0.5], A3)."""
    source, memory = _memory_run(run_dir)
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if not 0 <= replay < 1:
        raise ValueError(f"replay must be a share in [0, 1), got {replay}")
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
    n_old = min(int(round(batch_size * replay)), batch_size - 1)
    loader = SequenceLoader(packed, batch_size=min(batch_size - n_old, len(packed)), seed=seed)
    old_loader = _replay_loader(data, nodes, train_cfg.data.seq_len, n_old, seed) if n_old else None
    learned = {level - 1 for level in chosen}
    losses = []
    model.train()
    for step in range(steps):
        batch_tokens, segments, batch_paths = next(loader)
        if old_loader is not None:
            old = next(old_loader)
            batch_tokens, segments, batch_paths = (torch.cat([a, b]) for a, b in
                                                   zip((batch_tokens, segments, batch_paths), old))
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
    seq_tokens = steps * (loader.batch_size + n_old) * train_cfg.data.seq_len
    record = {"kind": "learn", "memory_type": memory.type, "levels": chosen, "nodes": [n.to_dict(k) for n in nodes],
              "documents": [{"name": name, "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": int(len(ids)),
                             "path": [int(i) for i in p]} for (name, text), ids, p in zip(docs, tokens, paths)],
              "steps": steps, "lr": lr, "batch_size": loader.batch_size, "weight_decay": weight_decay,
              "sequences": len(packed), "bank_semantics": "lazy", "loss_first": losses[0], "loss_last": losses[-1],
              "replay": replay, "replay_sequences_per_batch": n_old}
    return _write_edited_run(source, out, changed, record, tokens=seq_tokens)


def _replay_loader(data: DataBundle, nodes: Sequence[Node], seq_len: int, batch_size: int, seed: int):
    """Batches of the run's own training documents whose paths reach learned blocks at every learned level
    (so a replayed document trains no other block), packed by leaf."""
    corpus = data.corpus
    train = (corpus["split"] == "train").to_numpy() if "split" in corpus else np.ones(len(corpus), bool)
    reach = np.ones(len(corpus), bool)
    for level in sorted({n.level for n in nodes}):
        at_level = np.zeros(len(corpus), bool)
        for n in (n for n in nodes if n.level == level):
            at_level |= np.all(data.doc_paths[:, :level] == np.asarray(n.path), axis=1)
        reach &= at_level
    rows = np.flatnonzero(reach & train)
    if not len(rows):
        raise ValueError("replay: no training document of the run reaches the learned blocks")
    tokens = [data.doc_tokens[i] for i in rows]
    packed = pack_by_leaf(tokens, data.doc_paths[rows], seq_len, data.eot_id, data.pad_id, seed + 1)
    return SequenceLoader(packed, batch_size=min(batch_size, len(packed)), seed=seed + 1)


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


# ------------------------------------------------------------------------------------------ after `hiermem eval`
def forgetting_from_evaluations(run_dir: str | Path, metrics: Sequence[str] = ("correct", "rank_correct"),
                                ) -> tuple[pd.DataFrame | None, list[str]]:
    """Per deleted subject (and "all"), from evaluation tables already written: accuracy (%) before
    deletion (the source run's evaluation, mode fetched), after (this run's, fetched), the anchor's (the
    source's parent, mode none) and leakage = after - anchor, on the probes every table holds.

    Returns (table, notes): table is None for a run that is not a forget of subjects; notes name
    what is missing (an unevaluated source or anchor), one line each. Nothing is scored here: it
    only joins tables on `probe_id` (what `hiermem eval` prints for a forgotten run)."""
    record = edit_record(run_dir)
    if record.get("kind") != "forget" or not record.get("subjects"):
        return None, []
    subjects = sorted({v["subject"] for v in record["subjects"].values()})
    source = RunDir.open(record["source"]["run_dir"])
    anchor = source.parent
    notes, columns = [], {}
    for name, run, mode in (("after", RunDir.open(run_dir), "fetched"), ("before", source, "fetched"),
                            ("anchor", anchor, "none")):
        if run is None or not run.is_evaluated:
            what = "records no parent anchor" if run is None else "is not evaluated"
            hint = "" if run is None else f" (`hiermem eval {run.path}`)"
            notes.append(f"{name}: the {'anchor' if name == 'anchor' else 'source'} run {what}{hint}; column left out")
            continue
        table = run.eval_table("probes")
        table = table[(table["mode"] == mode) & table["subject"].isin(subjects)]
        columns[name] = table.set_index("probe_id")[["subject", *metrics]]
    if "after" not in columns or len(columns) < 2:
        return None, notes
    ids = sorted(set.intersection(*(set(c.index) for c in columns.values())))
    if not ids:
        return None, notes + ["the evaluations share no probe of the deleted subjects (different probe selections)"]
    out = []
    for metric in metrics:
        frame = pd.DataFrame({name: c.loc[ids, metric].astype(float) * 100 for name, c in columns.items()})
        frame["subject"] = columns["after"].loc[ids, "subject"]
        for subject, part in [*frame.groupby("subject", sort=True), ("all", frame)]:
            row = {"subject": subject, "metric": metric, "probes": len(part),
                   **{name: float(part[name].mean()) for name in ("before", "after", "anchor") if name in part}}
            if "anchor" in row:
                row["leakage"] = row["after"] - row["anchor"]
            if "before" in row:
                row["removed"] = row["before"] - row["after"]
            out.append(row)
    return pd.DataFrame(out), notes
