"""The explorer: its numbers equal `hiermem eval`'s, blocking, the bank browser, and its widgets driven
headless (every callback called as a notebook click would, the displayed values checked)."""

import shutil

import numpy as np
import pandas as pd
import pytest

from hiermem.explore import Explorer, find_runs, format_prefix, parse_prefix
from hiermem.explore_ui import explorer_widget
from hiermem.rundir import RunDir

EVAL = dict(max_probes_per_relation=3, heldout_docs_per_source=2, max_new_tokens=4, perplexity_modes=("none",))


@pytest.fixture(scope="module")
def runs(smoke_data_config, pretrained_anchor, tmp_path_factory):
    """A co-trained memory run on the smoke data, evaluated; a copy without its evaluation; the dense anchor."""
    from hiermem.config import MemoryConfig
    from hiermem.evaluate import EvalConfig, evaluate_run
    from hiermem.train import TrainConfig, train
    root = tmp_path_factory.mktemp("explore_runs")
    cfg = TrainConfig(stage="memory-cotrain", anchor="tiny-d1", data=smoke_data_config, init_from=str(pretrained_anchor),
                      memory=MemoryConfig(multipliers=(8, 2), branching=4), tokens=8 * 4 * 128, batch_size=4,
                      optim=TrainConfig().optim.replace(bank_lr=0.05))
    memory = train(cfg, root / "memory", progress=False)
    unevaluated = shutil.copytree(memory, root / "unevaluated")
    evaluate_run(memory, EvalConfig(**EVAL))
    dense = shutil.copytree(pretrained_anchor, root / "dense")
    return {"root": root, "memory": str(memory), "unevaluated": str(unevaluated), "dense": str(dense)}


@pytest.fixture(scope="module")
def explorer(runs):
    return Explorer(runs["memory"])


def test_explorer_numbers_equal_hiermem_eval(explorer, runs):
    """Every evaluated probe in every mode: the greedy answer and the answer's log-probability are the
    eval table's, and so are the routed, oracle and used paths."""
    table = RunDir(runs["memory"]).eval_table("probes")
    assert set(table["mode"]) == set(explorer.modes) >= {"none", "generic", "fetched", "blocked-drop", "blocked-reroute",
                                                         "wrong-path", "oracle-path", "drop-level1", "drop-level2"}
    assert list(explorer.evaluated_probes["probe_id"]) == list(table[table["mode"] == "none"]["probe_id"])
    for probe_id, rows in table.groupby("probe_id", sort=False):
        probe = explorer.probe(probe_id)
        prompt, answer = probe["prompt"], str(probe["answer"])
        assert format_prefix(explorer.route(prompt)) == rows["routed_path"].iloc[0].replace(",", ".")
        assert format_prefix(explorer.oracle_path(prompt)) == rows["oracle_path"].iloc[0].replace(",", ".")
        for row in rows.itertuples():
            assert explorer.answer(prompt, row.mode) == row.generated, (probe_id, row.mode)
            assert explorer.answer_logprob(prompt, answer, row.mode) == pytest.approx(row.answer_logprob, abs=1e-4), \
                (probe_id, row.mode)
            memory = explorer.memory(prompt, row.mode)
            used = "" if memory.paths is None else ",".join(map(str, memory.paths[0]))
            assert used == row.used_path, (probe_id, row.mode)
    # the mode table shows both, side by side
    probe_id = table["probe_id"].iloc[0]
    modes = explorer.inspect(probe_id=probe_id).modes.set_index("mode")
    np.testing.assert_allclose(modes["answer_logprob"], modes["eval_answer_logprob"], atol=1e-4)
    assert (modes["generated"] == modes["eval_generated"]).all() and (modes["correct"] == modes["eval_correct"]).all()


def test_inspect_route_labels_and_top_tokens(explorer):
    probe = explorer.probes(group="SK", evaluated_only=True).iloc[0]
    found = explorer.inspect(probe_id=probe["probe_id"])
    assert found.prompt == probe["prompt"] and found.answer == str(probe["answer"]) and found.oracle is not None
    assert list(found.route["level"]) == [1, 2] and found.route["node"].iloc[-1] == format_prefix(found.path)
    for label, level in zip(found.route["label"], (1, 2)):
        info = explorer.node_info(found.path[:level])
        assert label.startswith(format_prefix(found.path[:level])) and f"{info['docs']:,} docs" in label
        assert info["docs"] > 0 and info["typical"] and all(t in label for t in info["typical"])
        assert sum(info["sources"].values()) <= info["docs"]
    for top in (found.top_none, found.top_memory):
        assert len(top) == 10 and list(top["rank"]) == list(range(1, 11))
        assert (np.diff(top["prob"]) <= 0).all() and 0 < top["prob"].sum() <= 1 + 1e-9
    assert not np.allclose(found.top_none["prob"], found.top_memory["prob"])  # the fetched memory changes them
    # a typed prompt: routed, no oracle, answers with a budget from its answer
    typed = explorer.inspect("Paris is the capital of", answer="France")
    assert typed.probe is None and typed.oracle is None and len(typed.path) == 2
    assert typed.modes["answer_logprob"].notna().all() and "eval_answer_logprob" not in typed.modes


