"""Building the demo: list, split, render and write every source (resumable, skipped when ``manifest.json``
matches the configuration)."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..assets import cache_dir as default_cache_dir
from ..data.writers import ShardTask, WriteReport, _make_pool, write_shards
from .captions import (
    heldout_captions,
    normalize_caption,
)
from .listing import (
    list_source,
)
from .packages import (
    DEMO_VERSION,
    MANIFEST,
    SOURCE_INFO,
    SOURCES,
    SPLITS,
    DemoItem,
    _roots,
    check_assets,
)
from .render import (
    render_item,
)


def demo_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/demo``."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "demo"


def demo_split_dirs(
    cache_dir: str | os.PathLike | None = None, sources: Sequence[str] = SOURCES
) -> dict[str, dict[str, Path]]:
    """``{source: {"train": dir, "heldout": dir}}`` of a built demo."""
    root = demo_root(cache_dir)
    return {s: {sp: root / s / sp for sp in SPLITS} for s in sources}


def _num_shards(n: int, min_shards: int, max_per_shard: int) -> int:
    return max(1, min(n, max(min_shards, math.ceil(n / max_per_shard))))


def _config(sources, roots, limit, heldout_fraction, max_heldout, image_size, image_format, quality) -> dict:
    return {
        "version": DEMO_VERSION,
        "sources": list(sources),
        "roots": {k: str(v) for k, v in _roots(roots).items()},
        "limit": limit,
        "heldout_fraction": heldout_fraction,
        "max_heldout": max_heldout,
        "image_size": image_size,
        "image_format": image_format,
        "quality": quality,
    }


def _fresh_manifest(root: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("config") != config:
        return None
    for s in config["sources"]:
        for sp in SPLITS:
            if not (root / s / sp / "stats.json").is_file():
                return None
    return manifest


def build_demo(
    cache_dir: str | os.PathLike | None = None,
    *,
    sources: Sequence[str] = SOURCES,
    roots: Mapping[str, str | os.PathLike] | None = None,
    limit: int | None = None,
    heldout_fraction: float = 0.2,
    max_heldout: int | None = 400,
    image_size: int = 160,
    image_format: str = "jpg",
    quality: int = 90,
    workers: int = 2,
    min_train_shards: int = 8,
    min_heldout_shards: int = 2,
    max_samples_per_shard: int = 256,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build (or find up to date) the demo shards under ``<cache_dir>/demo`` and return its manifest.

    ``limit`` keeps the first N items of each source (tests). ``workers`` renders in a process pool (the SVG
    sources dominate the time). Shard counts are at least ``min_*_shards`` so that DDP ranks × dataloader
    workers each get shards. Raises :class:`DemoAssetsMissing` naming the packages to install.
    """
    t0 = time.perf_counter()
    sources = list(sources)
    root = demo_root(cache_dir)
    config = _config(sources, roots, limit, heldout_fraction, max_heldout, image_size, image_format, quality)
    if not force and (manifest := _fresh_manifest(root, config)) is not None:
        manifest["status"] = "up-to-date"
        return manifest
    check_assets(sources, roots)
    r = _roots(roots)
    say = log or (lambda _msg: None)
    load = functools.partial(
        render_item, size=image_size, fmt=image_format, quality=quality, emoji_font=str(r["emoji"])
    )
    entries: dict[str, Any] = {}
    pool = _make_pool(workers) if workers > 0 else None
    try:
        for s in sources:
            ts = time.perf_counter()
            items = list_source(s, roots)
            if limit is not None:
                items = items[:limit]
            entries[s] = _build_source(
                s,
                items,
                root / s,
                load,
                config,
                pool,
                force,
                progress,
                (min_train_shards, min_heldout_shards),
                max_samples_per_shard,
            )
            entries[s]["seconds"] = round(time.perf_counter() - ts, 2)
            e = entries[s]
            n_train, n_held = e["train"]["num_samples"], e["heldout"]["num_samples"]
            say(f"{s}: {n_train} train / {n_held} heldout ({e['seconds']:.1f}s)")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    manifest = {
        "config": config,
        "sources": entries,
        "totals": {sp: sum(e[sp]["num_samples"] for e in entries.values()) for sp in SPLITS},
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, root / MANIFEST)
    manifest["status"] = "built"
    return manifest


def _build_source(
    source: str,
    items: Sequence[DemoItem],
    out: Path,
    load: Callable[[Any], tuple[bytes, str]],
    config: Mapping[str, Any],
    pool: Any,
    force: bool,
    progress: bool,
    min_shards: tuple[int, int],
    max_per_shard: int,
) -> dict[str, Any]:
    captions = [it.caption for it in items]
    held = heldout_captions(captions, config["heldout_fraction"], config["max_heldout"])
    text_ids = {c: i for i, c in enumerate(sorted({normalize_caption(c) for c in captions}))}
    split_tasks: dict[str, list[ShardTask]] = {sp: [] for sp in SPLITS}
    held_seen: set[str] = set()
    for image_id, it in enumerate(items):
        norm = normalize_caption(it.caption)
        split = "heldout" if norm in held else "train"
        if split == "heldout":
            # One image per held-out caption: a caption shared by several images ("A flower." x6) is an
            # ambiguous retrieval query whose identical text embeddings would tie; its other images are dropped.
            if norm in held_seen:
                continue
            held_seen.add(norm)
        meta = {
            "image_id": image_id,
            "caption_id": image_id,
            "text_id": text_ids[norm],
            "origin": it.uid,
            "split": split,
        }
        split_tasks[split].append(ShardTask(f"{source}_{image_id:06d}", it.caption, meta, it.render))
    entry: dict[str, Any] = {
        "package": " + ".join(SOURCE_INFO[source].debian),
        "licence": SOURCE_INFO[source].licence,
        "captions": SOURCE_INFO[source].captions,
        "items": len(items),
    }
    for sp, min_n in zip(SPLITS, min_shards):
        tasks = split_tasks[sp]
        random.Random(f"{source}/{sp}").shuffle(tasks)  # mix categories across shards
        per_shard = math.ceil(max(1, len(tasks)) / _num_shards(len(tasks), min_n, max_per_shard))
        n_unique = len({normalize_caption(t.caption) for t in tasks})
        params = {k: config[k] for k in ("version", "image_size", "image_format", "quality")}
        report: WriteReport = write_shards(
            tasks,
            out / sp,
            load,
            source=source,
            samples_per_shard=per_shard,
            params={"demo": params},
            extra_stats={
                "split": sp,
                "num_unique_captions": n_unique,
                "builder": f"zerovl demo v{DEMO_VERSION}",
            },
            pool=pool,
            force=force,
            progress=progress,
            desc=f"{source}/{sp}",
        )
        st = report.stats
        entry[sp] = {
            "dir": f"{source}/{sp}",
            "num_samples": st["num_samples"],
            "num_images": st["num_images"],
            "num_unique_captions": n_unique,
            "num_shards": st["num_shards"],
            "skipped": sum(st["skipped"].values()),
            "status": report.status,
        }
    return entry
