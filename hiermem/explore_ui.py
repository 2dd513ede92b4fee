"""The explorer's ipywidgets interface (`explorer_widget`, `ExplorerUI`) over `hiermem.explore.Explorer`.

Every number it shows is a call of `Explorer` (tested without widgets); each callback here is a
method of `ExplorerUI`, which the tests drive headless. `notebooks/explorer.ipynb` is one call of
`explorer_widget(run_dir)`.
"""

from __future__ import annotations

import contextlib
import html
import logging
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from hiermem.data.pipeline import DataBundle
from hiermem.explore import BLOCK_POLICIES, Explorer, Inspection, Prefix, find_runs, format_prefix, parse_prefix

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ widgets
TABLE_STYLE = ("<style>.hiermem-table {border-collapse: collapse; font-size: 0.9em} .hiermem-table th, "
               ".hiermem-table td {border: 1px solid #ddd; padding: 1px 6px; text-align: left}</style>")


def visible(token: str) -> str:
    """A token with its spaces and newlines made visible (" Paris" -> "␣Paris")."""
    return token.replace(" ", "\u2423").replace("\n", "\u21b5")


def _table_html(frame: pd.DataFrame, floatfmt: str = "{:.4g}", max_rows: int = 60) -> str:
    if frame is None or frame.empty:
        return "<i>nothing here</i>"
    shown = frame.head(max_rows)
    body = shown.to_html(index=False, escape=True, border=0, classes="hiermem-table",
                         float_format=lambda v: floatfmt.format(v))
    more = f"<div><i>{len(frame) - max_rows:,} more rows not shown</i></div>" if len(frame) > max_rows else ""
    return TABLE_STYLE + body + more


def _message_html(text: str, kind: str = "info") -> str:
    colour = {"info": "#31708f", "warning": "#8a6d3b", "error": "#a94442"}[kind]
    return f'<div class="hiermem-message hiermem-{kind}" style="color:{colour}"><b>{kind}:</b> {html.escape(text)}</div>'


