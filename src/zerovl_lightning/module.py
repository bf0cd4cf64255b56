"""The LightningModule: a dual encoder, ZeroVL's contrastive loss, AdamW and the warm-up + cosine schedule."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from zerovl_lightning.assets import to_plain, to_portable
from zerovl_lightning.dga import DecoupledStep, split_batch
from zerovl_lightning.distributed import world_info
from zerovl_lightning.eval.validation import RetrievalValidation
from zerovl_lightning.feature_cache import FeatureCache, sample_keys
from zerovl_lightning.locked_cache import LockedTowerCache
from zerovl_lightning.loss import ContrastiveLoss
from zerovl_lightning.lr_schedule import warmup_cosine
from zerovl_lightning.mixup import CoinFlipMixup, MixupPlan, encode_pair
from zerovl_lightning.model import DualEncoder
from zerovl_lightning.param_groups import parameter_groups
from zerovl_lightning.siglip_loss import SigLipLoss, SigLipObjective

log = logging.getLogger(__name__)

DEFAULT_OPTIMIZER: dict[str, Any] = {
    "_target_": "torch.optim.AdamW",
    "_partial_": True,
    "lr": 1e-4,
    "betas": [0.9, 0.98],
    "eps": 1e-6,
    "weight_decay": 1e-3,
}
DEFAULT_SCHEDULER: dict[str, Any] = {"warmup_fraction": 0.025, "min_lr_ratio": 0.1}
# DGA options (conf/method/dga.yaml). Lightning forbids Trainer(gradient_clip_val) under manual optimization,
# so the DGA path clips with its own keys (after AMP unscaling, in on_before_optimizer_step).
DEFAULT_DGA: dict[str, Any] = {
    "closed_form": True,
    "gradient_clip_val": None,
    "gradient_clip_algorithm": "norm",
    "keep_last_graph": True,
    "locked_cache": True,  # locked tower parts run once per step (pass 1), replayed in pass 2
    "locked_cache_mb": 2048.0,  # refuse a step whose locked-tower cache would exceed this (per rank)
}
# Locked towers' outputs kept per sample across steps (feature_cache.py; conf/module/zerovl.yaml).
DEFAULT_FEATURE_CACHE: dict[str, Any] = {"enabled": False, "limit_mb": 4096.0}
LOSSES = ("infonce", "siglip")


def _check_sub_batch(sub_batch_size: int, batch_size: int) -> None:
    """The DGA sub-batch must divide the per-rank batch (``batch_size``, from the config: ``train.build``)."""
    if batch_size % sub_batch_size:
        raise ValueError(
            f"module.sub_batch_size={sub_batch_size} must divide data.batch_size={batch_size} "
            "(the per-rank batch of one optimizer step)"
        )
    if batch_size == sub_batch_size:
        log.warning(
            "module.sub_batch_size equals data.batch_size: DGA with one sub-batch costs an extra "
            "forward per step; drop module.sub_batch_size to train with the plain step"
        )


class ZeroVLModule(L.LightningModule):
    """Trains a :class:`DualEncoder` with symmetric InfoNCE over the whole (gathered) global batch.

    ``model`` is either a config for :func:`zerovl_lightning.model.build_dual_encoder` (saved as a hyper-parameter,
    so ``load_from_checkpoint`` rebuilds the model) or a ready ``DualEncoder`` (notebooks). ``batch_size`` is the
    per-rank batch of one step, from the config (``train.build`` passes it), so a DGA ``sub_batch_size`` that does
    not divide it fails at construction; the module never reads the DataModule.
    """

    # ThroughputMonitor reads this (None: no FLOP counting, and no per-run warning that it is missing)
    flops_per_batch: int | None = None

    def __init__(
        self,
        model: Mapping[str, Any] | DualEncoder,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        gather_with_grad: bool = True,
        sub_batch_size: int | None = None,
        mixup: Mapping[str, Any] | None = None,
        dga: Mapping[str, Any] | None = None,
        loss: str = "infonce",
        retrieval: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        lr_scales: Mapping[str, float] | None = None,
        feature_cache: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Hydra hands the option nodes over as OmegaConf containers; the module config cannot take `_convert_: all`,
        # because its model node must reach to_portable unresolved (asset references survive in the checkpoint).
        optimizer, scheduler, mixup, dga, retrieval, lr_scales, feature_cache = (
            to_plain(node) for node in (optimizer, scheduler, mixup, dga, retrieval, lr_scales, feature_cache)
        )
        if isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model"])
            self.model = model
        else:
            model = to_portable(model)  # asset paths stay ${zerovl.asset:…}: the checkpoint loads on any machine
            self.save_hyperparameters({"model": model})
            self.model = instantiate(model, _convert_="all")
        self.optimizer_cfg = dict(optimizer or DEFAULT_OPTIMIZER)
        self.scheduler_cfg = {**DEFAULT_SCHEDULER, **(scheduler or {})}
        self.lr_scales = {str(k): float(v) for k, v in (lr_scales or {}).items()}
        self.save_hyperparameters(
            {
                "optimizer": self.optimizer_cfg,
                "scheduler": self.scheduler_cfg,
                "gather_with_grad": gather_with_grad,
                "lr_scales": self.lr_scales,
            }
        )
        self.loss_name = _check_loss(loss, self.model)
        self.loss_fn = (SigLipLoss if self.loss_name == "siglip" else ContrastiveLoss)(gather_with_grad)
        self.save_hyperparameters({"loss": self.loss_name})

        # Coin-flipping mixup (off unless configured); decoupled gradient accumulation iff sub_batch_size.
        mixup_cfg = dict(mixup or {"enabled": False})
        self.mixup = CoinFlipMixup(**mixup_cfg)
        self.dga_cfg = {**DEFAULT_DGA, **(dga or {})}
        if sub_batch_size is not None and int(sub_batch_size) <= 0:
            raise ValueError(f"module.sub_batch_size must be positive, got {sub_batch_size}")
        self.sub_batch_size = None if sub_batch_size is None else int(sub_batch_size)
        if self.sub_batch_size is not None and batch_size is not None:
            _check_sub_batch(self.sub_batch_size, int(batch_size))
        self.dga_step = DecoupledStep(
            closed_form=self.dga_cfg["closed_form"],
            keep_last_graph=self.dga_cfg["keep_last_graph"],
        )
        self.automatic_optimization = self.sub_batch_size is None
        self.tower_cache = (
            LockedTowerCache.for_model(self.model, float(self.dga_cfg["locked_cache_mb"]))
            if self.sub_batch_size is not None and self.dga_cfg["locked_cache"]
            else None
        )
        if self.tower_cache is not None:
            log.info("DGA pass 2 replays the locked parts, not recomputing them (%s)", self.tower_cache.describe())
        self.save_hyperparameters({"sub_batch_size": self.sub_batch_size, "mixup": mixup_cfg, "dga": self.dga_cfg})
        self.feature_cache_cfg = {**DEFAULT_FEATURE_CACHE, **(feature_cache or {})}
        self.feature_cache = _feature_cache(self.model, self.feature_cache_cfg)
        self.save_hyperparameters({"feature_cache": self.feature_cache_cfg})
        # Zero-shot retrieval in the validation loop (options: ks, chunk_size, ties); sets come from val_dataloader.
        retrieval_cfg = dict(retrieval or {})
        self.retrieval = RetrievalValidation(**retrieval_cfg)
        self.save_hyperparameters({"retrieval": retrieval_cfg})

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        plan = self.mixup.plan(self.global_step)  # one plan per optimizer step, the same on every rank
        lr = self._current_lr()  # read before the step: the rate this step's update uses
        cache = self.feature_cache
        with cache.step(plan) if cache is not None else nullcontext():  # outside DGA's two passes
            loss = (
                self._dga_training_step(batch, plan, lr)
                if not self.automatic_optimization
                else self._plain_training_step(batch, plan, lr)
            )
        if cache is not None:  # the share of this step's locked-tower lookups answered from the cache
            hits, misses = cache.take_counts()
            self.log("train/feature_cache_hit_rate", hits / max(hits + misses, 1), batch_size=len(batch["image"]))
        return loss

    def _encode(self, batch: Mapping[str, Any], plan: MixupPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings [b, D] of a (sub-)batch with the step's mixup; cached towers answer per sample."""
        cache = self.feature_cache
        with cache.batch(sample_keys(batch)) if cache is not None else nullcontext():
            return encode_pair(self.model, batch["image"], batch["text"], plan)

    def _plain_training_step(self, batch: Mapping[str, Any], plan: MixupPlan, lr: float | None) -> torch.Tensor:
        images = batch["image"]
        # [b, D] unit norm each; mixup (if any) mirrors partners inside this forward batch
        image_emb, text_emb = self._encode(batch, plan)
        world = world_info()
        targets = self.mixup.targets(plan, images.shape[0], None, world.rank, world.world_size, images.device)
        loss = self._loss(image_emb, text_emb, targets)
        self._log_step(loss, batch_size=images.shape[0], lr=lr)
        self._log_mixup(plan, batch_size=images.shape[0])
        return loss

    def _dga_training_step(self, batch: Mapping[str, Any], plan: MixupPlan, lr: float | None) -> torch.Tensor:
        """One optimizer step over the per-rank batch in sub-batches (manual optimization, dga.py).

        DDP's own reducer reduces the gradients once: :class:`DecoupledStep` runs all but the last backward
        inside the wrapper's ``no_sync`` and ``manual_backward`` prepares the reducer for the last one. The
        closure runs inside ``opt.step`` so Lightning's precision plugin scales the backward (16-mixed),
        unscales before ``on_before_optimizer_step`` (clipping) and skips overflowed steps.
        """
        n, b = batch["image"].shape[0], self.sub_batch_size
        if n % b:
            raise ValueError(f"module.sub_batch_size={b} must divide data.batch_size (got a batch of {n} samples)")
        subs = split_batch(batch, b)
        world = world_info()
        # partners mirror inside each sub-batch: a block-diagonal permutation of the gathered batch
        targets = self.mixup.targets(plan, n, b, world.rank, world.world_size, batch["image"].device)
        opt, sched = self.optimizers(), self.lr_schedulers()
        result: dict[str, torch.Tensor] = {}
        ddp = self.trainer.strategy.model if self._trainer is not None else None
        no_sync = ddp.no_sync if isinstance(ddp, DistributedDataParallel) else None
        # with gradient_as_bucket_view the gradients *are* DDP's buckets; zeroing in place keeps them so (the
        # K − 1 no_sync backwards then accumulate straight into the buckets: no second copy)
        keep_views = isinstance(ddp, DistributedDataParallel) and bool(getattr(ddp, "gradient_as_bucket_view", False))

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=not keep_views)
            res = self.dga_step(
                self.model,
                lambda sub: self._encode(sub, plan),
                subs,
                self.model.logit_scale,
                targets,
                backward=self.manual_backward,
                world=world,
                no_sync=no_sync,
                objective=self._dga_objective(),
                tower_cache=self.tower_cache,
            )
            result["loss"] = res.loss
            return res.loss

        opt.step(closure=closure)
        self.model.clamp_temperature_()  # inside the step: checkpoint callbacks run before on_train_batch_end
        if sched is not None:
            sched.step()
        loss = result["loss"]  # the full-batch loss with this step's targets, identical on every rank
        self._log_step(loss, batch_size=n, lr=lr)
        self._log_mixup(plan, batch_size=n)
        self.log("train/sub_batches", float(len(subs)), batch_size=n)
        return loss

    def _loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, targets: Any) -> torch.Tensor:
        """The plain step's loss (this rank's local mean): InfoNCE or SigLIP (``module.loss``)."""
        if self.loss_name == "siglip":
            return self.loss_fn(image_emb, text_emb, self.model.logit_scale.exp(), self.model.logit_bias, targets)
        return self.loss_fn(image_emb, text_emb, self.model.logit_scale.exp(), targets)

    def _dga_objective(self) -> Any:
        """The loss as DGA sees it (dga.DGAObjective); None = InfoNCE on logit_scale."""
        if self.loss_name == "siglip":
            return SigLipObjective(self.model.logit_scale, self.model.logit_bias)
        return None

    def _log_mixup(self, plan: MixupPlan, batch_size: int) -> None:
        if self.mixup.enabled:
            self.log("mixup/alpha", plan.alpha, batch_size=batch_size)
            self.log("mixup/modality", plan.modality_code, batch_size=batch_size)  # 0 none, 1 image, 2 text

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """DGA path only: clip after AMP unscaling (the plain path clips via Trainer(gradient_clip_val))."""
        clip = self.dga_cfg.get("gradient_clip_val")
        if not self.automatic_optimization and clip:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=clip,
                gradient_clip_algorithm=self.dga_cfg["gradient_clip_algorithm"],
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mixup"] = self.mixup.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "mixup" in checkpoint:
            self.mixup.load_state_dict(checkpoint["mixup"])

    def _current_lr(self) -> float | None:
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        if opt is None:
            return None
        group = opt.param_groups[0]  # the base LR: a scaled group's rate over its multiplier
        return float(group["lr"]) / float(group.get("lr_scale", 1.0) or 1.0)

    def _log_step(self, loss: torch.Tensor, batch_size: int, lr: float | None) -> None:
        """Loss, τ and the LR this step used; the loss is this rank's share, averaged over ranks = the full loss.

        Device tensors, no ``float()``: no host sync per step (Lightning reads them when it writes the logs).
        """
        self.log("train/loss", loss.detach(), prog_bar=True, sync_dist=True, batch_size=batch_size)
        temperature = torch.exp(-self.model.logit_scale.detach())
        self.log("train/temperature", temperature, batch_size=batch_size)
        if self.loss_name == "siglip":
            self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=batch_size)
        if lr is not None:
            self.log("train/lr", lr, prog_bar=True, batch_size=batch_size)
        self.log("train/global_batch_size", float(batch_size * self.trainer.world_size), batch_size=batch_size)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Clamp τ right after the update, so the checkpoint a callback saves at batch end holds the clamped value."""
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_temperature_()

    # ---------------------------------------------------------------- validation (zero-shot retrieval)
    def on_validation_epoch_start(self) -> None:
        self.retrieval.reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Encode this rank's images of one retrieval set (each once) and their captions into the set's metric."""
        self.retrieval.update(self.model, batch)

    def on_validation_epoch_end(self) -> None:
        """Compute every set (states synced across ranks) and log ``val/<set>/<metric>``.

        The values are identical on every rank; ``reduce_fx="max"`` keeps them bit-exact under ``sync_dist``
        (a mean of W copies may round), and float64 tensors keep them exact in the loggers (a float is logged
        as float32).
        """
        self.retrieval.validated_step = int(self.global_step)
        for name, metrics in self.retrieval.compute().items():
            for key in self.retrieval.log_keys:
                value = torch.tensor(metrics[key], dtype=torch.float64, device=self.device)
                self.log(f"val/{name}/{key}", value, sync_dist=True, reduce_fx="max")

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only, ``lr_scales`` multipliers by parameter name (param_groups.py)."""
        lr = self.optimizer_cfg.get("lr")
        return parameter_groups(self.model, None if lr is None else float(lr), self.lr_scales)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = instantiate(self.optimizer_cfg)(self.parameter_groups())
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, total, **self.scheduler_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def batch_size(batch: Mapping[str, Any]) -> int:
    """Pairs in a training batch (``ThroughputMonitor(batch_size_fn=...)``, conf/callbacks/throughput.yaml)."""
    return int(batch["image"].shape[0])


def _feature_cache(model: nn.Module, cfg: Mapping[str, Any]) -> FeatureCache | None:
    """``module.feature_cache`` for this model; a model with nothing it can cache gets a warning, not an error
    (an experiment's setting under a swapped-in model, e.g. experiment=demo model=tiny)."""
    if not cfg["enabled"]:
        return None
    cache = FeatureCache.for_model(model, float(cfg["limit_mb"]))
    if cache is None:
        log.warning(
            "module.feature_cache: no tower is wholly locked or locked below a trainable head, so nothing is "
            "cached (model.lock_image / model.lock_text with no unlocked groups / layers)"
        )
    else:
        log.info("module.feature_cache keeps each sample's locked-tower output across steps (%s)", cache.describe())
    return cache


def _check_loss(loss: str, model: nn.Module) -> str:
    """``module.loss`` must match the model: SigLIP needs open_clip's logit bias, InfoNCE must not have one."""
    if loss not in LOSSES:
        raise ValueError(f"module.loss={loss!r} is not one of {LOSSES}")
    has_bias = getattr(model, "logit_bias", None) is not None
    if loss == "siglip" and not has_bias:
        raise ValueError(
            "module.loss=siglip needs a model with a logit bias: set model.init_logit_bias (loss=siglip does)"
        )
    if loss == "infonce" and has_bias:
        raise ValueError(
            "the model has a logit bias (model.init_logit_bias) that InfoNCE would never train: use loss=siglip "
            "or set model.init_logit_bias=null"
        )
    return loss
