"""Resuming keeps every logger's history: steps before the checkpoint stay, steps re-run after it appear once.

Lightning's loggers start over in a run folder they find: ``CSVLogger`` deletes ``metrics.csv``, TensorBoard
keeps the old events *and* the re-run steps (each step twice), wandb (resumed by id) drops steps below its
last one. :func:`configure_logger_resume` sets, before the loggers are built, what each needs to continue
from the checkpoint's ``global_step`` ``G``:

- CSV (:class:`ResumableCSVLogger`): rows with ``step < G`` are kept (the file is rewritten atomically),
  rows logged after the checkpoint by the killed run are dropped, the resumed run appends. Lightning logs the
  validation that follows step ``G``'s batch at step ``G - 1`` (the batch's logging step), *after* the
  checkpoint was written: those ``val/`` rows are dropped too, the resumed run repeats that validation
  (:func:`zerovl_lightning.checkpointing.run_pending_validation`).
- TensorBoard: ``purge_step=G`` (``SummaryWriter`` hides older events at steps ≥ G).
- wandb: same run id and ``resume="allow"`` (:func:`zerovl_lightning.checkpointing.prepare_resume`).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps ``metrics.csv`` rows before ``resume_step`` instead of deleting it."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._resume_step is None:
            super()._check_log_dir_exists()
            return
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if _written_before(r, self._resume_step)]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a kill here leaves the old file or the trimmed one, never neither
        self.metrics_keys = header
        log.info("%s: kept %d rows before step %d, resuming the history", path, len(rows), self._resume_step)


VALIDATION_PREFIX = "val/"  # every metric the validation loop logs (ZeroVLModule.validation_step)


def _written_before(row: dict[str, Any], step: int) -> bool:
    """Whether the killed run logged ``row`` before writing the checkpoint of global step ``step``."""
    at = _step(row)
    if at == step - 1:  # that batch's training row came before the checkpoint, its validation after it
        return not any(key.startswith(VALIDATION_PREFIX) and value not in ("", None) for key, value in row.items())
    return at < step


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")  # NaN < G is False: an unreadable row is dropped, not kept twice


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that continues ``metrics.csv`` from ``resume_step`` (set by :func:`configure_logger_resume`)."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank != 0:
                return super().experiment  # a dummy on other ranks
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.resume_step)
        return self._experiment


def configure_logger_resume(cfg: DictConfig, step: int) -> None:
    """Point the configured CSV and TensorBoard loggers at step ``step`` of their existing history."""
    for name, node in (cfg.get("logger") or {}).items():
        if not isinstance(node, DictConfig):
            continue
        target = str(node.get("_target_", ""))
        with open_dict(node):
            if target.endswith("ResumableCSVLogger"):
                node.resume_step = int(step)
            elif target.endswith("TensorBoardLogger"):
                node.purge_step = int(step)
            else:
                continue
        log.info("logger.%s continues its history from step %d", name, step)
