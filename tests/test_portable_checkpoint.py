"""A checkpoint written on one machine loads on another with a different cache folder: the hyper-parameters
keep ``${zerovl.asset:…}`` references, not this machine's absolute paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from zerovl_lightning.export import load_dual_encoder
from zerovl_lightning.model import TINY_MODEL_CFG, build_tiny
from zerovl_lightning.module import ZeroVLModule


def test_checkpoint_loads_after_the_asset_folder_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "machine_a" / "cache", tmp_path / "machine_b" / "elsewhere"
    (first / "weights").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_tiny().clip.state_dict(), first / "weights" / "tiny.pt")  # a local pretrained checkpoint
    monkeypatch.setenv("ZEROVL_CACHE", str(first))
    cfg = OmegaConf.create(
        {
            "model": {
                "_target_": "zerovl_lightning.model.build_dual_encoder",
                "model_name": "zerovl-tiny",
                "model_cfg": TINY_MODEL_CFG,
                "pretrained": "${zerovl.asset:cache}/weights/tiny.pt",
                "temperature": 0.07,
            }
        }
    )
    module = ZeroVLModule(model=cfg.model)
    assert module.hparams["model"]["pretrained"] == "${zerovl.asset:cache}/weights/tiny.pt"
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    assert str(first) not in ckpt.read_bytes().decode("latin-1")  # no absolute asset path inside

    shutil.move(str(first), str(second))  # "another machine": the old folder is gone
    monkeypatch.setenv("ZEROVL_CACHE", str(second))
    loaded = ZeroVLModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    for (name, a), b in zip(module.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    encoder = load_dual_encoder(str(ckpt))  # the zerovl-export / zerovl-eval path
    assert torch.equal(encoder.clip.logit_scale, module.model.clip.logit_scale)
