"""``zerovl-train``: the Hydra app that composes conf/, instantiates model, data, callbacks, loggers, and fits."""

from __future__ import annotations

import os

# Offline unless the user said otherwise (HF_HUB_OFFLINE=0 allows the hub). Before any import: huggingface_hub reads
# it once, at its import (lightning imports it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import zerovl_lightning.assets  # noqa: F401  (registers ${zerovl.asset:...} resolvers)
from zerovl_lightning.checkpointing import prepare_resume
from zerovl_lightning.config_checks import validate_config
from zerovl_lightning.errors import exit_on_known_errors
from zerovl_lightning.world import check_sub_batch, normalize_slurm_env, per_rank_batch

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict group (callbacks, loggers), skipping empty entries."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


class SeedPerRank(L.Callback):
    """Reseed every process with ``seed + global_rank`` once the model is built and DDP has broadcast it.

    ``seed_everything(seed)`` on every rank gives identical dropout / drop-path / patch-dropout masks and
    augmentation draws on every rank for the same local index (correlated noise). The model is built under the
    common seed (identical init, DDP broadcasts rank 0's anyway); training randomness is per rank, as OpenCLIP's
    ``seed + rank``. What must agree across ranks never reads the global RNG: the mixup plan is drawn from
    (seed, step), the data plan from (seed, epoch). On resume, ``RNGStateCheckpoint`` puts each rank's saved
    states back before the first step, after this.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiate trainer (it knows the world size), then module and data module (with the model's tokenizer
    and preprocessing)."""
    callbacks = [*instantiate_group(cfg.get("callbacks")), SeedPerRank(cfg.seed)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False)
    per_rank = check_batches(cfg, trainer.world_size)
    module = instantiate(cfg.module, batch_size=per_rank)  # config → module: the per-rank batch of one step
    datamodule = instantiate(
        cfg.data, tokenizer=module.model.tokenizer, preprocess_cfg=module.model.preprocess_cfg, _convert_="all"
    )
    return module, datamodule, trainer


def check_batches(cfg: DictConfig, world_size: int) -> int:
    """Before any work: ``data.global_batch_size`` divides over the ranks, and the DGA sub-batch (``module.`` or
    ``method.sub_batch_size``, whichever is set) divides the per-rank batch; returns that per-rank batch."""
    global_batch = OmegaConf.select(cfg, "data.global_batch_size")
    if global_batch is not None:
        per_rank = per_rank_batch(int(global_batch), world_size)
        source = f"data.global_batch_size={global_batch} over {world_size} ranks"
    else:
        per_rank, source = int(OmegaConf.select(cfg, "data.batch_size", default=1)), "data.batch_size"
    for key in ("method.sub_batch_size", "module.sub_batch_size"):
        sub = OmegaConf.select(cfg, key)
        if sub is not None:
            check_sub_batch(int(sub), per_rank, key, source)
    return per_rank


def run(cfg: DictConfig) -> dict[str, float]:
    """Validate, build, fit; return the final logged metrics (floats)."""
    validate_config(cfg)
    normalize_slurm_env()  # before Lightning reads SLURM_NTASKS_PER_NODE
    ckpt_path = prepare_resume(cfg)  # newest loadable checkpoint; may set the wandb run id to resume
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule, trainer = build(cfg)
    failed = True
    try:
        for lg in trainer.loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the resolved config, once
        if cfg.get("train", True):
            fit_and_validate(cfg, module, datamodule, trainer, ckpt_path)
        failed = False
    finally:
        finish_loggers(trainer, failed=failed)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        print_report(trainer)
    return metrics


def fit_and_validate(
    cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule, trainer: L.Trainer,
    ckpt_path: str | None,
) -> None:
    """``trainer.validate`` before the first step (the untrained baseline, not on resume), fit (which
    validates on the Trainer's ``val_check_interval`` / ``check_val_every_n_epoch``), and ``trainer.validate``
    at the end unless the final step was just validated. Validation = zero-shot retrieval on
    ``data.val_sets``; without sets there is none."""
    has_val = bool(getattr(datamodule, "val_sets", None))
    if has_val and cfg.get("val_at_start", True) and ckpt_path is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    validated = getattr(getattr(module, "retrieval", None), "validated_step", None)
    if has_val and cfg.get("val_at_end", True) and validated != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)


def checkpoint_metadata(trainer: L.Trainer) -> dict[str, Any]:
    """Where the run's checkpoints are and at which step (for the loggers' run summary)."""
    meta: dict[str, Any] = {"checkpoint/global_step": int(trainer.global_step)}
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "last_model_path", ""):
            meta["checkpoint/last_path"] = cb.last_model_path
        if getattr(cb, "best_model_path", ""):
            meta["checkpoint/best_path"] = cb.best_model_path
        if getattr(cb, "dirpath", None):
            meta["checkpoint/dir"] = str(cb.dirpath)
    return meta


def finish_loggers(trainer: L.Trainer, failed: bool = False) -> None:
    """End this job's wandb run (checkpoint metadata into its summary, then ``wandb.finish``).

    wandb keeps one global run per process: unfinished, the next job of a multirun (same process) would log
    into this job's run. A failed job's run is finished too, with exit code 1.
    """
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and trainer.is_global_zero and lg._experiment is not None:
            lg.experiment.summary.update(checkpoint_metadata(trainer))
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def print_report(trainer: L.Trainer) -> None:
    """Print the results tables of evaluation callbacks that keep a history (step 0 vs final)."""
    for cb in trainer.callbacks:
        report = getattr(cb, "format_report", None)
        if callable(report):
            print(report())


@hydra.main(version_base="1.3", config_path="pkg://zerovl_lightning.conf", config_name="train")
@exit_on_known_errors
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    name = cfg.get("optimized_metric")
    if name:
        if name in metrics:
            return metrics[name]
        message = f"optimized_metric {name!r} was not logged; logged: {sorted(metrics)}"
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise KeyError(message)  # a sweeper needs a value for every job
        log.warning(message)
    return None


if __name__ == "__main__":
    main()
