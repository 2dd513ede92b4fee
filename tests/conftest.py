"""Shared test settings: deterministic, small, CPU-only by default."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch
    # one thread by default: on a busy 2-core box, two threads per tiny model are far slower
    torch.set_num_threads(int(os.environ.get("HIERMEM_TEST_THREADS", "1")))
    yield


@pytest.fixture(scope="session")
def smoke_data_config(tmp_path_factory):
    """The `smoke` data preset built once per test session in a temporary root."""
    from hiermem.data.pipeline import DataConfig, build_data
    cfg = DataConfig.preset("smoke", root=str(tmp_path_factory.mktemp("data")))
    build_data(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def pretrained_anchor(smoke_data_config, tmp_path_factory):
    """A tiny anchor pretrained for a few steps on the smoke data (a run directory)."""
    from hiermem.train import TrainConfig, train
    cfg = TrainConfig(stage="pretrain", anchor="tiny-d1", data=smoke_data_config, tokens=30 * 4 * 128,
                      batch_size=4, checkpoint_every=10, log_every=5)
    return train(cfg, tmp_path_factory.mktemp("runs") / "anchor", progress=False)
