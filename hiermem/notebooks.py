"""Notebooks as a pipeline: execute the thin analysis notebooks with papermill; strip and check them.

The notebooks in `notebooks/` are committed without outputs. Each is a short sequence of one-line
calls into `hiermem` and `analysis`, with one cell tagged `parameters` that sets at least `scale`
(a name of `hiermem.scales`: "smoke" runs end to end on a CPU in minutes, "small" is the CPU study on
`make demo`'s runs and the shipped sweeps) and `out_dir` (where its tables and figures go, each figure
as PNG + the CSV it plots). A fresh clone runs every notebook at smoke scale with nothing but the
repository and its installed packages.

    run_notebook("chinchilla_check")          # -> results/notebooks/chinchilla_check.ipynb (executed)
    run_all(scale="small")                    # every notebook

`run_notebook` injects `scale`, `out_dir` = <out>/<name>/ and any other parameters, executes the
notebook with the repository root as working directory (so the notebooks' relative defaults such as
`data` and `analysis/reference/...` resolve the same way from anywhere), writes the executed copy beside
that folder, and records parameters, timing and git SHA in <out>/<name>/run.json. A failing cell
raises `NotebookError` naming the cell; the executed copy with the traceback is still written.
`run_all` goes on after a failing notebook and returns every outcome (`fail_fast=True` stops at the
first failure).

Command line (`hiermem notebooks ...`):

    list                                          names, titles and parameters
    run [NAME ...] [--scale smoke|small] [--out DIR] [-p key=value ...] [--fail-fast]
    strip                                         remove outputs from notebooks/*.ipynb (before committing)
    check                                         fail if a committed notebook has outputs or no parameters cell
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import nbformat
import pandas as pd
import yaml

from hiermem.io import atomic_path, atomic_write_json, atomic_write_text
from hiermem.provenance import git_sha
from hiermem.scales import accepted, check

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
SCALES = accepted("notebooks")  # smoke, small (hiermem.scales); the demo's scales of the same names
KERNEL_NAME = "python3"  # the ipykernel of the running environment (jupyter_client maps `python` to sys.executable)
REQUIRED_PARAMETERS = ("scale", "out_dir")


T = TypeVar("T")


class NotebookError(RuntimeError):
    """A notebook failed; the one-line message names the notebook, the cell and the executed copy."""


def _one_line(text: object, width: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


# ------------------------------------------------------------------------------------ discovery
def list_notebooks(directory: str | Path = NOTEBOOK_DIR) -> list[str]:
    """Names (file stems) of the notebooks in `directory`, sorted."""
    return sorted(p.stem for p in Path(directory).glob("*.ipynb"))


def notebook_path(name: str, directory: str | Path = NOTEBOOK_DIR) -> Path:
    """The source notebook for `name` (with or without .ipynb); a clear error lists the others."""
    path = Path(directory) / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    if not path.is_file():
        available = ", ".join(list_notebooks(directory))
        raise FileNotFoundError(f"no notebook {name!r} in {directory}; available: {available}")
    return path


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    return next((c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None)


def notebook_parameters(name: str, directory: str | Path = NOTEBOOK_DIR) -> dict[str, str]:
    """The parameters a notebook declares: name -> default expression, as written in its parameters cell."""
    cell = _parameters_cell(nbformat.read(notebook_path(name, directory), as_version=4))
    if cell is None:
        return {}
    out = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and node.value is not None:
                    out[target.id] = ast.get_source_segment(cell.source, node.value)
    return out


def notebook_title(name: str, directory: str | Path = NOTEBOOK_DIR) -> str:
    """The first markdown heading of a notebook (its one-line description)."""
    nb = nbformat.read(notebook_path(name, directory), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


# ------------------------------------------------------------------------------------ execution
def run_notebook(name: str, out_dir: str | Path = "results/notebooks", parameters: Mapping[str, Any] | None = None,
                 scale: str = "smoke", directory: str | Path = NOTEBOOK_DIR, log_output: bool = False,
                 timeout: int | None = None) -> Path:
    """Execute notebook `name` with papermill into <out_dir>/<name>.ipynb and return that path.

    Injected parameters: `scale`, `out_dir` = <out_dir>/<name> (absolute), then `parameters`
    (which may override both). `log_output` streams cell output to this process's log; `timeout`
    limits each cell (seconds). Relative `out_dir` is relative to the current directory.
    """
    import papermill

    check(scale, "notebooks")
    source = notebook_path(name, directory)
    name = source.stem
    if scale not in notebook_scales(name):
        raise ValueError(f"notebook {name!r} has no recipe for scale {scale!r}; it runs at: "
                         f"{', '.join(notebook_scales(name))}")
    out = Path(out_dir).resolve()
    params = {"scale": scale, "out_dir": str(out / name), **dict(parameters or {})}
    Path(params["out_dir"]).mkdir(parents=True, exist_ok=True)
    executed = out / f"{name}.ipynb"
    tic = time.perf_counter()
    try:
        papermill.execute_notebook(str(source), str(executed), parameters=params, kernel_name=KERNEL_NAME,
                                   cwd=str(REPO_ROOT), progress_bar=False, log_output=log_output,
                                   execution_timeout=timeout)
    except papermill.PapermillExecutionError as e:
        raise NotebookError(f"notebook {name!r} failed in cell {e.exec_count} ({e.ename}: {_one_line(e.evalue)}); "
                            f"the executed copy with the traceback is {executed}") from e
    seconds = time.perf_counter() - tic
    atomic_write_json(Path(params["out_dir"]) / "run.json",
                      {"notebook": name, "parameters": params, "seconds": round(seconds, 1),
                       "executed": str(executed), "git_sha": git_sha(REPO_ROOT)})
    return executed


NOTEBOOK_SCALES = {"paper_figures": ("smoke", "study"), "scaling_memory": ("smoke", "small", "study"),
                   "scaling_depth_anchor": ("smoke", "small", "study")}  # the others: smoke and small
DEFAULT_SCALES = ("smoke", "small")


def notebook_scales(name: str) -> tuple[str, ...]:
    """The scales notebook `name` has a recipe for."""
    return NOTEBOOK_SCALES.get(name, DEFAULT_SCALES)


def run_all(names: Iterable[str] | None = None, out_dir: str | Path = "results/notebooks",
            parameters: Mapping[str, Any] | None = None, scale: str = "smoke", directory: str | Path = NOTEBOOK_DIR,
            fail_fast: bool = False, log_output: bool = False) -> dict[str, Path | NotebookError]:
    """Run several notebooks (default: all) in name order; returns name -> executed copy, or the
    `NotebookError` of a notebook that failed.

    A failing notebook (a cell that raises, a dead kernel, a timeout) is recorded and the rest still
    run; with `fail_fast` the first failure raises instead. Unknown names and scales are refused
    before anything runs.
    """
    check(scale, "notebooks")
    if names is None:  # every notebook with a recipe at this scale
        names = [n for n in list_notebooks(directory) if scale in notebook_scales(n)]
        skipped = [n for n in list_notebooks(directory) if scale not in notebook_scales(n)]
        if skipped:
            print(f"[notebooks] scale {scale}: skipping {', '.join(skipped)} (no recipe at this scale)", flush=True)
    else:
        names = [notebook_path(n, directory).stem for n in names]
        for n in names:
            if scale not in notebook_scales(n):
                raise ValueError(f"notebook {n!r} has no recipe for scale {scale!r}; it runs at: "
                                 f"{', '.join(notebook_scales(n))}")
    out: dict[str, Path | NotebookError] = {}
    for name in names:
        started = time.perf_counter()
        print(f"[notebooks] {name} (scale={scale}) ...", flush=True)
        try:
            out[name] = run_notebook(name, out_dir, parameters, scale, directory, log_output)
        except Exception as e:  # noqa: BLE001 - one notebook's failure must not stop the others
            error = e if isinstance(e, NotebookError) else NotebookError(
                f"notebook {name!r} failed ({type(e).__name__}: {_one_line(e)})")
            if fail_fast:
                if error is e:
                    raise
                raise error from e
            out[name] = error
            print(f"[notebooks] {name} FAILED: {error}", flush=True)
            continue
        print(f"[notebooks] {name}: {time.perf_counter() - started:.0f} s -> {out[name]}", flush=True)
    return out


def save_table(frame: pd.DataFrame, path: str | Path, index: bool = False) -> pd.DataFrame:
    """Write `frame` as CSV atomically (creating folders) and return it, so a notebook cell both
    saves a table and shows it."""
    path = Path(path)
    with atomic_path(path if path.suffix else path.with_suffix(".csv")) as tmp:
        frame.to_csv(tmp, index=index)
    return frame


def attempt(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`fn(*args, **kwargs)`, or None with the reason printed when it raises ValueError.

    At smoke scale a fit can be underdetermined (too few runs, a curve that does not decrease), and
    the analysis library says so with a ValueError; the notebook prints why and carries on, so it
    still runs end to end. A step whose input was skipped (None) is skipped too.
    """
    name = getattr(fn, "__name__", repr(fn))
    if any(a is None for a in args):
        print(f"skipped {name}: it needs the result of a step that was skipped")
        return None
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        print(f"skipped {name}: {e}")
        return None


