"""Notebooks: committed clean with a parameters cell, and executed end to end by papermill at smoke scale."""

import json
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from hiermem.cli import main
from hiermem.demo import RUNS
from hiermem.notebooks import (NOTEBOOK_DIR, NotebookError, attempt, check_notebook, check_notebooks, list_notebooks,
                               notebook_parameters, run_notebook, strip_outputs)

EXPECTED = {"chinchilla_check", "knowledge_attribution", "scaling_memory", "scaling_depth_anchor", "paper_figures"}
CHINCHILLA = Path(__file__).resolve().parents[1] / "analysis" / "reference" / "chinchilla_svg_extracted.csv"


def _files(folder: Path, *names: str) -> None:
    """Each figure as PNG + the CSV it plots, each table as CSV, all non-empty."""
    for name in names:
        path = folder / name
        assert path.is_file() and path.stat().st_size > 0, f"missing {path}"
        if path.suffix == ".png":
            assert path.read_bytes()[:4] == b"\x89PNG"
            assert len(pd.read_csv(path.with_suffix(".csv"))) > 0
        elif path.suffix == ".csv":
            assert len(pd.read_csv(path)) > 0


def _executed_ok(executed: Path, out: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(executed, as_version=4)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and str(out) in injected[0].source
    assert json.loads((out / "run.json").read_text())["parameters"]["out_dir"] == str(out)
    return nb


# ------------------------------------------------------------------------------ committed notebooks
def test_committed_notebooks_are_clean_and_parameterised():
    assert EXPECTED <= set(list_notebooks())
    assert check_notebooks() == []
    for name in list_notebooks():
        params = notebook_parameters(name)
        assert params["scale"] == '"smoke"' and f"results/notebooks/{name}" in params["out_dir"]


def test_check_and_strip_catch_what_must_not_be_committed(tmp_path):
    path = tmp_path / "nb.ipynb"
    shutil.copy(NOTEBOOK_DIR / "chinchilla_check.ipynb", path)
    assert check_notebook(path) == []
    nb = nbformat.read(path, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    code.outputs = [nbformat.v4.new_output("stream", text="hello")]
    code.execution_count = 3
    nbformat.write(nb, path)
    problems = check_notebook(path)
    assert any("has outputs" in p for p in problems) and any("execution count" in p for p in problems)
    assert strip_outputs(path) is True and check_notebook(path) == [] and strip_outputs(path) is False
    nb = nbformat.read(path, as_version=4)
    next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).metadata["tags"] = []
    nbformat.write(nb, path)
    assert any("no cell tagged 'parameters'" in p for p in check_notebook(path))


def test_attempt_prints_why_a_step_was_skipped(capsys):
    def underdetermined():
        raise ValueError("too few points")
    assert attempt(underdetermined) is None and attempt(len, None) is None and attempt(len, [1, 2]) == 2
    out = capsys.readouterr().out
    assert "skipped underdetermined: too few points" in out and "skipped len" in out
    with pytest.raises(TypeError):  # only the library's 'cannot be determined' errors are tolerated
        attempt(len, 3)


def test_a_failing_cell_names_the_cell_and_keeps_the_executed_copy(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('scale = "smoke"\nout_dir = "x"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("raise ValueError('broken on purpose')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "src").mkdir()
    nbformat.write(nb, tmp_path / "src" / "broken.ipynb")
    with pytest.raises(NotebookError, match="broken.*ValueError: broken on purpose") as err:
        run_notebook("broken", tmp_path / "out", directory=tmp_path / "src")
    assert (tmp_path / "out" / "broken.ipynb").is_file() and "broken.ipynb" in str(err.value)


def test_cli_list_and_errors(capsys):
    assert main(["notebooks", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPECTED) and "scale=" in out
    assert main(["notebooks", "check"]) == 0
    assert main(["notebooks", "run", "no_such_notebook"]) == 1
    assert "no notebook 'no_such_notebook'" in capsys.readouterr().err
    assert main(["notebooks", "run", "chinchilla_check", "-p", "not a pair"]) == 1


# ------------------------------------------------------------------------------ executed at smoke scale
def test_chinchilla_notebook_end_to_end_through_the_cli(tmp_path, capsys):
    assert CHINCHILLA.is_file()  # shipped in the repository: the notebook's default needs nothing else
    assert main(["notebooks", "run", "chinchilla_check", "--out", str(tmp_path)]) == 0
    out = tmp_path / "chinchilla_check"
    _executed_ok(tmp_path / "chinchilla_check.ipynb", out)
    _files(out, "tables/parameters.csv", "tables/isoflop_optima.csv", "fit.png", "isoflop.png", "bootstrap.png")
    params = pd.read_csv(out / "tables" / "parameters.csv").set_index("param")
    assert params.loc[["E", "alpha", "beta"], "besiroglu_in_ci"].all()
    assert abs(params.loc["E", "estimate"] - 1.817) < 0.02
    assert len(pd.read_csv(out / "bootstrap.csv")) == 50  # the smoke scale's bootstrap size
    assert "chinchilla_check (scale=smoke)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def evaluated_runs(smoke_data_config, pretrained_anchor, tmp_path_factory):
    """A dense anchor and a co-trained memory run on it, both evaluated with few probes."""
    from hiermem.config import MemoryConfig
    from hiermem.evaluate import EvalConfig, evaluate_run
    from hiermem.train import TrainConfig, train
    root = tmp_path_factory.mktemp("runs")
    anchor = shutil.copytree(pretrained_anchor, root / "anchor")  # evaluate a copy: the fixture is shared
    cfg = TrainConfig(stage="memory-cotrain", anchor="tiny-d1", data=smoke_data_config, init_from=str(anchor),
                      memory=MemoryConfig(multipliers=(8, 2), branching=4), tokens=8 * 4 * 128, batch_size=4,
                      optim=TrainConfig().optim.replace(bank_lr=0.05))
    memory = train(cfg, root / "memory", progress=False)
    eval_cfg = EvalConfig(max_probes_per_relation=5, heldout_docs_per_source=5, max_new_tokens=4, mc_candidates=4)
    for run in (anchor, memory):
        evaluate_run(run, eval_cfg)
    return {"anchor": str(anchor), "memory-cotrain": str(memory)}


KNOWLEDGE_FILES = ("tables/summary.csv", "figure1_accuracy_by_exposures.png", "tables/figure1_accuracy_by_exposures.csv",
                   "tables/claims.csv", "accuracy_by_frequency.png", "attribution_by_bucket.png", "memory_gain.png",
                   "blocking.png", "level_contribution.png", "tables/accuracy_by_frequency.csv",
                   "tables/attribution_per_probe.csv", "tables/attribution_by_group.csv",
                   "tables/attribution_by_relation.csv", "tables/memory_gain.csv")
LEARN_FILES = ("learning.png", "learning.csv", "tables/learning_new_facts.csv", "tables/learning_other_probes.csv")
FORGET_FILES = ("forgetting.png", "forgetting.csv", "tables/forgetting.csv")


def test_knowledge_attribution_notebook_on_evaluated_runs(evaluated_runs, tmp_path):
    executed = run_notebook("knowledge_attribution", tmp_path,
                            parameters={"run_dirs": evaluated_runs, "metric": "mc_correct", "n_boot": 200,
                                        "edits_dir": str(tmp_path / "edits"), "learn_steps": 20})
    out = tmp_path / "knowledge_attribution"
    _executed_ok(executed, out)
    _files(out, *KNOWLEDGE_FILES, *LEARN_FILES)
    # forgetting chooses its subjects on the frozen run (A3), which these runs lack: skipped, saying why
    assert "skipped forget_study: forget_study chooses its subjects on the run 'memory-frozen'" in executed.read_text()
    learned = pd.read_csv(out / "tables" / "learning_new_facts.csv")
    assert set(learned["model"]) == {"A2"} and set(learned["phase"]) == {"before", "after"}
    others = pd.read_csv(out / "tables" / "learning_other_probes.csv").set_index(["metric", "part"])
    assert (others.xs("untouched", level="part")["score_changed"] == 0).all()
    per_probe = pd.read_csv(out / "tables" / "attribution_per_probe.csv")
    assert set(per_probe["run"]) == {"memory-cotrain"}  # the dense anchor has no memory to attribute to
    curve = pd.read_csv(out / "accuracy_by_frequency.csv")
    assert set(curve["run"]) == {"anchor", "memory-cotrain"} and set(curve["metric"]) == {"mc_correct"}


@pytest.mark.slow
def test_knowledge_attribution_notebook_runs_the_demo(tmp_path):
    """The notebook as shipped at smoke scale: trains and evaluates the demo's five runs, then reuses them."""
    params = {"data_root": str(tmp_path / "data"), "runs_dir": str(tmp_path / "runs")}
    run_notebook("knowledge_attribution", tmp_path / "first", parameters=params)
    _files(tmp_path / "first" / "knowledge_attribution", *KNOWLEDGE_FILES, *FORGET_FILES, *LEARN_FILES)
    forgotten = pd.read_csv(tmp_path / "first" / "knowledge_attribution" / "tables" / "forgetting.csv")
    assert set(forgotten["model"]) == {"A3", "A2"} and "all" in set(forgotten["subject"])
    summary = pd.read_csv(tmp_path / "first" / "knowledge_attribution" / "tables" / "summary.csv")
    assert set(summary["run"]) == set(RUNS)
    executed = run_notebook("knowledge_attribution", tmp_path / "second", parameters=params)
    assert "reusing the finished and evaluated demo runs" in executed.read_text()


# ------------------------------------------------------------------------------ scaling notebooks (smoke sweeps)
def test_scaling_memory_notebook_at_smoke_scale(smoke_data_config, tmp_path):
    """About ten runs of seconds each (the smoke sweep with a fetched x bank grid and a dense ladder)."""
    params = {"data_root": smoke_data_config.root, "sweeps_dir": str(tmp_path / "sweeps")}
    executed = run_notebook("scaling_memory", tmp_path, parameters=params)
    out = tmp_path / "scaling_memory"
    _executed_ok(executed, out)
    _files(out, "tables/plan.csv", "tables/runs.csv", "tables/dense_fit_parameters.csv", "tables/iso_runtime.csv",
           "tables/form_comparison.csv", "tables/form_parameters.csv", "tables/equivalence_by_config.csv",
           "tables/holdout_largest_bank.csv", "holdout_largest_bank.png", "dense_fit.png", "iso_runtime.png", "form_comparison.png", "memory_effective_fit.png", "equivalence.png",
           "metrics_vs_fetched.png", "metrics_vs_bank.png")
    runs = pd.read_csv(out / "tables" / "runs.csv")
    assert (runs["status"] == "ok").all() and set(runs["kind"]) == {"dense", "memory"}
    memory = runs[runs["kind"] == "memory"]
    assert (memory["total_tokens"] == 2 * memory["tokens"]).all()  # anchor pretraining + memory training
    assert set(pd.read_csv(out / "tables" / "form_comparison.csv")["form"]) == \
        {"chinchilla", "memory_effective", "memory_additive"}
    assert len(pd.read_csv(out / "tables" / "equivalence_by_config.csv")) == len(memory)
    assert (tmp_path / "sweeps" / "scaling-memory-smoke" / "results.parquet").is_file()


def test_scaling_depth_anchor_notebook_at_smoke_scale(smoke_data_config, tmp_path):
    """Two smoke sweeps: four placements of one fetched budget, and two anchors against a dense ladder."""
    params = {"data_root": smoke_data_config.root, "sweeps_dir": str(tmp_path / "sweeps")}
    executed = run_notebook("scaling_depth_anchor", tmp_path, parameters=params)
    out = tmp_path / "scaling_depth_anchor"
    _executed_ok(executed, out)
    _files(out, "tables/depth_runs.csv", "tables/depth_summary.csv", "tables/anchor_runs.csv",
           "tables/dense_fit_parameters.csv", "tables/iso_runtime.csv", "tables/equivalence_by_anchor.csv",
           "tables/form_comparison.csv", "tables/holdout_largest_anchor.csv", "tables/dense_holdout_largest_anchor.csv",
           "holdout_largest_anchor.png", "dense_holdout_largest_anchor.png", "depth_vs_bank.png", "dense_fit.png", "iso_runtime.png", "equivalence.png",
           "form_comparison.png", "metrics_vs_anchor.png")
    depth = pd.read_csv(out / "tables" / "depth_summary.csv")
    memory = depth[depth["kind"] == "memory"]
    assert memory["fetched_params"].nunique() == 1 and memory["bank_params"].nunique() == 4  # same budget, 4 banks
    k = pd.read_csv(out / "tables" / "equivalence_by_anchor.csv")
    assert len(k) == 2 and set(k["cfg.stage"]) == {"memory-cotrain"}  # one row per anchor size and stage


# ------------------------------------------------------------------------------ run: failures, scales, no outside files
def _tiny_notebook(folder: Path, name: str, code: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('scale = "smoke"\nout_dir = "x"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / f"{name}.ipynb")


@pytest.fixture
def tiny_notebooks(tmp_path, monkeypatch):
    """Three notebooks of one cell each: the first and the last fail, the middle one runs."""
    src = tmp_path / "src"
    _tiny_notebook(src, "a_fails", "raise ValueError('first failure\\nsecond line')")
    _tiny_notebook(src, "b_runs", "print('fine')")
    _tiny_notebook(src, "c_fails", "import no_such_module_here")
    monkeypatch.setattr("hiermem.notebooks.NOTEBOOK_DIR", src)
    return src


def test_run_goes_on_after_a_failure_and_reports_every_one(tiny_notebooks, tmp_path, capsys):
    assert main(["notebooks", "run", "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "[notebooks] c_fails (scale=smoke)" in captured.out  # ran after a_fails failed
    assert (tmp_path / "out" / "b_runs" / "run.json").is_file()
    report = captured.err.splitlines()
    assert report[0] == "hiermem notebooks run: 2 of 3 notebooks failed:"
    assert report[1].startswith("  a_fails: notebook 'a_fails' failed in cell")
    assert "ValueError: first failure second line" in report[1] and "a_fails.ipynb" in report[1]
    assert report[2].startswith("  c_fails: ") and "ModuleNotFoundError" in report[2]
    assert len(report) == 3  # one line per failed notebook


def test_run_fail_fast_stops_at_the_first_failure(tiny_notebooks, tmp_path, capsys):
    assert main(["notebooks", "run", "--fail-fast", "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "b_runs" not in captured.out and not (tmp_path / "out" / "b_runs").exists()
    assert "stopped (--fail-fast): notebook 'a_fails' failed" in captured.err


def test_run_all_returns_every_outcome_and_refuses_unknown_names_before_running(tiny_notebooks, tmp_path):
    from hiermem.notebooks import run_all
    with pytest.raises(FileNotFoundError, match="no notebook 'nope'"):
        run_all(["b_runs", "nope"], tmp_path / "out", directory=tiny_notebooks)
    assert not (tmp_path / "out").exists()  # nothing ran
    out = run_all(None, tmp_path / "out", directory=tiny_notebooks)
    assert list(out) == ["a_fails", "b_runs", "c_fails"]
    assert isinstance(out["a_fails"], NotebookError) and isinstance(out["c_fails"], NotebookError)
    assert out["b_runs"] == (tmp_path / "out" / "b_runs.ipynb").resolve()
    with pytest.raises(NotebookError, match="a_fails"):
        run_all(None, tmp_path / "out", directory=tiny_notebooks, fail_fast=True)


def test_an_unknown_scale_is_refused_naming_the_accepted_ones(capsys):
    from hiermem.notebooks import run_all
    for call in (lambda: run_notebook("chinchilla_check", scale="default"), lambda: run_all(scale="huge")):
        with pytest.raises(ValueError, match=r"^unknown scale '\w+' for the notebooks; accepted: smoke, small, study$"):
            call()
    with pytest.raises(SystemExit):
        main(["notebooks", "run", "--scale", "default"])
    assert "invalid choice: 'default'" in capsys.readouterr().err


def test_notebooks_read_nothing_outside_the_repository():
    """A fresh clone runs every notebook: no path above the repository, no absolute path, no home."""
    for name in list_notebooks():
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                for bad in ("../", "..\\", "\"/", "'/", "~/", "shared/", "expanduser", "HOME"):
                    assert bad not in cell.source, (name, bad, cell.source)


# ------------------------------------------------------------------------------ the paper's figures (smoke study)
PAPER_FIGURES = ("figure1_middle_longtail", "figure1_right_exposures", "figure3ab_memory_type", "figure3cd_depth_bank",
                 "figure4a_hierarchy", "figure4b_ratio", "table9_placement", "figure6b_blocking", "figure_k_equivalence")


def test_paper_figures_notebook_at_smoke_scale(tmp_path):
    """Every study part at smoke size (seconds per run), every figure with its CSV, the claims table with one
    verdict per claim by the stated rule, and the generated README; a second run reuses every run."""
    from analysis.paper_claims import CLAIMS, VERDICTS
    params = {"data_root": str(tmp_path / "data"), "sweeps_dir": str(tmp_path / "sweeps")}
    executed = run_notebook("paper_figures", tmp_path, parameters=params)
    out = tmp_path / "paper_figures"
    _executed_ok(executed, out)
    _files(out, "claims.csv", "README.md", "tables/runs.csv", *(f"{f}.png" for f in PAPER_FIGURES),
           *(f"{f}.csv" for f in PAPER_FIGURES))
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims["claim"]) == [c.claim for c in CLAIMS] and set(claims["verdict"]) <= set(VERDICTS)
    undetermined = claims[claims["verdict"] == "undetermined"]
    assert (undetermined["note"].notna() | undetermined["ci_low"].notna()).all()  # each says why or shows its CI
    readme = (out / "README.md").read_text()
    assert "hiermem notebooks run paper_figures --scale smoke" in readme
    assert all(f"({f}.png)" in readme for f in PAPER_FIGURES)
    curve = pd.read_csv(out / "figure6b_blocking.csv")
    assert {"drop", "reroute"} <= set(curve["policy"]) and curve["fraction"].max() == 0.5
    runs = pd.read_csv(out / "tables" / "runs.csv")
    assert set(runs["sweep"]) == {"longtail", "memory_type", "depth_bank", "hierarchy", "ratio", "placement",
                                  "blocking", "dense_ladder"}
    # a plotted Avg-SK equals the macro average over relations of the run's own SK probe scores
    # (bug caught: a figure scoring the wrong mode, run or averaging)
    plotted = pd.read_csv(out / "figure3ab_memory_type.csv").query("mode == 'fetched'").iloc[0]
    run_dir = runs.loc[runs["run"] == plotted["run"], "run_dir"].iloc[0]
    probe_table = pd.read_parquet(Path(run_dir) / "eval" / "probe_results.parquet")
    sk = probe_table[(probe_table["mode"] == plotted["mode"]) & (probe_table["group"] == "SK")]
    assert plotted["avg_sk"] == pytest.approx(100 * sk.groupby("relation")["correct"].mean().mean())
    again = run_notebook("paper_figures", tmp_path / "again", parameters=params)
    to_run = re.findall(r"(\d+) to run on", again.read_text())
    assert len(to_run) == 8 and set(to_run) == {"0"}  # every part's runs were reused

    # The scaling notebooks' study recipe on the same runs (the parts at smoke size): every run is reused,
    # each shared run appears once, and the hold-out and k tables are written where paper_dir says.
    recipe = {"parts": ["hierarchy", "depth_bank", "longtail", "dense_ladder"], "scale": "smoke"}
    laws = tmp_path / "laws"
    executed = run_notebook("scaling_memory", tmp_path / "study", scale="study",
                            parameters={**params, "paper_dir": str(laws), "sweeps": {"study": recipe}})
    assert set(re.findall(r"(\d+) to run on", executed.read_text())) == {"0"}
    _files(laws, "tables/holdout_largest_bank.csv", "holdout_largest_bank.png", "tables/form_comparison.csv",
           "tables/equivalence_by_config.csv")
    rows = pd.read_csv(laws / "tables" / "runs.csv")
    assert rows["run_id"].is_unique and set(rows["sweep"]) == set(recipe["parts"])
    assert set(pd.read_csv(laws / "tables" / "holdout_largest_bank.csv")["form"]) == \
        {"chinchilla", "memory_effective", "memory_additive"}


def test_a_scale_a_notebook_has_no_recipe_for_is_refused_or_skipped(capsys):
    from hiermem.notebooks import notebook_scales, run_all
    assert notebook_scales("paper_figures") == ("smoke", "study")
    assert notebook_scales("scaling_memory") == notebook_scales("scaling_depth_anchor") == ("smoke", "small", "study")
    with pytest.raises(ValueError, match="notebook 'chinchilla_check' has no recipe for scale 'study'; it runs at: smoke, small"):
        run_notebook("chinchilla_check", scale="study")
    with pytest.raises(ValueError, match="notebook 'paper_figures' has no recipe for scale 'small'"):
        run_all(["paper_figures"], scale="small")
