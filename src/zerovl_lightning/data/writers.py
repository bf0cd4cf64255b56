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

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from .image_decoding import BadImage
from .stats import STATS_FILE, read_stats

log = logging.getLogger(__name__)

WRITER_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
_PROGRESS_DIR = ".progress"
_TAR_MTIME = 1_700_000_000  # fixed member mtime → byte-identical shards for identical inputs


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
        h.update(json.dumps([t.key, t.caption, dict(t.meta), repr(t.image)], sort_keys=True, default=str).encode())
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
    fingerprint = _fingerprint(tasks, {"source": source, "samples_per_shard": samples_per_shard, **(params or {})})
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
    if rec.get("fingerprint") != fingerprint or not shard.is_file() or shard.stat().st_size != rec.get("bytes"):
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
        "shards": [{"file": r["file"], "num_samples": r["num_samples"], "bytes": r["bytes"]} for r in records],
        "writer": f"zerovl_lightning.data.writers v{WRITER_VERSION}",
        "fingerprint": fingerprint,
    }
