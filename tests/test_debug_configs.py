"""The ``debug`` config group (lightning-hydra-template's) and ``model=openclip`` (a named open_clip model in one
key): each composes to what it says, ``debug=fdr`` runs Lightning's fast_dev_run end to end on the tiny model."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from hydra.utils import instantiate
from open_clip.factory import get_model_config
from test_configs import compose_train, options, write_smoke_data

DEBUG_KEYS = {
    "default": {"trainer.max_epochs": 1},
    "fdr": {"trainer.fast_dev_run": True},
    "limit": {"trainer.max_epochs": 3, "trainer.limit_train_batches": 0.01, "trainer.limit_val_batches": 0.05},
    "overfit": {"trainer.max_epochs": 20, "trainer.overfit_batches": 3},
    "profiler": {"trainer.profiler": "simple"},
}


def _select(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def test_debug_group_has_the_template_options() -> None:
    assert options("debug") == sorted(DEBUG_KEYS)


@pytest.mark.parametrize("option", sorted(DEBUG_KEYS))
def test_every_debug_option_composes(option: str, tmp_path: Path) -> None:
    cfg = compose_train([f"debug={option}"], tmp_path)
    assert cfg.hydra.runtime.choices["debug"] == option
    assert cfg.task_name == "debug"
    assert cfg.callbacks is None and cfg.logger is None
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1 and cfg.trainer.detect_anomaly is True
    assert cfg.data.num_workers == 0
    for key, value in DEBUG_KEYS[option].items():
        assert _select(cfg, key) == value, key


def test_debug_fdr_runs_one_fast_dev_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zerovl_lightning.train import build, run

    cache = write_smoke_data(tmp_path / "cache", n_train=16, n_heldout=4, per_shard=8)
    monkeypatch.setenv("ZEROVL_CACHE", str(cache))
    cfg = compose_train(["debug=fdr", "model=tiny", "data.batch_size=4"], tmp_path)
    _, _, trainer = build(cfg)
    assert trainer.fast_dev_run == 1 and trainer.loggers == []
    metrics = run(cfg)
    assert metrics["train/loss"] > 0 and metrics["train/global_batch_size"] == 4.0
    assert not (tmp_path / "out" / "checkpoints").exists()  # fast_dev_run writes no checkpoints


def test_model_openclip_is_one_key_random_init_offline(tmp_path: Path) -> None:
    cfg = compose_train(["model=openclip"], tmp_path)
    assert cfg.model.model_name == "ViT-B-16" and cfg.model.pretrained is None
    assert cfg.model._target_ == "zerovl_lightning.model.build_dual_encoder"
    name = "ViT-S-32-alt"  # the smallest of open_clip's own configs (~40M parameters): built here for real
    cfg = compose_train(["model=openclip", f"model.model_name={name}"], tmp_path)
    model = instantiate(cfg.model)
    want = get_model_config(name)
    assert model.model_name == name
    assert model.clip.visual.transformer.width == want["vision_cfg"]["width"]
    assert len(model.clip.transformer.resblocks) == want["text_cfg"]["layers"]
    assert model.clip.text_projection.shape[-1] == want["embed_dim"]
    assert abs(float(torch.exp(-model.logit_scale)) - 0.02) < 1e-6 and not model.clip.logit_scale.requires_grad
    assert name in open_clip.list_models()
