"""Scoring primitives for evaluation: batched greedy generation, answer log-likelihood, perplexity.

Every function takes a `MemoryChoice` that says which memory each row uses, so the same code scores
every evaluation mode (no memory, generic, fetched, blocked, wrong or oracle path, one level dropped).
Prompts of different lengths are left-padded with segment id -1: padding is a separate "document"
under the document-restricted attention mask and RoPE is relative, so a padded row scores exactly as
the prompt alone.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch

from hiermem.kernels import linear_cross_entropy_rows
from hiermem.masks import loss_mask
from hiermem.model import HierMemLM, KVCache
from hiermem.stepper import next_token_loss

_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass
class MemoryChoice:
    """Per-row memory for a batch of rows: paths (n, depth) or None, and optional masks."""

    paths: np.ndarray | None = None
    use_generic: np.ndarray | None = None  # (n,) bool
    blocked: np.ndarray | None = None      # (n, depth) bool: drop these levels' blocks for the row

    def take(self, index: np.ndarray) -> "MemoryChoice":
        """The choice of rows `index` (in that order, repeats allowed)."""
        return MemoryChoice(*(None if a is None else a[index] for a in (self.paths, self.use_generic, self.blocked)))

    def rows(self, index: np.ndarray, device: torch.device) -> dict:
        out = {}
        if self.paths is not None:
            out["paths"] = torch.as_tensor(self.paths[index], dtype=torch.long, device=device)
        if self.use_generic is not None:
            out["use_generic"] = torch.as_tensor(self.use_generic[index], dtype=torch.bool, device=device)
        if self.blocked is not None:
            out["blocked"] = torch.as_tensor(self.blocked[index], dtype=torch.bool, device=device)
        return out


@dataclasses.dataclass
class MergedChoice:
    """The distinct (row, memory) pairs of several choices over the same rows, as one `MemoryChoice`.

    choice: memory of the U distinct pairs; row: (U,) the original row of each pair; where[name]: (n,)
    the pair each row of choice `name` is scored by. See `merge_choices`.
    """

    choice: MemoryChoice
    row: np.ndarray
    where: dict[str, np.ndarray]


def merge_choices(choices: dict[str, MemoryChoice], n: int, depth: int) -> MergedChoice:
    """Score each distinct (row, memory) pair once across several modes (the fast evaluation path).

    Two modes that give a row the same memory -- the same path, generic flag and dropped levels, or no
    memory at all (which is also what a row with every level dropped and no generic block reads) --
    give it the same scores, so the pair is scored once. Rows with no memory join the others as rows
    whose every level is dropped: their fetched rows are zeros, whose contribution is exactly zero.
    """
    keys: dict[tuple, int] = {}
    row, paths, generic, blocked = [], [], [], []
    where: dict[str, np.ndarray] = {}
    for name, choice in choices.items():
        index = np.empty(n, dtype=np.int64)
        for i in range(n):
            if choice.paths is None:
                key = (i, None)
            else:
                g = bool(choice.use_generic[i]) if choice.use_generic is not None else False
                b = tuple(bool(x) for x in choice.blocked[i, :depth]) if choice.blocked is not None else (False,) * depth
                key = (i, None) if not g and all(b) else (i, tuple(int(x) for x in choice.paths[i, :depth]), g, b)
            if key not in keys:
                keys[key] = len(row)
                row.append(i)
                none = key[1] is None
                paths.append((0,) * depth if none else key[1])
                generic.append(False if none else key[2])
                blocked.append((True,) * depth if none else key[3])
            index[i] = keys[key]
        where[name] = index
    if all(key[1] is None for key in keys):
        merged = MemoryChoice()
    else:
        merged = MemoryChoice(paths=np.asarray(paths, dtype=np.int64).reshape(len(row), depth),
                              use_generic=np.asarray(generic, dtype=bool) if any(generic) else None,
                              blocked=np.asarray(blocked, dtype=bool).reshape(len(row), depth) if any(map(any, blocked))
                              else None)
    return MergedChoice(choice=merged, row=np.asarray(row, dtype=np.int64), where=where)


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    segments = torch.full((len(seqs), width), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        segments[i, width - len(s):] = 0
    return tokens, segments


@torch.no_grad()
def greedy_generate(model: HierMemLM, prompts: list[list[int]], memory: MemoryChoice,
                    max_new_tokens: int | list[int], pad_id: int, batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation of each prompt, decoding one token per step with a KV cache.

    max_new_tokens: one budget for all prompts, or one per prompt (e.g. the answer's length + 1);
    prompts are batched by budget so short answers do not pay for long ones. The memory of a batch
    is fetched once and reused at every generation step. A prompt longer than the context minus the
    largest budget of the call keeps its last tokens (the same cut whatever its batch).
    """
    device = next(model.parameters()).device
    max_len = model.model_cfg.max_seq_len
    cached = getattr(model, "kv_cache", True)  # False: a model without hiermem's KV cache (hiermem.hf)
    budgets = np.broadcast_to(np.asarray(max_new_tokens, dtype=np.int64), (len(prompts),))
    order = np.argsort(budgets, kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    keep = max_len - int(budgets.max()) if len(prompts) else max_len
    for start in range(0, len(prompts), batch_size):
        index = order[start:start + batch_size]
        steps = int(budgets[index].max())
        batch = [list(prompts[i][-keep:]) for i in index]
        rows = memory.rows(index, device)
        generated = [[] for _ in index]
        tokens, segments = _left_pad(batch, pad_id)
        tokens, segments = tokens.to(device), segments.to(device)
        if not cached:  # the whole sequence again at every step
            for _ in range(steps):
                next_ids = model(tokens, segments, last_n=1, **rows)[:, -1].argmax(dim=-1)
                for g, t in zip(generated, next_ids.tolist()):
                    g.append(t)
                tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
                segments = torch.cat([segments, torch.zeros_like(segments[:, :1])], dim=1)
            for i, g in zip(index, generated):
                out[i] = g[: int(budgets[i])]
            continue
        fetched = model.fetch(rows.get("paths"), rows.get("use_generic"), rows.get("blocked"))
        cache = KVCache(model.model_cfg.n_layers)
        for _ in range(steps):
            logits = model.anchor(tokens, segments, fetched, last_n=1, cache=cache)
            next_ids = logits[:, -1].argmax(dim=-1)
            for g, t in zip(generated, next_ids.tolist()):
                g.append(t)
            tokens, segments = next_ids[:, None], None
        for i, g in zip(index, generated):
            out[i] = g[: int(budgets[i])]
    return out


@torch.no_grad()
def continuation_logprobs(model: HierMemLM, contexts: list[list[int]], continuations: list[list[int]],
                          memory: MemoryChoice, pad_id: int, batch_size: int = 128) -> np.ndarray:
    """Sum of log p(continuation | context) per row (the answer's log-likelihood)."""
    device = next(model.parameters()).device
    max_len = model.model_cfg.max_seq_len
    scores = np.zeros(len(contexts), dtype=np.float64)
    for start in range(0, len(contexts), batch_size):
        index = np.arange(start, min(start + batch_size, len(contexts)))
        rows = [(list(contexts[i]) + list(continuations[i]))[-max_len:] for i in index]
        tokens, segments = _left_pad(rows, pad_id)
        longest = max(len(continuations[i]) for i in index)
        # rows are right-aligned, so every continuation sits in the last `longest` positions
        logits = model(tokens.to(device), segments.to(device), last_n=longest + 1, **memory.rows(index, device))
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = tokens[:, -longest:].to(device)
        token_logp = logp.gather(-1, targets[..., None])[..., 0]
        for row, i in enumerate(index):
            n = len(continuations[i])
            scores[i] = float(token_logp[row, -n:].sum())
    return scores


@torch.no_grad()
def candidate_logprobs(model: HierMemLM, prompts: list[list[int]], candidates: list[list[list[int]]],
                       memory: MemoryChoice, pad_id: int, batch_size: int = 16) -> list[np.ndarray]:
    """log p(candidate | prompt) for every candidate continuation of every prompt.

    Each prompt is run once (KV cache) and its memory fetched once; the cache is then repeated for its
    candidates, which are scored together in one call (right-padded: causal attention keeps the padding
    out of the scores), all sharing the prompt's memory without copies (rows grouped per prompt, see
    `hiermem.memory`). Returns one array of scores per prompt, in the order of its candidates. A
    prompt longer than the context minus the call's longest candidate keeps its last tokens (the same
    cut whatever its batch).
    """
    device = next(model.parameters()).device
    max_len = model.model_cfg.max_seq_len
    out: list[np.ndarray] = [np.zeros(0) for _ in prompts]
    keep = max_len - max((len(c) for cands in candidates for c in cands), default=0)
    if not getattr(model, "kv_cache", True):  # no KV cache (hiermem.hf): each (prompt, candidate) pair whole
        owner = np.repeat(np.arange(len(prompts)), [len(c) for c in candidates])
        flat = continuation_logprobs(model, [list(prompts[i][-keep:]) for i in owner],
                                     [c for cands in candidates for c in cands], memory.take(owner), pad_id,
                                     batch_size * 4)
        bounds = np.cumsum([0] + [len(c) for c in candidates])
        return [flat[bounds[i]:bounds[i + 1]] for i in range(len(prompts))]
    if model.fast:  # prompts whose candidates have the same lengths together: buckets without padding
        hist = [tuple(np.bincount([len(c) for c in cands], minlength=max_len + 1)) for cands in candidates]
        order = np.array(sorted(range(len(prompts)), key=hist.__getitem__), dtype=np.int64)
    else:
        order = np.argsort([len(c) for c in candidates], kind="stable")  # similar candidate counts together
    for start in range(0, len(prompts), batch_size):
        index = order[start:start + batch_size]
        width = max(len(candidates[i]) for i in index)  # candidates per prompt, padded with repeats
        padded = [list(candidates[i]) + [candidates[i][0]] * (width - len(candidates[i])) for i in index]
        longest = max(len(c) for cands in padded for c in cands)
        batch = [list(prompts[i][-keep:]) for i in index]
        tokens, segments = _left_pad(batch, pad_id)
        rows = memory.rows(index, device)
        cache = KVCache(model.model_cfg.n_layers)
        fetched = model.fetch(rows.get("paths"), rows.get("use_generic"), rows.get("blocked"))
        first = torch.log_softmax(model.anchor(tokens.to(device), segments.to(device), fetched, last_n=1,
                                               cache=cache)[:, -1].float(), dim=-1)
        if model.fast:
            scored = _scores_by_length(model, first, cache, fetched, [candidates[i] for i in index], pad_id)
            for j, i in enumerate(index):
                out[i] = scored[j]
            continue
        flat = [c for cands in padded for c in cands]
        lengths = torch.tensor([len(c) for c in flat], device=device)
        cand = torch.full((len(flat), longest), pad_id, dtype=torch.long)
        for j, c in enumerate(flat):
            cand[j, :len(c)] = torch.as_tensor(c, dtype=torch.long)
        cand = cand.to(device)
        rep = torch.arange(len(index), device=device).repeat_interleave(width)
        scores = first[rep, cand[:, 0]]
        if longest > 1:
            cache.segments = cache.segments[rep]
            for layer in cache.layers:
                layer["k"], layer["v"] = layer["k"][rep], layer["v"][rep]
            logits = model.anchor(cand[:, :-1], None, fetched, last_n=longest - 1, cache=cache).float()
            logp = logits.gather(-1, cand[:, 1:, None])[..., 0] - torch.logsumexp(logits, dim=-1)
            valid = torch.arange(1, longest, device=device)[None, :] < lengths[:, None]
            scores = scores + (logp * valid).sum(dim=1)
        scores = scores.double().cpu().numpy().reshape(len(index), width)
        for j, i in enumerate(index):
            out[i] = scores[j, :len(candidates[i])]
    return out


@torch.no_grad()
def document_nll(model: HierMemLM, docs: list[np.ndarray], memory: MemoryChoice, pad_id: int,
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token NLL and number of predicted tokens per document (truncated to max_seq_len)."""
    device = next(model.parameters()).device
    max_len = model.model_cfg.max_seq_len
    nll = np.zeros(len(docs))
    counts = np.zeros(len(docs), dtype=np.int64)
    for start in range(0, len(docs), batch_size):
        index = np.arange(start, min(start + batch_size, len(docs)))
        rows = [list(docs[i][:max_len]) for i in index]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        for j, r in enumerate(rows):
            tokens[j, :len(r)] = torch.tensor(r)
            segments[j, :len(r)] = 0
        tokens, segments = tokens.to(device), segments.to(device)
        if model.fast:  # the head and the cross-entropy in chunks, on the counted positions only
            hidden = model.features(tokens, segments, **memory.rows(index, device))
            mask = loss_mask(segments)
            losses = torch.zeros(mask.shape, dtype=torch.float32, device=device)
            losses[mask] = linear_cross_entropy_rows(hidden[:, :-1][mask], model.anchor.head_weight,
                                                     tokens[:, 1:][mask])
        else:
            logits = model(tokens, segments, **memory.rows(index, device))
            losses = next_token_loss(logits, tokens, segments, reduction="none")
        nll[index] = losses.sum(dim=1).double().cpu().numpy()
        counts[index] = np.array([max(0, len(r) - 1) for r in rows])
    return nll, counts


def _scores_by_length(model: HierMemLM, first: torch.Tensor, cache: KVCache, fetched, candidates: list[list[list[int]]],
                      pad_id: int) -> list[np.ndarray]:
    """The fast path of `candidate_logprobs` for one batch of prompts, after their prefill.

    Candidates are scored in buckets of equal length, so no position is computed for padding (the
    plain path pads every candidate to the batch's longest); each prompt's candidates of a bucket are
    padded with repeats to the bucket's widest prompt, which keeps rows grouped per prompt (one fetched
    memory each). The head and its normaliser run in chunks on the scored tokens only.
    """
    device = first.device
    firsts = [torch.as_tensor([c[0] for c in cands], dtype=torch.long, device=device) for cands in candidates]
    scores = [first[b, firsts[b]].double() for b in range(len(candidates))]
    members: dict[int, list[list[int]]] = {}
    for b, cands in enumerate(candidates):
        for j, c in enumerate(cands):
            if len(c) > 1:
                members.setdefault(len(c), [[] for _ in candidates])[b].append(j)
    for length, chosen in sorted(members.items()):
        width = max(len(m) for m in chosen)
        seqs = []
        for b, m in enumerate(chosen):
            own = [candidates[b][j] for j in m] or [[pad_id] * length]
            seqs += own + [own[0]] * (width - len(own))
        tokens = torch.as_tensor(seqs, dtype=torch.long, device=device)  # (B * width, length)
        rep = torch.arange(len(candidates), device=device).repeat_interleave(width)
        sub = KVCache(len(cache.layers))
        sub.segments = cache.segments[rep]
        sub.layers = [{"k": layer["k"][rep], "v": layer["v"][rep]} for layer in cache.layers]
        hidden = model.anchor.features(tokens[:, :-1], None, fetched, last_n=length - 1, cache=sub)
        nll = linear_cross_entropy_rows(hidden.reshape(-1, hidden.shape[-1]), model.anchor.head_weight,
                                        tokens[:, 1:].reshape(-1)).view(len(seqs), length - 1).sum(dim=1).double()
        for b, m in enumerate(chosen):
            if m:
                scores[b][torch.as_tensor(m, device=device)] -= nll[b * width:b * width + len(m)]
    return [s.cpu().numpy() for s in scores]


def normalize_text(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_matches(generated: str, answer: str) -> bool:
    """Exact match: integers compare the first integer generated; strings compare normalized prefixes.

    "The atomic number of Technetium is" -> " 43." matches "43"; " 430" does not.
    """
    answer = answer.strip()
    if _INTEGER.fullmatch(answer):
        found = _INTEGER.search(generated)
        return found is not None and int(found.group()) == int(answer)
    gen, ans = normalize_text(generated), normalize_text(answer)
    if not ans:
        return False
    return gen == ans or gen.startswith(ans + " ")
