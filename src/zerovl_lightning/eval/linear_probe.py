"""Linear probe: frozen image-tower features *before* the projection, a logistic regression on top.

ZeroVL (§7) and CLIP probe the representation of the image tower, not the joint embedding: the projection is
trained for the contrastive task and may discard what a classifier could use. Which tensor that is depends on
the open_clip tower (:func:`image_features`). The classifier is fitted full-batch with L-BFGS on standardised
features; the L2 strength is chosen on a held-out validation split of the training set, then refitted on the
whole training set (as CLIP_benchmark / CLIP's sweep, smaller).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zerovl_lightning.eval.classification_data import ClassificationSet, Transformed
from zerovl_lightning.eval.encoding import evaluating, rank_subset
from zerovl_lightning.eval.transforms import eval_transform
from zerovl_lightning.eval.zeroshot import classification_metrics

log = logging.getLogger(__name__)
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def image_features(model: nn.Module, images: Tensor) -> Tensor:
    """[B, F] image-tower features before the projection to the joint space.

    - timm towers (``clip.visual.trunk``): the trunk's pooled output (global average pool, or ``token`` for
      ViTs); an unpooled map (attention-pool configs) is averaged over space.
    - open_clip ViT (``VisionTransformer``): the pooled token after ``ln_post``: ``forward`` without ``proj``.
    - open_clip ModifiedResNet: layer4 averaged over space (its attention pool ends in the projection).
    - anything else: the projected, un-normalised embedding (logged once).
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    visual = getattr(getattr(model, "clip", model), "visual", None)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        x = trunk(images)
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x.mean(dim=1) if x.ndim == 3 else x
    if isinstance(visual, VisionTransformer):
        proj, output_tokens = visual.proj, visual.output_tokens
        try:
            visual.proj, visual.output_tokens = None, False
            return visual(images)
        finally:
            visual.proj, visual.output_tokens = proj, output_tokens
    if isinstance(visual, ModifiedResNet):
        x = visual.stem(images)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        return x.mean(dim=(2, 3))
    log.warning("linear probe: no pre-projection hook for %s; using the projected embedding", type(visual).__name__)
    return model.encode_image(images, normalize=False)  # type: ignore[operator]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    preprocess_cfg: dict[str, Any],
    batch_size: int = 64,
    num_workers: int = 0,
    image_size: int | None = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """(features [N, F] fp32, labels [N]) over the whole dataset; under DDP each rank encodes its share and
    the shares are gathered (every rank gets all rows)."""
    from torchmetrics.utilities.distributed import gather_all_tensors

    from zerovl_lightning.distributed import world_info

    data = Transformed(rank_subset(dataset), eval_transform(preprocess_cfg, image_size))
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    with evaluating(model) as ev:
        for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            feats.append(image_features(model, ev.images(images)).float())
            labels.append(y.to(ev.device))
        if not feats:  # this rank got no samples: still take part in the gather
            size = image_size or int(getattr(model, "image_size", 224))
            feats.append(image_features(model, ev.images(torch.zeros(1, 3, size, size)))[:0].float())
            labels.append(torch.zeros(0, dtype=torch.long, device=ev.device))
    x, y = torch.cat(feats), torch.cat(labels)
    if world_info().distributed:
        x, y = torch.cat(gather_all_tensors(x.contiguous())), torch.cat(gather_all_tensors(y.contiguous()))
    return x, y


def fit_logistic_regression(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS: minimise CE + (λ/2)·‖W‖². Returns (W [F, C], b
    [C])."""
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    try:
        # a few MFLOP per step: on CPU, thread synchronisation costs more than it saves (8× on a busy machine)
        if x.device.type == "cpu":
            torch.set_num_threads(1)
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return weight.detach(), bias.detach()


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Pick λ on a seeded validation split of the training features, refit on all of them, score the test set.

    Returns ``top1``, ``top5`` (≥ 5 classes), ``mean_per_class_recall`` (fractions), ``weight_decay`` (chosen
    λ), ``val_top1`` (its validation accuracy), ``num_train``, ``num_test``.
    """
    if len(weight_decays) == 0:
        raise ValueError("weight_decays must not be empty")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(train_x.shape[0], generator=gen).to(train_x.device)
    n_val = int(round(val_fraction * train_x.shape[0])) if len(weight_decays) > 1 else 0
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    best_wd, best_acc = float(weight_decays[0]), float("nan")
    if n_val > 0:
        fx, vx = _standardise(train_x[fit_idx], train_x[val_idx])
        scores = []
        for wd in weight_decays:
            w, b = fit_logistic_regression(fx, train_y[fit_idx], num_classes, float(wd), max_iter)
            scores.append(float(((vx @ w + b).argmax(1) == train_y[val_idx]).double().mean()))
        best = max(range(len(scores)), key=lambda i: (scores[i], weight_decays[i]))  # ties → stronger λ
        best_wd, best_acc = float(weight_decays[best]), scores[best]
        log.info("linear probe λ sweep: %s", dict(zip(weight_decays, scores)))
    tx, sx = _standardise(train_x, test_x)
    w, b = fit_logistic_regression(tx, train_y, num_classes, best_wd, max_iter)
    metrics = classification_metrics(num_classes, "cpu", sync=False)  # every rank holds all test features
    metrics.update((sx @ w + b).cpu(), test_y.cpu())
    out = {k: float(v) for k, v in metrics.compute().items()}
    out.update(
        weight_decay=best_wd,
        val_top1=best_acc,
        num_train=float(train_x.shape[0]),
        num_test=float(test_x.shape[0]),
    )
    return out


def evaluate_linear_probe(
    model: nn.Module,
    dataset: ClassificationSet,
    batch_size: int = 64,
    num_workers: int = 0,
    image_size: int | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    max_iter: int = 100,
    progress: bool = True,
) -> dict[str, float]:
    """Frozen features of ``dataset.train`` / ``dataset.test`` → :func:`linear_probe` (see there for the
    keys)."""
    if dataset.train is None:
        raise ValueError(f"linear probe on {dataset.name!r} needs a train split")
    pp = dict(model.preprocess_cfg)  # type: ignore[arg-type]
    kw = dict(batch_size=batch_size, num_workers=num_workers, image_size=image_size, progress=progress)
    train_x, train_y = extract_features(model, dataset.train, pp, desc=f"probe {dataset.name} train", **kw)
    test_x, test_y = extract_features(model, dataset.test, pp, desc=f"probe {dataset.name} test", **kw)
    return linear_probe(train_x, train_y, test_x, test_y, dataset.num_classes, weight_decays, val_fraction, max_iter)
