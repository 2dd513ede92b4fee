"""Knowledge attribution: which facts the anchor holds and which only the fetched memory supplies.

Inputs are the tidy probe tables that `hiermem eval` writes (RUN_DIR/eval/probe_results.parquet,
one row per probe and memory mode; see `hiermem.evaluate`), from one or more runs, with a `run`
column added by `load_probe_results`. Every function returns a tidy DataFrame, so a notebook cell is
one call:

    results = load_probe_results(["runs/demo/anchor", "runs/demo/memory-cotrain"])
    accuracy_by_frequency(results)                 # the "Kandpal curve": accuracy by exposure bucket
    attribution_shares(attribute_knowledge(results), by="bucket")
    memory_gain(results)                           # fetched - none, fetched - generic, bootstrap CIs
    blocking_effect(results); level_contribution(results)

Categories of `attribute_knowledge` (per run and probe; exhaustive and disjoint), from the scores
without memory (a), with the fetched memory (f) and with the generic block (g):

    anchor        a and f          known without memory and kept with it
    lost          a and not f      known without memory, forgotten once memory is fetched
    generic-only  not a and g      needs extra parameters, but not the routed ones (the paper's control)
    memory-only   not a, f, not g  known only with the blocks on the prompt's own path
    neither       none of the three

Frequency buckets are ordered by exposure ("unseen" < "b0-rarest" < "b1" < ... < "b<n>-frequent");
buckets that are not about frequency (the held-out prose "cloze") come last. Plots (`plot_*`)
write `<name>.png` and the `<name>.csv` they plot, atomically, like `analysis.plots`; matplotlib is
imported only when a plot is drawn.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from hiermem.rundir import RunDir

# The evaluation modes in the order `hiermem.evaluate.BASE_MODES` defines them (not imported from
# there: that module pulls in torch, and analysis stays numpy/pandas only). drop-level<l> follow.
MODE_ORDER = ("none", "generic", "fetched", "blocked-drop", "blocked-reroute", "wrong-path", "oracle-path")
CATEGORIES = ("anchor", "memory-only", "generic-only", "lost", "neither")
BOOLEAN_METRICS = ("correct", "rank_correct", "mc_correct")
METRICS = BOOLEAN_METRICS + ("answer_logprob",)
PROBE_COLUMNS = ("relation", "subject", "group", "bucket", "exposures")
BLOCKING_MODES = ("none", "fetched", "blocked-drop", "blocked-reroute", "wrong-path", "oracle-path")
_BUCKET_INDEX = re.compile(r"^b(\d+)(?:-|$)")
_DROP_LEVEL = re.compile(r"^drop-level(\d+)$")


# ------------------------------------------------------------------------------------ loading
def _named_runs(run_dirs: str | Path | Iterable[str | Path] | Mapping[str, str | Path]) -> dict[str, Path]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    named = dict(run_dirs) if isinstance(run_dirs, Mapping) else {Path(d).name: d for d in run_dirs}
    if not named:
        raise ValueError("no run directories given")
    return {str(name): Path(d) for name, d in named.items()}


def _load_eval_tables(run_dirs, table: str) -> pd.DataFrame:
    frames = []
    for name, directory in _named_runs(run_dirs).items():
        frame = RunDir(directory).eval_table(table)
        frames.append(frame.drop(columns=["run"], errors="ignore").assign(run=name))
    out = pd.concat(frames, ignore_index=True)
    return out[["run"] + [c for c in out.columns if c != "run"]]


def load_probe_results(run_dirs: str | Path | Iterable[str | Path] | Mapping[str, str | Path]) -> pd.DataFrame:
    """Concatenate RUN_DIR/eval/probe_results.parquet of each run, with a `run` column.

    `run_dirs` is one directory, a list (each run is named by its directory name) or a mapping
    {name: directory}. A run without evaluation tables is an error naming it.
    """
    return _load_eval_tables(run_dirs, "probes")


def load_eval_summary(run_dirs: str | Path | Iterable[str | Path] | Mapping[str, str | Path]) -> pd.DataFrame:
    """Concatenate RUN_DIR/eval/summary.csv (one row per mode: Avg-SK/CK, perplexity, per-bucket
    accuracy) of each run, with a `run` column; runs are named as in `load_probe_results`."""
    return _load_eval_tables(run_dirs, "summary")


def _checked(results: pd.DataFrame, metric: str, boolean: bool = False) -> pd.DataFrame:
    """The results with a `run` column (one unnamed run is 'run'), after validating the metric."""
    allowed = BOOLEAN_METRICS if boolean else METRICS
    if metric not in allowed:
        raise ValueError(f"metric must be one of {list(allowed)}, got {metric!r}")
    missing = {"probe_id", "mode", "bucket", metric} - set(results.columns)
    if missing:
        raise ValueError(f"probe results lack columns {sorted(missing)} (expected hiermem eval's probe_results)")
    if results.empty:
        raise ValueError("the probe results table is empty")
    return results if "run" in results.columns else results.assign(run="run")


# ------------------------------------------------------------------------------------ ordering
def bucket_index(bucket: str) -> float:
    """Exposure rank of a bucket label: 'unseen' = -1, 'b<i>...' = i, anything else NaN."""
    if bucket == "unseen":
        return -1.0
    match = _BUCKET_INDEX.match(str(bucket))
    return float(match.group(1)) if match else np.nan


def bucket_order(buckets: Iterable[str]) -> list[str]:
    """Distinct bucket labels, rarest first; non-frequency buckets (e.g. 'cloze') last, by name."""
    distinct = sorted(set(map(str, buckets)))
    ranked = sorted((b for b in distinct if np.isfinite(bucket_index(b))), key=bucket_index)
    return ranked + [b for b in distinct if not np.isfinite(bucket_index(b))]


def mode_order(modes: Iterable[str]) -> list[str]:
    """Distinct modes in evaluation order: the base modes, then drop-level<l> by level, then others."""
    distinct = set(modes)
    levels = sorted((m for m in distinct if _DROP_LEVEL.match(m)), key=lambda m: int(_DROP_LEVEL.match(m).group(1)))
    rest = sorted(distinct - set(MODE_ORDER) - set(levels))
    return [m for m in MODE_ORDER if m in distinct] + levels + rest


def _sorted(frame: pd.DataFrame, runs: Sequence[str], extra: Sequence[str] = ()) -> pd.DataFrame:
    """Rows ordered by run (as first seen), `extra` columns as given, then bucket by exposure."""
    keys = {"run": {r: i for i, r in enumerate(runs)}}
    if "mode" in frame:
        keys["mode"] = {m: i for i, m in enumerate(mode_order(frame["mode"]))}
    if "bucket" in frame:
        keys["bucket"] = {b: i for i, b in enumerate(bucket_order(frame["bucket"]))}
    cols = [c for c in ("run", *extra, "mode", "bucket") if c in frame]
    cols = list(dict.fromkeys(cols))
    return frame.sort_values(cols, key=lambda s: s.map(keys[s.name]) if s.name in keys else s,
                             kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------ accuracy
def _wilson(successes: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval: unlike mean +- z se it stays inside [0, 1] and is not empty at 0 or n
    successes, which matters for the handful of probes per bucket at smoke scale."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def accuracy_by_frequency(results: pd.DataFrame, metric: str = "correct", modes: Sequence[str] | None = None,
                          frequency_only: bool = True) -> pd.DataFrame:
    """Mean `metric` per run, mode and bucket, buckets ordered by exposure (the Kandpal curve).

    Columns: run, mode, bucket, bucket_index, exposures_min/max, n, mean, se, lo, hi (95%: Wilson
    for correct/mc_correct, normal for answer_logprob). `frequency_only` drops buckets that are not
    exposure buckets (the cloze probes); `modes` keeps only those modes.
    """
    results = _checked(results, metric)
    if modes is not None:
        results = results[results["mode"].isin(modes)]
    if frequency_only:
        results = results[np.isfinite(results["bucket"].map(bucket_index))]
    if results.empty:
        raise ValueError(f"no probe rows left for modes {modes} (frequency_only={frequency_only})")
    has_exposures = "exposures" in results.columns
    values = results.assign(_v=results[metric].astype(float), _e=results["exposures"] if has_exposures else np.nan)
    table = (values.groupby(["run", "mode", "bucket"], sort=False)
             .agg(exposures_min=("_e", "min"), exposures_max=("_e", "max"), n=("_v", "size"), mean=("_v", "mean"),
                  sd=("_v", "std"))
             .reset_index())
    n = table["n"].to_numpy(dtype=float)
    table["se"] = table.pop("sd").fillna(0.0).to_numpy() / np.sqrt(n)
    if metric in BOOLEAN_METRICS:
        table["lo"], table["hi"] = _wilson(table["mean"].to_numpy() * n, n)
    else:
        table["lo"], table["hi"] = table["mean"] - 1.959964 * table["se"], table["mean"] + 1.959964 * table["se"]
    table.insert(3, "bucket_index", table["bucket"].map(bucket_index))
    table.insert(0, "metric", metric)
    return _sorted(table, list(dict.fromkeys(results["run"])))


def blocking_effect(results: pd.DataFrame, metric: str = "correct", modes: Sequence[str] = BLOCKING_MODES,
                    frequency_only: bool = False) -> pd.DataFrame:
    """Accuracy per bucket with the routed memory, a blocked subtree, a wrong path and the oracle path.

    `accuracy_by_frequency` over `modes` (those a run has), plus `vs_fetched`: the difference from
    the fetched memory in the same run and bucket (blocking should hurt the long tail most; the
    oracle path bounds what better routing could give). Cloze probes are kept: common knowledge
    should survive blocking.
    """
    table = accuracy_by_frequency(results, metric, modes=modes, frequency_only=frequency_only)
    fetched = table[table["mode"] == "fetched"].set_index(["run", "bucket"])["mean"]
    if fetched.empty:
        raise ValueError("blocking_effect compares against the 'fetched' mode, which no run has (dense runs only?)")
    table = table[table["run"].isin(fetched.index.get_level_values("run"))].copy()
    table["vs_fetched"] = table["mean"].to_numpy() - fetched.reindex(
        pd.MultiIndex.from_frame(table[["run", "bucket"]])).to_numpy()
    return table.reset_index(drop=True)


# ------------------------------------------------------------------------------------ attribution
def _wide(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (run, probe): the probe's attributes and one column per mode holding `metric`."""
    attributes = [c for c in PROBE_COLUMNS if c in results.columns]
    probes = results.drop_duplicates(["run", "probe_id"])[["run", "probe_id", *attributes]]
    scores = results.pivot_table(index=["run", "probe_id"], columns="mode", values=metric, aggfunc="first")
    scores.columns.name = None
    return probes.merge(scores.reset_index(), on=["run", "probe_id"], how="left")


