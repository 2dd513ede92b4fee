"""The paper figures' drawing rules: a failed run is marked where it would have been and named; one concept
keeps one colour across figures whichever of its values a figure has."""

import pandas as pd
import pytest

import analysis.paper_figures as pf


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """The matplotlib figures the plot functions would save (they still write PNG + CSV)."""
    figures = []
    real = pf.save_figure

    def keep(fig, data, path):
        figures.append(fig)
        return real(fig, data, path)
    monkeypatch.setattr(pf, "save_figure", keep)
    return figures


def _data(types):
    return pd.DataFrame({"fetched_params": [1e4 * (i + 1) for i in range(len(types))], "cfg.memory.type": list(types),
                         "avg_sk": 10.0, "lo": 8.0, "hi": 12.0})


def test_a_failed_run_is_marked_on_the_x_axis_and_named(drawn, tmp_path):
    failed = pd.DataFrame({"run": ["r9"], "sweep": ["memory_type"], "label": ["memory.type=kv size 3"],
                           "fetched_params": [5e4]})
    files = pf.plot_against(_data(["ffn", "lora-ffn"]), "fetched_params", "cfg.memory.type", tmp_path / "f",
                            "title", "fetched", order=pf.TYPE_ORDER, failed=failed)
    ax = drawn[-1].axes[0]
    marks = [c for c in ax.collections if c.get_label() == "failed run (no score)"]
    assert len(marks) == 1 and marks[0].get_offsets()[0][0] == pytest.approx(5e4)
    assert any("1 failed run(s), not drawn: memory.type=kv size 3" in t.get_text() for t in ax.texts)
    assert "failed run (no score)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert pd.read_csv(files.csv)["cfg.memory.type"].tolist() == ["ffn", "lora-ffn"]  # the CSV holds what is drawn
    pf.plot_bars(_data(["early"]).rename(columns={"cfg.memory.type": "where"}), "where", tmp_path / "b", "t", "x",
                 failed=failed)
    assert any("not drawn" in t.get_text() for t in drawn[-1].axes[0].texts)


def test_a_concept_keeps_its_colour_whichever_values_a_figure_has(drawn, tmp_path):
    """Bug caught: colours assigned by position among the values present, so 'kv' changed colour between
    a figure with every memory type and one where a type's runs failed."""
    def colour_of(types, key):
        pf.plot_against(_data(types), "fetched_params", "cfg.memory.type", tmp_path / "c", "t", "x",
                        order=pf.TYPE_ORDER)
        lines = {c.get_label(): c.lines[0].get_color() for c in drawn[-1].axes[0].containers}
        return lines[key]
    assert colour_of(pf.TYPE_ORDER, "kv") == colour_of(["ffn", "kv"], "kv")
    assert colour_of(pf.TYPE_ORDER, "ffn") != colour_of(pf.TYPE_ORDER, "kv")