def test_blocking_a_node_changes_every_number_and_unblocking_restores_them(explorer):
    probe = explorer.probes(evaluated_only=True).iloc[0]
    prompt, answer = probe["prompt"], str(probe["answer"])
    path = explorer.route(prompt)
    none = explorer.answer_logprob(prompt, answer, "none")
    fetched = explorer.answer_logprob(prompt, answer, "fetched")
    assert fetched != pytest.approx(none, abs=1e-6)
    explorer.block(path[:1])
    try:
        assert explorer.blocked == [path[:1]] and explorer.is_blocked(path) and not explorer.is_blocked(())
        # drop: the routed subtree's blocks contribute nothing, so fetched is the anchor alone
        assert explorer.answer_logprob(prompt, answer, "fetched") == pytest.approx(none, abs=1e-5)
        assert explorer.memory(prompt, "fetched").blocked.tolist() == [[True, True]]
        assert explorer.memory(prompt, "generic").blocked is None  # the generic block is no node
        table = explorer.mode_table(prompt, answer).set_index("mode")
        assert table.loc["fetched", "dropped"] == "L1,L2" and "BLOCKED" in explorer.node_label(path[:1])
        # reroute: the prompt goes to the nearest open subtree instead
        explorer.block_policy = "reroute"
        rerouted = explorer.route(prompt)
        assert rerouted[:1] != path[:1] and explorer.memory(prompt, "fetched").blocked.tolist() == [[False, False]]
    finally:
        explorer.block_policy = "drop"
        explorer.unblock(path[:1])
    assert explorer.blocked == [] and explorer.route(prompt) == path
    assert explorer.answer_logprob(prompt, answer, "fetched") == pytest.approx(fetched, abs=1e-9)
    with pytest.raises(ValueError, match="1..2 entries"):
        explorer.block(())
    with pytest.raises(ValueError, match="not available"):
        explorer.answer(prompt, "no-such-mode")


def test_bank_browser_children_documents_and_facts(explorer):
    data = explorer.data
    top = explorer.children(())
    train = int((data.corpus["split"] == "train").sum())
    assert top["docs"].sum() == train and len(top) <= explorer.branching
    with_facts = np.flatnonzero(((data.corpus["fact_id"] != "") & (data.corpus["split"] == "train")).to_numpy())
    node = tuple(int(i) for i in data.doc_paths[with_facts[0], :1])  # a node holding fact documents
    assert node in set(top["prefix"])
    below = explorer.children(node)
    assert below["docs"].sum() == node_docs(explorer, node) and all(p[:1] == node for p in below["prefix"])
    assert explorer.children(below["prefix"].iloc[0]).empty  # a leaf has no children
    docs = explorer.documents(node, limit=None)
    assert len(docs) == node_docs(explorer, node) and (np.diff(docs["typicality"]) <= 1e-9).all()
    assert all(leaf.startswith(format_prefix(node) + ".") for leaf in docs["leaf"])
    leaf = tuple(int(i) for i in docs["leaf"].iloc[0].split("."))
    facts = explorer.facts(node)
    assert len(facts) and (facts["docs_here"] >= 1).all() and (facts["docs_here"] <= facts["docs_total"]).all()
    fact_ids = set(data.corpus.loc[data.corpus["doc_id"].isin(docs["doc_id"]), "fact_id"]) - {""}
    assert set(facts["fact_id"]) == fact_ids
    assert facts["majority_here"].any() and len(explorer.facts(leaf)) <= len(facts)


def node_docs(explorer, prefix):
    data = explorer.data
    train = (data.corpus["split"] == "train").to_numpy()
    return int((np.all(data.doc_paths[:, :len(prefix)] == np.asarray(prefix), axis=1) & train).sum())


