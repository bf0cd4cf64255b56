"""``stats.json``, the per-source summary next to the shards: the one reader, its checks against the shards,
and the summaries the CLI prints.

:func:`read_stats` has one contract for the writers (is this output up to date?), the CLI and the loaders: the
folder's parsed ``stats.json`` (``load_stats_file``), and, given the shards a loader will read (``urls``), checked
against them (:func:`verify_stats`). ``FileNotFoundError`` (saying what to run) when there is none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

STATS_FILE = "stats.json"

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
            raise DataError(
                f"{p}: {k}={stats[k]!r} must be a non-negative integer; " + _REBUILD_HINT.format(dir=p.parent)
            )
    shards = stats.get("shards")
    if shards is not None and not (
        isinstance(shards, list)
        and all(
            isinstance(x, dict)
            and isinstance(x.get("file"), str)
            and isinstance(x.get("num_samples"), int)
            and x["num_samples"] >= 0
            for x in shards
        )
    ):
        raise DataError(
            f"{p}: `shards` must be a list of {{file, num_samples >= 0}}; " + _REBUILD_HINT.format(dir=p.parent)
        )
    return stats


def verify_stats(
    stats: Mapping[str, Any],
    path: str | os.PathLike,
    urls: Sequence[str],
    scan: Callable[[str], int] | None = None,
    max_scans: int = 2,
) -> None:
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
        raise DataError(
            f"{p} lists shard(s) missing on disk: {', '.join(missing[:3])}"
            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
            + "; "
            + hint
        )
    here, listed_paths = os.path.realpath(folder), {os.path.realpath(folder / n) for n in names}
    unlisted = sorted(
        os.path.basename(u)
        for u in urls
        if "://" not in u and os.path.dirname(os.path.realpath(u)) == here and os.path.realpath(u) not in listed_paths
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


def read_stats(directory: str | os.PathLike, *, urls: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``stats.json`` of a shard folder (``num_samples``, ``num_shards``, ``shards``…), parsed and checked;
    with ``urls`` (the shards a loader will read) also verified against them (:func:`verify_stats`)."""
    p = Path(directory) / STATS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"No {STATS_FILE} in {Path(directory)}: write the shards with `zerovl-data csv|folder|demo`, "
            f"or index existing webdataset/img2dataset shards with `zerovl-data img2dataset {directory}`"
        )
    stats = load_stats_file(p)
    if urls is not None:
        from .shard_list import scan_tar

        verify_stats(stats, p, urls, scan=scan_tar)
    return stats


def shard_paths(directory: str | os.PathLike) -> list[str]:
    """Absolute paths of a folder's shards in order, as listed by its ``stats.json``."""
    d = Path(directory).resolve()
    return [str(d / s["file"]) for s in read_stats(d)["shards"]]


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
