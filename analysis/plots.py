"""Seaborn figures for fits, views and comparisons; each writes a PNG and the CSV it plots.

Every function takes a result object and an output path (with or without `.png`), writes
`<stem>.png` and `<stem>.csv` atomically (temp file + rename, so a crash never leaves half a
file), and returns the paths and the matplotlib Figure (notebooks display it inline). Figures
are built with `matplotlib.figure.Figure`, not pyplot: no global state, no GUI backend.
"""

from __future__ import annotations

import textwrap

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from hiermem.io import atomic_path

from .compare import Comparison, HoldoutResult
from .data import scale_groups
from .equivalence import EquivalenceResult
from .fitting import FitResult
from .views import IsoFlopView

STYLE = "whitegrid"


@dataclass
class PlotFiles:
    """Where a figure went, and the figure itself."""

    png: Path
    csv: Path
    figure: Figure

    def _repr_png_(self) -> bytes:  # a notebook cell ending in a plot call shows the figure
        return self.png.read_bytes()


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".csv") else path
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".csv")


def _figure(ncols: int = 1, width: float = 5.5, height: float = 4.2) -> tuple[Figure, list]:
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(width * ncols, height), layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Figure, data: pd.DataFrame, path: str | Path, dpi: int = 130) -> PlotFiles:
    """Write `fig` as PNG and `data` as CSV beside it, both atomically."""
    png, csv = _paths(path)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    with atomic_path(csv) as tmp:
        data.to_csv(tmp, index=False)
    return PlotFiles(png=png, csv=csv, figure=fig)


# Axis and legend labels with units for the columns the figures plot (never a raw column name on a figure).
LABELS = {
    "fetched_params": "fetched memory parameters", "bank_params": "memory bank parameters",
    "anchor_params": "anchor parameters", "runtime_params": "runtime parameters (anchor + fetched)",
    "total_tokens": "training tokens (anchor + memory stage)", "tokens": "training tokens (this stage)",
    "loss": "held-out loss (nats per token)", "ppl": "held-out perplexity", "avg_sk": "Avg-SK (%, greedy exact match)",
    "avg_ck": "Avg-CK (%, greedy exact match)", "avg_sk_rank": "Avg-SK (%, answer ranked first)",
    "correct": "greedy exact match", "rank_correct": "answer ranked first", "mc_correct": "4-way multiple choice",
    "cfg.memory.branching": "branching factor k", "cfg.data.tree.branching": "branching factor k",
    "cfg.data.tree.depth": "tree depth", "cfg.memory.type": "memory type", "cfg.memory.placement": "memory placement",
    "cfg.memory.multipliers": "memory units per level (r1, r2, ...)", "memory_level": "memory level",
    "N": "anchor parameters N", "D": "training tokens D", "F": "fetched memory parameters F", "M": "bank parameters M",
    "kind": "model", "cfg.stage": "training stage",
}


