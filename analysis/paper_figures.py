"""The paper's figures from the study's runs: one function per figure, each writing PNG + the CSV it plots.

Inputs are the study's tables (`hiermem.study.study_runs` / `study_probes`): a runs table (one row per
run: `run`, `sweep` = the study part, `role`, accounting, `cfg.*`, `memory_level`) and the probe table
(one row per run, probe and mode). Every accuracy is Avg-SK (macro over relations of greedy exact match
on the SK probes, in points) with a 95% paired bootstrap CI over probes (`analysis.claims.Table`).
A part with no finished run draws an empty panel that says so, and its claims are `undetermined`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .claims import Table
from .plots import PlotFiles, log_axis, save_figure

MODE_LABELS = {"none": "no memory", "generic": "generic block", "fetched": "fetched memory"}
TYPE_ORDER = ("ffn", "lora-ffn", "lora-qk", "lora-vo", "kv")
PLACEMENT_ORDER = ("early", "middle", "late", "uniform")
LEVEL_ORDER = (1, 2, 3)
LONGTAIL_ORDER = ("anchor (no memory)", "dense, same total tokens", "A4 from scratch + memory", "A3 frozen + memory",
                  "A2 co-trained + memory")


def _avg_sk(table: Table, run: str, mode: str) -> dict:
    """Avg-SK of one (run, mode) of `table` with its bootstrap 95% CI: {avg_sk, lo, hi}."""
    sk = table.group == "SK"
    x, b = table.series(run, mode)
    lo, hi = np.nanpercentile(table.macro(b, sk), [2.5, 97.5])
    return {"avg_sk": float(table.macro(x, sk)), "lo": float(lo), "hi": float(hi)}


def avg_sk_by_run(probes: pd.DataFrame, runs: pd.DataFrame, mode: str = "fetched", metric: str = "correct",
                  n_boot: int = 1000, seed: int = 0, sweep: str | None = None) -> pd.DataFrame:
    """Avg-SK with its bootstrap 95% CI per run in `mode` (memory runs) or `none` (runs without memory),
    merged with the runs' descriptors; `sweep` keeps one part."""
    part = runs if sweep is None else runs[runs["sweep"] == sweep]
    if part.empty:
        return part.drop(columns=[c for c in ("avg_sk", "lo", "hi", "mode") if c in part]).assign(
            avg_sk=[], lo=[], hi=[], mode=[])
    table = Table(probes[probes["run"].isin(part["run"])], metric, n_boot, seed)
    rows = []
    for r in part.itertuples(index=False):
        memory = getattr(r, "fetched_params", 0) and getattr(r, "fetched_params", 0) > 0
        m = mode if memory else "none"
        if table.has(r.run, m):
            rows.append({"run": r.run, "mode": m, **_avg_sk(table, r.run, m)})
    descriptors = part.drop(columns=[c for c in ("avg_sk", "lo", "hi", "mode") if c in part])
    if not rows:
        return descriptors.iloc[:0].assign(avg_sk=[], lo=[], hi=[], mode=[])
    return pd.DataFrame(rows).merge(descriptors, on="run", how="left")


