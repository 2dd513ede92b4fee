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

from hiermem.model import HierMemLM, KVCache
from hiermem.stepper import next_token_loss

_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass
class MemoryChoice:
    """Per-row memory for a batch of rows: paths (n, depth) or None, and optional masks."""

    paths: np.ndarray | None = None
    use_generic: np.ndarray | None = None  # (n,) bool
    blocked: np.ndarray | None = None      # (n, depth) bool: drop these levels' blocks for the row

    def rows(self, index: np.ndarray, device: torch.device) -> dict:
        out = {}
        if self.paths is not None:
            out["paths"] = torch.as_tensor(self.paths[index], dtype=torch.long, device=device)
        if self.use_generic is not None:
            out["use_generic"] = torch.as_tensor(self.use_generic[index], dtype=torch.bool, device=device)
        if self.blocked is not None:
            out["blocked"] = torch.as_tensor(self.blocked[index], dtype=torch.bool, device=device)
        return out


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
    is fetched once and reused at every generation step.
    """
    device = next(model.parameters()).device
    max_len = model.model_cfg.max_seq_len
    budgets = np.broadcast_to(np.asarray(max_new_tokens, dtype=np.int64), (len(prompts),))
    order = np.argsort(budgets, kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(prompts), batch_size):
        index = order[start:start + batch_size]
        steps = int(budgets[index].max())
        batch = [list(prompts[i][-(max_len - steps):]) for i in index]
        rows = memory.rows(index, device)
        fetched = model.fetch(rows.get("paths"), rows.get("use_generic"), rows.get("blocked"))
        generated = [[] for _ in index]
        cache = KVCache(model.model_cfg.n_layers)
        tokens, segments = _left_pad(batch, pad_id)
        tokens, segments = tokens.to(device), segments.to(device)
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
    `hiermem.memory`). Returns one array of scores per prompt, in the order of its candidates.
    """
    device = next(model.parameters()).device
    max_len = model.model_cfg.max_seq_len
    out: list[np.ndarray] = [np.zeros(0) for _ in prompts]
    order = np.argsort([len(c) for c in candidates], kind="stable")  # similar candidate counts together
    for start in range(0, len(prompts), batch_size):
        index = order[start:start + batch_size]
        width = max(len(candidates[i]) for i in index)  # candidates per prompt, padded with repeats
        padded = [list(candidates[i]) + [candidates[i][0]] * (width - len(candidates[i])) for i in index]
        longest = max(len(c) for cands in padded for c in cands)
        batch = [list(prompts[i][-(max_len - longest):]) for i in index]
        tokens, segments = _left_pad(batch, pad_id)
        rows = memory.rows(index, device)
        cache = KVCache(model.model_cfg.n_layers)
        fetched = model.fetch(rows.get("paths"), rows.get("use_generic"), rows.get("blocked"))
        first = torch.log_softmax(model.anchor(tokens.to(device), segments.to(device), fetched, last_n=1,
                                               cache=cache)[:, -1].float(), dim=-1)
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
        logits = model(tokens, segments, **memory.rows(index, device))
        losses = next_token_loss(logits, tokens, segments, reduction="none")
        nll[index] = losses.sum(dim=1).double().cpu().numpy()
        counts[index] = np.array([max(0, len(r) - 1) for r in rows])
    return nll, counts


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
