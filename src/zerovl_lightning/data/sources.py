"""The inputs the writers know: ZeroVL CSV layouts, image folders with captions, img2dataset output.

Each turns its input into a list of :class:`~.writers.ShardTask` and hands it to the one resumable writer
(:func:`~.writers.write_shards`); img2dataset shards are already webdataset and only get a ``stats.json``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .image_decoding import load_image_file
from .shard_list import tar_index
from .stats import STATS_FILE
from .writers import (
    WRITER_VERSION,
    ShardTask,
    WriteReport,
    _atomic_write_json,
    _stats_up_to_date,
    write_shards,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# (a) ZeroVL CSV layout


def _safe_key_part(s: str) -> str:
    # webdataset splits a member name at its first dot: keys must not contain dots (or slashes).
    return re.sub(r"[^A-Za-z0-9_-]+", "_", s).strip("_") or "src"


def _shuffled(items: list[Any], seed: int | None) -> list[Any]:
    if seed is not None:
        random.Random(seed).shuffle(items)
    return items


def write_csv_shards(
    root: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    shuffle_seed: int | None = 0,
    workers: int = 0,
    force: bool = False,
    progress: bool = True,
) -> WriteReport:
    """ZeroVL's ``<root>/<name>/<split>_anno.csv`` (image, image_id, caption, caption_id) → shards.

    One sample per CSV row (caption); images are read from ``<root>/<name>/<split>/``. Rows are shuffled with
    ``shuffle_seed`` (None keeps CSV order) so that the captions of one image spread over the shards instead
    of filling one batch with duplicates. ``max_side`` downsizes larger images (re-encoded as JPEG).
    """
    base = Path(root) / name
    csv_path = base / f"{split}_anno.csv"
    image_dir = base / split
    if not csv_path.is_file():
        raise FileNotFoundError(f"ZeroVL annotation file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        missing = {"image", "image_id", "caption", "caption_id"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)} (has {reader.fieldnames})")
        rows = list(reader)
    key_prefix = _safe_key_part(name)
    tasks = []
    for line, r in enumerate(rows, start=2):
        try:
            image_id, caption_id = int(r["image_id"]), int(r["caption_id"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{csv_path}:{line}: image_id and caption_id must be integers ({e})") from e
        tasks.append(
            ShardTask(
                key=f"{key_prefix}_{caption_id:010d}",
                caption=r["caption"] or "",
                meta={"image_id": image_id, "caption_id": caption_id, "image": r["image"]},
                image=str(image_dir / r["image"]),
            )
        )
    if len({t.key for t in tasks}) != len(tasks):
        raise ValueError(f"{csv_path}: caption_id values are not unique")
    tasks = _shuffled(tasks, shuffle_seed)
    return write_shards(
        tasks,
        out_dir,
        functools.partial(load_image_file, max_side=max_side),
        source=name,
        samples_per_shard=samples_per_shard,
        params={"max_side": max_side, "shuffle_seed": shuffle_seed, "kind": "zerovl-csv"},
        workers=workers,
        force=force,
        progress=progress,
        desc=f"{name}/{split}",
    )


# ----------------------------------------------------------------------------------------------------
# (b) a folder of images with captions

_FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "path", "image_path")
_CAPTION_COLUMNS = ("caption", "text", "title", "description")
CAPTION_FILES = ("captions.csv", "captions.tsv", "metadata.csv", "metadata.tsv")


def _read_caption_table(path: Path) -> list[tuple[str, str]]:
    """(relative image path, caption) rows of a CSV/TSV with a header naming an image and a caption column."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        sample = f.read(4096)
        f.seek(0)
        delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in sample and "," not in sample) else ","
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip().lower() for h in next(reader, [])]
        img_col = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), None)
        cap_col = next((header.index(c) for c in _CAPTION_COLUMNS if c in header), None)
        if img_col is None or cap_col is None:
            raise ValueError(
                f"{path}: the header must name an image column (one of {_IMAGE_COLUMNS}) and a caption "
                f"column (one of {_CAPTION_COLUMNS}); got {header}"
            )
        return [(r[img_col], r[cap_col]) for r in reader if len(r) > max(img_col, cap_col)]


