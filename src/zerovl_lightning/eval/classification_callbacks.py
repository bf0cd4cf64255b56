"""Zero-shot classification and the linear probe as Lightning callbacks on their own schedule.

:class:`EvalCallback` runs an evaluation before the first step (the untrained baseline, step 0), every N steps
/ epochs and at the end of fit, logs ``<prefix>/<set>/<key>`` through the trainer's loggers and records the
results (:class:`~zerovl_lightning.eval.history.EvalHistory`). The math lives in :mod:`zeroshot` and
:mod:`linear_probe`, the labelled sets in :mod:`classification_data`. ``zerovl-eval`` builds the same callbacks
from the same config files (``conf/callbacks/{zeroshot,linear_probe}.yaml``) and calls :meth:`EvalCallback.evaluate`.

Every rank evaluates its share of each set and the metrics are synced, so everything works unchanged under DDP.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from zerovl_lightning.eval.classification_data import ClassificationSet, build_classification_set
from zerovl_lightning.eval.history import EvalHistory
from zerovl_lightning.eval.linear_probe import DEFAULT_WEIGHT_DECAYS, evaluate_linear_probe
from zerovl_lightning.eval.zeroshot import clip_benchmark_keys as cls_benchmark_keys
from zerovl_lightning.eval.zeroshot import evaluate_zeroshot


class EvalCallback(EvalHistory):
    """An evaluation that runs outside Lightning's loops, on its own schedule; subclasses implement
    :meth:`evaluate` (set name → metrics).

    Zero-shot classification and the linear probe stay callbacks: neither is a per-batch metric of the
    model's own validation data (the probe fits a classifier on features of a whole train split first), so
    they gain nothing from the validation loop and would cost every ``val_check_interval`` validation.

    Args:
        every_n_steps: evaluate after every N optimizer steps (None: never on a step count).
        every_n_epochs: evaluate at the end of every N training epochs (None: never on epochs).
        at_start: evaluate before the first step (the untrained baseline, logged as step 0); not on resume.
        at_end: evaluate when fit ends, unless that step was just evaluated.
        batch_size / num_workers: of the evaluation loaders (workers compete with training on small machines).
        progress: tqdm bars on rank 0.
        output_dir / model_attr: see :class:`EvalHistory`.
    """

    log_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_start: bool = True,
        at_end: bool = True,
        output_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
        model_attr: str = "model",
    ) -> None:
        super().__init__(output_dir, model_attr)
        self.every_n_steps = every_n_steps or None
        self.every_n_epochs = every_n_epochs or None
        self.at_start, self.at_end = at_start, at_end
        self.batch_size, self.num_workers = batch_size, num_workers
        self.progress = self.progress_enabled = progress

    def evaluate(self, model: nn.Module, trainer: L.Trainer | None = None) -> dict[str, dict[str, float]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if trainer.global_step != self._last_step:
                self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: nn.Module) -> list[dict[str, Any]]:
        """Evaluate every set now; record, and (rank 0) log and write results. Returns the new records."""
        model = self.model_of(pl_module)
        self.progress_enabled = self.progress and trainer.is_global_zero
        records = self.record(trainer, model, self.evaluate(model, trainer))
        flat = {
            f"{self.prefix}/{r['dataset']}/{k}": float(r["metrics"][k])
            for r in records
            for k in self.log_keys
            if k in r["metrics"]
        }
        for name, value in flat.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=int(trainer.global_step))
        return records


def _classification_sets(
    sets: Sequence[str | Mapping[str, Any]], test_limit: int | None, train_limit: int | None, with_train: bool
) -> list[ClassificationSet]:
    if isinstance(sets, (str, Mapping)):
        sets = [sets]  # type: ignore[list-item]
    return [build_classification_set(s, test_limit, train_limit, with_train) for s in sets]


class ZeroShotCallback(EvalCallback):
    """Zero-shot classification (class names × templates → text classifier) on labelled sets.

    Args:
        sets: built-in names (``fashion_mnist``, ``digits``) or mappings for image folders / webdatasets
            (see :func:`~zerovl_lightning.eval.classification_data.build_classification_set`).
        test_limit: class-balanced subset of each test split (None: all).
        image_size: eval resolution override (None: the model's).

    Logs ``zeroshot/<set>/{top1,top5}``.
    """

    task = "zeroshot_classification"
    prefix = "zeroshot"
    log_keys = ("top1", "top5")

    def __init__(
        self,
        sets: Sequence[str | Mapping[str, Any]] = ("fashion_mnist",),
        test_limit: int | None = 1000,
        image_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sets, self.test_limit, self.image_size = sets, test_limit, image_size
        self._datasets: list[ClassificationSet] | None = None

    def evaluate(self, model: nn.Module, trainer: L.Trainer | None = None) -> dict[str, dict[str, float]]:
        if self._datasets is None:
            self._datasets = _classification_sets(self.sets, self.test_limit, None, with_train=False)
        progress = self.progress_enabled
        return {
            ds.name: evaluate_zeroshot(model, ds, self.batch_size, self.num_workers, self.image_size, progress)
            for ds in self._datasets
        }

    def benchmark_keys(self, metrics: dict[str, float]) -> dict[str, float]:
        return cls_benchmark_keys(metrics)


class LinearProbeCallback(EvalCallback):
    """Linear probe on frozen pre-projection image features (L-BFGS logistic regression, λ chosen on
    validation).

    Args:
        sets: as :class:`ZeroShotCallback`; each needs a train split (the built-ins have one).
        train_limit / test_limit: class-balanced subsets (None: all; Fashion-MNIST has 60k / 10k).
        image_size: eval resolution override; convolutional towers give good Fashion-MNIST features at
            48–64 px (ViTs need their own size).
        weight_decays / val_fraction / max_iter: the L2 sweep (see
            :func:`~zerovl_lightning.eval.linear_probe.linear_probe`).

    Logs ``linear_probe/<set>/{top1,top5}``. Defaults to the end of fit only (features of the untrained towers
    are the pretrained towers' features, so step 0 is often interesting too: set ``at_start``).
    """

    task = "linear_probe"
    prefix = "linear_probe"
    log_keys = ("top1", "top5")

    def __init__(
        self,
        sets: Sequence[str | Mapping[str, Any]] = ("fashion_mnist",),
        train_limit: int | None = 2000,
        test_limit: int | None = 1000,
        image_size: int | None = None,
        weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
        val_fraction: float = 0.2,
        max_iter: int = 100,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("at_start", False)
        super().__init__(**kwargs)
        self.sets, self.train_limit, self.test_limit = sets, train_limit, test_limit
        self.image_size = image_size
        self.weight_decays, self.val_fraction, self.max_iter = tuple(weight_decays), val_fraction, max_iter
        self._datasets: list[ClassificationSet] | None = None

    def evaluate(self, model: nn.Module, trainer: L.Trainer | None = None) -> dict[str, dict[str, float]]:
        if self._datasets is None:
            self._datasets = _classification_sets(self.sets, self.test_limit, self.train_limit, with_train=True)
        progress = self.progress_enabled
        return {
            ds.name: evaluate_linear_probe(
                model,
                ds,
                self.batch_size,
                self.num_workers,
                self.image_size,
                self.weight_decays,
                self.val_fraction,
                self.max_iter,
                progress,
            )
            for ds in self._datasets
        }

    def benchmark_keys(self, metrics: dict[str, float]) -> dict[str, float]:
        return cls_benchmark_keys(metrics, prefix="lp_")
