"""Evaluation data: the eval transform, retrieval shards (webdataset), labelled sets for zero-shot and probes.

Everything here reads local files only. Retrieval sets are webdataset shards in the project's contract (one
sample per caption: ``KEY.{jpg,png,webp}``, ``KEY.txt``, ``KEY.json`` with ``image_id`` and ``caption_id``).
Labelled sets are the offline Fashion-MNIST (Debian ``dataset-fashion-mnist``) and scikit-learn digits, or any
image folder / webdataset with a class-name list.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from zerovl_lightning.data.image_decoding import to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# "A {c}." is the caption style of the demo data (Tux Paint: "A rainbow lorikeet."); the rest are CLIP-style.
DEFAULT_TEMPLATES = (
    "A {c}.",
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a picture of a {c}.",
    "an icon of a {c}.",
    "a black and white image of a {c}.",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))
DIGIT_TEMPLATES = ('a photo of the number: "{c}".', "the digit {c}.", "a drawing of the number {c}.", "{c}")


# ------------------------------------------------------------------------------------------- transform
# to_rgb: the one decoder of training, evaluation and the writers (transparency on white, 16-bit, float)
def eval_transform(
    preprocess_cfg: Mapping[str, Any], image_size: int | None = None
) -> Callable[[Any], torch.Tensor]:
    """ZeroVL's eval transform for a PIL image: RGB on white, Resize((s·256/224)²), CenterCrop(s), normalise.

    The tensor part is :func:`zerovl_lightning.data.transforms.build_eval_transform` (fp32, no augmentation);
    ``image_size`` overrides the model's size (convolutional towers with global pooling, e.g. a cheaper linear
    probe on 28-px Fashion-MNIST).
    """
    from zerovl_lightning.data.transforms import build_eval_transform

    return T.Compose([to_rgb, build_eval_transform(preprocess_cfg, image_size)])


# ------------------------------------------------------------------------------------------- retrieval
def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a folder (its ``*.tar``), a glob, a brace pattern (``shard-{000000..000003}.tar``) or
    a list."""
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    out: list[str] = []
    for item in spec:
        item = str(item)
        if os.path.isdir(item):
            out += sorted(glob.glob(os.path.join(item, "*.tar")))
        elif "{" in item:
            import braceexpand

            out += [p for p in braceexpand.braceexpand(item)]
        elif any(c in item for c in "*?["):
            out += sorted(glob.glob(item))
        else:
            out.append(item)
    missing = [p for p in out if not os.path.isfile(p)]
    if not out or missing:
        raise FileNotFoundError(
            f"no webdataset shards at {spec!r}" + (f" (missing: {missing[:3]})" if missing else "")
        )
    return out


def resolve_retrieval_sets(sets: str | Mapping[str, Any] | Sequence[str]) -> dict[str, list[str]]:
    """Named shard lists from ``{name: spec}``, or from a glob of folders (name = the folder above
    ``heldout``).

    ``"<cache>/demo/*/heldout"`` finds every demo source's held-out split, whatever sources the builder wrote.
    """
    if isinstance(sets, Mapping):
        return {str(name): resolve_shards(spec) for name, spec in sets.items()}
    patterns = [sets] if isinstance(sets, (str, os.PathLike)) else list(sets)
    folders = sorted({f for p in patterns for f in glob.glob(str(p)) if os.path.isdir(f)})
    if not folders:
        raise FileNotFoundError(
            f"no retrieval set folders match {patterns!r}; build the demo data first (zerovl-data demo) "
            "or give sets as {name: shard folder/glob}"
        )
    named: dict[str, list[str]] = {}
    for folder in folders:
        p = Path(folder)
        name = p.parent.name if p.name in ("heldout", "test", "val", "train") else p.name
        named[name] = resolve_shards(folder)
    return named


def _iter_tar(url: str) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    yield from wds.tarfile_to_samples()(iter([{"url": url}]))


def _decode_image(sample: Mapping[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            image = Image.open(io.BytesIO(sample[ext]))
            image.load()
            return image
    raise KeyError(f"sample {sample.get('__key__')} has no image ({'/'.join(IMAGE_EXTENSIONS)})")


def _decode_meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if "image_id" not in meta or "caption_id" not in meta:
        raise KeyError(
            f"sample {sample.get('__key__')}: KEY.json needs image_id and caption_id (docs/CONTRACTS.md)"
        )
    return meta


def load_items_by_id(
    shards: Sequence[str],
    image_ids: set[int] | None = None,
    caption_ids: set[int] | None = None,
    thumbnail: int = 128,
) -> tuple[dict[int, Image.Image], dict[int, str]]:
    """Thumbnails of some images and texts of some captions, read back from the shards (example tables)."""
    image_ids, caption_ids = set(image_ids or ()), set(caption_ids or ())
    images: dict[int, Image.Image] = {}
    captions: dict[int, str] = {}
    for url in resolve_shards(shards):
        for sample in _iter_tar(url):
            meta = _decode_meta(sample)
            iid, cid = int(meta["image_id"]), int(meta["caption_id"])
            if cid in caption_ids:
                captions[cid] = sample["txt"].decode("utf-8").strip()
            if iid in image_ids and iid not in images:
                image = to_rgb(_decode_image(sample))
                image.thumbnail((thumbnail, thumbnail))
                images[iid] = image
    return images, captions


# -------------------------------------------------------------------------------------- classification
class ArrayImages(Dataset):
    """uint8 grey images [N, H, W] + labels → (PIL RGB image, label); grey is replicated to RGB."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels.astype(np.int64)

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


def _read_idx(path: Path) -> np.ndarray:
    """idx-ubyte(.gz) → uint8 array; dimensions from the header (big-endian int32 after a 4-byte magic)."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def fashion_mnist(
    split: str = "test",
    limit: int | None = 1000,
    root: str | os.PathLike = FASHION_MNIST_ROOT,
    invert: bool = True,
) -> ArrayImages:
    """Fashion-MNIST from the Debian package; inverted (255 − x) to dark-on-white like the clip-art training
    data."""
    prefix = {"test": "t10k", "train": "train"}[split]
    root = Path(root)
    try:
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root}: apt-get install dataset-fashion-mnist"
        ) from e
    keep = balanced_subset(labels, limit)
    images = images[keep]
    return ArrayImages(255 - images if invert else images.copy(), labels[keep])


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
    return ArrayImages(255 - images if invert else images, data.target[keep])


