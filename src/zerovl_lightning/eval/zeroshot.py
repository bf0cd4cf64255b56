"""Zero-shot classification: class names × prompt templates → a text classifier; top-1 / top-5 accuracy.

CLIP's recipe: every class name is put into every template, the normalised text embeddings are averaged per
class and re-normalised; an image's logits are its cosine similarities to these class embeddings. Accuracies
come from torchmetrics (``MulticlassAccuracy`` with ``top_k``), which also syncs them across DDP ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall
from tqdm.auto import tqdm

from zerovl_lightning.eval.classification_data import ClassificationSet, Transformed
from zerovl_lightning.eval.encoding import evaluating, rank_subset
from zerovl_lightning.eval.transforms import eval_transform


class Encoder(Protocol):
    """What evaluation needs from a model (:class:`zerovl_lightning.model.DualEncoder` has it)."""

    preprocess_cfg: dict[str, Any]

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor: ...
    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor: ...
    def tokenize(self, texts: list[str]) -> Tensor: ...


@torch.no_grad()
def zeroshot_classifier(
    model: Encoder, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> Tensor:
    """[C, D] unit-norm class embeddings: mean over templates of the normalised prompt embeddings,
    re-normalised.

    Templates use ``{c}`` for the class name (``{}`` works too).
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs class names and templates")
    prompts = [t.replace("{}", "{c}").format(c=name) for name in classnames for t in templates]
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = model.tokenize(prompts[start : start + batch_size]).to(device)
        chunks.append(model.encode_text(tokens, normalize=True).float())
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def classification_metrics(num_classes: int, device: torch.device | str = "cpu", sync: bool = True) -> MetricCollection:
    """top1, top5 (when there are ≥ 5 classes) and mean per-class recall, as CLIP_benchmark.

    ``sync=False`` when every rank already holds all predictions (the linear probe fits on gathered features).
    """
    kw: dict[str, Any] = {"sync_on_compute": sync}
    metrics: dict[str, Any] = {
        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", **kw),
        "mean_per_class_recall": MulticlassRecall(num_classes, average="macro", **kw),
    }
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", **kw)
    # compute_groups=False: top-1 and top-5 have equal state shapes; torchmetrics would merge them for good if
    # their states coincide after the first batch (a perfect first batch), and top-5 would then report top-1
    return MetricCollection(metrics, compute_groups=False).to(device)


def clip_benchmark_keys(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """CLIP_benchmark's names: ``acc1``, ``acc5``, ``mean_per_class_recall`` (``lp_`` prefix for linear
    probes)."""
    out = {
        f"{prefix}acc1": metrics["top1"],
        f"{prefix}mean_per_class_recall": metrics["mean_per_class_recall"],
    }
    if "top5" in metrics:
        out[f"{prefix}acc5"] = metrics["top5"]
    return out


@torch.no_grad()
def evaluate_zeroshot(
    model: Encoder,
    dataset: ClassificationSet,
    batch_size: int = 64,
    num_workers: int = 0,
    image_size: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Zero-shot accuracy of ``model`` on ``dataset.test`` (this rank's share under DDP, metrics synced).

    Returns ``top1``, ``top5`` (≥ 5 classes), ``mean_per_class_recall`` as fractions and ``num_samples``.
    """
    with evaluating(model) as ev:  # type: ignore[arg-type]
        classifier = zeroshot_classifier(model, dataset.classnames, dataset.templates)
        data = Transformed(rank_subset(dataset.test), eval_transform(model.preprocess_cfg, image_size))
        loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers)
        metrics = classification_metrics(dataset.num_classes, ev.device)
        n = torch.zeros((), device=ev.device)
        for images, labels in tqdm(loader, desc=f"zero-shot {dataset.name}", disable=not progress, leave=False):
            emb = model.encode_image(ev.images(images), normalize=True).float()
            metrics.update(emb @ classifier.T, labels.to(ev.device))
            n += labels.numel()
        out = {k: float(v) for k, v in metrics.compute().items()}
    from zerovl_lightning.distributed import world_info

    world = world_info()
    if world.distributed:
        torch.distributed.all_reduce(n, group=world.group)
    out["num_samples"] = float(n)
    return out
