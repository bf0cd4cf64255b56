"""Shard writers: ZeroVL CSV layouts, image folders, img2dataset output → webdataset shards + ``stats.json``.

Every writer produces the layout of ``docs/CONTRACTS.md``: one sample per caption (``KEY.jpg|png|webp``,
``KEY.txt``, ``KEY.json`` with ``image_id``, ``caption_id``, ``source``) in ``shard-%06d.tar`` files, and a
``stats.json`` next to them that the loaders use for size-proportional source weights and epoch lengths.

Why the machinery around ``wds.TarWriter``:

* **Resumable.** Inputs are cut into fixed chunks, one chunk per shard. A shard is written to ``*.tar.tmpPID``
  and renamed only once complete (after its progress record is on disk), so a killed writer never leaves a
  half shard that looks finished; a rerun keeps the finished shards and writes the rest.
* **Idempotent.** ``stats.json`` records a fingerprint of the inputs and options; a rerun with the same
  fingerprint and intact shards returns at once.
* **Robust.** Missing or undecodable images and empty captions are skipped and counted (``stats["skipped"]``).
* **Reproducible.** Tar members get a fixed mtime and the task order is deterministic, so the same inputs give
  byte-identical shards.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from tqdm.auto import tqdm

from .image_decoding import to_rgb

log = logging.getLogger(__name__)

WRITER_VERSION = 1
STATS_FILE = "stats.json"
SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
_PROGRESS_DIR = ".progress"
_TAR_MTIME = 1_700_000_000  # fixed member mtime → byte-identical shards for identical inputs
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_WDS_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Above this many pixels an image is treated as a decompression bomb and skipped (PIL's own guard is 2×89 MP).
MAX_PIXELS = 89_478_485


class BadImage(Exception):
    """Raised by an image loader for an input that cannot become a training image (skipped and counted)."""


class ShardTask(NamedTuple):
    """One sample to write: ``image`` is the (picklable, hashable) argument of the writer's ``load`` function.

    Tasks that share ``image`` are loaded once per shard (several captions per image).
    """

    key: str
    caption: str
    meta: Mapping[str, Any]
    image: Hashable


@dataclass
class WriteReport:
    """What a writer did: ``status`` is ``"up-to-date"`` (nothing written), ``"written"`` or ``"resumed"``."""

    out_dir: Path
    stats: dict[str, Any]
    status: str
    seconds: float
    shards_written: int = 0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Image loading


def encode_image(im: Image.Image, fmt: str = "jpg", quality: int = 90) -> bytes:
    """Encode a PIL image as ``jpg`` (RGB), ``png`` or ``webp`` bytes."""
    buf = io.BytesIO()
    if fmt == "jpg":
        im.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    elif fmt == "png":
        im.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"Unknown image format {fmt!r}; use jpg, png or webp")
    return buf.getvalue()


flatten_on_white = to_rgb  # the old name (demo.py): transparency on white, 16-bit and float images scaled


def load_image_file(path: str, max_side: int | None = None, quality: int = 90) -> tuple[bytes, str]:
    """Image bytes for a shard: the file's own when jpg/png/webp and small enough, else re-encoded.

    The image is fully decoded once to catch truncated or corrupt files; ``FileNotFoundError`` and
    :class:`BadImage` are the two outcomes a writer counts as skips.
    """
    p = Path(path)
    data = p.read_bytes()  # FileNotFoundError → "missing_image"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadImage(f"{im.width}x{im.height} exceeds the decompression-bomb guard")
            im.load()
            ext = _WDS_EXT.get(p.suffix.lower())
            fmt_ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(im.format or "")
            too_big = max_side is not None and max(im.size) > max_side
            if ext is not None and ext == fmt_ext and not too_big:
                return data, ext
            out = im
            if too_big:
                assert max_side is not None
                out = im.copy()
                out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            if fmt_ext == "png" and not too_big:
                return encode_image(out, "png"), "png"
            return encode_image(flatten_on_white(out), "jpg", quality), "jpg"
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: {e}") from e


def _safe_load(load: Callable[[Any], tuple[bytes, str]], arg: Any) -> tuple[bytes, str] | tuple[None, str]:
    """Run ``load`` and turn its failure into a skip reason (so pool workers never die on bad input)."""
    try:
        return load(arg)
    except FileNotFoundError:
        return None, "missing_image"
    except BadImage as e:
        return None, "unreadable_image:" + str(e)[:200]
    except Exception as e:  # noqa: BLE001 - any decoder/renderer failure is a bad input, not a crash
        return None, f"unreadable_image:{type(e).__name__}: {str(e)[:200]}"


# ----------------------------------------------------------------------------------------------------
# The core writer


def _fingerprint(tasks: Sequence[ShardTask], params: Mapping[str, Any]) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"writer": WRITER_VERSION, **params}, sort_keys=True, default=str).encode())
    for t in tasks:
        h.update(
            json.dumps([t.key, t.caption, dict(t.meta), repr(t.image)], sort_keys=True, default=str).encode()
        )
    return h.hexdigest()


def _shard_files(out_dir: Path) -> dict[int, Path]:
    if not out_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in out_dir.iterdir() if (m := _SHARD_RE.match(p.name))}


def _stats_up_to_date(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The stats of a finished output with this fingerprint whose shards are all intact, else None."""
    try:
        stats = read_stats(out_dir)
    except (FileNotFoundError, ValueError):
        return None
    if stats.get("fingerprint") != fingerprint:
        return None
    for s in stats.get("shards", []):
        p = out_dir / s["file"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            return None
    return stats


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(_tmp_name(path.name))
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _tmp_name(name: str) -> str:
    # Per process: two writers racing on one folder never write into the same temp file (and both produce
    # identical shards, so whichever rename lands last is fine).
    return f"{name}.tmp{os.getpid()}"


def _remove_stale_tmp(out_dir: Path) -> None:
    """Delete temp files left by killed writers (their process is gone); a live writer's are kept."""
    for p in [*out_dir.glob("shard-*.tar.tmp*"), *out_dir.glob(f"{STATS_FILE}.tmp*")]:
        pid = p.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        p.unlink(missing_ok=True)


def _clean_output(out_dir: Path) -> None:
    """Remove what a writer owns in ``out_dir`` (shards, temp files, progress, stats) and nothing else."""
    for p in _shard_files(out_dir).values():
        p.unlink()
    if out_dir.is_dir():
        _remove_stale_tmp(out_dir)
    shutil.rmtree(out_dir / _PROGRESS_DIR, ignore_errors=True)
    (out_dir / STATS_FILE).unlink(missing_ok=True)


def _make_pool(workers: int):
    """A process pool for image loading/rendering.

    fork on Linux while the process has a single Python thread: it needs no ``if __name__ == "__main__"``
    guard and starts instantly, and the workers only run PIL/cairosvg (never torch). With other threads alive
    (one might hold a lock at fork time) spawn is used instead.
    """
    method = "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"
    return multiprocessing.get_context(method).Pool(workers)


def write_shards(
    tasks: Sequence[ShardTask],
    out_dir: str | os.PathLike,
    load: Callable[[Any], tuple[bytes, str]],
    *,
    source: str,
    samples_per_shard: int = 1000,
    params: Mapping[str, Any] | None = None,
    extra_stats: Mapping[str, Any] | None = None,
    workers: int = 0,
    pool: Any = None,
    force: bool = False,
    progress: bool = True,
    desc: str | None = None,
) -> WriteReport:
    """Write ``tasks`` as webdataset shards into ``out_dir`` and a ``stats.json`` next to them.

    ``load(task.image) -> (bytes, ext)`` produces an image (``ext`` in jpg/png/webp) or raises
    (``FileNotFoundError`` / :class:`BadImage` / anything) to have the sample skipped and counted.
    ``workers > 0`` loads images in a process pool (``load`` must then be picklable); a caller writing several
    outputs can pass its own ``multiprocessing`` ``pool`` instead. ``params`` are the options
    that shape the output; together with the task list they form the fingerprint that makes reruns skip.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    fingerprint = _fingerprint(
        tasks, {"source": source, "samples_per_shard": samples_per_shard, **(params or {})}
    )
    if force:
        _clean_output(out)
    elif (stats := _stats_up_to_date(out, fingerprint)) is not None:
        return WriteReport(out, stats, "up-to-date", time.perf_counter() - t0)

    out.mkdir(parents=True, exist_ok=True)
    (out / STATS_FILE).unlink(missing_ok=True)  # stale or other inputs: no longer describes the shards
    progress_dir = out / _PROGRESS_DIR
    progress_dir.mkdir(exist_ok=True)
    chunks = [tasks[i : i + samples_per_shard] for i in range(0, len(tasks), samples_per_shard)]
    # Shards beyond the planned count belong to an earlier, larger input: remove them.
    for idx, p in _shard_files(out).items():
        if idx >= len(chunks):
            p.unlink()

    records: list[dict[str, Any]] = []
    todo: list[int] = []
    for i in range(len(chunks)):
        rec = _read_progress(progress_dir, i, fingerprint, out)
        if rec is None:
            todo.append(i)
        records.append(rec or {})
    resumed = len(todo) < len(chunks)

    own_pool = _make_pool(workers) if pool is None and workers > 0 and todo else None
    pool = pool or own_pool
    bar = tqdm(
        total=sum(len(chunks[i]) for i in todo),
        desc=desc or source,
        unit="sample",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for i in todo:
            records[i] = _write_chunk(out, i, chunks[i], load, fingerprint, source, pool, bar)
    finally:
        bar.close()
        if own_pool is not None:
            own_pool.close()
            own_pool.join()

    stats = _aggregate(records, source, fingerprint, extra_stats)
    _atomic_write_json(out / STATS_FILE, stats)
    shutil.rmtree(progress_dir, ignore_errors=True)
    _remove_stale_tmp(out)
    skipped = sum(stats["skipped"].values())
    if skipped:
        log.warning("%s: skipped %d samples %s", source, skipped, stats["skipped"])
    return WriteReport(
        out, stats, "resumed" if resumed else "written", time.perf_counter() - t0, shards_written=len(todo)
    )


def _read_progress(progress_dir: Path, i: int, fingerprint: str, out: Path) -> dict[str, Any] | None:
    """The record of a shard that a previous run of the same job finished, else None."""
    p = progress_dir / f"{i:06d}.json"
    shard = out / (SHARD_PATTERN % i)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if (
        rec.get("fingerprint") != fingerprint
        or not shard.is_file()
        or shard.stat().st_size != rec.get("bytes")
    ):
        return None
    return rec


def _has_bad_bytes(text: str | None) -> bool:
    """True when ``text`` was decoded with ``surrogateescape`` from bytes that are not UTF-8."""
    return bool(text) and any("\udc80" <= c <= "\udcff" for c in text)


def _write_chunk(
    out: Path,
    i: int,
    chunk: Sequence[ShardTask],
    load: Callable[[Any], tuple[bytes, str]],
    fingerprint: str,
    source: str,
    pool: Any,
    bar: Any,
) -> dict[str, Any]:
    skipped: Counter[str] = Counter()
    bad_examples: list[str] = []
    # Captions are read with errors="surrogateescape": a non-UTF-8 byte becomes a lone surrogate here, and
    # the sample is skipped and counted as the loader would count it (never written with U+FFFD).
    encoded = [t for t in chunk if not _has_bad_bytes(t.caption)]
    skipped["bad_text_encoding"] = len(chunk) - len(encoded)
    valid = [t for t in encoded if t.caption and t.caption.strip()]
    skipped["empty_caption"] = len(encoded) - len(valid)
    # Several captions per image: load each image of the shard once.
    unique = list(dict.fromkeys(t.image for t in valid))
    fn = functools.partial(_safe_load, load)
    results = pool.imap(fn, unique, chunksize=4) if pool is not None else map(fn, unique)
    loaded: dict[Hashable, tuple[bytes | None, str]] = dict(zip(unique, results))

    import webdataset as wds  # lazily: it imports torch (seconds), which stats/up-to-date checks never need

    name = SHARD_PATTERN % i
    tmp = out / _tmp_name(name)
    n = 0
    image_ids: set[Any] = set()
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=_TAR_MTIME, user="zerovl", group="zerovl") as sink:
            for t in valid:
                data, ext = loaded[t.image]
                if data is None:
                    reason = ext.split(":", 1)[0]
                    skipped[reason] += 1
                    if len(bad_examples) < 5 and ":" in ext:
                        bad_examples.append(ext.split(":", 1)[1])
                    continue
                meta = {"source": source, **t.meta}
                sink.write(
                    {
                        "__key__": t.key,
                        ext: data,
                        "txt": t.caption.strip().encode("utf-8"),
                        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                    }
                )
                n += 1
                image_ids.add(meta.get("image_id", t.image))
        bar.update(len(chunk))
    rec = {
        "fingerprint": fingerprint,
        "file": name,
        "num_samples": n,
        "bytes": tmp.stat().st_size,
        "image_ids": sorted(image_ids, key=repr),
        "skipped": {k: v for k, v in skipped.items() if v},
        "bad_examples": bad_examples,
    }
    # Progress record first, then the rename: a shard named shard-*.tar always has its record.
    _atomic_write_json(out / _PROGRESS_DIR / f"{i:06d}.json", rec)
    os.replace(tmp, out / name)
    return rec


def _aggregate(
    records: Sequence[Mapping[str, Any]], source: str, fingerprint: str, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    skipped: Counter[str] = Counter(
        {"empty_caption": 0, "bad_text_encoding": 0, "missing_image": 0, "unreadable_image": 0}
    )
    images: set[Any] = set()
    bad_examples: list[str] = []
    for r in records:
        skipped.update(r.get("skipped", {}))
        images.update(json.dumps(x) for x in r.get("image_ids", []))
        bad_examples.extend(r.get("bad_examples", []))
    num_samples = sum(r["num_samples"] for r in records)
    return {
        "source": source,
        "format": "webdataset",
        "num_samples": num_samples,
        "num_shards": len(records),
        "num_images": len(images),
        "num_captions": num_samples,
        **(dict(extra) if extra else {}),
        "skipped": dict(skipped),
        "bad_examples": bad_examples[:10],
        "shards": [
            {"file": r["file"], "num_samples": r["num_samples"], "bytes": r["bytes"]} for r in records
        ],
        "writer": f"zerovl_lightning.data.writers v{WRITER_VERSION}",
        "fingerprint": fingerprint,
    }


# ----------------------------------------------------------------------------------------------------
# Reading stats back


_REBUILD_HINT = (
    "rebuild it: `zerovl-data img2dataset {dir} --scan --force` (shards written by other tools), rewrite the "
    "shards with `zerovl-data csv|folder`, or delete it to count samples by scanning the tars"
)


def load_stats_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a ``stats.json`` (the one reader of the format); a malformed file is a DataError naming it."""
    from zerovl_lightning.errors import DataError

    p = Path(path)
    try:
        stats = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e}); " + _REBUILD_HINT.format(dir=p.parent)) from e
    if not isinstance(stats, dict):
        raise DataError(f"{p}: expected a JSON object; " + _REBUILD_HINT.format(dir=p.parent))
    for k in ("num_samples", "num_shards"):
        if k in stats and (not isinstance(stats[k], int) or isinstance(stats[k], bool) or stats[k] < 0):
            raise DataError(f"{p}: {k}={stats[k]!r} must be a non-negative integer; "
                            + _REBUILD_HINT.format(dir=p.parent))
    shards = stats.get("shards")
    if shards is not None and not (
        isinstance(shards, list)
        and all(isinstance(x, dict) and isinstance(x.get("file"), str)
                and isinstance(x.get("num_samples"), int) and x["num_samples"] >= 0 for x in shards)
    ):
        raise DataError(f"{p}: `shards` must be a list of {{file, num_samples >= 0}}; "
                        + _REBUILD_HINT.format(dir=p.parent))
    return stats