def attribute_knowledge(results: pd.DataFrame, memory_mode: str = "fetched", anchor_mode: str = "none",
                        generic_mode: str = "generic", metric: str = "correct") -> pd.DataFrame:
    """One row per (run, probe) with its scores without memory / with the fetched / the generic
    memory (`anchor`, `memory`, `generic`, booleans) and its `category` (see the module docstring).

    Runs without `memory_mode` (dense models) are left out; a run without the generic mode (a bank
    without generic block) counts every probe as not known by the generic block. Scores are booleans
    (`correct` or `mc_correct`).
    """
    results = _checked(results, metric, boolean=True)
    modes_by_run = results.groupby("run", sort=False)["mode"].agg(set)
    keep = [r for r, modes in modes_by_run.items() if {memory_mode, anchor_mode} <= modes]
    if not keep:
        raise ValueError(f"no run has both modes {anchor_mode!r} and {memory_mode!r}; modes per run: "
                         f"{ {r: sorted(m) for r, m in modes_by_run.items()} }")
    # a probe unscored in either mode cannot be attributed (the evaluator scores every probe in every mode)
    wide = _wide(results[results["run"].isin(keep)], metric).dropna(subset=[anchor_mode, memory_mode])
    a = wide[anchor_mode].eq(True).to_numpy()
    f = wide[memory_mode].eq(True).to_numpy()
    g = wide[generic_mode].eq(True).to_numpy() if generic_mode in wide else np.zeros(len(wide), dtype=bool)
    category = np.select([a & f, a & ~f, ~a & g, ~a & f], ["anchor", "lost", "generic-only", "memory-only"],
                         default="neither")
    out = wide.drop(columns=[c for c in wide.columns if c not in ("run", "probe_id", *PROBE_COLUMNS)])
    out["anchor"], out["memory"], out["generic"] = a, f, g
    out["category"] = pd.Categorical(category, categories=list(CATEGORIES))
    return _sorted(out, keep)


