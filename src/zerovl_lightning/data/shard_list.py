"""Where a source's samples are: shard specs → ordered shard lists, per-shard sample counts, :class:`SourceInfo`.

Everything here runs *before* training (a missing path is a clear error at construction, not a hang in a
worker). Per-shard counts give exact epochs: ``stats.json`` (``stats.read_stats``, verified against the
shards) when present, else a header-only tar scan (:func:`tar_index`, the one tar walker: the writers' img2dataset
indexer counts with it too).
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import braceexpand
from webdataset.tariterators import base_plus_ext

from .bad_samples import IMAGE_EXTS

log = logging.getLogger(__name__)

_REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def is_remote(url: str) -> bool:
    return bool(_REMOTE.match(url))


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


# -------------------------------------------------------------------------------------- shard lists


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike], *, source: str = "?") -> list[str]:
    """Expand a dir / glob / brace pattern / list of those into an ordered, de-duplicated shard list.

    Local paths must exist (the error names the source and the first missing paths); remote URLs (``pipe:``,
    ``s3://``, ``https://``) are taken as given.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError(f"source {source!r}: empty shard list")
    urls: list[str] = []
    for item in specs:
        s = os.fspath(item)
        if is_remote(s) and not s.startswith("file://"):
            urls.extend(braceexpand.braceexpand(s))
            continue
        s = os.path.expanduser(_local_path(s))
        if os.path.isdir(s):
            found = sorted(str(p) for p in Path(s).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"source {source!r}: no *.tar shards in directory {s}")
            urls.extend(found)
        elif any(c in s for c in "*?["):
            found = sorted(globlib.glob(s))
            if not found:
                raise FileNotFoundError(f"source {source!r}: no shards match {s}")
            urls.extend(found)
        else:
            expanded = list(braceexpand.braceexpand(s))
            missing = [p for p in expanded if not os.path.exists(p)]
            if missing:
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise FileNotFoundError(
                    f"source {source!r}: shard path(s) not found: {', '.join(missing[:3])}{more}"
                    + (_DEMO_HINT if "/demo/" in s else "")
                )
            urls.extend(expanded)
    return list(dict.fromkeys(urls))


_DEMO_HINT = " — build the demo shards first: `zerovl-data demo` (make train does it)"


def stats_for(urls: Sequence[str], spec: Any = None) -> dict[str, Any] | None:
    """The ``stats.json`` describing these shards (in the folder ``spec`` names, else next to the first local
    shard), verified against them (:func:`~.stats.read_stats`); None when there is none."""
    from .stats import STATS_FILE, read_stats

    folders: list[str] = []
    if isinstance(spec, (str, os.PathLike)) and os.path.isdir(os.path.expanduser(os.fspath(spec))):
        folders.append(os.path.expanduser(os.fspath(spec)))
    if urls and not is_remote(urls[0]):
        folders.append(os.path.dirname(_local_path(urls[0])))
    for folder in folders:
        if os.path.isfile(os.path.join(folder, STATS_FILE)):
            return read_stats(folder, urls=urls)  # a contradiction with the shards is an error
    return None


class TarIndex(NamedTuple):
    """What a streaming read of one tar yields: each sample's first header offset, whether each sample has an
    image member, and whether the read ends cleanly (a truncated tar stops at its first incomplete member)."""

    offsets: list[int]
    has_image: list[bool]
    clean: bool


def tar_index(path: str) -> TarIndex:
    """Index the samples of a tar from its headers only (the data is seeked over, not read).

    Mirrors webdataset's grouping (consecutive members with the same key, ``__meta__`` files skipped) and
    stops where a streaming read would: at the first member whose data the file does not fully contain. A
    stream opened at offset ``i`` starts exactly at sample ``i``. A read that does not end cleanly yields its
    last sample only when the next shard's first member arrives.
    """
    path = _local_path(path)
    size = os.path.getsize(path)
    offsets: list[int] = []
    has_image: list[bool] = []
    if size == 0:
        return TarIndex(offsets, has_image, False)
    current = None
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                try:
                    member = tf.next()
                except (tarfile.TarError, EOFError, OSError):
                    return TarIndex(offsets, has_image, False)
                if member is None:
                    return TarIndex(offsets, has_image, True)
                if member.offset_data + member.size > size:
                    return TarIndex(offsets, has_image, False)
                if not member.isreg():
                    continue
                name = member.name
                if "/" not in name and name.startswith("__") and name.endswith("__"):
                    continue
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                if prefix != current:
                    offsets.append(member.offset)
                    has_image.append(False)
                    current = prefix
                if suffix.lower() in IMAGE_EXTS:
                    has_image[-1] = True
    except (tarfile.TarError, EOFError, OSError):
        return TarIndex(offsets, has_image, False)


def tar_sample_offsets(path: str) -> tuple[list[int], bool]:
    """(sample header offsets, read ends cleanly) of a tar: :func:`tar_index` for seeking."""
    index = tar_index(path)
    return index.offsets, index.clean


def scan_tar(path: str) -> int:
    """Count the samples a streaming read of ``path`` yields, reading tar headers only."""
    return len(tar_index(path).offsets)


def _shard_sizes_from_stats(stats: Mapping[str, Any] | None, urls: Sequence[str]) -> list[int] | None:
    """Per-shard counts from ``stats.json``: the writers' ``shards: [{file, num_samples}]``, or
    ``shard_sizes`` ({file name: n} or a list aligned with the shards); None when they do not cover every
    shard."""
    if not stats:
        return None
    names = [os.path.basename(u) for u in urls]
    sizes: Any = stats.get("shard_sizes")
    if isinstance(stats.get("shards"), Sequence):
        sizes = {os.path.basename(str(s.get("file", ""))): s.get("num_samples") for s in stats["shards"]}
    if isinstance(sizes, Mapping):
        if all(isinstance(sizes.get(n), int) for n in names):
            return [int(sizes[n]) for n in names]
    elif isinstance(sizes, Sequence) and len(sizes) == len(urls):
        return [int(n) for n in sizes]
    return None


@dataclass
class SourceInfo:
    """Everything the sampler needs to know about one source before training."""

    name: str
    urls: list[str]
    num_samples: int
    shard_sizes: list[int] | None  # raw samples per shard (equal shares assumed when unknown: see exact_sizes)
    weight: float | None = None
    exact_sizes: bool = True  # shard_sizes counted (stats.json or a header scan), so streams can seek by them

    @classmethod
    def build(
        cls,
        name: str,
        spec: Any,
        *,
        num_samples: int | None = None,
        weight: float | None = None,
        scan: bool = True,
    ) -> SourceInfo:
        urls = expand_shards(spec, source=name)
        stats = stats_for(urls, spec)
        sizes = _shard_sizes_from_stats(stats, urls)
        known = num_samples is not None or bool(stats and "num_samples" in stats)
        if sizes is None and (scan or not known) and not any(is_remote(u) for u in urls):
            if len(urls) > 200:
                log.info(
                    "source %s: scanning %d shards for sample counts (add shard_sizes to stats.json)",
                    name,
                    len(urls),
                )
            sizes = [scan_tar(u) for u in urls]
        if num_samples is None:
            if sizes is not None:  # the selected shards' counts (a glob may select part of a folder)
                num_samples = int(sum(sizes))
            elif stats and "num_samples" in stats:
                num_samples = int(stats["num_samples"])
            else:
                raise ValueError(
                    f"source {name!r}: number of samples unknown — give num_samples or a stats.json next to the shards"
                )
        exact = sizes is not None
        if sizes is None:  # remote shards without per-shard counts: assume equal shards
            per, extra = divmod(num_samples, len(urls))
            sizes = [per + (i < extra) for i in range(len(urls))]
        return cls(
            name=name,
            urls=urls,
            num_samples=int(num_samples),
            shard_sizes=sizes,
            weight=weight,
            exact_sizes=exact,
        )
