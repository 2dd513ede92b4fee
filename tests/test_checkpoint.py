"""Checkpoints: bit-exact round trip, per-level bank files, and errors naming the mismatch."""

import pytest
import torch

from hiermem.checkpoint import load_bank_level, load_model, load_weights, save_checkpoint
from hiermem.config import MemoryConfig, ModelConfig
from hiermem.model import HierMemLM

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, head_dim=8, ffn_dim=48, vocab_size=61, max_seq_len=32,
                  tie_embeddings=False)
MEM = MemoryConfig(type="ffn", multipliers=(2, 1), branching=4)


def _trained_model():
    torch.manual_seed(0)
    model = HierMemLM(CFG, MEM)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_round_trip_is_bit_exact(tmp_path):
    model = _trained_model()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    tokens = torch.randint(0, CFG.vocab_size, (3, 9))
    paths = torch.tensor([[0, 1], [3, 3], [2, 0]])
    assert torch.equal(model(tokens, paths=paths), loaded(tokens, paths=paths))
    assert torch.equal(model(tokens, paths=paths, use_generic=torch.ones(3, dtype=torch.bool)),
                       loaded(tokens, paths=paths, use_generic=torch.ones(3, dtype=torch.bool)))
    assert sorted(p.name for p in (tmp_path / "ckpt" / "bank").iterdir()) == [
        "generic.safetensors", "level_1.safetensors", "level_2.safetensors"]


def test_one_level_loads_alone(tmp_path):
    model = _trained_model()
    save_checkpoint(model, tmp_path / "ckpt")
    assert torch.equal(load_bank_level(tmp_path / "ckpt", 2), model.bank.levels[1].data)
    fresh = HierMemLM(CFG, MEM)
    before = fresh.bank.levels[1].data.clone()
    load_weights(fresh, tmp_path / "ckpt", levels=[1])
    assert torch.equal(fresh.bank.levels[0].data, model.bank.levels[0].data)
    assert torch.equal(fresh.bank.levels[1].data, before)
    (tmp_path / "ckpt" / "bank" / "level_2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="level 2"):
        load_model(tmp_path / "ckpt")


def test_mismatched_config_is_named(tmp_path):
    save_checkpoint(_trained_model(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="d_model: checkpoint has 32, model has 64"):
        load_weights(HierMemLM(CFG.replace(d_model=64), MEM), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="multipliers"):
        load_weights(HierMemLM(CFG, MEM.replace(multipliers=(4, 1))), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="memory"):
        load_weights(HierMemLM(CFG, None), tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a hiermem checkpoint"):
        load_model(tmp_path / "nothing")
