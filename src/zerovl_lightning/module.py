"""The LightningModule: a dual encoder, ZeroVL's contrastive loss, AdamW and the warm-up + cosine schedule."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from zerovl_lightning.loss import ContrastiveLoss
from zerovl_lightning.lr_schedule import warmup_cosine
from zerovl_lightning.model import DualEncoder

DEFAULT_OPTIMIZER: dict[str, Any] = {
    "_target_": "torch.optim.AdamW",
    "_partial_": True,
    "lr": 1e-4,
    "betas": [0.9, 0.98],
    "eps": 1e-6,
    "weight_decay": 1e-3,
}
DEFAULT_SCHEDULER: dict[str, Any] = {"warmup_fraction": 0.025, "min_lr_ratio": 0.1}


def _plain(cfg: Any) -> Any:
    """Config nodes → plain containers, so hyper-parameters pickle and reload without Hydra objects."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


class ZeroVLModule(L.LightningModule):
    """Trains a :class:`DualEncoder` with symmetric InfoNCE over the whole (gathered) global batch.

    ``model`` is either a config for :func:`zerovl_lightning.model.build_dual_encoder` (saved as a hyper-parameter,
    so ``load_from_checkpoint`` rebuilds the model) or a ready ``DualEncoder`` (notebooks).
    """

    def __init__(
        self,
        model: Mapping[str, Any] | DualEncoder,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model"])
            self.model = model
        else:
            model = _plain(model)
            self.save_hyperparameters({"model": model})
            self.model = instantiate(model)
        self.optimizer_cfg = dict(_plain(optimizer) or DEFAULT_OPTIMIZER)
        self.scheduler_cfg = {**DEFAULT_SCHEDULER, **(_plain(scheduler) or {})}
        self.save_hyperparameters(
            {"optimizer": self.optimizer_cfg, "scheduler": self.scheduler_cfg, "gather_with_grad": gather_with_grad}
        )
        self.loss_fn = ContrastiveLoss(gather_with_grad=gather_with_grad)
        self._step_started: float | None = None

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        images, tokens = batch["image"], batch["text"]
        image_emb = self.model.encode_image(images)  # [b, D], unit norm
        text_emb = self.model.encode_text(tokens)  # [b, D], unit norm
        loss = self.loss_fn(image_emb, text_emb, self.model.logit_scale.exp())
        self._log_step(loss, batch_size=images.shape[0])
        return loss

    def _log_step(self, loss: torch.Tensor, batch_size: int) -> None:
        """Loss, τ and LR every step; the loss is this rank's share, averaged over ranks = the full-batch loss."""
        self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=True, batch_size=batch_size)
        self.log("train/temperature", self.model.temperature, batch_size=batch_size)
        opt = self.optimizers(use_pl_optimizer=False)
        if opt is not None:
            self.log("train/lr", opt.param_groups[0]["lr"], prog_bar=True, batch_size=batch_size)
        self.log("train/global_batch_size", float(batch_size * self.trainer.world_size), batch_size=batch_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.model.clamp_temperature_()
        if self._step_started is not None:
            seconds = time.perf_counter() - self._step_started
            n = batch["image"].shape[0] * self.trainer.world_size
            self.log("train/samples_per_sec", n / max(seconds, 1e-9), batch_size=batch["image"].shape[0])

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only: no decay for gains, biases and the temperature (as OpenCLIP)."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or "logit_scale" in name or "bias" in name or "norm" in name or "bn" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.optimizer_cfg)(self.parameter_groups())
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, total, **self.scheduler_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