def write_folder_shards(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    captions_file: str | os.PathLike | None = None,
    source: str | None = None,
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    shuffle_seed: int | None = 0,
    workers: int = 0,
    force: bool = False,
    progress: bool = True,
) -> WriteReport:
    """A folder of images with captions → shards in ``out_dir``.

    Captions come from a same-stem ``.txt`` sidecar (each non-empty line is one caption) and/or a CSV/TSV
    mapping file (``captions_file``, or ``captions.csv|tsv`` / ``metadata.csv|tsv`` found in ``image_dir``)
    whose header names an image column (image, file_name, …, relative to ``image_dir``) and a caption column
    (caption, text, …); several rows per image give several captions. Images without any caption and caption
    rows whose image is absent are counted in ``stats``.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    source = source or root.resolve().name
    images = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in _FOLDER_IMAGE_EXTS and p.is_file() and not any(s.startswith(".") for s in p.parts)
    )
    captions: dict[str, list[str]] = {im: [] for im in images}
    for im in images:
        txt = (root / im).with_suffix(".txt")
        if txt.is_file():
            text = txt.read_bytes().decode("utf-8", errors="surrogateescape")  # bad bytes: counted later
            captions[im].extend(line.strip() for line in text.splitlines() if line.strip())
    table = (
        Path(captions_file) if captions_file else next((root / n for n in CAPTION_FILES if (root / n).is_file()), None)
    )
    orphan_rows = 0
    if table is not None:
        for rel, cap in _read_caption_table(table):
            rel = Path(rel).as_posix()  # "./a.jpg" → "a.jpg"
            if rel in captions:
                captions[rel].append(cap.strip())
            else:
                orphan_rows += 1
    key_prefix = _safe_key_part(source)
    tasks: list[ShardTask] = []
    no_caption = 0
    caption_id = 0
    for image_id, im in enumerate(images):
        if not captions[im]:
            no_caption += 1
        for cap in captions[im]:
            tasks.append(
                ShardTask(
                    key=f"{key_prefix}_{caption_id:09d}",
                    caption=cap,
                    meta={"image_id": image_id, "caption_id": caption_id, "image": im},
                    image=str(root / im),
                )
            )
            caption_id += 1
    tasks = _shuffled(tasks, shuffle_seed)
    report = write_shards(
        tasks,
        out_dir,
        functools.partial(load_image_file, max_side=max_side),
        source=source,
        samples_per_shard=samples_per_shard,
        params={
            "max_side": max_side,
            "shuffle_seed": shuffle_seed,
            "kind": "folder",
            "no_caption": no_caption,
            "orphan_rows": orphan_rows,
        },
        extra_stats={"images_without_caption": no_caption, "captions_without_image": orphan_rows},
        workers=workers,
        force=force,
        progress=progress,
        desc=source,
    )
    return report


# ----------------------------------------------------------------------------------------------------
# (c) img2dataset output (already webdataset)


def index_img2dataset(
    directory: str | os.PathLike,
    *,
    source: str | None = None,
    count: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> WriteReport:
    """Write ``stats.json`` for img2dataset (or any webdataset) shards in ``directory``, left as they are.

    ``count="auto"`` takes each shard's sample count from img2dataset's ``NNNNN_stats.json`` (``successes``)
    when present and counts the tar's keys otherwise; ``count="scan"`` always reads the tars. img2dataset
    writes one caption per image, so ``num_images == num_samples``; its ``KEY.json`` has no
    ``image_id``/``caption_id``.
    """
    t0 = time.perf_counter()
    d = Path(directory)
    if count not in ("auto", "scan"):
        raise ValueError("count must be 'auto' or 'scan'")
    tars = sorted(p for p in d.glob("*.tar") if p.is_file())
    if not tars:
        raise FileNotFoundError(f"No .tar shards in {d}")
    source = source or d.resolve().name
    listing = [(p.name, p.stat().st_size) for p in tars]
    fingerprint = hashlib.sha1(json.dumps([WRITER_VERSION, "img2dataset", source, count, listing]).encode()).hexdigest()
    if not force and (stats := _stats_up_to_date(d, fingerprint)) is not None:
        return WriteReport(d, stats, "up-to-date", time.perf_counter() - t0)
    shards = []
    no_image = 0
    counted_from = Counter()
    for p in tqdm(tars, desc=f"index {source}", unit="shard", disable=not progress, leave=False):
        n = None
        side = p.with_name(p.stem + "_stats.json")
        if count == "auto" and side.is_file():
            try:
                n = int(json.loads(side.read_text())["successes"])
                counted_from["img2dataset_stats"] += 1
            except (ValueError, KeyError, TypeError):
                n = None
        if n is None:
            index = tar_index(str(p))  # the loaders' own header scan; samples with an image count
            n = sum(index.has_image)
            no_image += len(index.has_image) - n
            counted_from["tar_scan" if index.clean else "unreadable_tar"] += 1
            if not index.clean:
                log.warning("%s: truncated or unreadable shard, counted the %d samples a read yields", p, n)
        shards.append({"file": p.name, "num_samples": n, "bytes": p.stat().st_size})
    num_samples = sum(s["num_samples"] for s in shards)
    stats = {
        "source": source,
        "format": "img2dataset",
        "num_samples": num_samples,
        "num_shards": len(shards),
        "num_images": num_samples,
        "num_captions": num_samples,
        "skipped": {"no_image": no_image},
        "counted_from": dict(counted_from),
        "shards": shards,
        "writer": f"zerovl_lightning.data.writers v{WRITER_VERSION}",
        "fingerprint": fingerprint,
    }
    _atomic_write_json(d / STATS_FILE, stats)
    return WriteReport(d, stats, "written", time.perf_counter() - t0)
