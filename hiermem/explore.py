"""Look inside a run's memory: where a prompt routes, what each node holds, what memory changes.

`Explorer(run_dir)` loads a finished run (its final checkpoint, its data bundle with the k-means tree,
and the EvalConfig of its evaluation) and answers questions about one prompt at a time, with no
widgets, so every number the notebook shows is a library call with a test:

    ex = Explorer("runs/demo/memory-frozen")
    ex.route("The atomic number of Technetium is")          # (3, 1): the routed root-to-leaf path
    ex.node_label((3,))                                      # "3 · 412 docs (38k tok) · facts 52%, ... · e.g. ..."
    ex.answer(prompt, "fetched")                             # greedy answer, as `hiermem eval` generates it
    ex.answer_logprob(prompt, "43", "none")                  # log p(" 43" | prompt) without memory
    ex.top_next_tokens(prompt, "fetched", k=10)              # the 10 likeliest next tokens
    ex.block((3,)); ex.unblock((3,))                         # block a node's subtree: every number follows
    ex.children(()), ex.documents((3, 1)), ex.facts((3, 1))  # the bank browser
    ex.inspect(probe_id="atomic_number:technetium")          # all of the above for one prompt

Modes are those of `hiermem.modes` (none, generic, fetched, blocked-drop, blocked-reroute, wrong-path,
oracle-path, drop-level<l>), built by `hiermem.evaluate.eval_modes` with the run's evaluation settings,
so for a probe of the evaluated set and no blocks of your own, the greedy answer and the answer's
log-probability equal the rows of RUN_DIR/eval/probe_results.parquet (the wrong path of a probe is drawn
at its position in the evaluated set, as `hiermem eval` draws it). Your blocks act on top of a mode:
`block_policy="drop"` (default) drops the blocked blocks from whatever path the mode fetches;
`"reroute"` routes the prompt again with the blocked subtrees closed (as a deployed system would).

`hiermem.explore_ui.explorer_widget(run_dir)` builds the ipywidgets interface of notebooks/explorer.ipynb on top; each of
its callbacks is a method of `ExplorerUI` (tests drive them headless). A run directory that cannot be
explored (not a run, not finished, unreadable config) shows one line saying why; a run without an
evaluation or without memory is explored with a message saying what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from hiermem.checkpoint import load_model
from hiermem.data.pipeline import DataBundle, build_data
from hiermem.diagnostics import majority_path
from hiermem.evaluate import (EvalConfig, answer_candidates, available_modes, eval_modes, probe_rows,
                              select_probes)
from hiermem.modes import Blocking, Rows
from hiermem.probing import MemoryChoice, answer_matches, candidate_logprobs, greedy_generate
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig, device_for

log = logging.getLogger(__name__)
Prefix = tuple[int, ...]
BLOCK_POLICIES = ("drop", "reroute")


def find_runs(root: str | Path = "runs", max_depth: int = 3) -> list[str]:
    """Run directories (holding a config.yaml) under `root`, sorted; [] when root does not exist."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []

    def walk(folder: Path, depth: int) -> None:
        if RunDir(folder).is_started:
            found.append(str(folder))
            return
        if depth < max_depth:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                walk(child, depth + 1)

    walk(root, 0)
    return sorted(found)


def parse_prefix(text: str | Sequence[int]) -> Prefix:
    """A node prefix from "3,1" / "3.1" / (3, 1); "" or () is the root."""
    if isinstance(text, str):
        parts = [p for p in text.replace(".", ",").replace(" ", ",").split(",") if p != ""]
        return tuple(int(p) for p in parts)
    return tuple(int(i) for i in text)


def format_prefix(prefix: Sequence[int]) -> str:
    return ".".join(str(int(i)) for i in prefix) if len(prefix) else "root"


@dataclasses.dataclass
class Inspection:
    """Everything the explorer shows about one prompt."""

    prompt: str
    answer: str | None            # the expected answer (a probe's, or one typed), None when unknown
    probe: dict | None            # the probe's row, when the prompt is a probe
    path: Prefix                  # the path the prompt is routed to
    route: pd.DataFrame           # level, node, label, blocked: one row per node of that path
    oracle: Prefix | None         # where the fact's documents went (probes only)
    modes: pd.DataFrame           # one row per mode: path, generated, correct, answer_logprob (+ eval's)
    top_none: pd.DataFrame        # top next tokens without memory
    top_memory: pd.DataFrame      # top next tokens in the chosen mode
    memory_mode: str


