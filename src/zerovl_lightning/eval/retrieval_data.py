"""Retrieval sets by image: each unique image is decoded and encoded once, on one rank, with all its captions.

:func:`resolve_retrieval_sets` turns the config's ``val_sets`` (``{name: shards}`` or a glob of set folders) into
named shard lists (:func:`zerovl_lightning.data.shards.expand_shards`, the training loader's expander).

Shards hold one sample per caption (``KEY.{jpg,png,webp}``, ``KEY.txt``, ``KEY.json`` with ``image_id`` and
``caption_id``), so an image with five captions is stored five times. :func:`index_retrieval_set` reads the tar
headers and the small ``.json``/``.txt`` members only (image payloads are skipped by offset), groups captions by
``image_id`` and remembers where each image's first copy lies. :class:`RetrievalImages` is then a map-style
dataset of unique images (one item = one decoded image + all its captions), and :class:`RankSplitSampler` gives
rank ``r`` the images ``r, r + W, …`` padded to the same count on every rank, so every rank runs the same number
of validation batches (DDP's forward broadcasts buffers: unequal batch counts would hang).
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from webdataset.tariterators import base_plus_ext

from zerovl_lightning.data.shards import IMAGE_EXTS, expand_shards
from zerovl_lightning.eval.transforms import eval_transform

PAD = -1  # sampler index of a padding item: no decode, no captions, image_id -1 (dropped by the step)


@dataclass
class RetrievalImage:
    """One unique image: where its first copy lies and all its captions (in caption id order)."""

    image_id: int
    shard: str
    offset: int  # byte offset of the image member's data in the tar
    size: int
    captions: list[str] = field(default_factory=list)
    caption_ids: list[int] = field(default_factory=list)


def resolve_retrieval_sets(sets: str | os.PathLike | Mapping[str, Any] | Sequence[str]) -> dict[str, list[str]]:
    """Named shard lists from ``{name: spec}``, or from a glob of folders (name = the folder above
    ``heldout``).

    ``"<cache>/demo/*/heldout"`` finds every demo source's held-out split, whatever sources the builder wrote.
    """
    if isinstance(sets, Mapping):
        return {str(name): expand_shards(spec, source=str(name)) for name, spec in sets.items()}
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
        named[name] = expand_shards(folder, source=name)
    return named


def index_retrieval_set(shards: str | Sequence[str]) -> list[RetrievalImage]:
    """Unique images of a shard set in image id order, with their captions; reads no image payloads."""
    images: dict[int, RetrievalImage] = {}
    for url in expand_shards(shards, source="retrieval set"):
        samples: dict[str, dict[str, Any]] = {}
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:  # no extension: not part of a sample (webdataset skips it too)
                    continue
                ext = ext.lower()
                sample = samples.setdefault(key, {})
                if ext in ("json", "txt"):
                    sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                elif ext in IMAGE_EXTS and "image" not in sample:
                    sample["image"] = (member.offset_data, member.size)
        for key, sample in samples.items():
            if "json" not in sample or "txt" not in sample or "image" not in sample:
                raise KeyError(f"{url}: sample {key} needs an image, KEY.txt and KEY.json (docs/CONTRACTS.md)")
            meta = json.loads(sample["json"])
            if "image_id" not in meta or "caption_id" not in meta:
                raise KeyError(f"{url}: sample {key}: KEY.json needs image_id and caption_id (docs/CONTRACTS.md)")
            image_id = int(meta["image_id"])
            if image_id not in images:
                images[image_id] = RetrievalImage(image_id, url, *sample["image"])
            item = images[image_id]
            item.captions.append(sample["txt"].decode("utf-8").strip())
            item.caption_ids.append(int(meta["caption_id"]))
    out = [images[i] for i in sorted(images)]
    for item in out:
        order = sorted(range(len(item.caption_ids)), key=item.caption_ids.__getitem__)
        item.caption_ids = [item.caption_ids[j] for j in order]
        item.captions = [item.captions[j] for j in order]
    return out


def read_image(item: RetrievalImage) -> Image.Image:
    """Decode the image bytes of an indexed image (one seek + read in its shard)."""
    with open(item.shard, "rb") as f:
        f.seek(item.offset)
        data = f.read(item.size)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class RetrievalImages(Dataset):
    """Unique images of a retrieval set: ``{"image", "image_id", "captions", "caption_ids"}`` per item.

    Index :data:`PAD` is a padding item (a blank image of the right size, image id -1, no captions).
    ``decoded`` counts decodes in this process (the benchmark's images-decoded-per-unique-image figure).
    """

    def __init__(
        self, shards: str | Sequence[str], transform: Callable[[Image.Image], torch.Tensor], name: str = ""
    ) -> None:
        self.name = name
        self.items = index_retrieval_set(shards)
        self.transform = transform
        self.decoded = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index == PAD:
            return {"image": self.transform(Image.new("RGB", (8, 8), "white")), "image_id": -1,
                    "captions": [], "caption_ids": []}  # fmt: skip
        item = self.items[index]
        self.decoded += 1
        return {"image": self.transform(read_image(item)), "image_id": item.image_id,
                "captions": item.captions, "caption_ids": item.caption_ids}  # fmt: skip


class RankSplitSampler(DistributedSampler):
    """Rank ``r`` of ``W`` gets images ``r, r + W, …``, padded with :data:`PAD` to ``ceil(N / W)`` items.

    A DistributedSampler subclass, so Lightning keeps it (it would otherwise add one that pads by repeating
    images, decoding them twice).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        mine = list(range(self.rank, n, self.num_replicas))
        return iter(mine + [PAD] * (self.num_samples - len(mine)))

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.num_replicas)  # type: ignore[arg-type]


def collate_retrieval(items: list[dict[str, Any]], name: str = "") -> dict[str, Any]:
    """[B, 3, H, W] images with [B] ids; their captions flattened ([Bt]) with each caption's image id."""
    return {
        "set": name,
        "image": torch.stack([it["image"] for it in items]),
        "image_id": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
        "caption": [c for it in items for c in it["captions"]],
        "caption_id": torch.tensor([c for it in items for c in it["caption_ids"]], dtype=torch.long),
        "caption_image_id": torch.tensor([it["image_id"] for it in items for _ in it["captions"]], dtype=torch.long),
    }


class _Collate:
    """Picklable collate that stamps the set name on every batch (workers may be spawned)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_retrieval(items, self.name)


def retrieval_loaders(
    sets: Mapping[str, Sequence[str]],
    preprocess_cfg: Mapping[str, Any],
    batch_size: int = 64,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> list[DataLoader]:
    """One DataLoader per named set (already resolved shard lists), this rank's images only.

    Each loader has its own generator: iterating a DataLoader draws its workers' base seed from the global
    torch RNG otherwise, and an evaluation inside training would shift the training RNG (resume exactness).
    """
    transform = eval_transform(preprocess_cfg)
    loaders = []
    for name, shards in sets.items():
        data = RetrievalImages(shards, transform, name)
        loaders.append(
            DataLoader(
                data,
                batch_size=batch_size,
                sampler=RankSplitSampler(data, world_size, rank),
                num_workers=num_workers,
                collate_fn=_Collate(name),
                generator=torch.Generator().manual_seed(0),
            )
        )
    return loaders
