"""The LightningModule on in-memory batches: it learns, logs, schedules per step and reloads from checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ThroughputMonitor
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from zerovl_lightning.model import TINY_MODEL_CFG, build_tiny
from zerovl_lightning.module import ZeroVLModule

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = {"_target_": "zerovl_lightning.model.build_dual_encoder", "model_name": "zerovl-tiny",
        "model_cfg": TINY_MODEL_CFG, "temperature": 0.07, "learn_temperature": True}


class RepeatBatch(Dataset):
    """The same batch of 8 pairs, `n` times: a model that works must overfit it."""

    def __init__(self, n: int, tokenizer) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(8, 3, 32, 32, generator=g)
        self.text = tokenizer([f"caption number {i}" for i in range(8)])
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"image": self.images, "text": self.text, "key": [str(k) for k in range(8)], "source": ["s"] * 8}


def _trainer(tmp_path, steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, **kw)


def test_overfits_one_batch_and_logs(tmp_path):
    torch.manual_seed(0)
    module = ZeroVLModule(model=TINY, optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3},
                          scheduler={"warmup_fraction": 0.1})
    data = DataLoader(RepeatBatch(40, module.model.tokenizer), batch_size=None)
    first = None
    trainer = _trainer(tmp_path, 40)

    class Record(L.Callback):
        losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    rec = Record()
    trainer.callbacks.append(rec)
    # the throughput callback of the default callbacks group (Lightning's ThroughputMonitor, device-synced)
    throughput = instantiate(OmegaConf.load(CONF / "callbacks" / "throughput.yaml").throughput)
    assert isinstance(throughput, ThroughputMonitor)
    trainer.callbacks.append(throughput)
    trainer.fit(module, data)
    first, last = rec.losses[0], rec.losses[-1]
    assert first > 1.5  # ~log(8) = 2.08 at random init
    assert last < 0.1 * first
    logged = trainer.logged_metrics
    for key in ("train/loss", "train/temperature", "train/lr"):
        assert key in logged, key
    header = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/device/samples_per_sec" in header  # one process: the per-device figure
    # LR followed the per-step schedule: 4 warm-up steps, cosine to 0.1x peak at the end
    assert float(logged["train/lr"]) == pytest.approx(3e-4, rel=0.05)


def test_no_weight_decay_on_temperature_and_gains():
    module = ZeroVLModule(model=build_tiny())
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert any("logit_scale" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_checkpoint_rebuilds_model_from_hparams(tmp_path):
    module = ZeroVLModule(model=TINY)
    data = DataLoader(RepeatBatch(2, module.model.tokenizer), batch_size=None)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ZeroVLModule.load_from_checkpoint(path, weights_only=False)
    batch = next(iter(data))
    module.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(batch["image"]), module.model.encode_image(batch["image"]))
    assert loaded.model.temperature == pytest.approx(module.model.temperature)