def ensure_demo(scale: str = "smoke", data_root: str = "data", runs_dir: str | Path = "runs/demo-smoke"
                ) -> dict[str, Path]:
    """The demo's evaluated runs under `runs_dir` (name -> run directory), running the demo if needed.

    When every run of the demo at this scale is finished and evaluated they are reused as they are;
    otherwise `hiermem.demo.run_demo` trains what is missing and (re-)evaluates every run (the
    expensive part), writing its summary table to RUNS_DIR/summary.csv.
    """
    from hiermem.demo import SCALES, run_demo
    from hiermem.rundir import RunDir

    cfg = SCALES[check(scale, "demo")]
    cfg = cfg.replace(data=cfg.data.replace(root=data_root))
    runs = Path(runs_dir)
    dirs = {name: runs / name for name in cfg.runs}
    if all(RunDir(d).is_finished and RunDir(d).is_evaluated for d in dirs.values()):
        print(f"reusing the finished and evaluated demo runs in {runs}")
    else:
        run_demo(cfg, str(runs), str(runs), progress=False)
    return dirs


def sweep_spec(spec: str | Path, data_root: str | None = None, **fields: Any):
    """A sweep spec (`hiermem.sweep.SweepSpec`) read from YAML, with top-level `fields` replaced
    (`name`, `axes`, `dense_ladder`, `eval`, ...; None keeps the file's) and, with `data_root`, its
    data under that root, so a notebook can shrink or redirect a shipped sweep from its parameters."""
    from hiermem.sweep import SweepSpec, load_spec

    data = load_spec(spec).to_dict()
    data.update({k: v for k, v in fields.items() if v is not None})
    if data_root is not None:
        base = dict(data.get("base") or {})
        base["data"] = {**(base.get("data") or {}), "root": data_root}
        data["base"] = base
    return SweepSpec.from_dict(data)