def attribution_shares(attributed: pd.DataFrame, by: str | Sequence[str] | None = "bucket") -> pd.DataFrame:
    """Count and share of each category per run and `by` group (e.g. 'bucket', 'relation', 'group';
    None: per run). Every category appears in every group (count 0 when empty); shares sum to 1."""
    by = [] if by is None else [by] if isinstance(by, str) else list(by)
    keys = ["run", *by]
    counts = (attributed.groupby(keys + ["category"], sort=False, observed=False).size()
              .rename("count").reset_index())
    # observed=False yields every category but also key combinations that never occur: drop those
    present = attributed[keys].drop_duplicates()
    counts = counts.merge(present, on=keys, how="inner")
    counts["total"] = counts.groupby(keys, sort=False)["count"].transform("sum")
    counts["share"] = counts["count"] / counts["total"]
    counts["category"] = pd.Categorical(counts["category"].astype(str), categories=list(CATEGORIES))
    runs = list(dict.fromkeys(attributed["run"]))
    return _sorted(counts, runs, extra=[*by, "category"])


# ------------------------------------------------------------------------------------ paired gains
def _bootstrap_mean(diff: np.ndarray, n_boot: int, ci: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile CI of the mean of `diff` over probes resampled with replacement."""
    if len(diff) == 1 or n_boot == 0:
        return float(diff.mean()), float(diff.mean())
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    return float(np.quantile(means, (1 - ci) / 2)), float(np.quantile(means, 1 - (1 - ci) / 2))


def memory_gain(results: pd.DataFrame, metric: str = "correct", memory_mode: str = "fetched",
                baselines: Sequence[str] = ("none", "generic"), by: str | Sequence[str] = ("bucket", "group"),
                n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Paired gain `memory_mode` - baseline per run, for each grouping column in `by` and overall.

    Columns: run, baseline, by (the grouping column, or 'all'), key (its value), n (probes),
    memory, base (mean metric), gain and its bootstrap CI lo/hi (probes resampled with
    replacement, `n_boot` times, level `ci`). The same probes are scored in every mode, so the
    difference is taken per probe before averaging. Baselines a run lacks are skipped.
    """
    results = _checked(results, metric)
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    by = [by] if isinstance(by, str) else list(by)
    wide = _wide(results, metric)
    rng = np.random.default_rng(seed)
    rows = []
    for run, part in wide.groupby("run", sort=False):
        if memory_mode not in part or part[memory_mode].isna().all():
            continue
        for baseline in baselines:
            if baseline not in part or part[baseline].isna().all():
                continue
            pair = part.dropna(subset=[memory_mode, baseline])
            groups = [("all", "all", pair)] + [(col, key, sub) for col in by
                                               for key, sub in pair.groupby(col, sort=False)]
            for col, key, sub in groups:
                mem, base = sub[memory_mode].astype(float).to_numpy(), sub[baseline].astype(float).to_numpy()
                lo, hi = _bootstrap_mean(mem - base, n_boot, ci, rng)
                rows.append({"run": run, "baseline": baseline, "by": col, "key": str(key), "n": len(sub),
                             "memory": mem.mean(), "base": base.mean(), "gain": (mem - base).mean(),
                             "lo": lo, "hi": hi})
    if not rows:
        raise ValueError(f"no run has {memory_mode!r} together with any of the baselines {list(baselines)}")
    table = pd.DataFrame(rows)
    table.insert(0, "metric", metric)
    # within each grouping column, buckets by exposure; other keys as first seen
    order = {b: i for i, b in enumerate(bucket_order(table.loc[table["by"] == "bucket", "key"]))}
    table["_k"] = [order.get(k, -1) if b == "bucket" else 0 for b, k in zip(table["by"], table["key"])]
    by_rank = {c: i for i, c in enumerate(["all", *by])}
    runs = {r: i for i, r in enumerate(dict.fromkeys(table["run"]))}
    table = table.sort_values(["run", "baseline", "by", "_k"], kind="stable",
                              key=lambda s: s.map(runs) if s.name == "run" else s.map(by_rank) if s.name == "by"
                              else s.map({b: i for i, b in enumerate(baselines)}) if s.name == "baseline" else s)
    return table.drop(columns="_k").reset_index(drop=True)


def level_contribution(results: pd.DataFrame, metric: str = "correct", base_mode: str = "fetched",
                       by: str = "bucket", n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Accuracy drop when one memory level is dropped: `base_mode` - drop-level<l>, per level and `by`.

    Columns: run, level, by, key, n, base (accuracy with every level), dropped, drop and its
    bootstrap CI lo/hi. A large drop at level l means level l's blocks hold the knowledge.
    """
    drops = mode_order(m for m in results["mode"].unique() if _DROP_LEVEL.match(m))
    if not drops:
        raise ValueError("no drop-level<l> modes in the results (evaluate with level_ablation=True)")
    gains = memory_gain(results, metric, memory_mode=base_mode, baselines=drops, by=by, n_boot=n_boot, ci=ci,
                        seed=seed)
    gains.insert(2, "level", gains.pop("baseline").map(lambda m: int(_DROP_LEVEL.match(m).group(1))))
    return gains.rename(columns={"memory": "base", "base": "dropped", "gain": "drop"})


# ------------------------------------------------------------------------------------ plots
def _panels(n: int, width: float = 4.2, height: float = 3.6, max_cols: int = 3, sharey: bool = True):
    """A Figure with one axes per panel (wrapped in rows of `max_cols`), y shared unless told."""
    import seaborn as sns
    from matplotlib.figure import Figure

    from .plots import STYLE
    cols = min(n, max_cols)
    rows = -(-n // cols)
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _metric_label(data: pd.DataFrame) -> str:
    from .plots import axis_label
    return axis_label(str(data["metric"].iloc[0]))


def _points_with_ci(data: pd.DataFrame, path: str | Path, *, x: str, y: str, hue: str, x_order: list[str],
                    ylabel: str, title: str, zero_line: bool = False, connect: bool = True):
    """One panel per run: `y` against categorical `x` with lo/hi error bars, one series per `hue`
    (dodged so overlapping intervals stay readable; joined by lines when `connect`, i.e. when `x`
    is an ordered scale such as exposure buckets); writes PNG + the CSV of `data`."""
    import seaborn as sns

    from .plots import save_figure
    runs = list(dict.fromkeys(data["run"]))
    series = list(dict.fromkeys(data[hue]))
    colors = dict(zip(series, sns.color_palette("tab10", len(series))))
    fig, axes = _panels(len(runs))
    width = 0.6 / max(len(series), 1)
    positions = {k: i for i, k in enumerate(x_order)}
    for ax, run in zip(axes, runs):
        part = data[data["run"] == run]
        for j, name in enumerate(series):
            s = part[part[hue] == name]
            if s.empty:
                continue
            xs = s[x].map(positions).to_numpy() + (j - (len(series) - 1) / 2) * width
            yerr = [np.clip(s[y] - s["lo"], 0, None), np.clip(s["hi"] - s[y], 0, None)]
            ax.errorbar(xs, s[y], yerr=yerr, marker="o", ms=4, lw=1, capsize=2, color=colors[name], label=str(name),
                        ls="-" if connect else "none")
        if zero_line:
            ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(x_order)), x_order, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(x_order) - 0.5)  # every panel shows every key, even a run lacking some
        ax.set(title=str(run), xlabel="", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, data, path)


def plot_accuracy_by_frequency(table: pd.DataFrame, path: str | Path, modes: Sequence[str] | None = None):
    """The Kandpal curve per run: mean metric per exposure bucket (rarest left), one line per mode."""
    data = table if modes is None else table[table["mode"].isin(modes)]
    if data.empty:
        raise ValueError(f"no rows for modes {modes}")
    return _points_with_ci(data.reset_index(drop=True), path, x="bucket", y="mean", hue="mode",
                           x_order=bucket_order(data["bucket"]), ylabel=f"{_metric_label(data)} (share of probes)",
                           title="accuracy by exposure bucket (95% CI)")


def exposure_curve(results: pd.DataFrame, series: Mapping[str, tuple[str, str]], metric: str = "correct",
                   group: str | None = None) -> pd.DataFrame:
    """The paper's Figure 1 (right) as a table: `metric` per exposure bucket for chosen (run, mode)
    series, e.g. {"anchor": ("anchor", "none"), "memory, fetched": ("memory-frozen", "fetched")}, with
    Wilson 95% CIs and each bucket's median exposures (the x axis). `group` ("SK"/"CK") keeps one group.
    Columns: series, run, mode, bucket, exposures (median), n, mean, lo, hi, metric."""
    frames = []
    for label, (run, mode) in series.items():
        part = results[(results["run"] == run) & (results["mode"] == mode)]
        if group is not None:
            part = part[part["group"] == group]
        if part.empty:
            continue
        table = accuracy_by_frequency(part, metric)
        median = part.groupby("bucket")["exposures"].median()
        frames.append(table.assign(series=label, exposures=table["bucket"].map(median)))
    if not frames:
        raise ValueError(f"none of the series {dict(series)} has probe rows")
    out = pd.concat(frames, ignore_index=True)
    return out[["series", "run", "mode", "bucket", "exposures", "n", "mean", "lo", "hi", "metric"]]


def plot_exposure_curve(table: pd.DataFrame, path: str | Path, title: str = "accuracy by exposures"):
    """`exposure_curve` on one axes: accuracy (%) against exposures in training (log scale), one line
    per series with its 95% Wilson interval, legend outside the data. Writes PNG + CSV."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .plots import save_figure
    names = list(dict.fromkeys(table["series"]))
    colors = dict(zip(names, sns.color_palette("colorblind", len(names))))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, name in enumerate(names):
        s = table[table["series"] == name].sort_values("exposures")
        x = s["exposures"].to_numpy(dtype=float) * (1 + 0.03 * (i - (len(names) - 1) / 2))  # dodge on log x
        y, lo, hi = 100 * s["mean"], 100 * s["lo"], 100 * s["hi"]
        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], marker="o", ms=4, lw=1.2,
                    capsize=2, color=colors[name], label=name)
    ax.set_xscale("log")
    ticks = sorted(table["exposures"].dropna().unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    metric = str(table["metric"].iloc[0])
    label = {"correct": "greedy exact match", "rank_correct": "answer ranked first", "mc_correct": "4-way choice"}
    import textwrap
    ax.set(xlabel="exposures of the fact in training (median of bucket, log scale)",
           ylabel=f"accuracy, {label.get(metric, metric)} (%)", ylim=(0, 100))
    ax.set_title(textwrap.fill(title, 60), fontsize=10)  # wrapped: a long title must not be clipped
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return save_figure(fig, table, path)


def plot_blocking(table: pd.DataFrame, path: str | Path):
    """`blocking_effect` per run: routed, blocked, wrong and oracle paths (and no memory) by bucket."""
    return _points_with_ci(table.reset_index(drop=True), path, x="bucket", y="mean", hue="mode",
                           x_order=bucket_order(table["bucket"]), ylabel=f"{_metric_label(table)} (share of probes)",
                           title="memory paths: routed, blocked subtree, wrong, oracle (95% CI)")


def _key_order(data: pd.DataFrame, by: str) -> list:
    """x order of a per-key table: buckets rarest first (else first-seen order), then "all"."""
    keys = data.loc[data["by"] == by, "key"]
    return (bucket_order(keys) if by == "bucket" else list(dict.fromkeys(keys))) + ["all"]


def plot_memory_gain(gains: pd.DataFrame, path: str | Path, by: str = "bucket"):
    """`memory_gain` per run: gain over each baseline with bootstrap CI, per `by` key and overall."""
    data = gains[gains["by"].isin([by, "all"])].reset_index(drop=True)
    order = _key_order(data, by)
    return _points_with_ci(data, path, x="key", y="gain", hue="baseline", x_order=order,
                           ylabel=f"gain in {_metric_label(data)} (difference in share of probes)",
                           zero_line=True, connect=False,
                           title="fetched memory minus baseline (bootstrap 95% CI)")


def plot_level_contribution(table: pd.DataFrame, path: str | Path, by: str = "bucket"):
    """`level_contribution` per run: accuracy lost when each level is dropped, per `by` key and overall."""
    data = table[table["by"].isin([by, "all"])].reset_index(drop=True)
    data = data.assign(series=data["level"].map(lambda l: f"level {l}"))
    order = _key_order(data, by)
    return _points_with_ci(data, path, x="key", y="drop", hue="series", x_order=order,
                           ylabel=f"drop in {_metric_label(data)} (difference in share of probes)",
                           zero_line=True, connect=False,
                           title="contribution of each memory level (bootstrap 95% CI)")


def plot_attribution(shares: pd.DataFrame, path: str | Path, by: str = "bucket"):
    """Stacked shares of the attribution categories per `by` key, one panel per run."""
    import seaborn as sns

    from .plots import save_figure
    data = shares.reset_index(drop=True)
    runs = list(dict.fromkeys(data["run"]))
    order = bucket_order(data[by]) if by == "bucket" else list(dict.fromkeys(data[by]))
    colors = dict(zip(CATEGORIES, sns.color_palette("Set2", len(CATEGORIES))))
    fig, axes = _panels(len(runs))
    for ax, run in zip(axes, runs):
        wide = (data[data["run"] == run].pivot_table(index=by, columns="category", values="share", observed=False)
                .reindex(index=[k for k in order if k in set(data.loc[data["run"] == run, by])],
                         columns=list(CATEGORIES)).fillna(0.0))
        bottom = np.zeros(len(wide))
        for category in CATEGORIES:
            ax.bar(range(len(wide)), wide[category], bottom=bottom, color=colors[category], label=category)
            bottom += wide[category].to_numpy()
        ax.set_xticks(range(len(wide)), list(wide.index), rotation=30, ha="right", fontsize=8)
        ax.set(title=str(run), ylabel="share of probes", ylim=(0, 1))
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("where knowledge lives: anchor, fetched memory, generic block", fontsize=10)
    return save_figure(fig, data, path)


def plot_against_size(runs: pd.DataFrame, path: str | Path, x: str = "fetched_params",
                      y: Sequence[str] = ("loss", "avg_sk", "avg_ck"), hue: str | None = "bank_params"):
    """Per-run metrics (held-out loss, Avg-SK/CK accuracy, ...) against a size column, one panel
    per metric, runs of equal `hue` joined in order of `x` (e.g. accuracy against fetched size per
    bank size). Rows with x <= 0 (dense runs against fetched size) cannot sit on the log axis and
    are left out; metrics the table lacks or holds only NaN for are skipped."""
    import seaborn as sns

    from .plots import axis_label, hue_map, log_axis, save_figure
    data = runs[runs[x] > 0].reset_index(drop=True)
    handles: list = []
    metrics = [m for m in y if m in data and data[m].notna().any()]
    if data.empty or not metrics:
        raise ValueError(f"nothing to plot: no run with {x} > 0 and any of {list(y)}")
    keep = list(dict.fromkeys([c for c in ("run_id", "label", "kind") if c in data] + [x, *metrics]
                              + ([hue] if hue else [])))
    data = data[keep].sort_values(x, kind="stable").reset_index(drop=True)
    hue_kw = hue_map(data, hue) if hue else {}
    fig, axes = _panels(len(metrics), max_cols=len(metrics), sharey=False)
    for ax, metric in zip(axes, metrics):
        sns.lineplot(data=data, x=x, y=metric, marker="o", ax=ax, estimator=None, sort=True,
                     **({"units": hue_kw["hue"]} if hue else {}), **hue_kw)
        log_axis(ax)
        ax.set(xlabel=f"{axis_label(x)} (log scale)", ylabel=axis_label(metric), title=axis_label(metric))
        if ax.get_legend() is not None:  # one legend for all panels, beside them (never on the data)
            handles, labels = ax.get_legend_handles_labels()
            ax.get_legend().remove()
    if hue and handles:
        fig.legend(handles, labels, title=axis_label(hue), loc="outside right upper", fontsize=8, title_fontsize=8)
    fig.suptitle(f"per-run metrics against {axis_label(x)}", fontsize=10)
    return save_figure(fig, data, path)
