"""``zerovl-train``: the Hydra app that composes conf/, instantiates model, data, callbacks, loggers, and fits."""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import zerovl_lightning.assets  # noqa: F401  (registers ${zerovl.asset:...} resolvers)
from zerovl_lightning.checkpointing import prepare_resume
from zerovl_lightning.config_checks import validate_config

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict group (callbacks, loggers), skipping empty entries."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiate module, data module (with the model's tokenizer and preprocessing) and trainer."""
    module = instantiate(cfg.module)
    datamodule = instantiate(
        cfg.data, tokenizer=module.model.tokenizer, preprocess_cfg=module.model.preprocess_cfg
    )
    trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")),
                          logger=instantiate_group(cfg.get("logger")) or False)
    return module, datamodule, trainer


def run(cfg: DictConfig) -> dict[str, float]:
    """Validate, build, fit; return the final logged metrics (floats)."""
    validate_config(cfg)
    ckpt_path = prepare_resume(cfg)  # newest loadable checkpoint; may set the wandb run id to resume
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule, trainer = build(cfg)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the resolved config, once
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        print_report(trainer)
    return metrics


def print_report(trainer: L.Trainer) -> None:
    """Print the results tables of evaluation callbacks that keep a history (step 0 vs final)."""
    for cb in trainer.callbacks:
        report = getattr(cb, "format_report", None)
        if callable(report):
            print(report())


@hydra.main(version_base="1.3", config_path="pkg://zerovl_lightning.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    name = cfg.get("optimized_metric")
    if name:
        if name not in metrics:
            raise KeyError(f"optimized_metric {name!r} was not logged; logged: {sorted(metrics)}")
        return metrics[name]
    return None


if __name__ == "__main__":
    main()
