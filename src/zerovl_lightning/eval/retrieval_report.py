"""Reports of the zero-shot retrieval that runs in Lightning's validation loop (:mod:`validation`): history and
``eval/zeroshot_retrieval.json``, recall@K plots, and wandb tables of example queries with their top-5."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from zerovl_lightning.data.image_decoding import to_rgb
from zerovl_lightning.eval import report
from zerovl_lightning.eval.history import EvalHistory
from zerovl_lightning.eval.retrieval import RetrievalMetric, chunked_topk, clip_benchmark_keys, recall_curve
from zerovl_lightning.eval.retrieval_data import index_retrieval_set, read_image

log = logging.getLogger(__name__)


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
    img_q = ranks.query_image_index[torch.linspace(0, n_q - 1, min(num_examples, n_q)).round().long().unique()]
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
            ("✓ " if int(ranks.caption_image_index[j]) == q else "") + captions.get(int(ranks.caption_ids[j]), "")
            for j in top
        ]
        rows_i2t.append([show(int(ranks.image_ids[q])), i2t_rank[q] + 1, *cells])
    return {"text_to_image": (cols_t2i, rows_t2i), "image_to_text": (cols_i2t, rows_i2t)}


def load_items_by_id(
    shards: Sequence[str],
    image_ids: set[int] | None = None,
    caption_ids: set[int] | None = None,
    thumbnail: int = 128,
) -> tuple[dict[int, Any], dict[int, str]]:
    """Thumbnails (PIL, RGB) of some images and texts of some captions, read back from the shards through the
    validation loader's index (only the wanted images are decoded)."""
    image_ids, caption_ids = set(image_ids or ()), set(caption_ids or ())
    images: dict[int, Any] = {}
    captions: dict[int, str] = {}
    for item in index_retrieval_set(shards):
        captions.update((c, t) for c, t in zip(item.caption_ids, item.captions) if c in caption_ids)
        if item.image_id in image_ids:
            image = to_rgb(read_image(item))
            image.thumbnail((thumbnail, thumbnail))
            images[item.image_id] = image
    return images, captions
