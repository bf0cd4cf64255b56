"""Image bytes in and out, one way for training, evaluation and the shard writers: decoded image → 8-bit RGB
(:func:`to_rgb`), an image file → shard bytes (:func:`load_image_file`). PIL + numpy only, so the writers' CLI
does not import torch."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_WDS_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Above this many pixels an image is treated as a decompression bomb and skipped (PIL's own guard is 2×89 MP).
MAX_PIXELS = 89_478_485


class BadImage(Exception):
    """Raised by an image loader for an input that cannot become a training image (skipped and counted)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image → 8-bit RGB, identically for training, evaluation and the shard writers.

    - Transparency (RGBA, LA, PA, P with a transparent colour) is composited on white: clip art and stamps
      are drawn on transparent pixels, which are often black underneath (``convert("RGB")`` would show them).
    - 16-bit grey (``I;16*``, e.g. 16-bit PNG) is scaled by 255/65535, not clipped at 255.
    - 32-bit integer (``I``) is taken as 16-bit when any value exceeds 255 (PIL's mode for 16-bit data from
      some decoders), else as 8-bit; float (``F``, e.g. float TIFF) as [0, 1] when its values are within it,
      else as [0, 255] (clipped).
    """
    mode = image.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)
        finite = a[np.isfinite(a)]
        top = float(finite.max()) if finite.size else 0.0
        if mode in _SIXTEEN_BIT or (mode == "I" and top > 255):
            a = a * (255.0 / 65535.0)
        elif mode == "F" and float(finite.min(initial=0.0)) >= 0.0 and top <= 1.0:
            a = a * 255.0
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    return image.convert("RGB")


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
            return encode_image(to_rgb(out), "jpg", quality), "jpg"
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: {e}") from e
