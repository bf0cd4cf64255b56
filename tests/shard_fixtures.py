"""Tiny webdataset shards for the data tests, written with ``webdataset.TarWriter`` and PIL.

Samples follow ``docs/CONTRACTS.md`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json``; ``stats.json`` next to the
shards, in the writers' format). Keys are ``<source>-<index:05d>`` so every key names its source.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image


def jpeg_bytes(index: int, size: tuple[int, int] = (24, 24)) -> bytes:
    """A small JPEG whose colour depends on ``index``."""
    color = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of ``width × height`` pixels, written by hand in ~a few kB (all black).

    Pillow would need the full image in memory to encode it; here each row is a filter byte plus zero bits,
    and zlib squeezes the ~50 MB of raw rows to a few tens of kB.
    """

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def sample(source: str, index: int, *, image_size: tuple[int, int] = (24, 24)) -> dict[str, Any]:
    key = f"{source}-{index:05d}"
    return {
        "__key__": key,
        "jpg": jpeg_bytes(index, image_size),
        "txt": f"a picture of {source} number {index}",
        "json": json.dumps({"image_id": index, "caption_id": index, "source": source}),
    }


def write_stats(directory: Path, source: str, shard_counts: Sequence[tuple[str, int]]) -> None:
    stats = {
        "source": source,
        "num_samples": sum(n for _, n in shard_counts),
        "num_shards": len(shard_counts),
        "num_images": sum(n for _, n in shard_counts),
        "shards": [{"file": name, "num_samples": n} for name, n in shard_counts],
    }
    (directory / "stats.json").write_text(json.dumps(stats))


def write_source(
    directory: str | Path,
    source: str,
    num_samples: int,
    shard_size: int,
    *,
    stats: bool = True,
    image_size: tuple[int, int] = (24, 24),
) -> list[str]:
    """``num_samples`` good samples in shards of ``shard_size`` (last one smaller); returns the keys."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    keys, counts = [], []
    for shard, start in enumerate(range(0, num_samples, shard_size)):
        name = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(d / name)) as tw:
            for i in range(start, min(start + shard_size, num_samples)):
                s = sample(source, i, image_size=image_size)
                tw.write(s)
                keys.append(s["__key__"])
        counts.append((name, min(shard_size, num_samples - start)))
    if stats:
        write_stats(d, source, counts)
    return keys


BAD_EXPECTED = {
    "corrupt_image": 2,
    "missing_image": 1,
    "missing_caption": 1,
    "bad_text_encoding": 1,
    "empty_caption": 1,
    "image_too_large": 1,
    "truncated_tar": 1,
    "empty_shard": 1,
}


def write_bad_source(directory: str | Path, source: str = "bad") -> tuple[dict[str, int], list[str]]:
    """Shards with one of every kind of bad input, among good samples.

    - ``shard-000000.tar``: 6 good; a truncated JPEG; garbage bytes as ``.jpg``; a sample without caption; a
      non-UTF-8 caption; a whitespace caption; a 20000×20000 PNG; a caption without image.
    - ``shard-000001.tar``: 8 samples, the file cut in the middle of the 6th image (5 good survive).
    - ``shard-000002.tar``: zero bytes.
    - ``shard-000003.tar``: 6 good.

    Returns the expected bad counts and the keys of all good samples (17). No ``stats.json``: counts come from
    scanning the tars, as for shards written by other tools.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    good: list[str] = []
    idx = iter(range(10_000))

    def good_sample() -> dict[str, Any]:
        s = sample(source, next(idx))
        good.append(s["__key__"])
        return s

    with wds.TarWriter(str(d / "shard-000000.tar")) as tw:
        for _ in range(3):
            tw.write(good_sample())
        bad = [
            {"jpg": jpeg_bytes(1)[:200], "txt": "truncated jpeg"},
            {"jpg": b"this is not an image" * 10, "txt": "garbage jpeg"},
            {"jpg": jpeg_bytes(2), "json": "{}"},
            {"jpg": jpeg_bytes(3), "txt": b"caf\xe9 \xff\xfe latin-1 caption"},
            {"jpg": jpeg_bytes(4), "txt": "   \n "},
            {"png": png_bomb(), "txt": "a decompression bomb"},
            {"txt": "a caption without image"},
        ]
        for b in bad:
            tw.write({"__key__": f"{source}-bad{next(idx):05d}", **b})
        for _ in range(3):
            tw.write(good_sample())

    full = d / "shard-000001.tar"
    cut_keys = []
    with wds.TarWriter(str(full)) as tw:
        for _ in range(8):
            s = sample(source, next(idx))
            cut_keys.append(s["__key__"])
            tw.write(s)
    with tarfile.open(full) as tf:
        member = tf.getmember(f"{cut_keys[5]}.jpg")
        cut = member.offset_data + member.size // 2
    data = full.read_bytes()[:cut]
    full.write_bytes(data)
    good.extend(cut_keys[:5])

    (d / "shard-000002.tar").write_bytes(b"")

    with wds.TarWriter(str(d / "shard-000003.tar")) as tw:
        for _ in range(6):
            tw.write(good_sample())
    return dict(BAD_EXPECTED), good
