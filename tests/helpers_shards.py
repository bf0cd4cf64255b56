"""Helpers for tests that need tiny image–caption inputs or shards (import them; they are not fixtures).

``write_tiny_shards`` gives any test a real source in the contract layout (``shard-%06d.tar`` +
``stats.json``) in milliseconds, through the production writer.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from zerovl_lightning.data.writers import ShardTask, WriteReport, write_shards

COLORS = [(220, 30, 30), (30, 160, 60), (40, 60, 210), (240, 200, 20), (150, 40, 180), (20, 190, 200)]


def tiny_image(i: int, size: int = 12, mode: str = "RGB") -> Image.Image:
    """A small image whose colour and a marker pixel depend on ``i`` (so images are distinguishable)."""
    im = Image.new("RGB", (size, size + 2), COLORS[i % len(COLORS)])
    im.putpixel((i % size, 0), (255, 255, 255))
    return im.convert(mode)


def image_bytes(i: int, fmt: str = "PNG", size: int = 12) -> bytes:
    buf = io.BytesIO()
    tiny_image(i, size).save(buf, format=fmt)
    return buf.getvalue()


def make_zerovl_csv(
    root: Path, name: str = "toy", n_images: int = 6, captions_per_image: int = 3, fmt: str = "JPEG"
) -> list[dict[str, Any]]:
    """Write ZeroVL's ``<root>/<name>/train_anno.csv`` + ``train/`` images; return the rows written."""
    base = root / name
    (base / "train").mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    rows = []
    for i in range(n_images):
        fname = f"img_{i:03d}.{ext}"
        (base / "train" / fname).write_bytes(image_bytes(i, fmt))
        for j in range(captions_per_image):
            rows.append(
                {
                    "image": fname,
                    "image_id": 100 + i,
                    "caption": f'picture {i}, caption {j}: a ünïcode, comma\'d "quoted" text',
                    "caption_id": 10_000 + i * captions_per_image + j,
                }
            )
    with open(base / "train_anno.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "image_id", "caption", "caption_id"])
        w.writeheader()
        w.writerows(rows)
    return rows


def read_shards(directory: Path) -> dict[str, dict[str, Any]]:
    """Every sample of the ``shard-*.tar`` in ``directory``: key → {ext: bytes, "txt": str, "json": dict}."""
    samples: dict[str, dict[str, Any]] = {}
    for shard in sorted(Path(directory).glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                value: Any = data
                if ext == "txt":
                    value = data.decode("utf-8")
                elif ext == "json":
                    value = json.loads(data)
                samples.setdefault(key, {})[ext] = value
    return samples


def _load_bytes(arg: tuple[int, str]) -> tuple[bytes, str]:
    i, ext = arg
    return image_bytes(i, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]), ext


def write_tiny_shards(
    out_dir: Path,
    source: str = "toy",
    n: int = 20,
    samples_per_shard: int = 5,
    captions: Sequence[str] | None = None,
    ext: str = "png",
) -> WriteReport:
    """A real source in the contract layout: ``n`` samples (one caption each), ``samples_per_shard`` each."""
    tasks = [
        ShardTask(
            key=f"{source}_{i:06d}",
            caption=captions[i] if captions else f"{source} sample number {i}",
            meta={"image_id": i, "caption_id": i},
            image=(i, ext),
        )
        for i in range(n)
    ]
    return write_shards(
        tasks, out_dir, _load_bytes, source=source, samples_per_shard=samples_per_shard, progress=False
    )
