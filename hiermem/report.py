"""`hiermem report`: one static HTML page of everything under results/, opened from disk.

`build_report()` writes results/report/index.html with

- the demo's tables (results/demo/*.csv: the summary, one row per model and mode, and the claims,
  one row per claim with its 95% CI and whether it holds),
- every figure under results/ (PNG; copied into report/figures/ with the CSV each plots),
- the executed notebooks (results/notebooks/*.ipynb) converted to HTML by nbconvert
  (report/notebooks/<name>.html); an ipywidgets output (the explorer) becomes a note saying how to
  open it live, and nothing is loaded from the network (nbconvert's CDN scripts are left out),

with relative links only, so the folder opens from disk without a server (and can be copied whole).

Browser checks use a headless Chromium (Debian's `chromium` package) over the DevTools protocol
(`Browser`, a small client over websocket-client): `check_page` loads a page and returns every <img>
with its naturalWidth and every console error; `hiermem report --screenshot` checks the report that
way and saves report/screenshot.png, plus report/explorer_jupyterlab.png when the executed explorer
notebook exists: `jupyterlab_screenshot` serves the explorer notebook (with that run's parameters) with
JupyterLab on localhost (token auth, private config and settings folders), runs its cells in the kernel
from the page and screenshots its widgets rendered.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

from hiermem.browser import INSTALL_HINT, Browser, BrowserError, check_page, find_chromium
from hiermem.io import atomic_write_text

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
DEMO_COLUMNS = ["model", "mode", "runtime_params", "train_tokens", "avg_sk", "avg_sk_rank", "avg_ck", "avg_ck_rank",
                "ppl"]
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; }
table.report { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
table.report th, table.report td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
table.report th { background: #f3f3f3; }
table.report td:first-child, table.report td:nth-child(2) { text-align: left; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; max-width: 560px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; word-break: break-all; }
.note { color: #666; font-style: italic; }
.holds-yes { background: #e6f4ea; } .holds-no { background: #fdecea; }
"""


# ------------------------------------------------------------------------------------------ report
def _table(frame: pd.DataFrame, highlight_holds: bool = False) -> str:
    frame = frame.copy()
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].map(lambda v: "" if pd.isna(v) else f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}")
        elif pd.api.types.is_integer_dtype(frame[column]):
            frame[column] = frame[column].map(lambda v: f"{v:,}")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for record in frame.astype(str).to_dict("records"):
        cls = ""
        if highlight_holds and "holds" in record:
            cls = ' class="holds-yes"' if record["holds"] in ("True", "true", "yes") else ' class="holds-no"'
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(v)}</td>" for v in record.values()) + "</tr>")
    return f'<table class="report"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _demo_section(demo_dir: Path) -> str:
    csvs = sorted(demo_dir.glob("*.csv")) if demo_dir.is_dir() else []
    if not csvs:
        return f'<p class="note">no demo tables in {html.escape(str(demo_dir))}: run <code>make demo</code> ' \
               f'(or <code>hiermem demo --scale smoke</code>).</p>'
    order = {"summary.csv": 0, "claims.csv": 1}
    parts = []
    for path in sorted(csvs, key=lambda p: (order.get(p.name, 2), p.name)):
        try:
            frame = pd.read_csv(path)
        except (ValueError, OSError) as e:
            parts.append(f'<p class="note">{html.escape(path.name)}: unreadable ({html.escape(str(e))})</p>')
            continue
        title = {"summary.csv": "Summary: one row per model and memory mode (evaluation split; %, macro over "
                                "relations)",
                 "claims.csv": "Claims: each with its 95% bootstrap CI, its target and whether it holds"}.get(
            path.name, path.name)
        shown = frame
        if path.name == "summary.csv" and set(DEMO_COLUMNS[:2]) <= set(frame.columns):
            shown = frame[[c for c in DEMO_COLUMNS if c in frame.columns]]
        parts.append(f"<h3>{html.escape(title)}</h3>" + _table(shown, highlight_holds=path.name == "claims.csv"))
        if shown is not frame:
            parts.append(f"<details><summary>all {len(frame.columns)} columns</summary>{_table(frame)}</details>")
        parts.append(f'<p><a href="tables/{html.escape(path.name)}">{html.escape(path.name)}</a></p>')
    return "".join(parts)


def _figures(results_dir: Path, out_dir: Path) -> list[Path]:
    """Every PNG under results/ (outside the report folder itself), sorted."""
    out = out_dir.resolve()
    return sorted(p for p in results_dir.rglob("*.png")
                  if p.is_file() and out not in p.resolve().parents and not p.name.startswith("."))