class Explorer:
    """A loaded run with methods to route, answer, score and browse (see the module docstring)."""

    def __init__(self, run_dir: str | Path, data: DataBundle | None = None, device: str = "cpu",
                 block_policy: str = "drop"):
        run = RunDir.open(run_dir)
        final = run.final
        self.run = run
        self.train_cfg = TrainConfig.load(run.config_path)
        self.model = load_model(final).to(device_for(device)).eval()
        self.data = build_data(self.train_cfg.data, progress=False) if data is None else data
        self.evaluated = run.is_evaluated
        self.eval_cfg = EvalConfig.load(run.eval_config_path) if self.evaluated else EvalConfig()
        self.messages: list[str] = []
        if not self.evaluated:
            self.messages.append(f"run {run.name!r} has no evaluation yet: the numbers below are computed with the "
                                 f"default evaluation settings and there is no eval table to compare with "
                                 f"(`hiermem eval {run.path}` writes it)")
        if self.model.bank is None:
            self.messages.append(f"run {run.name!r} is a dense model without a memory bank: only mode 'none' "
                                 "scores; routing and the bank browser show the data's tree")
        self._blocked: list[Prefix] = []
        self.block_policy = block_policy
        if block_policy not in BLOCK_POLICIES:
            raise ValueError(f"block_policy must be one of {BLOCK_POLICIES}, got {block_policy!r}")

    # ------------------------------------------------------------------------------ run facts
    @property
    def name(self) -> str:
        return self.run.name

    @property
    def has_memory(self) -> bool:
        return self.model.bank is not None

    @property
    def depth(self) -> int:
        return self.data.depth

    @property
    def branching(self) -> int:
        return self.data.branching

    @cached_property
    def modes(self) -> list[str]:
        """The modes of the run: those its evaluation used (none, generic, fetched, blocked-*, wrong-path,
        oracle-path, drop-level<l>); 'none' alone for a dense model."""
        return available_modes(self.model, self.eval_cfg)

    @cached_property
    def evaluated_probes(self) -> pd.DataFrame:
        """The probes `hiermem eval` scored (its split and per-relation sample), in its order."""
        return select_probes(self.data.probes, self.eval_cfg.max_probes_per_relation, self.eval_cfg.seed,
                             self.eval_cfg.split)

    @cached_property
    def _mode_objects(self) -> dict:
        return eval_modes(self.model, self.data, self.eval_cfg, self.modes, self.evaluated_probes)

    @cached_property
    def eval_table(self) -> pd.DataFrame | None:
        """RUN_DIR/eval/probe_results.parquet, or None without an evaluation."""
        return self.run.eval_table("probes") if self.evaluated else None

    # ------------------------------------------------------------------------------ probes
    def probes(self, relation: str | None = None, bucket: str | None = None, group: str | None = None,
               split: str | None = None, evaluated_only: bool = False) -> pd.DataFrame:
        """The data's probes, filtered (None or "all" keeps every value)."""
        frame = self.evaluated_probes if evaluated_only else self.data.probes
        for column, value in (("relation", relation), ("bucket", bucket), ("group", group), ("split", split)):
            if value not in (None, "", "all") and column in frame.columns:
                frame = frame[frame[column] == value]
        return frame.reset_index(drop=True)

    def probe(self, probe_id: str) -> dict:
        hit = self.data.probes[self.data.probes["probe_id"] == probe_id]
        if hit.empty:
            raise KeyError(f"no probe {probe_id!r} in the run's data")
        return hit.iloc[0].to_dict()

    @cached_property
    def _probe_by_prompt(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for frame in (self.evaluated_probes, self.data.probes):  # the evaluated probe first
            for row in frame.to_dict("records"):
                out.setdefault(row["prompt"], row)
        return out

    def probe_for(self, prompt: str) -> dict | None:
        """The probe whose prompt this is (the evaluated one first), else None."""
        return self._probe_by_prompt.get(prompt)

    @cached_property
    def _eval_position(self) -> dict[str, int]:
        return {pid: i for i, pid in enumerate(self.evaluated_probes["probe_id"])}

    # ------------------------------------------------------------------------------ blocking
    @property
    def blocked(self) -> list[Prefix]:
        return list(self._blocked)

    def block(self, prefix: Sequence[int]) -> None:
        """Block a node and its subtree (its blocks contribute nothing; see block_policy)."""
        prefix = self._check_prefix(prefix, allow_root=False)
        if prefix not in self._blocked:
            self._blocked.append(prefix)

    def unblock(self, prefix: Sequence[int]) -> None:
        prefix = parse_prefix(prefix)
        self._blocked = [p for p in self._blocked if p != prefix]

    def clear_blocks(self) -> None:
        self._blocked = []

    def is_blocked(self, prefix: Sequence[int]) -> bool:
        """Whether the node is inside a blocked subtree."""
        prefix = parse_prefix(prefix)
        return any(prefix[:len(b)] == b for b in self._blocked)

    def _check_prefix(self, prefix: Sequence[int], allow_root: bool = True) -> Prefix:
        prefix = parse_prefix(prefix)
        if len(prefix) > self.depth or (not prefix and not allow_root):
            raise ValueError(f"a node prefix has 1..{self.depth} entries, got {prefix}")
        if any(not 0 <= i < self.branching for i in prefix):
            raise ValueError(f"node {prefix}: entries must be in [0, {self.branching})")
        return prefix

    # ------------------------------------------------------------------------------ routing
    def _rows(self, prompt: str) -> tuple[Rows, dict | None]:
        probe = self.probe_for(prompt)
        frame = pd.DataFrame([probe]) if probe is not None else \
            pd.DataFrame({"prompt": [prompt], "fact_id": [""], "source_doc_id": [""]})
        rows = probe_rows(self.data, frame)
        if self._blocked and self.block_policy == "reroute":
            rows = Rows(routed=self.data.tree.route(rows.vectors, blocked=self._blocked), oracle=rows.oracle,
                        vectors=rows.vectors)
        return rows, probe

    def route(self, prompt: str) -> Prefix:
        """The root-to-leaf path the prompt is routed to (around your blocks with block_policy 'reroute')."""
        rows, _ = self._rows(prompt)
        return tuple(int(i) for i in rows.routed[0])

    def oracle_path(self, prompt: str) -> Prefix | None:
        """Where most documents of the prompt's fact went (probes only; None for a typed prompt)."""
        rows, probe = self._rows(prompt)
        return None if probe is None else tuple(int(i) for i in rows.oracle[0])

    def memory(self, prompt: str, mode: str) -> MemoryChoice:
        """The memory the prompt uses in `mode` (one row), your blocks applied."""
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not available for run {self.name!r}; available: {', '.join(self.modes)}")
        rows, probe = self._rows(prompt)
        mode_obj = self._mode_objects[mode]
        position = self._eval_position.get(probe["probe_id"]) if probe is not None else None
        if mode == "wrong-path" and position is not None:
            # hiermem eval draws the wrong paths of all evaluated probes at once: take this probe's draw
            n = len(self.evaluated_probes)
            many = Rows(routed=np.repeat(rows.routed, n, axis=0))
            choice = mode_obj.choose(many)
            choice = MemoryChoice(paths=choice.paths[position:position + 1])
        else:
            choice = mode_obj.choose(rows)
        generic = choice.use_generic is not None and bool(np.all(choice.use_generic))
        if self._blocked and choice.paths is not None and not generic:  # the generic block is no node
            drop = Blocking(prefixes=tuple(self._blocked)).drop_mask(np.asarray(choice.paths))
            if choice.blocked is not None:
                drop = drop | choice.blocked
            choice = MemoryChoice(paths=choice.paths, use_generic=choice.use_generic, blocked=drop)
        return choice

    # ------------------------------------------------------------------------------ scoring
    def _ids(self, text: str) -> list[int]:
        return self.data.tokenizer.encode(text).ids

    def budget(self, prompt: str, answer: str | None = None) -> int:
        """Greedy tokens generated for the prompt: as `hiermem eval`, the longest answer of the probe's
        relation + 1 (capped by max_new_tokens); a typed prompt gets its answer's length + 1, or the cap."""
        cap = self.eval_cfg.max_new_tokens
        probe = self.probe_for(prompt)
        if probe is not None:
            pool = self.evaluated_probes
            pool = pool[pool["relation"] == probe["relation"]]
            if pool.empty:
                pool = self.data.probes[self.data.probes["relation"] == probe["relation"]]
            longest = max(len(self._ids(" " + str(a))) for a in pool["answer"].astype(str))
            return int(min(cap, longest + 1))
        if answer:
            return int(min(cap, len(self._ids(" " + answer)) + 1))
        return int(cap)

    @cached_property
    def _eval_context(self) -> dict[str, tuple[int, int]]:
        """Per evaluated probe, the prompt tokens `hiermem eval` kept (generating, scoring).

        A prompt longer than the model's context is cut to max_seq_len minus the longest generation budget
        (or candidate answer) of the evaluation's probes; the same cut here gives the same numbers."""
        probes, cfg, tok = self.evaluated_probes, self.eval_cfg, self.data.tokenizer
        if probes.empty:
            return {}
        max_len = self.model.model_cfg.max_seq_len
        candidates = answer_candidates(self.data, probes, cfg)
        vocab = sorted({a for c in candidates for a in c})
        length = dict(zip(vocab, (len(e.ids) for e in tok.encode_batch([" " + a for a in vocab]))))
        answers = probes["answer"].astype(str)
        longest = pd.Series([length[a] for a in answers]).groupby(probes["relation"].to_numpy()).transform("max")
        budgets = np.minimum(cfg.max_new_tokens, longest.to_numpy() + 1)
        generate = max_len - int(budgets.max())  # as greedy_generate and candidate_logprobs cut
        score = max_len - max(length[a] for c in candidates for a in c)
        return {pid: (generate, score) for pid in probes["probe_id"]}

    def _prompt_ids(self, prompt: str, scoring: bool) -> list[int]:
        ids = self._ids(prompt)
        probe = self.probe_for(prompt)
        keep = self._eval_context.get(probe["probe_id"]) if probe is not None else None
        if keep is not None and keep[int(scoring)] > 0:
            ids = ids[-keep[int(scoring)]:]
        return ids

    @torch.no_grad()
    def answer(self, prompt: str, mode: str = "fetched", max_new_tokens: int | None = None) -> str:
        """The greedy continuation (the text `hiermem eval` matches against the answer)."""
        budget = max_new_tokens or self.budget(prompt)
        generated = greedy_generate(self.model, [self._prompt_ids(prompt, False)], self.memory(prompt, mode), [budget],
                                    self.data.pad_id, batch_size=1)
        return self.data.tokenizer.decode(generated[0])

    @torch.no_grad()
    def answer_logprob(self, prompt: str, answer: str, mode: str = "fetched") -> float:
        """log p(" " + answer | prompt) in `mode` (the answer_logprob of `hiermem eval`)."""
        scores = candidate_logprobs(self.model, [self._prompt_ids(prompt, True)], [[self._ids(" " + str(answer))]],
                                    self.memory(prompt, mode), self.data.pad_id, batch_size=1)
        return float(scores[0][0])

    @torch.no_grad()
    def top_next_tokens(self, prompt: str, mode: str = "fetched", k: int = 10) -> pd.DataFrame:
        """The k likeliest next tokens after the prompt in `mode`: rank, token, prob, logprob."""
        ids = self._ids(prompt)[-self.model.model_cfg.max_seq_len:]
        device = next(self.model.parameters()).device
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        segments = torch.zeros_like(tokens)
        logits = self.model(tokens, segments, last_n=1, **self.memory(prompt, mode).rows(np.arange(1), device))
        logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
        top = torch.topk(logp, k=min(k, logp.numel()))
        toks = [self.data.tokenizer.decode([int(i)]) for i in top.indices.tolist()]
        return pd.DataFrame({"rank": np.arange(1, len(toks) + 1), "token": toks, "token_id": top.indices.tolist(),
                             "prob": np.exp(top.values.double().cpu().numpy()),
                             "logprob": top.values.double().cpu().numpy()})

    def eval_rows(self, probe_id: str) -> pd.DataFrame:
        """The evaluation's rows of a probe (one per mode), empty without an evaluation or outside it."""
        table = self.eval_table
        if table is None:
            return pd.DataFrame()
        return table[table["probe_id"] == probe_id].reset_index(drop=True)

    def mode_table(self, prompt: str, answer: str | None = None, modes: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per mode: the path used, blocked levels, the greedy answer, whether it is right, the
        answer's log-probability, and (for an evaluated probe without blocks) the eval table's numbers."""
        probe = self.probe_for(prompt)
        answer = answer if answer not in (None, "") else (str(probe["answer"]) if probe is not None else None)
        recorded = self.eval_rows(probe["probe_id"]) if probe is not None else pd.DataFrame()
        recorded = recorded.set_index("mode") if "mode" in recorded.columns else pd.DataFrame()
        rows = []
        for mode in modes or self.modes:
            memory = self.memory(prompt, mode)
            path = "" if memory.paths is None else format_prefix(memory.paths[0])
            if memory.use_generic is not None and bool(memory.use_generic[0]):
                path = "generic"
            dropped = "" if memory.blocked is None else \
                ",".join(f"L{j + 1}" for j, b in enumerate(memory.blocked[0]) if b)
            text = self.answer(prompt, mode)
            row: dict[str, Any] = {"mode": mode, "path": path, "dropped": dropped, "generated": text,
                                   "correct": answer_matches(text, answer) if answer is not None else None,
                                   "answer_logprob": self.answer_logprob(prompt, answer, mode) if answer else np.nan}
            if mode in recorded.index:
                row["eval_generated"] = recorded.loc[mode, "generated"]
                row["eval_correct"] = bool(recorded.loc[mode, "correct"])
                row["eval_answer_logprob"] = float(recorded.loc[mode, "answer_logprob"])
            rows.append(row)
        return pd.DataFrame(rows)

    def inspect(self, prompt: str | None = None, probe_id: str | None = None, answer: str | None = None,
                mode: str = "fetched", k: int = 10) -> Inspection:
        """Route, labels, oracle path, every mode's answer and log-probability, top-k next tokens with
        and without memory, for a typed prompt or a probe."""
        probe = self.probe(probe_id) if probe_id else None
        if probe is not None:
            prompt, answer = probe["prompt"], answer or str(probe["answer"])
        if not prompt:
            raise ValueError("type a prompt or pick a probe")
        probe = probe or self.probe_for(prompt)
        if probe is not None and not answer:
            answer = str(probe["answer"])
        mode = mode if mode in self.modes else self.modes[-1] if "fetched" not in self.modes else "fetched"
        path = self.route(prompt)
        route = pd.DataFrame([{"level": level, "node": format_prefix(path[:level]), "label": self.node_label(path[:level]),
                               "blocked": self.is_blocked(path[:level])} for level in range(1, len(path) + 1)])
        return Inspection(prompt=prompt, answer=answer, probe=probe, path=path, route=route, oracle=self.oracle_path(prompt),
                          modes=self.mode_table(prompt, answer), top_none=self.top_next_tokens(prompt, "none", k),
                          top_memory=self.top_next_tokens(prompt, mode, k), memory_mode=mode)

    # ------------------------------------------------------------------------------ the bank
    @cached_property
    def _train_docs(self) -> np.ndarray:
        return np.flatnonzero((self.data.corpus["split"] == "train").to_numpy())

    def _docs_under(self, prefix: Prefix) -> np.ndarray:
        rows = self._train_docs
        if not prefix:
            return rows
        paths = self.data.doc_paths[rows, :len(prefix)]
        return rows[np.all(paths == np.asarray(prefix)[None, :], axis=1)]

    @cached_property
    def _doc_vectors(self) -> np.ndarray:
        vectors = np.load(self.data.dirs["emb"] / "embeddings.npy", mmap_mode="r")
        return vectors

    @cached_property
    def _doc_lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.data.doc_tokens], dtype=np.int64)

    def _typical_order(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows sorted by cosine similarity to their mean embedding (the node's centroid), and the sims."""
        if not len(rows):
            return rows, np.zeros(0)
        x = np.asarray(self._doc_vectors[np.sort(rows)], dtype=np.float64)
        rows = np.sort(rows)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        centre = x.mean(axis=0)
        centre /= max(np.linalg.norm(centre), 1e-12)
        sims = x @ centre
        order = np.argsort(-sims, kind="stable")
        return rows[order], sims[order]

    def node_info(self, prefix: Sequence[int]) -> dict:
        """A node's size (training documents and tokens), top sources and most typical titles."""
        prefix = self._check_prefix(prefix)
        rows = self._docs_under(prefix)
        corpus = self.data.corpus
        sources = corpus["source"].iloc[rows].value_counts()
        ordered, _ = self._typical_order(rows)
        titles: list[str] = []
        for title in corpus["title"].iloc[ordered[:200]].astype(str):
            if title and title not in titles:
                titles.append(title)
            if len(titles) == 3:
                break
        return {"prefix": prefix, "docs": int(len(rows)), "tokens": int(self._doc_lengths[rows].sum()),
                "sources": {str(s): int(c) for s, c in sources.head(3).items()}, "typical": titles,
                "blocked": self.is_blocked(prefix)}

    def node_label(self, prefix: Sequence[int]) -> str:
        """One readable line per node: "3.1 · 412 docs (38k tok) · facts 52%, bioS 30% · e.g. Helium, Neon"."""
        info = self.node_info(prefix)
        n = info["docs"]
        if n == 0:
            return f"{format_prefix(info['prefix'])} · empty"
        tokens = info["tokens"]
        size = f"{n:,} docs ({tokens / 1000:.0f}k tok)" if tokens >= 1000 else f"{n:,} docs ({tokens} tok)"
        sources = ", ".join(f"{s} {100 * c / n:.0f}%" for s, c in info["sources"].items())
        typical = ", ".join(info["typical"])
        blocked = " · BLOCKED" if info["blocked"] else ""
        return f"{format_prefix(info['prefix'])} · {size} · {sources} · e.g. {typical}{blocked}"

    def children(self, prefix: Sequence[int] = ()) -> pd.DataFrame:
        """The non-empty children of a node (the level-1 nodes for the root): prefix, node, docs, label."""
        prefix = self._check_prefix(prefix)
        if len(prefix) == self.depth:
            return pd.DataFrame(columns=["prefix", "node", "docs", "label"])
        rows = self._docs_under(prefix)
        counts = np.bincount(self.data.doc_paths[rows, len(prefix)], minlength=self.branching)
        out = [{"prefix": prefix + (c,), "node": format_prefix(prefix + (c,)), "docs": int(counts[c]),
                "label": self.node_label(prefix + (c,))} for c in range(self.branching) if counts[c] > 0]
        return pd.DataFrame(out, columns=["prefix", "node", "docs", "label"])

    def documents(self, prefix: Sequence[int], limit: int | None = 50, chars: int = 160) -> pd.DataFrame:
        """The training documents of a node's subtree, the most typical first: doc_id, source, title,
        leaf, typicality (cosine to the node's mean embedding) and the text's start."""
        prefix = self._check_prefix(prefix)
        ordered, sims = self._typical_order(self._docs_under(prefix))
        if limit is not None:
            ordered, sims = ordered[:limit], sims[:limit]
        corpus = self.data.corpus.iloc[ordered]
        text = corpus["text"].astype(str).str.slice(0, chars).str.replace("\n", " ", regex=False)
        return pd.DataFrame({"doc_id": corpus["doc_id"].to_numpy(), "source": corpus["source"].to_numpy(),
                             "title": corpus["title"].to_numpy(),
                             "leaf": [format_prefix(p) for p in self.data.doc_paths[ordered]],
                             "typicality": np.round(sims, 3), "text": text.to_numpy()})

    def facts(self, prefix: Sequence[int]) -> pd.DataFrame:
        """The facts with training documents in a node's subtree: relation, subject, answer, exposures,
        bucket, group, role, docs_here / docs_total, the fact's majority path and whether it lies here."""
        prefix = self._check_prefix(prefix)
        corpus = self.data.corpus
        rows = self._docs_under(prefix)
        ids = corpus["fact_id"].iloc[rows]
        here = ids[ids != ""].value_counts()
        columns = ["fact_id", "relation", "subject", "answer", "exposures", "bucket", "group", "role",
                   "docs_here", "docs_total", "majority_path", "majority_here"]
        if here.empty or self.data.facts.empty:
            return pd.DataFrame(columns=columns)
        fact_paths = self.data.fact_paths()
        facts = self.data.facts[self.data.facts["fact_id"].isin(here.index)].copy()
        facts["docs_here"] = facts["fact_id"].map(here).astype(int)
        facts["docs_total"] = facts["fact_id"].map(lambda f: len(fact_paths.get(f, ())))
        majority = {f: tuple(int(i) for i in majority_path(fact_paths[f])) for f in here.index if f in fact_paths}
        facts["majority_path"] = facts["fact_id"].map(lambda f: format_prefix(majority.get(f, ())))
        facts["majority_here"] = facts["fact_id"].map(lambda f: majority.get(f, ())[:len(prefix)] == prefix)
        facts = facts.sort_values(["docs_here", "fact_id", "relation"], ascending=[False, True, True], kind="stable")
        return facts[[c for c in columns if c in facts.columns]].reset_index(drop=True)
