"""Labelled sets for zero-shot classification and the linear probe: class names, prompt templates, test / train
splits.

Built-ins are the offline Fashion-MNIST (Debian ``dataset-fashion-mnist``, read by
:func:`zerovl_lightning.data.fashion_mnist.read_fashion_mnist`) and scikit-learn's digits; any image folder or labelled
webdataset works with a class-name list. Everything reads local files only; images are decoded with the
training decoder (:func:`~zerovl_lightning.data.image_decoding.to_rgb`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from zerovl_lightning.data.image_decoding import to_rgb
from zerovl_lightning.data.shards import IMAGE_EXTS, expand_shards

# "A {c}." is the caption style of the demo data (Tux Paint: "A rainbow lorikeet."); the rest are CLIP-style.
DEFAULT_TEMPLATES = (
    "A {c}.",
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a picture of a {c}.",
    "an icon of a {c}.",
    "a black and white image of a {c}.",
)
# Class names as they read in a prompt (the dataset's own labels are "T-shirt/top", "Trouser", …).
FASHION_MNIST_CLASSES = (
    "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(i) for i in range(10))
DIGIT_TEMPLATES = ('a photo of the number: "{c}".', "the digit {c}.", "a drawing of the number {c}.", "{c}")


class ArrayImages(Dataset):
    """uint8 grey images [N, H, W] + labels → (PIL RGB image, label); grey is replicated to RGB.

    ``classnames``: the set's class names when the source knows them (the built-ins).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str] | None = None) -> None:
        self.images, self.labels = images, labels.astype(np.int64)
        self.classnames = None if classnames is None else tuple(classnames)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L").convert("RGB"), int(self.labels[i])


class Transformed(Dataset):
    """Apply an image transform lazily to a (image, label) dataset."""

    def __init__(self, dataset: Dataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[i]
        return self.transform(image), label


@dataclass
class ClassificationSet:
    """A labelled set: class names + prompt templates (zero-shot) and test / optional train split (probe)."""

    name: str
    classnames: Sequence[str]
    test: Dataset
    train: Dataset | None = None
    templates: Sequence[str] = field(default_factory=lambda: DEFAULT_TEMPLATES)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def balanced_subset(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """The first ``limit // C`` indices of every class (deterministic, class-balanced); all when ``limit`` is
    None."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class = max(1, limit // len(classes))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    return np.sort(keep)


def fashion_mnist(
    split: str = "test", limit: int | None = 1000, root: str | os.PathLike | None = None, invert: bool = True
) -> ArrayImages:
    """A class-balanced subset of Fashion-MNIST (Debian package; ``root`` None: its default folder), inverted
    (255 − x) to dark-on-white like the clip-art training data."""
    from zerovl_lightning.data.fashion_mnist import read_fashion_mnist

    images, labels = read_fashion_mnist(split, **({} if root is None else {"root": root}))
    images = 255 - images if invert else images
    keep = balanced_subset(labels, limit)
    return ArrayImages(images[keep], labels[keep], FASHION_MNIST_CLASSES)


def digits(split: str = "test", limit: int | None = None, invert: bool = True) -> ArrayImages:
    """scikit-learn's 8×8 digits (1,797); every third image is test; ink 0–16 scaled to 0–255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(len(images))
    index = index[index % 3 == 0] if split == "test" else index[index % 3 != 0]
    labels = data.target[index]
    keep = index[balanced_subset(labels, limit)]
    images = images[keep]
    return ArrayImages(255 - images if invert else images, data.target[keep], DIGIT_CLASSES)


class WebdatasetImages(Dataset):
    """A labelled webdataset read into memory (small eval sets): label from ``KEY.cls`` or a ``KEY.json``
    field."""

    def __init__(self, shards: str | Sequence[str], label_key: str = "cls", limit: int | None = None) -> None:
        import webdataset as wds

        self.items: list[tuple[bytes, int]] = []
        urls = expand_shards(shards, source="classification set")
        for sample in wds.tarfile_to_samples()(iter([{"url": u} for u in urls])):
            if label_key in sample:
                label = int(sample[label_key].decode().strip())
            else:
                label = int(json.loads(sample["json"])[label_key])
            ext = next(e for e in IMAGE_EXTS if e in sample)
            self.items.append((sample[ext], label))
        labels = np.array([label for _, label in self.items])
        self.items = [self.items[i] for i in balanced_subset(labels, limit)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        data, label = self.items[i]
        return to_rgb(Image.open(io.BytesIO(data))), label


def _split_dataset(kind: str, split: str, spec: Mapping[str, Any], limit: int | None) -> Dataset:
    if kind == "fashion_mnist":
        return fashion_mnist(split, limit, spec.get("root"))
    if kind == "digits":
        return digits(split, limit)
    path = spec.get(split)
    if path is None:
        raise KeyError(f"classification set {spec.get('name')!r} has no {split!r} path")
    if kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(str(path), loader=lambda p: to_rgb(Image.open(p)))
        keep = balanced_subset(np.array(folder.targets), limit)
        return torch.utils.data.Subset(folder, keep.tolist())
    if kind == "webdataset":
        return WebdatasetImages(path, spec.get("label_key", "cls"), limit)
    raise ValueError(f"unknown classification set type {kind!r} (fashion_mnist, digits, imagefolder, webdataset)")


def build_classification_set(
    spec: str | Mapping[str, Any],
    test_limit: int | None = 1000,
    train_limit: int | None = 2000,
    with_train: bool = False,
) -> ClassificationSet:
    """A :class:`ClassificationSet` from a built-in name (``fashion_mnist``, ``digits``) or a mapping.

    Mapping keys: ``name``, ``type`` (fashion_mnist | digits | imagefolder | webdataset), ``test`` / ``train``
    (folder or shards), ``classnames`` (list or a text file, one per line; built-ins and image folders have
    their own), ``templates``, ``label_key``, ``test_limit``, ``train_limit``, ``root`` (Fashion-MNIST).
    """
    spec = {"name": spec, "type": spec} if isinstance(spec, str) else dict(spec)
    kind = str(spec.get("type", spec.get("name")))
    name = str(spec.get("name", kind))
    test_limit = spec.get("test_limit", test_limit)
    train_limit = spec.get("train_limit", train_limit)
    test = _split_dataset(kind, "test", spec, test_limit)
    train = _split_dataset(kind, "train", spec, train_limit) if with_train else None
    classnames = getattr(test, "classnames", None)
    if spec.get("classnames") is not None:
        classnames = spec["classnames"]
        if isinstance(classnames, (str, os.PathLike)):
            classnames = [line.strip() for line in Path(classnames).read_text().splitlines() if line.strip()]
    if classnames is None and kind == "imagefolder":
        base = test.dataset if isinstance(test, torch.utils.data.Subset) else test
        classnames = [c.replace("_", " ") for c in base.classes]  # type: ignore[attr-defined]
    if classnames is None:
        raise ValueError(f"classification set {name!r} needs classnames")
    templates = spec.get("templates") or (DIGIT_TEMPLATES if kind == "digits" else DEFAULT_TEMPLATES)
    return ClassificationSet(name, list(classnames), test, train, list(templates))