def _strip_network(page: str) -> str:
    """Drop every script or stylesheet loaded from the network: the page must open offline."""
    page = re.sub(r'<script[^>]*\ssrc="https?://[^"]*"[^>]*>\s*</script>', "", page, flags=re.I)
    return re.sub(r'<link[^>]*\shref="https?://[^"]*"[^>]*>', "", page, flags=re.I)


def notebook_html(path: Path) -> str:
    """An executed notebook as a standalone HTML page (nbconvert's lab template) that loads nothing from
    the network; widget outputs become a note saying how to open the notebook live."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    note = ("<p><i>An interactive ipywidgets view: open the notebook live with <code>.venv/bin/jupyter lab</code> "
            f"(notebooks/{html.escape(path.name)}).</i></p>")
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data and WIDGET_MIME in data:
                output["data"] = {"text/html": note, "text/plain": "(interactive widget)"}
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return _strip_network(body)


def build_report(results_dir: str | Path = "results", out_dir: str | Path | None = None,
                 notebooks_dir: str | Path | None = None) -> Path:
    """Write <out_dir>/index.html (default results/report) and its files; returns the index path."""
    results = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results / "report"
    notebooks = Path(notebooks_dir) if notebooks_dir is not None else results / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("figures", "notebooks", "tables"):  # rebuilt from scratch: no stale files
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir()

    demo = results / "demo"
    for path in sorted(demo.glob("*.csv")) if demo.is_dir() else []:
        shutil.copy2(path, out / "tables" / path.name)
    sections = [("demo", "Demo: tables and claims", _demo_section(demo))]

    figures = _figures(results, out)
    groups: dict[str, list[str]] = {}
    for png in figures:
        rel = png.relative_to(results)
        target = out / "figures" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, target)
        csv = png.with_suffix(".csv")
        link = ""
        if csv.is_file():
            shutil.copy2(csv, target.with_suffix(".csv"))
            link = f' · <a href="{html.escape(target.with_suffix(".csv").relative_to(out).as_posix())}">data</a>'
        src = html.escape(target.relative_to(out).as_posix())
        groups.setdefault(str(rel.parent.as_posix()), []).append(
            f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(rel.as_posix())}" loading="eager"></a>'
            f"<figcaption>{html.escape(rel.as_posix())}{link}</figcaption></figure>")
    if groups:
        fig_html = "".join(f"<h3>{html.escape(folder)}</h3><div class=\"figures\">{''.join(items)}</div>"
                           for folder, items in groups.items())
    else:
        fig_html = f'<p class="note">no figures (PNG) under {html.escape(str(results))}.</p>'
    sections.append(("figures", f"Figures ({len(figures)})", fig_html))

    executed = sorted(notebooks.glob("*.ipynb")) if notebooks.is_dir() else []
    items = []
    for nb_path in executed:
        try:
            page = notebook_html(nb_path)
        except Exception as e:  # noqa: BLE001 - one unreadable notebook must not stop the report
            items.append(f"<li>{html.escape(nb_path.name)}: not converted ({html.escape(type(e).__name__)}: "
                         f"{html.escape(str(e))})</li>")
            continue
        atomic_write_text(out / "notebooks" / f"{nb_path.stem}.html", page)
        items.append(f'<li><a href="notebooks/{html.escape(nb_path.stem)}.html">{html.escape(nb_path.stem)}</a> '
                     f'<span class="note">executed {html.escape(_mtime(nb_path))}</span></li>')
    nb_html = f"<ul>{''.join(items)}</ul>" if items else \
        f'<p class="note">no executed notebooks in {html.escape(str(notebooks))}: run <code>make notebooks</code>.</p>'
    nb_html += '<p>Open the notebooks live (widgets included) with <code>.venv/bin/jupyter lab</code>.</p>'
    sections.append(("notebooks", f"Notebooks ({len(executed)})", nb_html))

    shots = [p for p in (out / "screenshot.png", out / "explorer_jupyterlab.png") if p.is_file()]
    if shots:
        sections.append(("screenshots", "Screenshots", '<div class="figures">' + "".join(
            f'<figure><img src="{p.name}" alt="{p.name}"><figcaption>{p.name}</figcaption></figure>'
            for p in shots) + "</div>"))

    nav = "".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>'
                   for key, title, content in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>hiermem report</title>'
            f"<style>{CSS}</style></head><body><h1>hiermem report</h1>"
            f'<p class="note">built {html.escape(_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))} from '
            f"{html.escape(str(results))}</p><nav>{nav}</nav>{body}</body></html>\n")
    index = out / "index.html"
    atomic_write_text(index, page)
    return index


def _mtime(path: Path) -> str:
    return _dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def check_report(index: str | Path, screenshot: str | Path | None = None) -> dict:
    """Open the report and every page it links (notebooks) in one browser: {page: check_page result}."""
    index = Path(index).resolve()
    out: dict[str, dict] = {}
    with Browser() as browser:
        out["index.html"] = first = check_page(index.as_uri(), screenshot, browser)
        for href in first["links"]:
            if href.endswith(".html") and "://" not in href and not href.startswith("#"):
                out[href] = check_page((index.parent / href).resolve().as_uri(), None, browser, full_page=False)
    return out


# ------------------------------------------------------------------------------------------ JupyterLab
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAB_SETTINGS = {  # a private user-settings folder: no news pop-up over the screenshot
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}
LAB_NOTEBOOK_READY_JS = """(() => { const app = window.jupyterapp; const w = app && app.shell.currentWidget;
  const kernel = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!(w && w.content && w.content.widgets && w.content.widgets.length && kernel && kernel.status === 'idle'); })()"""
LAB_RUN_ALL_JS = "window.jupyterapp.commands.execute('notebook:run-all-cells').then(() => true)"
LAB_READY_JS = """(() => { const w = window.jupyterapp.shell.currentWidget;
  const kernel = w.sessionContext.session.kernel;
  const running = Array.from(document.querySelectorAll('.jp-InputPrompt')).some(e => e.textContent.includes('*'));
  return !running && kernel.status === 'idle'
         && document.querySelectorAll('.jp-OutputArea-output .widget-tab, .jp-OutputArea-output .widget-box').length > 0;
})()"""
LAB_STATE_JS = """(() => ({
  widgets: document.querySelectorAll('.jp-OutputArea-output .jupyter-widgets').length,
  dropdowns: document.querySelectorAll('.jp-OutputArea-output .widget-dropdown').length,
  buttons: document.querySelectorAll('.jp-OutputArea-output .widget-button, .jp-OutputArea-output .widget-toggle-button').length,
  tables: document.querySelectorAll('.jp-OutputArea-output .widget-html table').length,
  errors_in_outputs: Array.from(document.querySelectorAll('.jp-OutputArea-output')).filter(
      e => /Error displaying widget|Traceback|Error rendering/.test(e.textContent)).map(e => e.textContent.slice(0, 300)),
  text: Array.from(document.querySelectorAll('.jp-OutputArea-output .widget-html')).map(e => e.textContent).join(' | ').slice(0, 2000),
}))()"""
SCROLL_TO_WIDGET_JS = """(() => { const el = document.querySelector('.jp-OutputArea-output .widget-tab, .jp-OutputArea-output .widget-box');
  if (el) { el.scrollIntoView({block: 'start'}); } return !!el; })()"""


def lab_notebook(source: str | Path, target: str | Path, parameters: dict | None = None,
                 cwd: str | Path | None = None) -> Path:
    """A copy of notebook `source` (outputs removed) with `parameters` injected after its parameters cell
    and, with `cwd`, a chdir there first (papermill runs the notebooks from the repository root)."""
    import nbformat

    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nb.metadata.pop("widgets", None)
    lines = ["# Parameters injected for this JupyterLab session"]
    if cwd is not None:
        lines += ["import os", f"os.chdir({str(Path(cwd).resolve())!r})"]
    lines += [f"{key} = {value!r}" for key, value in (parameters or {}).items()]
    injected = nbformat.v4.new_code_cell("\n".join(lines))
    injected.metadata["tags"] = ["injected-parameters"]
    at = next((i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), 0)
    nb.cells.insert(at, injected)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return target


def jupyterlab_screenshot(notebook: str | Path, screenshot: str | Path, parameters: dict | None = None,
                          cwd: str | Path | None = None, timeout: float = 120.0, width: int = 1400,
                          height: int = 1800) -> dict:
    """Open a notebook in JupyterLab served on localhost, run all its cells in its kernel and screenshot
    its widgets rendered.

    A copy of the notebook (`lab_notebook`: `parameters` injected, chdir to `cwd`) is served from a
    temporary folder with token authentication, private Jupyter config/runtime/settings folders and
    `expose_app_in_browser`; headless Chromium opens it, waits for the kernel, runs every cell
    (`notebook:run-all-cells`), waits until the kernel is idle with a widget rendered, scrolls to it and
    saves the screenshot. Returns the widget counts and texts (LAB_STATE_JS), the page's console errors,
    the screenshot path and the seconds it took; BrowserError (with a screenshot) when widgets never show."""
    started = time.monotonic()
    port, token = _free_port(), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="hiermem-lab-") as tmp:
        tmp = Path(tmp)
        served = lab_notebook(notebook, tmp / "lab" / Path(notebook).name, parameters, cwd)
        settings = tmp / "settings"
        for name, value in LAB_SETTINGS.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(value))
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
               "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces")}
        args = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served.parent}",
                "--ServerApp.port_retries=0", f"--LabApp.user_settings_dir={settings}",
                f"--LabApp.workspaces_dir={tmp / 'workspaces'}", "--LabApp.expose_app_in_browser=True"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-root")
        log = open(tmp / "lab.log", "w")
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(served.parent))
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(f"{base}/api/status?token={token}", server, tmp / "lab.log", timeout)
            with Browser(width=width, height=height, timeout=timeout) as browser:
                browser.open(f"{base}/lab/tree/{served.name}?token={token}&reset")
                try:
                    browser.wait_for(LAB_NOTEBOOK_READY_JS, timeout=timeout)
                    browser.evaluate(LAB_RUN_ALL_JS, timeout=timeout)
                    browser.wait_for(LAB_READY_JS, timeout=timeout)
                except BrowserError as e:
                    browser.screenshot(screenshot)
                    raise BrowserError(f"{e}; JupyterLab did not render the notebook's widgets (screenshot "
                                       f"{screenshot}; server log: {(tmp / 'lab.log').read_text()[-600:]})") from e
                browser.pump(1.5)  # let the widgets lay out
                state = browser.evaluate(LAB_STATE_JS)
                browser.evaluate(SCROLL_TO_WIDGET_JS)
                browser.pump(0.5)
                shot = browser.screenshot(screenshot)
                return {**state, "errors": browser.console_errors(), "screenshot": shot,
                        "seconds": round(time.monotonic() - started, 1)}
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()


def _wait_http(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise BrowserError(f"JupyterLab exited ({server.returncode}): {log.read_text()[-800:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise BrowserError(f"JupyterLab did not answer {url.split('?')[0]} within {timeout:.0f} s: {log.read_text()[-800:]}")


# ------------------------------------------------------------------------------------------ CLI
def _run(args: argparse.Namespace) -> int:
    index = build_report(args.results, args.out, args.notebooks)
    print(f"report written to {index} (open it from disk: file://{index.resolve()})")
    if not args.screenshot:
        return 0
    if find_chromium() is None:
        raise FileNotFoundError(f"--screenshot needs a headless Chromium: {INSTALL_HINT}")
    out = index.parent
    executed = Path(args.notebooks or Path(args.results) / "notebooks") / "explorer.ipynb"
    if executed.is_file():  # the explorer as it was executed (its parameters), live in JupyterLab
        import nbformat
        from hiermem.notebooks import REPO_ROOT, notebook_path
        params = nbformat.read(executed, as_version=4).metadata.get("papermill", {}).get("parameters", {})
        lab = jupyterlab_screenshot(notebook_path("explorer"), out / "explorer_jupyterlab.png", params, cwd=REPO_ROOT)
        print(f"explorer in JupyterLab: {lab['widgets']} widgets rendered in {lab['seconds']} s -> {lab['screenshot']}")
    index = build_report(args.results, args.out, args.notebooks)  # now listing the screenshots
    pages = check_report(index, out / "screenshot.png")
    problems = [f"{page}: image {src} did not load" for page, r in pages.items() for src in r["broken"]] + \
               [f"{page}: {error}" for page, r in pages.items() for error in r["errors"]]
    print(f"checked {len(pages)} pages, {sum(len(r['images']) for r in pages.values())} images in headless Chromium; "
          f"screenshot {out / 'screenshot.png'}")
    for problem in problems:
        print(f"  problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one static HTML page of the results (demo tables, figures, notebooks)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="the results folder (default: results)")
    p.add_argument("--out", default=None, help="where index.html goes (default: RESULTS/report)")
    p.add_argument("--notebooks", default=None, help="executed notebooks (default: RESULTS/notebooks)")
    p.add_argument("--screenshot", action="store_true",
                   help="check the report in headless Chromium (every image loads, no console errors) and save "
                        "OUT/screenshot.png; with an executed explorer notebook also OUT/explorer_jupyterlab.png")
    p.set_defaults(func=_run)

