"""Bad-sample handling: validate and decode one raw sample, count every skipped input once, per kind.

:class:`BadSampleCounter` is the skip-and-count handler of the webdataset stages and of :func:`decode_sample`:

====================  ===========================================================================
``missing_image``     no ``jpg/jpeg/png/webp`` member for the key
``missing_caption``   no ``txt`` member
``bad_text_encoding`` ``txt`` is not UTF-8
``empty_caption``     ``txt`` is empty or whitespace
``corrupt_image``     PIL cannot identify or fully decode the image (truncated or garbage bytes)
``image_too_large``   width × height above ``max_image_pixels`` (decompression bomb; header only)
``truncated_tar``     a tar that ends inside a member (counted once per shard and pass)
``empty_shard``       a zero-byte shard
``unreadable_shard``  a shard that cannot be opened at run time (deleted after setup, permissions)
``tar_error``         any other error of the tar reader (e.g. a duplicate member name)
====================  ===========================================================================
"""

from __future__ import annotations

import io
import re
import tarfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from .image_decoding import to_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BAD_KINDS = (
    "missing_image",
    "missing_caption",
    "bad_text_encoding",
    "empty_caption",
    "corrupt_image",
    "image_too_large",
    "truncated_tar",
    "empty_shard",
    "unreadable_shard",
    "tar_error",
)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb threshold (~9459²)

# -------------------------------------------------------------------------------------- bad samples


def new_counts() -> dict[str, int]:
    return dict.fromkeys(BAD_KINDS, 0)


_FILEOBJ_NAME = re.compile(r"name=['\"](.*?)['\"]")


class BadSampleCounter:
    """Skip-and-count handler for webdataset stages and for decoding.

    ``handler`` is passed as ``tarfile_to_samples(handler=...)``: it classifies the exception, counts it and
    returns True (continue). Shard-level errors are counted once per (shard, pass) and only by the slot that
    *owns* the shard (``owns``), so that slots that all read a shard (sample-level split) do not count its
    errors several times. ``muted`` suppresses counting while a resumed stream replays what was counted before
    the checkpoint.
    """

    def __init__(self, urls: Sequence[str] = (), owns: Callable[[str], bool] | None = None) -> None:
        self.counts = new_counts()
        self.urls = frozenset(urls)
        self.owns = owns or (lambda url: True)
        self.muted = False
        self._seen: set[tuple[str, str]] = set()
        self._pending: str | None = None

    def new_pass(self) -> None:
        self._seen.clear()
        self._pending = None

    def add(self, kind: str, n: int = 1) -> None:
        if not self.muted:
            self.counts[kind] += n

    def handler(self, exn: BaseException) -> bool:
        args = getattr(exn, "args", ()) or ()
        msg = str(args[0]) if args else str(exn)
        if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError)):
            kind = "unreadable_shard"
        elif isinstance(exn, tarfile.ReadError) and "empty file" in msg:
            kind = "empty_shard"
        elif isinstance(exn, (tarfile.TarError, EOFError)) or "unexpected end" in msg or "truncated" in msg:
            kind = "truncated_tar"
        else:
            kind = "tar_error"
        # webdataset appends the url to errors of shard stages and " @ <fileobj>" to errors inside a member
        url = next((a for a in reversed(args) if isinstance(a, str) and a in self.urls), None)
        if url is None:
            m = _FILEOBJ_NAME.search(msg)
            url = m.group(1) if m and m.group(1) in self.urls else None
        if url is None:
            if kind == "tar_error":
                self.add(kind)
            else:  # a member read failed: the outer read of the same tar fails next and names the shard
                self._pending = kind
            return True
        if self._pending is not None:
            kind, self._pending = self._pending, None
        if (url, kind) not in self._seen:
            self._seen.add((url, kind))
            if self.owns(url):
                self.add(kind)
        return True


def sum_counts(parts: Sequence[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """``{source: {kind: n}}`` counts of several ranks summed, non-zero entries only."""
    total: dict[str, dict[str, int]] = {}
    for part in parts:
        for src, c in part.items():
            for kind, n in c.items():
                if n:
                    total.setdefault(src, {})[kind] = total.get(src, {}).get(kind, 0) + n
    return total


def decode_sample(
    raw: Mapping[str, Any],
    counter: BadSampleCounter,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    draft_size: int | None = None,
) -> tuple[Image.Image, str] | None:
    """Validate one raw webdataset sample → (RGB PIL image, caption), or None after counting why it is bad.

    Captions are checked first (cheap). The image size is checked from the header before any pixel is decoded,
    so a 20000×20000 PNG costs a few kB of reading, not gigabytes of memory. ``draft_size`` lets libjpeg
    decode at a reduced scale that still covers ``draft_size`` on both sides (a large speed-up for big JPEGs).
    """
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        counter.add("missing_image")
        return None
    txt = raw.get("txt")
    if txt is None:
        counter.add("missing_caption")
        return None
    try:
        caption = txt.decode("utf-8") if isinstance(txt, (bytes, bytearray)) else str(txt)
    except UnicodeDecodeError:
        counter.add("bad_text_encoding")
        return None
    caption = caption.strip()
    if not caption:
        counter.add("empty_caption")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw[ext]))
            w, h = img.size
            if w * h > max_image_pixels:
                counter.add("image_too_large")
                return None
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img = to_rgb(img)  # alpha on white, 16-bit / float scaled: as evaluation decodes
    except Image.DecompressionBombError:
        counter.add("image_too_large")
        return None
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for corrupt files
        counter.add("corrupt_image")
        return None
    return img, caption
