"""Measure what an edit did, and the `hiermem forget` / `hiermem learn` commands.

`hiermem.edit` performs the edits on the saved files; this module scores them (see that module's
docstring for the definitions):

- `forgetting_table`: per deleted subject and model, accuracy before and after deletion, the
  anchor's, leakage and anchor leakage, with a bootstrap CI over probes;
- `forgetting_from_evaluations`: the same before/after per subject from evaluation tables already
  written (`hiermem eval` of the source, the forgotten run and the anchor), which `hiermem eval`
  prints for a forgotten run;
- `learned_fact_table`: the new facts' probes with and without memory, before and after learning;
- `probe_change_table`: the run's own probes before and after an edit, split by whether their path
  reaches an edited block;
- `forget_study` / `learn_study`: the notebook's one-line experiments on the demo's runs;
- `plot_forgetting`, `plot_learning`: PNG + the CSV each plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from hiermem.checkpoint import load_model
from hiermem.data.pipeline import DataBundle, build_data
from hiermem.diagnostics import majority_path
from hiermem.edit import (Node, edit_record, edited_nodes, forget, invent_facts, learn, read_subjects,
                          write_documents)
from hiermem.edit import __doc__ as EDIT_DOC
from hiermem.evaluate import EvalConfig, probe_rows, score_probes, select_probes
from hiermem.modes import Rows
from hiermem.rundir import RunDir
from hiermem.train import TrainConfig

METRICS = ("correct", "rank_correct")

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


# ------------------------------------------------------------------------------------------ studies
STUDY_MODELS = (("A3", "memory-frozen"), ("A2", "memory-cotrain"))  # label, the demo's run name


def _edited(out: Path, same: bool, make) -> Path:
    """Reuse the edited run at `out` when it is finished and `same` holds for its record, else redo it."""
    if RunDir(out).is_finished and same:
        return out
    if out.exists():
        shutil.rmtree(out)
    return make()


def forget_study(run_dirs: Mapping[str, str | Path], out_dir: str | Path, n_subjects: int = 5,
                 select_by: str = "memory-frozen", models: Sequence[tuple[str, str]] = STUDY_MODELS,
                 data: DataBundle | None = None, cfg: EvalConfig | None = None, n_boot: int = 1000) -> pd.DataFrame:
    """Forget the leaf blocks of `n_subjects` subjects in each memory run of the demo (A3 frozen, A2
    co-trained; edited runs under OUT_DIR, reused when their subjects match) and score them with
    `forgetting_table` (anchor: run_dirs['anchor']).

    The subjects are those the frozen run knows only with its memory (`choose_subjects`): the study
    asks whether deletion removes knowledge that lives in the bank, so `before` is high by selection;
    the findings are `after` and the leakage of the co-trained anchor, which is not selected on."""
    if select_by not in run_dirs:
        raise ValueError(f"forget_study chooses its subjects on the run {select_by!r}, which run_dirs lacks "
                         f"(it has {sorted(run_dirs)})")
    subjects = choose_subjects(run_dirs[select_by], n_subjects)
    pairs = {}
    for label, name in models:
        if name not in run_dirs:
            continue
        out = Path(out_dir) / f"{name}-forget"
        same = RunDir(out).is_finished and {v["subject"] for v in edit_record(out).get("subjects", {}).values()
                                            } == set(subjects)
        pairs[label] = (run_dirs[name], _edited(out, same, lambda: forget(run_dirs[name], out, subjects=subjects,
                                                                              data=data)))
    return forgetting_table(pairs, anchor=run_dirs.get("anchor"), data=data, cfg=cfg, n_boot=n_boot)


def learn_study(run_dirs: Mapping[str, str | Path], out_dir: str | Path, n_facts: int = 6, docs_per_subject: int = 4,
                steps: int = 150, lr: float = 1e-2, levels: str = "leaf", replay: float = 0.5,
                models: Sequence[tuple[str, str]] = STUDY_MODELS, data: DataBundle | None = None,
                cfg: EvalConfig | None = None, n_boot: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Teach each memory run of the demo `n_facts` invented people (`invent_facts`: documents under
    OUT_DIR/docs, learned runs under OUT_DIR, reused when their documents match) by training only
    the blocks they route to. Returns (learned_fact_table on the new facts, probe_change_table of the
    run's own probes per model, with a `model` column)."""
    if not any(name in run_dirs for _, name in models):
        raise ValueError(f"learn_study needs one of the memory runs {[n for _, n in models]}; run_dirs has "
                         f"{sorted(run_dirs)}")
    docs, probes = invent_facts(n_facts, docs_per_subject)
    folder = write_documents(Path(out_dir) / "docs", docs)
    pairs, others = {}, []
    for label, name in models:
        if name not in run_dirs:
            continue
        out = Path(out_dir) / f"{name}-learn"
        record = edit_record(out) if RunDir(out).is_finished else {}
        same = (sorted(d["name"] for d in record.get("documents", [])) == sorted(n for n, _ in docs)
                and (record.get("steps"), record.get("lr"), record.get("replay")) == (steps, lr, replay))
        pairs[label] = (run_dirs[name], _edited(out, same, lambda: learn(run_dirs[name], folder, out, steps=steps,
                                                                             lr=lr, levels=levels, replay=replay)))
        summary, _ = probe_change_table(run_dirs[name], out, data=data, cfg=cfg, n_boot=n_boot)
        others.append(summary.assign(model=label))
    return learned_fact_table(pairs, probes, data=data, cfg=cfg), pd.concat(others, ignore_index=True)


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
                batch_size=args.batch_size, replay=args.replay)
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
                       description=EDIT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                       description=EDIT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("run_dir", help="a finished memory run")
    q.add_argument("--docs", required=True, help="a folder of *.txt documents (UTF-8)")
    q.add_argument("--out", required=True, help="the new run directory")
    q.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    q.add_argument("--lr", type=float, default=1e-2, help="peak learning rate, cosine to lr/10 (default 1e-2)")
    q.add_argument("--levels", default="leaf", help="leaf (default) | all | comma list of levels, e.g. 1,2")
    q.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    q.add_argument("--replay", type=float, default=0.5,
                   help="share of each batch replayed from the run's own documents on the learned blocks "
                        "(default 0.5; 0: only the new documents, which overwrites what those blocks held)")
    q.add_argument("--probes", default=None, help="CSV (prompt, answer[, relation, documents]): score the new facts")
    q.add_argument("--check-others", action="store_true", help="score the run's own probes before and after")
    q.set_defaults(func=_run_learn)
