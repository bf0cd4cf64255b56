"""What every evaluation keeps: its records (``history``, saved in checkpoints through the callback
``state_dict``), the results JSON and the "step 0 vs final" table.

:class:`EvalHistory` is the base of the evaluation callbacks (:mod:`retrieval_report`,
:mod:`classification_callbacks`); record shapes are :mod:`report`'s (CLIP_benchmark-compatible keys).
Rank 0 writes the files; every rank keeps the same records (the metrics are synced first).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from zerovl_lightning.eval import report

log = logging.getLogger(__name__)


class EvalHistory(Callback):
    """Records of every evaluation (``history``, kept in checkpoints), results JSON, the step-0-vs-final table.

    Args:
        output_dir: run folder for ``eval/<task>.json`` (and plots); default ``trainer.default_root_dir``.
        model_attr: attribute of the LightningModule holding the DualEncoder (the module itself if absent).
    """

    task: ClassVar[str] = ""
    prefix: ClassVar[str] = ""

    def __init__(self, output_dir: str | os.PathLike | None = None, model_attr: str = "model") -> None:
        super().__init__()
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.model_attr = model_attr
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None

    def benchmark_keys(self, metrics: dict[str, float]) -> dict[str, float]:
        """CLIP_benchmark-compatible names added to the JSON records."""
        return {}

    def after_run(self, trainer: L.Trainer, records: list[dict[str, Any]]) -> None:
        """Hook for plots / tables (rank 0 only)."""

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = state_dict.get("last_step")

    @property
    def last_step(self) -> int | None:
        """The training step of the newest record (None before the first evaluation)."""
        return self._last_step

    def model_of(self, pl_module: nn.Module) -> nn.Module:
        return getattr(pl_module, self.model_attr, pl_module)

    def results_dir(self, trainer: L.Trainer) -> Path:
        return (self.output_dir or Path(trainer.default_root_dir)) / "eval"

    def record(
        self, trainer: L.Trainer, model: nn.Module, results: Mapping[str, Mapping[str, float]]
    ) -> list[dict[str, Any]]:
        """Add the records of one evaluation at the trainer's step; rank 0 writes the JSON and runs
        :meth:`after_run`. Returns the new records."""
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        records = self.make_records(model, results, step, epoch)
        self.history.extend(records)
        self._last_step = step
        if trainer.is_global_zero:
            path = report.write_json(self.results_dir(trainer) / f"{self.task}.json", self.history)
            self.after_run(trainer, records)
            log.info("%s at step %d → %s\n%s", self.task, step, path, report.format_table(records, "all"))
        return records

    def make_records(
        self, model: nn.Module, results: Mapping[str, Mapping[str, float]], step: int = 0, epoch: int = 0
    ) -> list[dict[str, Any]]:
        """CLIP_benchmark-shaped records (see :mod:`report`) from ``{set: metrics}``."""
        return [
            {
                "task": self.task,
                "dataset": name,
                "model": str(getattr(model, "model_name", type(model).__name__)),
                "step": step,
                "epoch": epoch,
                "metrics": {**metrics, **self.benchmark_keys(dict(metrics))},
            }
            for name, metrics in results.items()
        ]

    def format_report(self, which: str = "first_last") -> str:
        """Markdown table of the first and last evaluated steps (what ``make train`` prints)."""
        return report.format_table(self.history, which) if self.history else ""
