"""``ckpt_path`` from the config → the checkpoint to load, with the loggers set to continue its history."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from .resolve import _PASS_THROUGH, resolve_ckpt_path, stored_step
from .run_ids import read_run_ids

log = logging.getLogger(__name__)


def checkpoint_dir_of(cfg: DictConfig) -> str | None:
    """The run's checkpoint folder: ``dirpath`` of the first checkpoint entry of ``cfg.callbacks``."""
    for node in (cfg.get("callbacks") or {}).values():
        if isinstance(node, DictConfig) and node.get("dirpath"):
            return str(node.dirpath)
    out = cfg.get("paths", {}).get("output_dir")
    return str(Path(str(out)) / "checkpoints") if out else None


def prepare_resume(cfg: DictConfig) -> str | None:
    """Resolve ``cfg.ckpt_path`` to a loadable checkpoint; loggers continue their history from its step.

    Call before instantiating loggers. CSV and TensorBoard loggers get the checkpoint's step
    (:func:`zerovl_lightning.logger_resume.configure_logger_resume`). Sets ``cfg.logger.<wandb>.id`` (unless
    already set) and ``resume="allow"`` when the checkpoint recorded a ``WandbLogger`` run id.
    Returns the checkpoint path for ``trainer.fit``.
    """
    from zerovl_lightning.logger_resume import configure_logger_resume

    path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir_of(cfg))
    if path is None or path in _PASS_THROUGH or not Path(path).is_file():
        return path
    configure_logger_resume(cfg, stored_step(path))
    run_id = read_run_ids(path).get("WandbLogger")
    loggers = cfg.get("logger") or {}
    for name, node in loggers.items():
        if not (isinstance(node, DictConfig) and "WandbLogger" in str(node.get("_target_", ""))):
            continue
        with open_dict(node):
            if run_id and not node.get("id"):
                node.id = run_id
                log.info("Resuming wandb run %s (logger.%s.id)", run_id, name)
            if node.get("id"):
                node.resume = node.get("resume") or "allow"
    return path
