"""`hiermem report` opens from disk in a real headless Chromium (every image loads, no console errors),
and the explorer notebook renders its widgets in JupyterLab served on localhost."""

import base64
import io
import os
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from hiermem.cli import main
from hiermem.report import (WIDGET_MIME, build_report, check_report, find_chromium, jupyterlab_screenshot,
                            lab_notebook)

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def require_chromium() -> str:
    """The Chromium binary; missing, the test fails in CI (CI=1) and skips elsewhere, saying what to install."""
    binary = find_chromium()
    if binary is None:
        message = ("requires chromium: install Debian's chromium package (`apt-get install -y chromium`; "
                   ".ci/run does this) or set $CHROMIUM")
        if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("CI", "HIERMEM_CI")):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def _png(color: str = "C0") -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2], color=color)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@pytest.fixture
def results(tmp_path):
    """A results folder as the demo and the notebooks leave it: demo tables, figures (PNG + CSV) in
    nested folders, and an executed notebook with a figure, a table and a widget output."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from analysis.plots import save_figure
    root = tmp_path / "results"
    (root / "demo").mkdir(parents=True)
    pd.DataFrame({"model": ["anchor", "memory-frozen", "memory-frozen"], "mode": ["none", "none", "fetched"],
                  "runtime_params": [1_049_728, 1_148_032, 1_148_032], "avg_sk": [23.9, 22.9, 32.4],
                  "avg_ck": [36.1, 32.6, 39.6], "ppl": [48.9, 49.4, 44.2], "extra": [1, 2, 3]}
                 ).to_csv(root / "demo" / "summary.csv", index=False)
    pd.DataFrame({"claim": ["fetched_vs_none_sk", "ck_kept"], "model": ["memory-frozen"] * 2, "metric": ["a", "b"],
                  "value": [8.5, 3.5], "ci_low": [5.0, -3.9], "ci_high": [11.7, 11.3], "target": [">= +20", ">= -3"],
                  "holds": [False, True], "note": ["", ""]}).to_csv(root / "demo" / "claims.csv", index=False)
    for rel in ("notebooks/knowledge_attribution/memory_gain", "sweeps/smoke/fit"):
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.bar(["a", "b"], [1, 2])
        save_figure(fig, pd.DataFrame({"x": ["a", "b"], "y": [1, 2]}), root / rel)
        plt.close(fig)
    nb = nbformat.v4.new_notebook()
    image = nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(_png()).decode(),
                                                         "text/plain": "<Figure>"})
    table = nbformat.v4.new_output("execute_result", data={"text/html": pd.DataFrame({"a": [1]}).to_html(),
                                                           "text/plain": "a 1"}, execution_count=2)
    widget = nbformat.v4.new_output("execute_result", execution_count=3, data={
        WIDGET_MIME: {"model_id": "abc", "version_major": 2, "version_minor": 0}, "text/plain": "VBox(...)"})
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook\nWith $x^2$ maths."),
                nbformat.v4.new_code_cell("plot()", outputs=[image], execution_count=1),
                nbformat.v4.new_code_cell("table()", outputs=[table], execution_count=2),
                nbformat.v4.new_code_cell("ui.widget", outputs=[widget], execution_count=3)]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                              "version_minor": 0}}
    (root / "notebooks").mkdir(exist_ok=True)
    nbformat.write(nb, root / "notebooks" / "example.ipynb")
    return root


def test_report_lists_tables_figures_and_notebooks_with_relative_links(results):
    index = build_report(results)
    assert index == results / "report" / "index.html"
    page = index.read_text()
    for text in ("fetched_vs_none_sk", "memory-frozen", "23.9", "holds-no", "holds-yes", "example.html"):
        assert text in page, text
    for rel in ("figures/notebooks/knowledge_attribution/memory_gain.png", "figures/sweeps/smoke/fit.png",
                "figures/sweeps/smoke/fit.csv", "notebooks/example.html", "tables/summary.csv"):
        assert (index.parent / rel).is_file(), rel
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert links and all(not re.match(r"^(/|[a-z]+:)", link) for link in links), links  # relative only
    notebook = (index.parent / "notebooks" / "example.html").read_text()
    assert "jupyter lab" in notebook and WIDGET_MIME not in notebook
    assert not re.search(r'<script[^>]*src="https?://', notebook)  # nothing from the network
    # a rebuild replaces the copies (a figure gone from results/ leaves the report)
    (results / "sweeps" / "smoke" / "fit.png").unlink()
    build_report(results)
    assert not (index.parent / "figures" / "sweeps" / "smoke" / "fit.png").exists()


def test_report_without_results_says_what_to_run(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert "make demo" in page and "make notebooks" in page and "no figures" in page
    assert "report written to" in capsys.readouterr().out


def test_report_opens_from_disk_in_headless_chromium(results, tmp_path):
    require_chromium()
    index = build_report(results)
    pages = check_report(index, tmp_path / "report.png")
    assert set(pages) == {"index.html", "notebooks/example.html"}
    first = pages["index.html"]
    assert len(first["images"]) == 2 and first["broken"] == [] and first["errors"] == [], first
    assert all(image["naturalWidth"] > 0 for page in pages.values() for image in page["images"])
    assert len(pages["notebooks/example.html"]["images"]) == 1
    assert all(page["errors"] == [] for page in pages.values()), pages
    shot = tmp_path / "report.png"
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 5000


def test_the_check_catches_a_broken_image_and_a_console_error(results, tmp_path):
    require_chromium()
    index = build_report(results)
    page = index.read_text().replace("</body>", '<img src="figures/missing.png"><script>console.error("boom")'
                                                 "</script></body>")
    index.write_text(page)
    first = check_report(index)["index.html"]
    assert first["broken"] == ["figures/missing.png"]
    assert any("boom" in e for e in first["errors"]) and any("missing.png" in e for e in first["errors"])


def test_cli_screenshot(results, capsys):
    require_chromium()
    assert main(["report", "--results", str(results), "--screenshot"]) == 0
    out = results / "report"
    assert (out / "screenshot.png").read_bytes()[:4] == b"\x89PNG"
    assert "checked 2 pages" in capsys.readouterr().out


def test_lab_notebook_injects_parameters(tmp_path):
    served = lab_notebook(NOTEBOOK_DIR / "explorer.ipynb", tmp_path / "explorer.ipynb",
                          {"run_dir": "/x/run", "runs_dir": "/x"}, cwd=tmp_path)
    nb = nbformat.read(served, as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    at = tags.index(["parameters"])
    assert tags[at + 1] == ["injected-parameters"] and "run_dir = '/x/run'" in nb.cells[at + 1].source
    assert f"os.chdir({str(tmp_path)!r})" in nb.cells[at + 1].source
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.fixture(scope="module")
def memory_run(smoke_data_config, pretrained_anchor, tmp_path_factory):
    from hiermem.config import MemoryConfig
    from hiermem.evaluate import EvalConfig, evaluate_run
    from hiermem.train import TrainConfig, train
    root = tmp_path_factory.mktemp("lab_runs")
    cfg = TrainConfig(stage="memory-cotrain", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                      memory=MemoryConfig(multipliers=(8, 2), branching=4), tokens=8 * 4 * 128, batch_size=4)
    run = train(cfg, root / "memory", progress=False)
    evaluate_run(run, EvalConfig(max_probes_per_relation=2, heldout_docs_per_source=2, max_new_tokens=4,
                                 perplexity_modes=("none",)))
    return run


@pytest.mark.slow
def test_explorer_renders_its_widgets_in_jupyterlab(memory_run, tmp_path):
    """JupyterLab on localhost (token), the explorer notebook opened in headless Chromium, every cell run
    in its kernel: the widgets render (run picker, filters, block toggles, the mode table) with no error."""
    require_chromium()
    shot = tmp_path / "explorer_jupyterlab.png"
    state = jupyterlab_screenshot(NOTEBOOK_DIR / "explorer.ipynb", shot,
                                  {"run_dir": str(memory_run), "runs_dir": str(memory_run.parent),
                                   "out_dir": str(tmp_path / "out")}, timeout=150)
    assert state["widgets"] >= 20 and state["dropdowns"] >= 4 and state["buttons"] >= 4, state
    assert state["tables"] >= 2 and state["errors_in_outputs"] == [], state
    assert "fetched" in state["text"] and "Routed path" in state["text"] and "cannot explore" not in state["text"]
    assert state["errors"] == [], state["errors"]
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20000
    assert (tmp_path / "out" / "modes.csv").is_file()  # the static cells ran too