def test_widget_callbacks_driven_headless(runs):
    ui = explorer_widget(runs["memory"], runs_root=runs["root"])
    ex = ui.explorer
    assert ex is not None and "memory" in ui.message.value and "error" not in ui.message.value
    assert set(ui.run_picker.options) == {runs["memory"], runs["unevaluated"], runs["dense"]}
    # the filters refill the probe list; picking one fills the prompt and shows its numbers
    relation = ui.relation.options[1]
    ui.relation.value = relation
    ui.group.value = "SK"
    ids = [value for _, value in ui.probe_picker.options]
    expected = ex.probes(relation=relation, group="SK", evaluated_only=True)["probe_id"].tolist()
    assert ids == expected and ids
    ui.probe_picker.value = ids[-1]
    probe = ex.probe(ids[-1])
    assert ui.prompt.value == probe["prompt"] and ui.answer_box.value == str(probe["answer"])
    rows = ex.eval_rows(ids[-1]).set_index("mode")
    for mode in ex.modes:
        assert f"<td>{mode}</td>" in ui.modes_html.value
        assert f"{rows.loc[mode, 'answer_logprob']:.4g}" in ui.modes_html.value
    path = ui.inspection.path
    assert format_prefix(path) in ui.route_html.value and ex.node_label(path[:1]) in ui.route_html.value
    assert "none: token" in ui.top_html.value and "fetched: token" in ui.top_html.value
    # the memory mode of the token table
    ui.mode.value = "oracle-path"
    assert "oracle-path: token" in ui.top_html.value
    # a click on the first node of the path blocks its subtree: every number updates
    before = ui.modes_html.value
    toggle = ui.route_toggles.children[0]
    assert toggle.prefix == path[:1] and not toggle.value
    toggle.value = True
    assert ex.blocked == [path[:1]] and format_prefix(path[:1]) in ui.blocked_html.value
    assert ui.modes_html.value != before and "L1,L2" in ui.modes_html.value
    assert ui.route_toggles.children[0].value  # the redrawn toggle shows the block
    ui.route_toggles.children[0].value = False
    assert ex.blocked == [] and ui.modes_html.value == before
    # a typed prompt (Enter) is shown without a probe
    ui.answer_box.value = ""
    ui.prompt.value = "Paris is the capital of"
    assert ui.inspection.probe is None and "not a probe" in ui.route_html.value
    # the bank browser: open a child, list its documents and facts, block it, go up
    ui.browse(())
    child = ui.browse_children.options[0][1]
    ui.browse_children.value = child
    ui.browse_open.click()
    assert ui.browse_prefix == parse_prefix(child) and ex.node_label(parse_prefix(child)) in ui.browse_path.value
    first_doc = ex.documents(parse_prefix(child), limit=1)["doc_id"].iloc[0]
    assert first_doc in ui.docs_html.value and "relation" in ui.facts_html.value
    ui.browse_block.value = True
    assert ex.blocked == [parse_prefix(child)] and "BLOCKED" in ui.browse_path.value
    ui.clear_button.click()
    assert ex.blocked == [] and not ui.browse_block.value and "nothing blocked" in ui.blocked_html.value
    ui.browse_up.click()
    assert ui.browse_prefix == () and ui.browse_up.disabled
    # another run through the picker and the load button
    ui.run_picker.value = runs["dense"]
    ui.load_button.click()
    assert ui.explorer is not ex and ui.explorer.modes == ["none"]


def test_bad_runs_show_a_message_not_a_traceback(runs, tmp_path):
    ui = explorer_widget(str(tmp_path), runs_root=tmp_path)  # not a run directory
    assert ui.explorer is None and "cannot explore" in ui.message.value and "not a run directory" in ui.message.value
    assert ui.tabs.layout.display == "none"
    ui.load(str(tmp_path / "missing"))
    assert "does not exist" in ui.message.value
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(RunDir(runs["memory"]).config_path, unfinished / RunDir.CONFIG)
    ui.load(str(unfinished))
    assert "no final checkpoint" in ui.message.value and ui.explorer is None
    # without an evaluation: a warning, and the explorer still works with the default settings
    ui.load(runs["unevaluated"])
    assert ui.explorer is not None and "has no evaluation yet" in ui.message.value and "hiermem eval" in ui.message.value
    assert "eval_answer_logprob" not in ui.inspection.modes and ui.inspection.modes["answer_logprob"].notna().all()
    assert not ui.evaluated_only.value
    # a dense run: only mode none, a warning, routing and the browser still work
    ui.load(runs["dense"])
    assert "without a memory bank" in ui.message.value and ui.explorer.modes == ["none"]
    assert list(ui.inspection.modes["mode"]) == ["none"] and ui.mode.options == ("none",)
    assert ui.browse_children.options


def test_find_runs_and_prefixes(runs, tmp_path):
    assert find_runs(runs["root"]) == sorted([runs["memory"], runs["unevaluated"], runs["dense"]])
    assert find_runs(tmp_path / "nothing") == []
    assert parse_prefix("3,1") == parse_prefix("3.1") == parse_prefix((3, 1)) == (3, 1) and parse_prefix("") == ()
    assert format_prefix((3, 1)) == "3.1" and format_prefix(()) == "root"
    assert isinstance(Explorer(runs["memory"]).probes(bucket="all"), pd.DataFrame)
