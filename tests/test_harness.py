"""The lm-evaluation-harness adapter (hiermem.harness): lm_eval.simple_evaluate, offline, on a local task
over the workbench's own probes, against `hiermem eval` on the same probes and mode."""

import importlib
import json

import numpy as np
import pandas as pd
import pytest

lm_eval = pytest.importorskip("lm_eval")

from hiermem.config import MemoryConfig  # noqa: E402
from hiermem.data.pipeline import build_data  # noqa: E402
from hiermem.evaluate import EvalConfig, answer_candidates, evaluate_run, select_probes  # noqa: E402
from hiermem.train import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def memory_run(smoke_data_config, pretrained_anchor, tmp_path_factory):
    cfg = TrainConfig(stage="memory-cotrain", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                      memory=MemoryConfig(multipliers=(8, 2), branching=4), tokens=10 * 4 * 128, batch_size=4,
                      optim=TrainConfig().optim.replace(bank_lr=0.05))
    return train(cfg, tmp_path_factory.mktemp("runs") / "memory", progress=False)


@pytest.fixture(scope="module")
def hf_memory_run(smoke_data_config, tmp_path_factory):
    """A frozen tiny Llama-family Hugging Face base with a trained FFN memory, as a `hiermem train` run."""
    import transformers
    from helpers import saved_hf_base
    data = build_data(smoke_data_config, progress=False)
    folder = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1)
    base = saved_hf_base(folder / "base", config, data.vocab_size, smoke_data_config.seq_len)
    cfg = TrainConfig(stage="memory-frozen", base_model=str(base), data=smoke_data_config, tokens=10 * 4 * 128,
                      batch_size=4, memory=MemoryConfig(type="ffn", multipliers=(8, 2)),
                      optim=TrainConfig().optim.replace(bank_lr=0.05))
    return train(cfg, folder / "memory", data=data, progress=False)


def _task(tmp_path, probes, candidates) -> str:
    """A local multiple-choice task: each probe's prompt, its candidate answers, the true one first."""
    rows = [{"prompt": p, "choices": list(c), "gold": 0} for p, c in zip(probes["prompt"], candidates)]
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hiermem_probes.yaml").write_text(
        "task: hiermem_probes\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'probes.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{prompt}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n")
    return "hiermem_probes"


@pytest.mark.parametrize("mode,run", [("fetched", "memory_run"), ("none", "memory_run"), ("fetched", "hf_memory_run")])
def test_harness_multiple_choice_equals_hiermem_answer_ranking(run, smoke_data_config, tmp_path, mode, request):
    """Bug caught: the adapter routing requests differently from `hiermem eval` (another path, or
    memory in 'none' mode), tokenising the continuation without its leading space, or summing
    another span of log-probabilities. Reference: `hiermem eval`'s rank_correct on the same probes,
    candidates and mode -- for a hiermem run and for a memory on a Hugging Face base (scored without the KV
    cache)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    importlib.import_module("hiermem.harness")  # registers the model type

    memory_run = request.getfixturevalue(run)  # hiermem's own model, or a memory on a Hugging Face base
    cfg = EvalConfig(split="all", max_probes_per_relation=3, rank_candidates=6, heldout_docs_per_source=2,
                     modes=("none", "fetched"), level_ablation=False)
    evaluate_run(memory_run, cfg)
    results = pd.read_parquet(memory_run / "eval" / "probe_results.parquet")
    want = results[results["mode"] == mode]
    data = build_data(smoke_data_config, progress=False)
    probes = select_probes(data.probes, cfg.max_probes_per_relation, cfg.seed, cfg.split)
    assert list(probes["probe_id"]) == list(want["probe_id"])
    task = _task(tmp_path, probes, answer_candidates(data, probes, cfg))
    out = simple_evaluate(model="hiermem", model_args={"run_dir": str(memory_run), "mode": mode},
                          tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    acc = out["results"][task]["acc,none"]
    assert acc == pytest.approx(float(want["rank_correct"].mean()), abs=1e-9)
    # per probe, not only on average: the harness's chosen answer is the true one exactly where hiermem's is
    samples = out["samples"][task]
    picked = {s["doc"]["prompt"]: bool(s["acc"]) for s in samples}
    assert [picked[p] for p in probes["prompt"]] == list(want["rank_correct"])
    assert 0 < len(samples) == len(probes)


def test_harness_rolling_generation_and_bad_input(memory_run):
    """Bug caught: rolling log-likelihood skipping or double-counting tokens across windows, stop
    strings not cutting the generation, an unknown mode accepted."""
    import torch
    from lm_eval.api.instance import Instance
    from hiermem.harness import HiermemHarnessLM

    with pytest.raises(ValueError, match="mode"):
        HiermemHarnessLM(run_dir=str(memory_run), mode="oracle")
    lm = HiermemHarnessLM(run_dir=str(memory_run), mode="fetched")
    text = "The capital of France is Paris. " * 30  # longer than the context: several windows
    ids = lm._ids(text)
    assert len(ids) > lm.model.model_cfg.max_seq_len
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    # independent: each token predicted once, from the previous max_len tokens (eot before the first)
    full, max_len = [lm.data.eot_id] + ids, lm.model.model_cfg.max_seq_len
    rows = lm._memory([text]).rows(np.array([0]), torch.device("cpu"))
    want = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), max_len):
            end = min(start + max_len, len(ids))
            window = full[max(0, end - max_len):end + 1]  # context ending just before token end
            tokens = torch.as_tensor(window[:-1])[None]
            logp = torch.log_softmax(lm.model(tokens, torch.zeros_like(tokens), **rows)[0], -1)
            targets = torch.as_tensor(window[1:])
            n = end - start
            want += float(logp[-n:].gather(-1, targets[-n:, None]).sum())
    assert got == pytest.approx(want, rel=1e-4)
    gens = lm.generate_until([Instance("generate_until", {}, ("The capital of", {"until": ["."], "max_gen_toks": 8}), 0)])
    assert len(gens) == 1 and "." not in gens[0]