class ExplorerUI:
    """The explorer's ipywidgets: a run picker, a prompt or probe picker (filters by relation, bucket,
    SK/CK, split), the routed path with one block toggle per node, every mode's answer and answer
    log-probability, the top next tokens with and without memory, and a bank browser that drills down
    the tree. Every callback is a method (`load`, `show`, `on_probe`, `toggle_block`, `browse`, ...),
    so tests drive the interface headless; `widget` is the box to display."""

    ALL = "all"

    def __init__(self, run_dir: str | Path | None = None, runs_root: str | Path = "runs",
                 data: DataBundle | None = None, device: str = "cpu"):
        import ipywidgets as w

        self._w, self._data, self._device = w, data, device
        self.explorer: Explorer | None = None
        self.inspection: Inspection | None = None
        self.browse_prefix: Prefix = ()
        runs = find_runs(runs_root)
        if run_dir is not None and str(run_dir) not in runs:
            runs = [str(run_dir)] + runs
        layout_wide = w.Layout(width="95%")
        self.run_picker = w.Combobox(options=runs, value=str(run_dir or ""), placeholder="a run directory",
                                     description="run", ensure_option=False, layout=w.Layout(width="60%"))
        self.load_button = w.Button(description="load", button_style="primary")
        self.message = w.HTML()
        self.relation = w.Dropdown(description="relation", options=[self.ALL])
        self.bucket = w.Dropdown(description="bucket", options=[self.ALL])
        self.group = w.ToggleButtons(options=[self.ALL, "SK", "CK"], description="group")
        self.split = w.Dropdown(description="split", options=[self.ALL])
        self.evaluated_only = w.Checkbox(description="evaluated probes only", value=True)
        self.probe_picker = w.Dropdown(description="probe", options=[], layout=layout_wide)
        self.prompt = w.Text(description="prompt", placeholder="type a prompt and press Enter",
                             continuous_update=False, layout=layout_wide)
        self.answer_box = w.Text(description="answer", placeholder="expected answer (optional)",
                                 continuous_update=False)
        self.mode = w.Dropdown(description="memory", options=["fetched"])
        self.block_policy = w.ToggleButtons(options=list(BLOCK_POLICIES), description="blocking")
        self.route_html = w.HTML()
        self.route_toggles = w.HBox()
        self.blocked_html = w.HTML()
        self.clear_button = w.Button(description="unblock all")
        self.modes_html = w.HTML()
        self.top_html = w.HTML()
        self.browse_path = w.HTML()
        self.browse_up = w.Button(description="up", icon="arrow-up")
        self.browse_block = w.ToggleButton(description="block this subtree", value=False)
        self.browse_children = w.Select(options=[], rows=8, layout=layout_wide)
        self.browse_open = w.Button(description="open")
        self.docs_html = w.HTML()
        self.facts_html = w.HTML()
        self._quiet = False  # set while the UI updates its own widgets (observers ignore those changes)

        self.load_button.on_click(lambda _: self.load(self.run_picker.value))
        for control in (self.relation, self.bucket, self.group, self.split, self.evaluated_only):
            control.observe(self.on_filter, names="value")
        self.probe_picker.observe(self.on_probe, names="value")
        self.prompt.observe(self.on_prompt, names="value")
        self.answer_box.observe(self.on_prompt, names="value")
        self.mode.observe(self.on_prompt, names="value")
        self.block_policy.observe(self.on_block_policy, names="value")
        self.clear_button.on_click(lambda _: self.clear_blocks())
        self.browse_up.on_click(lambda _: self.browse(self.browse_prefix[:-1]))
        self.browse_open.on_click(lambda _: self.on_open_child())
        self.browse_block.observe(self.on_browse_block, names="value")

        inspect = w.VBox([w.HBox([self.relation, self.bucket, self.split]),
                          w.HBox([self.group, self.evaluated_only]), self.probe_picker, self.prompt,
                          w.HBox([self.answer_box, self.mode]),
                          w.HTML("<h4>Routed path</h4>"), self.route_html, self.route_toggles,
                          w.HBox([self.block_policy, self.clear_button]), self.blocked_html,
                          w.HTML("<h4>Answers per memory mode</h4>"), self.modes_html,
                          w.HTML("<h4>Top next tokens</h4>"), self.top_html])
        bank = w.VBox([self.browse_path, w.HBox([self.browse_up, self.browse_open, self.browse_block]),
                       self.browse_children, w.HTML("<h4>Documents (most typical first)</h4>"), self.docs_html,
                       w.HTML("<h4>Facts</h4>"), self.facts_html])
        self.tabs = w.Tab(children=[inspect, bank])
        self.tabs.set_title(0, "prompt")
        self.tabs.set_title(1, "bank")
        self.widget = w.VBox([w.HBox([self.run_picker, self.load_button]), self.message, self.tabs])
        if run_dir is not None:
            self.load(run_dir)
        else:
            self.message.value = _message_html("choose a run directory and press load")

    # ------------------------------------------------------------------------------ callbacks
    def load(self, run_dir: str | Path) -> bool:
        """Open a run; a run that cannot be explored shows one line saying why (no traceback)."""
        self.explorer, self.inspection = None, None
        self.tabs.layout.display = "none"
        if not str(run_dir or "").strip():
            self.message.value = _message_html("choose a run directory first", "error")
            return False
        try:
            self.explorer = Explorer(run_dir, data=self._data, device=self._device)
        except Exception as e:  # noqa: BLE001 - any reason a run cannot be opened becomes a message
            log.debug("cannot open %s", run_dir, exc_info=True)
            self.message.value = _message_html(f"cannot explore {run_dir}: {type(e).__name__}: {e}", "error")
            return False
        ex = self.explorer
        notes = [_message_html(m, "warning") for m in ex.messages]
        self.message.value = (f"<b>{html.escape(ex.name)}</b>: {len(ex.modes)} modes, tree k={ex.branching} "
                              f"depth {ex.depth}, {len(ex.data.probes):,} probes" + "".join(notes))
        self.tabs.layout.display = None
        probes = ex.data.probes
        with self._hold():
            self.relation.options = [self.ALL] + sorted(probes["relation"].unique().tolist())
            self.bucket.options = [self.ALL] + sorted(probes["bucket"].astype(str).unique().tolist())
            self.split.options = [self.ALL] + sorted(probes["split"].unique().tolist()) if "split" in probes else [self.ALL]
            self.relation.value, self.bucket.value, self.group.value, self.split.value = (self.ALL,) * 4
            self.evaluated_only.value = ex.evaluated
            self.evaluated_only.disabled = not ex.evaluated
            self.mode.options = [m for m in ex.modes if m != "none"] or ["none"]
            self.mode.value = "fetched" if "fetched" in ex.modes else self.mode.options[0]
            self.block_policy.value = ex.block_policy
        self.on_filter()
        self.browse(())
        return True

    def on_filter(self, change: Any = None) -> None:
        """Refill the probe list from the filters; the first probe is shown."""
        if self.explorer is None or self._quiet:
            return
        frame = self.explorer.probes(self.relation.value, self.bucket.value, self.group.value, self.split.value,
                                     evaluated_only=self.evaluated_only.value and self.explorer.evaluated)
        options = [(f"{r.subject} · {r.relation} · {r.group} · {r.bucket} · {r.split}", r.probe_id)
                   for r in frame.itertuples()] if "split" in frame else \
            [(f"{r.subject} · {r.relation} · {r.group} · {r.bucket}", r.probe_id) for r in frame.itertuples()]
        with self._hold():
            self.probe_picker.options = options
            self.probe_picker.value = options[0][1] if options else None
        self.on_probe()

    def on_probe(self, change: Any = None) -> None:
        """A picked probe fills the prompt and its answer and is shown."""
        if self.explorer is None or self._quiet or self.probe_picker.value is None:
            return
        probe = self.explorer.probe(self.probe_picker.value)
        with self._hold():
            self.prompt.value, self.answer_box.value = probe["prompt"], str(probe["answer"])
        self.show()

    def on_prompt(self, change: Any = None) -> None:
        if self.explorer is None or self._quiet:
            return
        self.show()

    def on_block_policy(self, change: Any = None) -> None:
        if self.explorer is None or self._quiet:
            return
        self.explorer.block_policy = self.block_policy.value
        self.show()

    def show(self) -> None:
        """Recompute and display everything for the current prompt (and refresh the bank browser)."""
        ex = self.explorer
        if ex is None:
            return
        if not self.prompt.value.strip():
            self.route_html.value = _message_html("type a prompt or pick a probe")
            return
        try:
            self.inspection = ins = ex.inspect(self.prompt.value, answer=self.answer_box.value or None,
                                               mode=self.mode.value)
        except Exception as e:  # noqa: BLE001 - shown, not raised, in the interface
            log.debug("inspect failed", exc_info=True)
            self.route_html.value = _message_html(f"{type(e).__name__}: {e}", "error")
            return
        route_rows = "".join(
            f"<li>level {r.level}: <code>{html.escape(r.label)}</code></li>" for r in ins.route.itertuples())
        oracle = (f"<div>oracle path (where the fact's documents went): <code>{format_prefix(ins.oracle)}</code>"
                  f"{' (the routed path)' if ins.oracle == ins.path else ''}"
                  f"</div><ul>" + "".join(f"<li>level {l}: <code>{html.escape(ex.node_label(ins.oracle[:l]))}</code></li>"
                                         for l in range(1, len(ins.oracle) + 1)) + "</ul>") \
            if ins.oracle is not None else "<div>oracle path: unknown (not a probe)</div>"
        self.route_html.value = f"<ul>{route_rows}</ul>{oracle}"
        toggles = []
        for r in ins.route.itertuples():
            prefix = parse_prefix(r.node)
            toggle = self._w.ToggleButton(value=prefix in ex.blocked, description=f"block {r.node}",
                                          tooltip=f"block node {r.node} and its subtree", icon="ban")
            toggle.prefix = prefix
            toggle.observe(self.on_route_toggle, names="value")
            toggles.append(toggle)
        self.route_toggles.children = toggles
        self._show_blocked()
        expected = f" (expected answer: <b>{html.escape(ins.answer)}</b>)" if ins.answer else ""
        note = ("<div><i>eval_*: what <code>hiermem eval</code> recorded for this probe (without your blocks)</i></div>"
                if "eval_answer_logprob" in ins.modes.columns else "")
        self.modes_html.value = f"<div>{html.escape(ins.prompt)}{expected}</div>" + _table_html(ins.modes) + note
        side = pd.concat([ins.top_none[["token", "prob"]].assign(token=lambda f: f["token"].map(visible))
                          .add_prefix("none: "),
                          ins.top_memory[["token", "prob"]].assign(token=lambda f: f["token"].map(visible))
                          .add_prefix(f"{ins.memory_mode}: ")], axis=1)
        self.top_html.value = _table_html(side, "{:.3f}")

    def on_route_toggle(self, change: dict) -> None:
        """A block toggle of the routed path: block or unblock that node's subtree."""
        self.toggle_block(change["owner"].prefix, bool(change["new"]))

    def toggle_block(self, prefix: Sequence[int], blocked: bool | None = None) -> None:
        """Block (or unblock; None flips) a node's subtree and update every number."""
        if self.explorer is None or self._quiet:
            return
        prefix = parse_prefix(prefix)
        blocked = (prefix not in self.explorer.blocked) if blocked is None else blocked
        (self.explorer.block if blocked else self.explorer.unblock)(prefix)
        self.show()
        self.browse(self.browse_prefix)

    def clear_blocks(self) -> None:
        if self.explorer is None:
            return
        self.explorer.clear_blocks()
        self.show()
        self.browse(self.browse_prefix)

    def _show_blocked(self) -> None:
        blocked = self.explorer.blocked if self.explorer else []
        self.blocked_html.value = ("blocked: " + ", ".join(f"<code>{format_prefix(p)}</code>" for p in blocked)
                                   if blocked else "nothing blocked")

    def browse(self, prefix: Sequence[int]) -> None:
        """Show a node of the bank: its label, its children (to drill down), documents and facts."""
        ex = self.explorer
        if ex is None:
            return
        prefix = parse_prefix(prefix)
        self.browse_prefix = prefix
        label = ex.node_label(prefix) if prefix else \
            f"root · {len(ex._train_docs):,} training documents, k={ex.branching}, depth {ex.depth}"
        self.browse_path.value = f"<b>node</b> <code>{html.escape(label)}</code>"
        children = ex.children(prefix)
        with self._hold():
            self.browse_children.options = [(r.label, r.node) for r in children.itertuples()]
            self.browse_children.value = None
            self.browse_block.value = bool(prefix) and prefix in ex.blocked
        self.browse_block.disabled = not prefix
        self.browse_up.disabled = not prefix
        self.browse_open.disabled = children.empty
        self.docs_html.value = _table_html(ex.documents(prefix, limit=30)) if prefix else \
            "<i>open a node to list its documents</i>"
        self.facts_html.value = _table_html(ex.facts(prefix)) if prefix else "<i>open a node to list its facts</i>"
        self._show_blocked()

    def on_open_child(self) -> None:
        if self.browse_children.value:
            self.browse(parse_prefix(self.browse_children.value))

    def on_browse_block(self, change: Any = None) -> None:
        if self._quiet or not self.browse_prefix:
            return
        self.toggle_block(self.browse_prefix, bool(self.browse_block.value))

    # ------------------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _hold(self):
        """Update widgets without their observers reacting (the UI changing its own controls)."""
        previous, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = previous


def explorer_widget(run_dir: str | Path | None = None, runs_root: str | Path = "runs",
                    data: DataBundle | None = None) -> ExplorerUI:
    """The explorer's interface (display `.widget`); see `ExplorerUI`."""
    return ExplorerUI(run_dir, runs_root=runs_root, data=data)