def _figure(title: str, width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    return fig, ax


def _missing(ax, what: str) -> None:
    ax.text(0.5, 0.5, textwrap.fill(f"no finished runs: {what}", 50), transform=ax.transAxes, ha="center",
            va="center", color="tab:red", fontsize=9)


def _lines(ax, data: pd.DataFrame, x: str, hue: str, order: Sequence | None = None, logx: bool = True,
           hue_label: str | None = None) -> None:
    import seaborn as sns
    full = list(order) if order else sorted(data[hue].unique(), key=str)
    palette = dict(zip(full, sns.color_palette("colorblind", len(full))))  # a concept's colour never moves
    keys = [k for k in full if k in set(data[hue])]
    for key in keys:
        s = data[data[hue] == key].sort_values(x)
        ax.errorbar(s[x], s["avg_sk"], yerr=[s["avg_sk"] - s["lo"], s["hi"] - s["avg_sk"]], marker="o", ms=4,
                    capsize=2, lw=1.2, color=palette[key], label=str(key))
    if logx:
        log_axis(ax)


def _legend(ax, title: str | None) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title=title, fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


def _mark_failed(ax, failed: pd.DataFrame | None, x: str | None = None) -> None:
    """Failed runs of the figure's part: a red x at their position on the x axis (where `x` is known)
    and their labels under the axes, so a missing point is never mistaken for an absent experiment."""
    if failed is None or failed.empty:
        return
    if x is not None and x in failed.columns:
        xs = pd.to_numeric(failed[x], errors="coerce").dropna()
        if len(xs):
            ax.scatter(xs, np.zeros(len(xs)), marker="x", s=50, color="tab:red", clip_on=False, zorder=5,
                       transform=ax.get_xaxis_transform(), label="failed run (no score)")
    labels = "; ".join(str(v) for v in failed.get("label", failed.get("run", pd.Series(dtype=str))))
    ax.annotate(textwrap.fill(f"{len(failed)} failed run(s), not drawn: {labels}", 95), (0, 0),
                xycoords="axes fraction", xytext=(0, -36), textcoords="offset points", va="top", fontsize=7,
                color="tab:red", annotation_clip=False)


def plot_against(data: pd.DataFrame, x: str, hue: str, path: str | Path, title: str, xlabel: str,
                 order: Sequence | None = None, logx: bool = True, hue_label: str | None = None,
                 failed: pd.DataFrame | None = None) -> PlotFiles:
    """Avg-SK (with CIs) against `x`, one line per `hue` value (legend titled `hue_label`) beside the axes;
    `failed` runs of the part (`hiermem.study.study_failed`) are marked on the x axis and named."""
    fig, ax = _figure(title)
    if data.empty:
        _missing(ax, title)
    else:
        _lines(ax, data, x, hue, order, logx, hue_label)
    _mark_failed(ax, failed, x)
    _legend(ax, hue_label or hue.replace("_", " "))
    ax.set(xlabel=xlabel, ylabel="Avg-SK (%, greedy exact match)")
    return save_figure(fig, data, path)


def plot_bars(data: pd.DataFrame, x: str, path: str | Path, title: str, xlabel: str,
              order: Sequence | None = None, failed: pd.DataFrame | None = None) -> PlotFiles:
    """Avg-SK (with CIs) per category of `x`; `failed` runs of the part are named under the axes."""
    fig, ax = _figure(title, width=5.6)
    if data.empty:
        _missing(ax, title)
    else:
        keys = [k for k in (order or list(dict.fromkeys(data[x]))) if k in set(data[x])]
        d = data.set_index(x).loc[keys].reset_index()
        ax.bar(range(len(d)), d["avg_sk"], yerr=[d["avg_sk"] - d["lo"], d["hi"] - d["avg_sk"]], capsize=3,
               color="tab:blue", label="fetched memory (95% CI)")
        ax.set_xticks(range(len(d)), [str(k) for k in keys])
    _mark_failed(ax, failed)
    ax.set(xlabel=xlabel, ylabel="Avg-SK (%, greedy exact match)")
    return save_figure(fig, data, path)


def longtail_table(probes: pd.DataFrame, runs: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Table 1 / Figure 1 (middle) analog: per anchor size, Avg-SK of the anchor (no memory), the frozen
    (A3) and co-trained (A2) memory models with fetched memory, the from-scratch one (A4) and the dense
    control of the same total tokens, with CIs."""
    part = runs[runs["sweep"] == "longtail"]
    stage = part.get("cfg.stage", pd.Series("", index=part.index))
    rows = []
    for mode, label, select in (
            ("none", "anchor (no memory)", part["role"] == "anchor"),
            ("fetched", "A3 frozen + memory", stage == "memory-frozen"),
            ("fetched", "A2 co-trained + memory", stage == "memory-cotrain"),
            ("fetched", "A4 from scratch + memory", stage == "memory-scratch"),
            ("none", "dense, same total tokens", part["role"] == "dense")):
        chosen = part[select]
        if chosen.empty:
            continue
        scored = avg_sk_by_run(probes, chosen, mode, n_boot=n_boot)
        if not scored.empty:
            rows.append(scored.assign(model=label))
    if not rows:
        return pd.DataFrame(columns=["model", "anchor_params", "avg_sk", "lo", "hi"])
    return pd.concat(rows, ignore_index=True)


def plot_longtail(table: pd.DataFrame, path: str | Path, failed: pd.DataFrame | None = None) -> PlotFiles:
    """Figure 1 (middle) analog: Avg-SK per anchor size (log x) for the anchor, memory models and dense control."""
    return plot_against(table, "anchor_params", "model", path,
                        "Figure 1 (middle) / Table 1 analog: ~10% memory against anchor size",
                        "anchor parameters (log scale)", order=LONGTAIL_ORDER, hue_label="model", failed=failed)


def longtail_series(runs: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Figure 1 (right) series for `analysis.exposure_curve`: per anchor size of the longtail part, the
    anchor without memory and the co-trained model (A2) with its fetched memory, on the same axes."""
    part = runs[runs["sweep"] == "longtail"]
    stage = part.get("cfg.stage", pd.Series("", index=part.index))
    series = {}
    for n in sorted(part["anchor_params"].unique()):
        size = f"{n / 1e6:.2g}M"
        for label, select, mode in ((f"{size} anchor, no memory", part["role"] == "anchor", "none"),
                                    (f"{size} + ~10% memory (A2)", stage == "memory-cotrain", "fetched")):
            chosen = part[select & (part["anchor_params"] == n)]
            if not chosen.empty:
                series[label] = (str(chosen["run"].iloc[0]), mode)
    return series


def blocking_table(curve: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Avg-SK with CIs per blocked fraction and policy from `hiermem.study.blocking_curve`; the fraction-0
    rows are the unblocked fetched memory and no memory (as references)."""
    if curve.empty:
        return pd.DataFrame(columns=["fraction", "policy", "avg_sk", "lo", "hi"])
    keys = [f"{p or m}@{f:g}" for p, m, f in zip(curve["policy"], curve["mode"], curve["fraction"])]
    keyed = curve.assign(run=keys)
    table = Table(keyed, "correct", n_boot, seed)
    rows = []
    for (run, mode), group in keyed.groupby(["run", "mode"]):
        first = group.iloc[0]
        rows.append({"fraction": float(first["fraction"]), "policy": first["policy"] or MODE_LABELS.get(mode, mode),
                     **_avg_sk(table, run, mode)})
    return pd.DataFrame(rows).sort_values(["policy", "fraction"]).reset_index(drop=True)


def plot_blocking_curve(table: pd.DataFrame, path: str | Path) -> PlotFiles:
    """Figure 6b analog: Avg-SK against the fraction of level-1 blocks blocked (best-matching first), for
    dropping and rerouting, with the unblocked fetched memory and no memory as horizontal references."""
    fig, ax = _figure("Figure 6b analog: blocking the best-matching memories")
    if table.empty:
        _missing(ax, "the blocking part")
    else:
        curves = table[table["policy"].isin(["drop", "reroute"])]
        zero = table[table["fraction"] == 0]
        for ref in zero.itertuples():
            ax.axhline(ref.avg_sk, color="gray", lw=0.8, ls="--")
            ax.text(1.0, ref.avg_sk, f" {ref.policy}", transform=ax.get_yaxis_transform(), va="center", fontsize=7)
        if not curves.empty:
            _lines(ax, curves.assign(policy="blocked, " + curves["policy"]), "fraction", "policy",
                   order=["blocked, drop", "blocked, reroute"], logx=False)
            _legend(ax, "policy")
    ax.set(xlabel="fraction of the bank's level-1 blocks blocked", ylabel="Avg-SK (%, greedy exact match)")
    return save_figure(fig, table, path)


SCALING_NOTEBOOKS = {
    "scaling_memory": "the memory laws on the hierarchy, depth_bank and longtail runs with the dense ladder: "
                      "AIC/BIC per form (`tables/form_comparison.csv`), error extrapolating to the largest bank "
                      "(`tables/holdout_largest_bank.csv`), fitted parameters (`tables/form_parameters.csv`)",
    "scaling_depth_anchor": "the dense Chinchilla fit (`tables/dense_fit_parameters.csv`) and its extrapolation "
                            "to the largest anchor, k per anchor size and stage with bootstrap CIs "
                            "(`tables/equivalence_by_anchor.csv`), the memory laws' hold-out errors",
}


def write_results_readme(paper_dir: str | Path, claims: pd.DataFrame, figures: Sequence[tuple[str, str]],
                         command: str, commit: str, scale: str) -> Path:
    """results/paper/README.md: each figure (title, PNG beside its CSV) and the claims with their verdicts,
    the commit and the command that produced them."""
    from hiermem.io import atomic_write_text
    paper_dir = Path(paper_dir)
    lines = [f"# The paper's figures and claims at {scale} scale", "",
             f"Generated by `{command}` at commit `{commit}`; do not edit by hand.", "",
             "## Claims", "", "Verdict rule (analysis.paper_claims): `holds` when the 95% CI is wholly on the claim's "
             "side of its decision, `fails` when wholly on the other side, `undetermined` when it spans the "
             "decision or an input is missing (see `note`).", "",
             "| claim | paper | paper's value | ours [95% CI] | decision | verdict | note |", "|---|---|---|---|---|---|---|"]
    for c in claims.itertuples():
        ours = "n/a" if not np.isfinite(c.ours) else f"{c.ours:.3g} [{c.ci_low:.3g}, {c.ci_high:.3g}]"
        lines.append(f"| {c.claim} | {c.paper_figure} | {c.paper_value} | {ours} | {c.decision} | **{c.verdict}** | "
                     f"{c.note} |")
    lines += ["", "## Figures", ""]
    for title, stem in figures:
        lines += [f"### {title}", "", f"![{title}]({stem}.png)", "", f"Data: [`{stem}.csv`]({stem}.csv)", ""]
    lines += ["## Scaling laws", "", f"Written by `hiermem notebooks run scaling_memory scaling_depth_anchor --scale {scale}` "
              "(after this notebook; they reuse its runs): the fitted-law tables and their figures.", ""]
    for name, what in SCALING_NOTEBOOKS.items():
        lines.append(f"- [`{name}/`]({name}/): {what}")
    path = paper_dir / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