def _short(value: float, _pos=None) -> str:
    """Tick label of a count: 300k, 1M, 2.5M, 1.2B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def log_axis(ax, axis: str = "x") -> None:
    """A log scale whose ticks never collide: labelled ticks at 1, 2 and 5 per decade (fewer when the range
    spans many decades) written as 300k / 1M / 2.5M, unlabelled minor ticks."""
    from matplotlib.ticker import LogLocator, NullFormatter
    getattr(ax, f"set_{axis}scale")("log")
    target = getattr(ax, f"{axis}axis")
    ax.autoscale_view()
    lo, hi = getattr(ax, f"get_{axis}lim")()
    decades = np.log10(hi / lo) if 0 < lo < hi else 3
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 2 else (1.0,)))
    target.set_major_formatter(_short)
    target.set_minor_formatter(NullFormatter())


def axis_label(column: str) -> str:
    """The human-readable label (with units) of a plotted column; unknown ones lose their `cfg.` prefix,
    dots and underscores."""
    return LABELS.get(column, column.removeprefix("cfg.").replace(".", " ").replace("_", " "))


def hue_map(data: pd.DataFrame, column: str | None, max_levels: int = 8) -> dict:
    """Seaborn hue arguments for a column: few numeric values become ordered, readable
    categories ('1e+09'); many become a continuous viridis scale (log-normed if positive)."""
    if column is None:
        return {}
    values = data[column]
    if not pd.api.types.is_numeric_dtype(values):
        return {"hue": column}
    levels = np.sort(values.dropna().unique())
    if len(levels) <= max_levels:
        label = f"{column} "
        data[label] = values.map(lambda v: f"{v:.3g}")
        colors = sns.color_palette("viridis", len(levels))
        order = [f"{v:.3g}" for v in levels]
        return {"hue": label, "hue_order": order, "palette": dict(zip(order, colors))}
    v = values.to_numpy(dtype=float)
    norm = LogNorm(v.min(), v.max()) if np.all(v > 0) and v.max() > v.min() else None
    return {"hue": column, "hue_norm": norm, "palette": "viridis"}


def plot_fit(result: FitResult, path: str | Path) -> PlotFiles:
    """Observed and fitted target against the first variable (hue: the second), and log residuals."""
    data = result.table().reset_index(names="row")
    data["set"] = np.where(data["used"], "fitted", "excluded")
    first = result.form.variable_names[0]
    second = result.form.variable_names[1] if len(result.form.variable_names) > 1 else None
    fig, (ax, ax_res) = _figure(2)
    hue = hue_map(data, second)
    if "hue" in hue and second is not None:  # the legend names the variable, not the column
        data = data.rename(columns={second: axis_label(second)})
        hue = hue_map(data, axis_label(second))
    sns.scatterplot(data=data, x=first, y="observed", style="set", ax=ax, **hue)
    ax.scatter(data[first], data["predicted"], marker="x", s=14, color="black", label="the law's prediction",
               linewidths=0.8)
    log_axis(ax)
    ax.set(xlabel=f"{axis_label(first)} (log scale)", ylabel=axis_label(result.y_name),
           title=f"{result.form.name}: {result.form.formula}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    sns.scatterplot(data=data, x="predicted", y="log_residual", hue="set", ax=ax_res, legend=False)
    ax_res.axhline(0, color="black", lw=0.8)
    ax_res.set(xlabel=f"predicted {axis_label(result.y_name)}", ylabel="log(predicted) - log(observed)",
               title="residuals")
    return save_figure(fig, data, path)


def plot_bootstrap(result: FitResult, path: str | Path) -> PlotFiles:
    """Histogram of each parameter over bootstrap replicates, with the estimate and CI."""
    if result.bootstrap is None:
        raise ValueError("this fit has no bootstrap replicates; run bootstrap_fit (or fit(..., bootstrap=B)) first")
    params = list(result.params)
    fig, axes = _figure(len(params), width=3.0, height=3.0)
    good = result.bootstrap[result.bootstrap["converged"]]
    for ax, p in zip(axes, params):
        sns.histplot(good[p], ax=ax, bins=30, color="tab:blue")
        ax.axvline(result.params[p], color="black", lw=1)
        row = result.ci.set_index("param").loc[p]
        for edge in (row["lo"], row["hi"]):
            ax.axvline(edge, color="tab:red", ls="--", lw=0.8)
        ax.set(title=p, xlabel="", ylabel="")
    return save_figure(fig, result.bootstrap, path)


def plot_isoflop(view: IsoFlopView, path: str | Path) -> PlotFiles:
    """Loss against parameters per FLOP budget, with parabola (and law) curves and optima."""
    parts = [view.points.assign(series="run")[["series", "budget_group", "budget", "params", "loss"]]]
    for col, name in (("loss_parabola", "parabola"), ("loss_law", "law")):
        if col in view.curves:
            parts.append(view.curves.rename(columns={col: "loss"}).assign(series=name)
                         [["series", "budget_group", "budget", "params", "loss"]])
    for col, name in (("parabola", "optimum_parabola"), ("law", "optimum_law")):
        pc, lc = f"params_opt_{col}", f"loss_opt_{col}"
        if pc in view.optima:
            opt = view.optima.dropna(subset=[pc])
            parts.append(pd.DataFrame({"series": name, "budget_group": opt["budget_group"], "budget": opt["budget"],
                                       "params": opt[pc], "loss": opt[lc]}))
    data = pd.concat(parts, ignore_index=True)
    data["budget_label"] = data["budget"].map(lambda v: f"{v:.2g}")
    order = [f"{v:.2g}" for v in sorted(data["budget"].unique())]
    palette = dict(zip(order, sns.color_palette("viridis", len(order))))
    fig, (ax,) = _figure(1, width=6.5, height=4.8)
    runs = data[data["series"] == "run"]
    sns.scatterplot(data=runs, x="params", y="loss", hue="budget_label", hue_order=order, palette=palette, ax=ax)
    for name, style in (("parabola", "--"), ("law", "-")):
        for label, curve in data[data["series"] == name].groupby("budget_label"):
            ax.plot(curve["params"], curve["loss"], color=palette[label], lw=1, ls=style)
    for name, marker in (("optimum_parabola", "D"), ("optimum_law", "*")):
        opt = data[data["series"] == name]
        if not opt.empty:
            ax.scatter(opt["params"], opt["loss"], marker=marker, s=60, color="black", label=name, zorder=5)
    lo, hi = runs["loss"].min(), runs["loss"].max()
    ax.set(xscale="log", xlabel="parameters (log scale)", ylabel=LABELS["loss"], title="IsoFLOP profiles (dashed: parabola, solid: law)",
           ylim=(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)))
    ax.legend(fontsize=7, title="budget (FLOPs)")
    return save_figure(fig, data, path)


def plot_iso_runtime(view: pd.DataFrame, path: str | Path, hue: str | None = None) -> PlotFiles:
    """Loss against runtime parameters (anchor + fetched), dense against memory models.

    Dense runs with the same tokens are joined by a line. With the dense law's loss at the
    same runtime parameters (`iso_runtime_view(..., dense_fit=...)`), each memory run gets a
    vertical segment down from that reference: its gain over a dense model of equal runtime size.
    """
    data = view.reset_index(drop=True)
    data["tokens_group"] = scale_groups(data["tokens"].to_numpy(), 0.05) if "tokens" in data else 0
    fig, (ax,) = _figure(1, width=8.0, height=4.8)
    hue_kw = hue_map(data, hue) if hue else {"hue": "kind"}
    sns.scatterplot(data=data, x="runtime_params", y="loss", style="kind", ax=ax, zorder=3, **hue_kw)
    for _, dense in data[data["kind"] == "dense"].groupby("tokens_group"):
        dense = dense.sort_values("runtime_params")
        ax.plot(dense["runtime_params"], dense["loss"], color="gray", lw=0.8, zorder=1)
    skipped = view.attrs.get("skipped", "")
    if skipped:
        _note(ax, skipped)
    elif "dense_loss_at_runtime" in data:
        mem = data[data["kind"] == "memory"]
        ax.vlines(mem["runtime_params"], mem["loss"], mem["dense_loss_at_runtime"], color="tab:red", lw=0.8,
                  label="gain over dense law at equal runtime params", zorder=2)
        ax.scatter(mem["runtime_params"], mem["dense_loss_at_runtime"], marker="_", s=80, color="tab:red", zorder=2)
    log_axis(ax)
    ax.set(xlabel="runtime parameters (anchor + fetched, log scale)", ylabel=LABELS["loss"],
           title="loss against runtime parameters")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, [axis_label(t) if t in LABELS or t in ("kind",) else t for t in labels], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, data, path)


def _note(ax, text: str, width: int = 70) -> None:
    """Why something is not drawn, wrapped, in the top left of the axes."""
    import textwrap
    wrapped = "\n".join(textwrap.fill(line, width) for line in text.splitlines())
    ax.text(0.01, 0.98, wrapped, transform=ax.transAxes, va="top", fontsize=7, color="tab:red")


def plot_equivalence(result: EquivalenceResult, path: str | Path) -> PlotFiles:
    """Multiplier k (with CI bars) against anchor size; k = 1 is 'no better than dense'.

    When no k was reported (an unidentified dense fit), the figure says why instead."""
    data = result.table.reset_index(names="row")
    fig, (ax,) = _figure(1, width=6.0, height=4.5)
    title = f"dense-equivalent multiplier ({result.dense_fit.form.name} dense fit)"
    if not result.identified:
        _note(ax, result.why)
        ax.set(xlabel="anchor parameters", ylabel="k = N_equiv / N_anchor", title=title)
        return save_figure(fig, data, path)
    finite = data[np.isfinite(data["k"])].copy()
    sns.scatterplot(data=finite, x="N", y="k", ax=ax, zorder=3, **hue_map(finite, "D" if "D" in finite else None))
    if "k_lo" in data:
        lo = np.clip(finite["k"] - finite["k_lo"], 0, None)
        hi = np.where(np.isfinite(finite["k_hi"]), finite["k_hi"] - finite["k"], 0)
        ax.errorbar(finite["N"], finite["k"], yerr=[lo, hi], fmt="none", ecolor="gray", lw=0.8, zorder=2)
    if (~np.isfinite(data["k"])).any():
        ax.text(0.01, 0.98, f"{int((~np.isfinite(data['k'])).sum())} run(s) beyond the dense floor (k = inf)",
                transform=ax.transAxes, va="top", fontsize=8)
    ax.axhline(1, color="black", lw=0.8)
    ax.set(xscale="log", xlabel="anchor parameters", ylabel="k = N_equiv / N_anchor", title=title)
    return save_figure(fig, data, path)


def plot_holdout(result: HoldoutResult, path: str | Path) -> PlotFiles:
    """Predicted against observed: fitted rows and held-out largest-scale rows."""
    train = result.fit.table()
    train = train[train["used"]].assign(set="fitted")[["observed", "predicted", "set"]]
    held = result.table.assign(set="held out")[["observed", "predicted", "set"]]
    data = pd.concat([train, held]).reset_index(names="row")
    fig, (ax,) = _figure(1, width=5.0, height=5.0)
    sns.scatterplot(data=data, x="observed", y="predicted", hue="set", ax=ax)
    lims = [data[["observed", "predicted"]].min().min(), data[["observed", "predicted"]].max().max()]
    ax.plot(lims, lims, color="black", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel=f"observed {axis_label(result.fit.y_name)}", ylabel=f"predicted {axis_label(result.fit.y_name)}",
           title=f"hold out {result.by} >= {result.threshold:.3g}: mean |rel err| {result.mean_abs_rel_error:.2%}")
    return save_figure(fig, data, path)


HOLDOUT_SCALES = {"N": "anchor size", "M": "fetched size", "Bk": "bank size", "D": "token budget"}


def plot_holdout_forms(table: pd.DataFrame, path: str | Path, title: str | None = None) -> PlotFiles:
    """Extrapolation error per form (`holdout_forms`): mean and max |relative error| on the held-out
    largest scales, in percent; a form without a number (not identified, not fittable) is named with
    its reason below the axes."""
    data = table.assign(mean_pct=100 * table["mean_abs_rel_error"], max_pct=100 * table["max_abs_rel_error"])
    long = data.melt(id_vars="form", value_vars=["mean_pct", "max_pct"], var_name="error", value_name="percent")
    long["error"] = long["error"].map({"mean_pct": "mean |rel. error|", "max_pct": "max |rel. error|"})
    fig, (ax,) = _figure(1, width=6.5, height=4.5)
    if long["percent"].notna().any():
        sns.barplot(data=long, x="form", y="percent", hue="error", ax=ax)
        ax.get_legend().remove()
        fig.legend(*ax.get_legend_handles_labels(), loc="outside upper center", ncol=2, frameon=False)
    else:
        ax.set_xticks([])
    missing = data[data["mean_abs_rel_error"].isna()]
    reasons = "\n".join(textwrap.fill(f"{r.form}: no error ({str(r.why).split(';')[0]})", 110)
                         for r in missing.itertuples())  # the first reason; the table's `why` has them all
    by = table["by"].iloc[0] if len(table) else "scale"
    ax.set_ylabel("error predicting held-out runs (%)")
    ax.set_xlabel(reasons, fontsize=7, color="tab:red", loc="left")
    ax.set_title(title or f"extrapolation to the largest {HOLDOUT_SCALES.get(by, by)} (fitted without it)")
    return save_figure(fig, data, path)


def plot_comparison(comparison: Comparison, path: str | Path) -> PlotFiles:
    """Delta AIC and delta BIC per form (0 = best); forms that may not be best (not identified,
    AICc infinite) are listed with the reason, and have no bar when not comparable."""
    data = comparison.table
    long = data.melt(id_vars="form", value_vars=["delta_aic", "delta_bic"], var_name="criterion", value_name="delta")
    fig, (ax,) = _figure(1, width=6.0, height=4.0)
    if long["delta"].notna().any():
        sns.barplot(data=long, x="form", y="delta", hue="criterion", ax=ax)
    if comparison.note:
        _note(ax, comparison.note, width=90)
    ax.set(ylabel="difference from best (lower is better)", xlabel="",
           title="model comparison" + ("" if comparison.best else " (no form identified)"))
    return save_figure(fig, data, path)
