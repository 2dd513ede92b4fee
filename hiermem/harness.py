"""lm-evaluation-harness adapter: a hiermem run scored by `lm_eval` as model type `hiermem`.

    python -m hiermem.harness --model hiermem --model_args run_dir=runs/demo/memory-frozen,mode=fetched \\
        --tasks hellaswag --device cpu

(`pip install -e ".[eval]"` installs lm-eval; `python -m hiermem.harness` registers the model type and
then runs lm-eval's own command line, so every `lm_eval` option works.) From Python, importing this
module registers `hiermem` for `lm_eval.simple_evaluate(model="hiermem", model_args=...)`.

`HiermemHarnessLM(run_dir, mode="fetched")` loads the run's final checkpoint and its data bundle (the
tokenizer, the embedder and the tree; the data cache is built if absent). Each request's context is
routed once (its text embedded and sent down the tree, as `hiermem eval` routes a probe's prompt) and
the path cached; the memory each request reads is what the mode gives it: `fetched` (the context's
path), `generic` or `none`. A run without memory is scored in `none` mode, which it says. Requests:

- `loglikelihood`: the continuations of one context are scored together by
  `hiermem.probing.candidate_logprobs` -- the function behind `hiermem eval`'s answer ranking -- so a
  multiple-choice task over the workbench's probes gives `hiermem eval`'s `rank_correct`; `is_greedy`
  is whether greedy decoding reproduces the continuation token by token;
- `loglikelihood_rolling`: the whole text in rolling windows of the model's context (lm-eval's
  `get_rolling_token_windows`), every token predicted once, with the text's routed memory;
- `generate_until`: `hiermem.probing.greedy_generate` (KV cache, memory fetched once per batch), cut at
  the first stop string.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hiermem.checkpoint import load_model
from hiermem.data.pipeline import build_data
from hiermem.probing import MemoryChoice, candidate_logprobs, greedy_generate
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig, device_for

log = logging.getLogger(__name__)
MODES = ("fetched", "generic", "none")


@register_model("hiermem")
class HiermemHarnessLM(LM):
    """A finished hiermem run as an lm-eval model (see the module docstring)."""

    def __init__(self, run_dir: str, mode: str = "fetched", batch_size: int | str = 16, max_gen_toks: int = 64,
                 device: str = "auto", data_root: str | None = None, **unused):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"invalid model_args field 'mode': expected one of {', '.join(MODES)}, got {mode!r}")
        run = RunDir.open(run_dir)
        cfg = TrainConfig.load(run.config_path)
        data_cfg = cfg.data.replace(root=data_root) if data_root else cfg.data
        self.data = build_data(data_cfg, progress=False)
        self.model = load_model(run.final).to(device_for(device)).eval()
        if self.model.bank is None and mode != "none":
            log.warning("run %s has no memory: scored in mode 'none'", run.name)
            mode = "none"
        if mode == "generic" and not self.model.bank.cfg.generic:
            raise ValueError(f"invalid model_args field 'mode': run {run.name} has no generic block")
        self.mode, self.run_name = mode, run.name
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        self.tok = self.data.tokenizer
        self._paths: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------------------ memory
    def _memory(self, texts: list[str]) -> MemoryChoice:
        """Each text's memory under the mode; contexts are routed once and their paths cached."""
        if self.mode == "none":
            return MemoryChoice()
        new = [t for t in dict.fromkeys(texts) if t not in self._paths]
        if new:
            for text, path in zip(new, self.data.route_texts(new)):
                self._paths[text] = tuple(int(i) for i in path)
        depth = self.model.bank.cfg.depth
        paths = np.array([self._paths[t][:depth] for t in texts], dtype=np.int64).reshape(len(texts), depth)
        generic = np.ones(len(texts), dtype=bool) if self.mode == "generic" else None
        return MemoryChoice(paths=paths, use_generic=generic)

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    # ------------------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [req.args for req in requests]
        contexts = list(dict.fromkeys(context for context, _ in pairs))
        where = {context: i for i, context in enumerate(contexts)}
        conts: list[list[list[int]]] = [[] for _ in contexts]
        slot = []
        for context, continuation in pairs:
            i = where[context]
            slot.append((i, len(conts[i])))
            conts[i].append(self._ids(continuation) or [self.data.eot_id])
        prompts = [self._ids(c) for c in contexts]
        memory = self._memory(contexts)
        with torch.no_grad():
            scores = candidate_logprobs(self.model, prompts, conts, memory, self.data.pad_id, self.batch_size)
            greedy = self._greedy(prompts, conts, memory, slot)
        return [(float(scores[i][j]), bool(g)) for (i, j), g in zip(slot, greedy)]

    def _greedy(self, prompts, conts, memory: MemoryChoice, slot) -> list[bool]:
        """Whether greedy decoding reproduces each continuation (argmax at every continuation token)."""
        device = next(self.model.parameters()).device
        max_len = self.model.model_cfg.max_seq_len
        out = []
        for i, j in slot:
            cont = conts[i][j]
            row = (prompts[i] + cont)[-max_len:]
            tokens = torch.as_tensor(row, dtype=torch.long, device=device)[None]
            rows = memory.rows(np.array([i]), device)
            logits = self.model(tokens, **rows)[0, -len(cont) - 1:-1]
            out.append(bool((logits.argmax(-1) == tokens[0, -len(cont):]).all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        max_len = self.model.model_cfg.max_seq_len
        device = next(self.model.parameters()).device
        texts = [req.args[0] for req in requests]
        memory = self._memory(texts)
        out = []
        with torch.no_grad():
            for i, text in enumerate(texts):
                rows = memory.rows(np.array([i]), device)
                total = 0.0
                windows = get_rolling_token_windows(self._ids(text), self.data.eot_id, max_len, context_len=1)
                for context, predicted in map(make_disjoint_window, windows):
                    tokens = torch.as_tensor(context + predicted, dtype=torch.long, device=device)[None]
                    seq = tokens[:, :-1] if len(predicted) else tokens
                    logits = self.model(seq, torch.zeros_like(seq), **rows)[0, -len(predicted):]
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    target = torch.as_tensor(predicted, dtype=torch.long, device=device)
                    total += float(logp.gather(-1, target[:, None]).sum())
                out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        contexts = [req.args[0] for req in requests]
        kwargs = [req.args[1] if len(req.args) > 1 else {} for req in requests]
        budgets = [min(int(k.get("max_gen_toks", self.max_gen_toks)), self.model.model_cfg.max_seq_len - 1)
                   for k in kwargs]
        with torch.no_grad():
            generated = greedy_generate(self.model, [self._ids(c) for c in contexts], self._memory(contexts),
                                        budgets, self.data.pad_id, self.batch_size)
        out = []
        for ids, k in zip(generated, kwargs):
            text = self.tok.decode(ids)
            until = k.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `hiermem` model type registered."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
