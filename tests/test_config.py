"""Configs: YAML round trip and validation errors that name the field and the allowed range."""

import pytest

from hiermem.config import MemoryConfig, ModelConfig, model_preset, parse_multipliers, tiny_config


def test_yaml_round_trip(tmp_path):
    cfg = model_preset("openlm-160m")
    mem = MemoryConfig(type="lora-ffn", multipliers=(256, 64, 16, 0), placement="late")
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    assert MemoryConfig.from_yaml(mem.to_yaml()) == mem
    mem.save(tmp_path / "m.yaml")
    assert MemoryConfig.load(tmp_path / "m.yaml") == mem


@pytest.mark.parametrize("kwargs,field", [
    ({"d_model": 0}, "d_model"), ({"n_heads": -1}, "n_heads"), ({"head_dim": 31}, "head_dim"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_model_config_errors_name_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"type": "mlp"}, "type"), ({"multipliers": (4, -1)}, r"multipliers\[1\]"), ({"branching": 1}, "branching"),
    ({"placement": "everywhere"}, "placement"), ({"multipliers": ()}, "multipliers"),
])
def test_memory_config_errors_name_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MemoryConfig(**kwargs)


def test_unknown_and_mistyped_yaml_fields():
    with pytest.raises(ValueError, match="unknown config field.*d_modle"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(ValueError, match="n_layers.*integer"):
        ModelConfig.from_dict({"n_layers": "four"})


def test_placement_layers():
    mem = MemoryConfig(placement="late")
    assert mem.memory_layers(35) == tuple(range(24, 35))
    assert MemoryConfig(placement="early").memory_layers(35) == tuple(range(11))
    assert MemoryConfig(placement="2,0").memory_layers(4) == (0, 2)
    with pytest.raises(ValueError, match="placement.*0, 3"):
        MemoryConfig(placement="0,7").memory_layers(4)
    scaled = MemoryConfig(multipliers=(0, 64), placement="late", scale_units_to_uniform=True)
    assert scaled.units_per_layer(33) == (0, 192)


def test_tiny_family_from_one_dial():
    small, big = tiny_config(2), tiny_config(4)
    assert (small.d_model, small.n_heads, small.ffn_dim) == (128, 4, 512)
    assert (big.d_model, big.n_heads, big.ffn_dim) == (256, 8, 1024)
    assert model_preset("tiny-d3") == tiny_config(3)


def test_parse_multipliers():
    assert parse_multipliers("(256, 64,16,0)") == (256, 64, 16, 0)
    with pytest.raises(ValueError, match="multipliers"):
        parse_multipliers("a,b")