def verify_stats(stats: Mapping[str, Any], path: str | os.PathLike, urls: Sequence[str],
                 scan: Callable[[str], int] | None = None, max_scans: int = 2) -> None:
    """Check a folder's ``stats.json`` against the shards on disk, cheaply; a DataError on a contradiction.

    Checks: every listed shard exists and has the recorded byte size; no ``*.tar`` in the folder is left out;
    ``num_samples`` is the sum of the shards' counts; the member count of up to ``max_scans`` shards (first
    and last listed, tar headers only, via ``scan``) equals the recorded one.
    """
    from zerovl_lightning.errors import DataError

    p = Path(path)
    folder = p.parent
    hint = _REBUILD_HINT.format(dir=folder)
    listed = stats.get("shards")
    if not isinstance(listed, list):
        return  # an old/foreign stats file without a shard list: nothing to compare
    names = [str(x["file"]) for x in listed]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{p} lists shard(s) missing on disk: {', '.join(missing[:3])}"
                        + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "") + "; " + hint)
    here, listed_paths = os.path.realpath(folder), {os.path.realpath(folder / n) for n in names}
    unlisted = sorted(
        os.path.basename(u) for u in urls
        if "://" not in u and os.path.dirname(os.path.realpath(u)) == here
        and os.path.realpath(u) not in listed_paths
    )
    if unlisted:
        raise DataError(f"{p} does not list shard(s) {', '.join(unlisted[:3])} found next to it; " + hint)
    for x in listed:
        size = x.get("bytes")
        actual = (folder / x["file"]).stat().st_size
        if isinstance(size, int) and size != actual:
            raise DataError(f"{p}: {x['file']} has {actual} bytes, the stats say {size}; " + hint)
    total = sum(int(x["num_samples"]) for x in listed)
    if "num_samples" in stats and int(stats["num_samples"]) != total:
        raise DataError(f"{p}: num_samples={stats['num_samples']} but its shards add up to {total}; " + hint)
    if scan is not None and listed:
        for x in list(dict.fromkeys([listed[0]["file"], listed[-1]["file"]]))[:max_scans]:
            n = next(int(y["num_samples"]) for y in listed if y["file"] == x)
            found = scan(str(folder / x))
            if found != n:
                raise DataError(f"{p}: {x} holds {found} samples, the stats say {n}; " + hint)