class WebdatasetImages(Dataset):
    """A labelled webdataset read into memory (small eval sets): label from ``KEY.cls`` or a ``KEY.json``
    field."""

    def __init__(self, shards: str | Sequence[str], label_key: str = "cls", limit: int | None = None) -> None:
        self.items: list[tuple[bytes, int]] = []
        for url in resolve_shards(shards):
            for sample in _iter_tar(url):
                if label_key in sample:
                    label = int(sample[label_key].decode().strip())
                else:
                    label = int(json.loads(sample["json"])[label_key])
                ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
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
        return fashion_mnist(split, limit, spec.get("root", FASHION_MNIST_ROOT))
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
    raise ValueError(
        f"unknown classification set type {kind!r} (fashion_mnist, digits, imagefolder, webdataset)"
    )


def build_classification_set(
    spec: str | Mapping[str, Any],
    test_limit: int | None = 1000,
    train_limit: int | None = 2000,
    with_train: bool = False,
) -> ClassificationSet:
    """A :class:`ClassificationSet` from a built-in name (``fashion_mnist``, ``digits``) or a mapping.

    Mapping keys: ``name``, ``type`` (fashion_mnist | digits | imagefolder | webdataset), ``test`` / ``train``
    (folder or shards), ``classnames`` (list or a text file, one per line; image folders default to folder
    names), ``templates``, ``label_key``, ``test_limit``, ``train_limit``.
    """
    spec = {"name": spec, "type": spec} if isinstance(spec, str) else dict(spec)
    kind = str(spec.get("type", spec.get("name")))
    name = str(spec.get("name", kind))
    test_limit = spec.get("test_limit", test_limit)
    train_limit = spec.get("train_limit", train_limit)
    test = _split_dataset(kind, "test", spec, test_limit)
    train = _split_dataset(kind, "train", spec, train_limit) if with_train else None
    defaults = {
        "fashion_mnist": (FASHION_MNIST_CLASSES, DEFAULT_TEMPLATES),
        "digits": (DIGIT_CLASSES, DIGIT_TEMPLATES),
    }
    classnames, templates = defaults.get(kind, (None, DEFAULT_TEMPLATES))
    if spec.get("classnames") is not None:
        classnames = spec["classnames"]
        if isinstance(classnames, (str, os.PathLike)):
            classnames = [line.strip() for line in Path(classnames).read_text().splitlines() if line.strip()]
    if classnames is None and kind == "imagefolder":
        base = test.dataset if isinstance(test, torch.utils.data.Subset) else test
        classnames = [c.replace("_", " ") for c in base.classes]  # type: ignore[attr-defined]
    if classnames is None:
        raise ValueError(f"classification set {name!r} needs classnames")
    templates = spec.get("templates") or templates
    return ClassificationSet(name, list(classnames), test, train, list(templates))


# ------------------------------------------------------------------------------------ encoding helpers
class evaluating:  # noqa: N801  (used as a context manager, reads like one)
    """Eval mode, no grad, fp32 autocast off for the duration; restores the previous train/eval mode.

    Evaluation runs inside training callbacks, so it must leave the model exactly as it found it.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.was_training = model.training
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        self._no_grad = torch.no_grad()
        self._autocast = torch.autocast(self.device.type, enabled=False)

    def __enter__(self) -> evaluating:
        self.model.eval()
        self._no_grad.__enter__()
        self._autocast.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._autocast.__exit__(*exc)
        self._no_grad.__exit__(*exc)
        self.model.train(self.was_training)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch of images to the model's device and parameter dtype."""
        return images.to(self.device, self.dtype, non_blocking=True)


def rank_subset(dataset: Dataset) -> Dataset:
    """This rank's share (indices rank, rank + W, …) of a map-style dataset; the whole set without DDP."""
    from zerovl_lightning.distributed import world_info

    world = world_info()
    if not world.distributed:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(world.rank, len(dataset), world.world_size)))  # type: ignore[arg-type]
