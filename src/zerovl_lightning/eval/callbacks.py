"""Lightning callbacks around evaluation: retrieval reports, zero-shot classification, linear probe.

Zero-shot retrieval runs in Lightning's validation loop (:mod:`validation`; schedule = the Trainer's
``val_check_interval`` / ``check_val_every_n_epoch``); :class:`RetrievalCallback` only reports it. Zero-shot
classification and the linear probe run on their own schedule (:class:`EvalCallback`: before the first step =
the untrained baseline, every N steps / epochs, at the end of fit). The math lives in :mod:`retrieval`,
:mod:`zeroshot`, :mod:`linear_probe`.

Every rank evaluates its share of each set and the metrics are synced, so everything works unchanged under
DDP; rank 0 writes the files. ``callback.history`` is the list of all records (see :mod:`report`) and survives
checkpoint resume through the callback ``state_dict``; :meth:`EvalHistory.format_report` prints
"step 0 vs final".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from zerovl_lightning.eval import report
from zerovl_lightning.eval.datasets import ClassificationSet, build_classification_set, load_items_by_id
from zerovl_lightning.eval.linear_probe import DEFAULT_WEIGHT_DECAYS, evaluate_linear_probe
from zerovl_lightning.eval.retrieval import RetrievalMetric, chunked_topk, clip_benchmark_keys, recall_curve
from zerovl_lightning.eval.zeroshot import clip_benchmark_keys as cls_benchmark_keys
from zerovl_lightning.eval.zeroshot import evaluate_zeroshot

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


class RetrievalCallback(EvalHistory):
    """Reports of the zero-shot retrieval that runs in Lightning's validation loop (``ZeroVLModule.retrieval``).

    At every validation end (not the sanity check) it records each set's metrics at the current step, writes
    ``eval/zeroshot_retrieval.json`` (CLIP_benchmark keys too), the recall@K plots and, with a wandb logger,
    tables of example queries. Logging ``val/<set>/...`` is the module's job (``self.log``).

    Args:
        curve_max_k: largest K of the recall@K plot (``eval/recall_at_k.png`` and one PNG per step).
        num_examples: example queries per direction in the wandb table (0 disables; wandb loggers only).
        retrieval_attr: attribute of the LightningModule holding the
            :class:`~zerovl_lightning.eval.validation.RetrievalValidation`.
        output_dir / model_attr: see :class:`EvalHistory`.
    """

    task = "zeroshot_retrieval"
    prefix = "val"

    def __init__(
        self,
        curve_max_k: int = 50,
        num_examples: int = 8,
        output_dir: str | os.PathLike | None = None,
        model_attr: str = "model",
        retrieval_attr: str = "retrieval",
    ) -> None:
        super().__init__(output_dir, model_attr)
        self.curve_max_k, self.num_examples = curve_max_k, num_examples
        self.retrieval_attr = retrieval_attr
        self.curves: list[tuple[int, dict[str, dict[str, list[float]]]]] = []  # (step, set → direction → R@K)
        self._validation: Any = None
        self._shards: dict[str, list[str]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        validation = getattr(pl_module, self.retrieval_attr, None)
        if validation is None or not validation.results:
            return
        self._validation = validation
        self._shards = {
            data.name: sorted({it.shard for it in data.items})
            for loader in (trainer.val_dataloaders or [])
            if hasattr(data := loader.dataset, "items")
        }
        curves: dict[str, dict[str, list[float]]] = {}
        for name, metric in validation.metrics.items():
            if metric.last is not None:
                ranks = metric.last[0]
                curves[name] = {
                    "i2t": recall_curve(ranks.i2t, self.curve_max_k).tolist(),
                    "t2i": recall_curve(ranks.t2i, self.curve_max_k).tolist(),
                }
        self.curves.append((int(trainer.global_step), curves))
        self.record(trainer, self.model_of(pl_module), validation.results)
        self._validation = None

    def benchmark_keys(self, metrics: dict[str, float]) -> dict[str, float]:
        ks = sorted(int(k[5:]) for k in metrics if k.startswith("i2t_r") and k[5:].isdigit())
        return clip_benchmark_keys(metrics, ks)

    def after_run(self, trainer: L.Trainer, records: list[dict[str, Any]]) -> None:
        step, curves = self.curves[-1]
        out = self.results_dir(trainer)
        try:
            report.plot_recall_curves(
                curves, out / f"recall_at_k_step{step:06d}.png", title=f"step {step}", label=f"step {step}"
            )
            first_step, first = self.curves[0]
            report.plot_recall_curves(
                curves,
                out / "recall_at_k.png",
                baseline=first if first_step != step else None,
                title=f"recall@K, step {first_step} (dashed) vs step {step}",
                baseline_label=f"step {first_step}",
                label=f"step {step}",
            )
        except Exception as e:  # a plotting problem must never stop training
            log.warning("recall@K plot failed: %s", e)
        if self.num_examples > 0:
            self._log_examples(trainer, step)

    def _log_examples(self, trainer: L.Trainer, step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        for name, metric in self._validation.metrics.items():
            try:
                tables = example_tables(metric, self._shards[name], self.num_examples)
            except Exception as e:
                log.warning("example table for %s failed: %s", name, e)
                continue
            for lg in wandb_loggers:
                for direction, (columns, rows) in tables.items():
                    lg.log_table(key=f"examples/{name}/{direction}", columns=columns, data=rows, step=step)


def example_tables(
    metric: RetrievalMetric, shards: Sequence[str], num_examples: int = 8, k: int = 5, as_wandb: bool = True
) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Example queries with their top-k results from the last compute: ``text_to_image`` and
    ``image_to_text``.

    Queries are spread evenly over the id-ordered galleries (deterministic); ✓ marks a correct result. Images
    are thumbnails read back from the shards (``wandb.Image`` when ``as_wandb``, else PIL).
    """
    if metric.last is None:
        raise ValueError("compute() the metric first")
    ranks, image_emb, text_emb = metric.last
    n_txt, n_q = ranks.caption_ids.numel(), ranks.query_image_index.numel()
    txt_q = torch.linspace(0, n_txt - 1, min(num_examples, n_txt)).round().long().unique()
    img_q = ranks.query_image_index[
        torch.linspace(0, n_q - 1, min(num_examples, n_q)).round().long().unique()
    ]
    _, t2i_top = chunked_topk(text_emb[txt_q], image_emb, k)
    _, i2t_top = chunked_topk(image_emb[img_q], text_emb, k)
    image_ids = set(ranks.image_ids[t2i_top.flatten()].tolist()) | set(ranks.image_ids[img_q].tolist())
    caption_ids = set(ranks.caption_ids[txt_q].tolist()) | set(ranks.caption_ids[i2t_top.flatten()].tolist())
    images, captions = load_items_by_id(shards, image_ids, caption_ids)

    def show(image_id: int, caption: str = "") -> Any:
        img = images.get(image_id)
        if not as_wandb or img is None:
            return img
        import wandb

        return wandb.Image(img, caption=caption)

    cols_t2i = ["query", "rank of match", *[f"top{i + 1}" for i in range(k)]]
    rows_t2i = []
    for q, top in zip(txt_q.tolist(), t2i_top.tolist()):
        target = int(ranks.caption_image_index[q])
        cells = [show(int(ranks.image_ids[j]), "✓" if j == target else "") for j in top]
        rows_t2i.append([captions.get(int(ranks.caption_ids[q]), ""), int(ranks.t2i[q]) + 1, *cells])
    cols_i2t = ["query", "rank of match", *[f"top{i + 1}" for i in range(k)]]
    rows_i2t = []
    i2t_rank = dict(zip(ranks.query_image_index.tolist(), ranks.i2t.tolist()))
    for q, top in zip(img_q.tolist(), i2t_top.tolist()):
        cells = [
            ("✓ " if int(ranks.caption_image_index[j]) == q else "")
            + captions.get(int(ranks.caption_ids[j]), "")
            for j in top
        ]
        rows_i2t.append([show(int(ranks.image_ids[q])), i2t_rank[q] + 1, *cells])
    return {"text_to_image": (cols_t2i, rows_t2i), "image_to_text": (cols_i2t, rows_i2t)}


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
            (see :func:`~zerovl_lightning.eval.datasets.build_classification_set`).
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
            ds.name: evaluate_zeroshot(
                model, ds, self.batch_size, self.num_workers, self.image_size, progress
            )
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
            self._datasets = _classification_sets(
                self.sets, self.test_limit, self.train_limit, with_train=True
            )
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