# ------------------------------------------------------------------------------------ strip / check
def strip_outputs(path: str | Path) -> bool:
    """Remove outputs, execution counts and papermill/widget metadata from one notebook in place.

    Returns whether the file changed. Cell tags (the `parameters` tag) are kept.
    """
    path = Path(path)
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        for key in ("papermill", "execution", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    for key in ("papermill", "widgets"):
        nb.metadata.pop(key, None)
    after = nbformat.writes(nb)
    after = after if after.endswith("\n") else after + "\n"  # as nbformat.write does
    if after == before:
        return False
    atomic_write_text(path, after)
    return True


def strip_notebooks(directory: str | Path = NOTEBOOK_DIR) -> list[Path]:
    """Strip every notebook in `directory`; returns those that changed."""
    return [p for p in sorted(Path(directory).glob("*.ipynb")) if strip_outputs(p)]


def check_notebook(path: str | Path) -> list[str]:
    """Problems that keep a notebook from being committed: outputs, execution counts, papermill
    leftovers, a missing `parameters` cell or one that does not set every required parameter."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.outputs:
            problems.append(f"{path.name}: cell {i} has outputs (run `hiermem notebooks strip`)")
        if cell.execution_count is not None:
            problems.append(f"{path.name}: cell {i} has an execution count (run `hiermem notebooks strip`)")
        if "injected-parameters" in cell.metadata.get("tags", []):
            problems.append(f"{path.name}: cell {i} is papermill's injected-parameters cell (an executed copy?)")
    cell = _parameters_cell(nb)
    if cell is None:
        problems.append(f"{path.name}: no cell tagged 'parameters' (papermill would inject at the top)")
    else:
        declared = notebook_parameters(path.stem, path.parent)
        missing = [p for p in REQUIRED_PARAMETERS if p not in declared]
        if missing:
            problems.append(f"{path.name}: the parameters cell does not set {missing}")
    return problems


def check_notebooks(directory: str | Path = NOTEBOOK_DIR) -> list[str]:
    """`check_notebook` over every notebook in `directory` (an empty directory is a problem too)."""
    paths = sorted(Path(directory).glob("*.ipynb"))
    if not paths:
        return [f"no notebooks in {directory}"]
    return [problem for p in paths for problem in check_notebook(p)]


# ------------------------------------------------------------------------------------ CLI
def _parse_parameters(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML scalars (5 -> int, true -> bool, a/b -> str)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"parameters are key=value with a Python name as key, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def _short(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _cmd_list(args: argparse.Namespace) -> int:
    for name in list_notebooks():
        params = ", ".join(f"{k}={_short(v)}" for k, v in notebook_parameters(name).items())
        print(f"{name:24s} {notebook_title(name)}\n{'':24s} parameters: {params}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        results = run_all(args.names or None, args.out, _parse_parameters(args.param), args.scale,
                          directory=NOTEBOOK_DIR, fail_fast=args.fail_fast, log_output=args.log_output)
    except NotebookError as e:
        print(f"hiermem notebooks run: stopped (--fail-fast): {e}", file=sys.stderr)
        return 1
    failed = {n: r for n, r in results.items() if isinstance(r, NotebookError)}
    if failed:
        print(f"hiermem notebooks run: {len(failed)} of {len(results)} notebooks failed:", file=sys.stderr)
        for name, error in failed.items():
            print(f"  {name}: {_one_line(error, 1000)}", file=sys.stderr)
        return 1
    print(f"[notebooks] all {len(results)} notebooks ran (scale={args.scale}) -> {args.out}", flush=True)
    return 0


def _cmd_strip(args: argparse.Namespace) -> int:
    changed = strip_notebooks()
    print("\n".join(f"stripped {p}" for p in changed) or "every notebook is already clean")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    problems = check_notebooks()
    print("\n".join(problems) or f"{len(list_notebooks())} notebooks: no outputs, parameters cells present")
    return 1 if problems else 0


CLI_DESCRIPTION = """\
Execute the analysis notebooks in notebooks/ with papermill; strip and check them before committing.

Each notebook has a `parameters` cell setting at least `scale` and `out_dir`; `run` injects them (and
any -p KEY=VALUE), executes the notebook from the repository root and writes the executed copy to
OUT/NAME.ipynb, its tables and figures (PNG + the CSV each plots) and run.json to OUT/NAME/.
`run` goes on after a failing notebook and ends with a list of every failure (exit status 1);
--fail-fast stops at the first. A fresh clone runs every notebook at smoke scale with no other files.

    hiermem notebooks list                                 names, titles and parameters
    hiermem notebooks run [NAME ...] [--scale smoke|small] [--out DIR] [-p KEY=VALUE ...] [--fail-fast]
    hiermem notebooks strip                                remove outputs from notebooks/*.ipynb
    hiermem notebooks check                                fail if a notebook has outputs or no parameters cell
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("notebooks", help="execute the analysis notebooks with papermill; strip and check them",
                       description=CLI_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    nsub = p.add_subparsers(dest="notebooks_command", metavar="ACTION", required=True)
    nsub.add_parser("list", help="names, titles and parameters").set_defaults(func=_cmd_list)
    run = nsub.add_parser("run", help="execute notebooks (default: all) into --out")
    run.add_argument("names", nargs="*", metavar="NAME", help="notebook names (default: every notebook)")
    run.add_argument("--scale", default="smoke", choices=SCALES,
                     help="smoke (default): minutes on a CPU; small: the CPU study (make demo's runs, the "
                          "shipped sweeps)")
    run.add_argument("--out", default="results/notebooks",
                     help="executed copies and per-notebook outputs (default: results/notebooks)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="extra notebook parameter (repeatable), e.g. -p bootstrap=50")
    run.add_argument("--fail-fast", action="store_true",
                     help="stop at the first failing notebook (default: run them all, then list the failures)")
    run.add_argument("--log-output", action="store_true", help="stream cell output while running")
    run.set_defaults(func=_cmd_run)
    nsub.add_parser("strip", help="remove outputs from notebooks/*.ipynb").set_defaults(func=_cmd_strip)
    nsub.add_parser("check", help="fail if a notebook has outputs or no parameters cell").set_defaults(func=_cmd_check)