def read_stats(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``stats.json`` of a shard folder (``num_samples``, ``num_shards``, ``num_images``, ``shards``…)."""
    p = Path(directory) / STATS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"No {STATS_FILE} in {Path(directory)}: write the shards with `zerovl-data csv|folder|demo`, "
            f"or index existing webdataset/img2dataset shards with `zerovl-data img2dataset {directory}`"
        )
    stats = load_stats_file(p)
    for k in ("num_samples", "num_shards", "num_images"):
        if not isinstance(stats.get(k), int):
            raise ValueError(f"{p}: field {k!r} missing or not an int")
    return stats


def shard_paths(directory: str | os.PathLike) -> list[str]:
    """Absolute paths of a folder's shards in order, as listed by its ``stats.json``."""
    d = Path(directory).resolve()
    return [str(d / s["file"]) for s in read_stats(d)["shards"]]


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
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not any(s.startswith(".") for s in p.parts)
    )
    captions: dict[str, list[str]] = {im: [] for im in images}
    for im in images:
        txt = (root / im).with_suffix(".txt")
        if txt.is_file():
            text = txt.read_bytes().decode("utf-8", errors="surrogateescape")  # bad bytes: counted later
            captions[im].extend(line.strip() for line in text.splitlines() if line.strip())
    table = (
        Path(captions_file)
        if captions_file
        else next((root / n for n in CAPTION_FILES if (root / n).is_file()), None)
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


def _count_tar_samples(path: Path) -> tuple[int, int]:
    """(samples with an image, samples without) in a tar, by member key (webdataset: name up to 1st dot)."""
    keys: dict[str, bool] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)
            stem, _, ext = base[-1].partition(".")
            key = (base[0] + "/" if len(base) == 2 else "") + stem
            keys[key] = keys.get(key, False) or ext.lower() in ("jpg", "jpeg", "png", "webp")
    with_image = sum(keys.values())
    return with_image, len(keys) - with_image


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
    fingerprint = hashlib.sha1(
        json.dumps([WRITER_VERSION, "img2dataset", source, count, listing]).encode()
    ).hexdigest()
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
            try:
                n, missing = _count_tar_samples(p)
                no_image += missing
                counted_from["tar_scan"] += 1
            except (tarfile.TarError, OSError) as e:
                log.warning("%s: unreadable shard (%s), counted as 0 samples", p, e)
                n = 0
                counted_from["unreadable_tar"] += 1
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


def iter_stats_dirs(root: str | os.PathLike) -> Iterator[Path]:
    """Every folder under ``root`` (itself included) that holds a ``stats.json``, sorted."""
    r = Path(root)
    yield from sorted(p.parent for p in r.rglob(STATS_FILE))


def summarize(dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per shard folder (for the CLI's summary table)."""
    rows = []
    for d in dirs:
        s = read_stats(d)
        rows.append(
            {
                "dir": str(d),
                "source": s.get("source", Path(d).name),
                "samples": s["num_samples"],
                "images": s["num_images"],
                "shards": s["num_shards"],
                "skipped": sum((s.get("skipped") or {}).values()),
            }
        )
    return rows
