"""Zero-shot retrieval as Lightning's validation loop: one :class:`RetrievalMetric` per retrieval set.

The LightningModule owns a :class:`RetrievalValidation`; ``validation_step`` passes it each batch of
:func:`~zerovl_lightning.eval.retrieval_data.retrieval_loaders` (the batch names its set), and
``on_validation_epoch_end`` computes every set (the metric syncs its states across DDP ranks) and logs
``val/<set>/{i2t_r1, …, rsum, i2t_medr, t2i_medr}``. Reports (history, JSON, plots, tables) are the
:class:`~zerovl_lightning.eval.retrieval_report.RetrievalCallback`'s job; it reads :attr:`RetrievalValidation.results`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from zerovl_lightning.eval.encoding import evaluating
from zerovl_lightning.eval.retrieval import RetrievalMetric, Ties


def retrieval_log_keys(ks: Sequence[int] = (1, 5, 10)) -> tuple[str, ...]:
    """Metric names logged per set: ``i2t_r{k}``, ``t2i_r{k}``, ``rsum``, median ranks."""
    return (*(f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks), "rsum", "i2t_medr", "t2i_medr")


class RetrievalValidation(nn.Module):
    """Per-set retrieval metrics fed by validation batches.

    Args:
        ks / chunk_size / ties: see :class:`~zerovl_lightning.eval.retrieval.RetrievalMetric`.
    """

    def __init__(self, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, ties: Ties = "pessimistic") -> None:
        super().__init__()
        self.ks, self.chunk_size, self.ties = tuple(int(k) for k in ks), int(chunk_size), ties
        RetrievalMetric(self.ks, self.chunk_size, self.ties)  # validate the options now, not at the first batch
        self.metrics: dict[str, RetrievalMetric] = {}  # set name → metric (created at the set's first batch)
        self.results: dict[str, dict[str, float]] = {}  # set name → metrics of the last compute
        self.validated_step: int | None = None  # training step of the last compute (set by the module)

    @property
    def log_keys(self) -> tuple[str, ...]:
        return retrieval_log_keys(self.ks)

    def metric(self, name: str, device: torch.device) -> RetrievalMetric:
        if name not in self.metrics:
            self.metrics[name] = RetrievalMetric(self.ks, self.chunk_size, self.ties).to(device)
        return self.metrics[name]

    @torch.no_grad()
    def update(self, model: nn.Module, batch: Mapping[str, Any]) -> None:
        """Encode one batch in fp32 (autocast off) and add it; padding rows (image id < 0) are dropped."""
        with evaluating(model) as ev:
            keep = batch["image_id"] >= 0
            # padding rows are encoded too (a blank image, never decoded) so an all-padding batch has a shape
            image_emb = model.encode_image(ev.images(batch["image"])).float()[keep.to(ev.device)]  # [Bi, D]
            if batch["caption"]:
                text_emb = model.encode_text(model.tokenize(batch["caption"]).to(ev.device)).float()  # [Bt, D]
            else:  # a padding-only batch: still contribute (empty) states to the DDP sync
                text_emb = image_emb.new_zeros((0, image_emb.shape[1]))
            self.metric(str(batch["set"]), ev.device).update(
                image_emb, batch["image_id"][keep], text_emb, batch["caption_id"], batch["caption_image_id"]
            )

    def compute(self) -> dict[str, dict[str, float]]:
        """Every set's metrics (floats; identical on every rank); the metrics keep ``last`` for plots."""
        self.results = {
            name: {k: float(v) for k, v in metric.compute().items()} for name, metric in sorted(self.metrics.items())
        }
        return self.results

    def reset(self) -> None:
        """Drop the accumulated states (after the report callback read ``metrics[...].last``)."""
        for metric in self.metrics.values():
            metric.reset()
