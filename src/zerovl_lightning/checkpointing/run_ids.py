"""Logger run ids stored in each checkpoint, so a resumed run logs into the same wandb run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.fabric.utilities.types import _PATH

from .resolve import check_checkpoint


def logger_run_ids(trainer: L.Trainer) -> dict[str, str]:
    """``{logger class name: run id / version}`` of the trainer's loggers (wandb: the run id)."""
    ids: dict[str, str] = {}
    for lg in trainer.loggers:
        version = getattr(lg, "version", None)
        if version is not None and version != "":
            ids[type(lg).__name__] = str(version)
    return ids


class RunIdCheckpoint(L.Callback):
    """Stores the loggers' run ids in each checkpoint: :func:`prepare_resume` reopens the same wandb run."""

    def __init__(self) -> None:
        self.run_ids: dict[str, str] = {}
        self.resumed_from: dict[str, str] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            self.run_ids = logger_run_ids(trainer)
        return {"run_ids": dict(self.run_ids)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed_from = dict(state_dict.get("run_ids", {}))


def read_run_ids(checkpoint: Mapping[str, Any] | _PATH) -> dict[str, str]:
    """Run ids stored by :class:`RunIdCheckpoint` in a checkpoint (a loaded dict or a path)."""
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else check_checkpoint(checkpoint)
    state = (ckpt.get("callbacks") or {}).get(RunIdCheckpoint.__qualname__) or {}
    return dict(state.get("run_ids", {}))
