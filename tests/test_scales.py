"""One scale vocabulary (hiermem.scales): the demo, the notebooks and the data presets use the same
names for the same sizes, and each refuses an unknown name in one line naming the ones it accepts."""

import re
from pathlib import Path

import pytest

from hiermem import scales
from hiermem.data.corpus import PRESETS, CorpusConfig
from hiermem.data.pipeline import DataConfig
from hiermem.demo import SCALES as DEMO, DemoConfig, run_demo
from hiermem.notebooks import list_notebooks, notebook_parameters, run_notebook

REPO = Path(__file__).resolve().parents[1]


def test_every_consumer_uses_names_of_the_one_table_smallest_first():
    order = list(scales.SCALES)
    for consumer, names in scales.ACCEPTED.items():
        assert names and set(names) <= set(order), consumer
        assert sorted(names, key=order.index) == list(names), consumer
    assert set(DEMO) == set(scales.accepted("demo"))
    assert set(PRESETS) == set(scales.accepted("data"))
    # the same name is the same size: each demo scale is built on the data preset of its name
    for name, cfg in DEMO.items():
        assert cfg.scale == name and cfg.data.corpus.preset == name


def test_notebooks_key_their_per_scale_settings_by_the_accepted_names():
    accepted = set(scales.accepted("notebooks"))
    for name in list_notebooks():
        for value in notebook_parameters(name).values():
            keys = set(re.findall(r'^\s*"(\w+)": \{', value, flags=re.M)) & set(scales.SCALES)
            assert keys <= accepted, (name, keys)


@pytest.mark.parametrize("consumer, refuse", [
    ("demo", lambda name: run_demo(name)),
    ("knowledge", lambda name: DataConfig.knowledge(name)),
    ("knowledge", lambda name: DataConfig.from_dict({"preset": name, "regime": "knowledge"})),
    ("notebooks", lambda name: run_notebook("chinchilla_check", scale=name)),
    ("data", lambda name: DataConfig.preset(name)),
    ("data", lambda name: CorpusConfig.preset(name)),
])
def test_an_unknown_scale_is_refused_in_one_line_naming_the_accepted_ones(consumer, refuse):
    accepted = ", ".join(scales.accepted(consumer))
    with pytest.raises(ValueError) as err:
        refuse("default")  # the demo's old name for `small`
    message = str(err.value)
    assert "\n" not in message and message.startswith("unknown scale 'default'") and message.endswith(accepted)


def test_config_files_refuse_unknown_scales_naming_the_accepted_ones(tmp_path):
    path = tmp_path / "pilot.yaml"
    path.write_text("scale: default\n")
    with pytest.raises(ValueError, match=r"scale.*one of \['smoke', 'small'\].*'default'"):
        DemoConfig.load(path)
    with pytest.raises(ValueError, match=r"unknown scale 'huge' for the data presets; accepted: smoke, small, full"):
        DataConfig.from_dict({"preset": "huge"})


def test_the_main_job_is_the_small_scale_and_every_pilot_loads():
    assert DemoConfig() == DEMO["small"] and DemoConfig.from_dict({}) == DEMO["small"]
    pilots = sorted((REPO / "configs" / "pilots").glob("*.yaml"))
    assert pilots
    for path in pilots:
        assert DemoConfig.load(path).scale == "small", path
