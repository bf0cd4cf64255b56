"""Rendering demo items into shard images (runs in pool workers: module-level and picklable): emoji glyphs,
SVG clip art under a CPU-time limit, rasters; cropped to content and flattened on white."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..data.image_decoding import BadImage, encode_image, to_rgb
from .packages import (
    DEFAULT_ROOTS,
)


@functools.lru_cache(maxsize=2)
def _emoji_font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, 109)  # the CBDT font has one bitmap strike: Pillow renders it only at 109


def _render_emoji(ch: str, font_path: str) -> Image.Image:
    font = _emoji_font(font_path)
    x0, y0, x1, y1 = font.getbbox(ch)
    if x1 <= x0 or y1 <= y0:
        raise BadImage(f"emoji {ch!r} has an empty glyph")
    if (x1 - x0) > 1.6 * (y1 - y0):
        raise BadImage(f"emoji {ch!r} renders as several glyphs")
    im = Image.new("RGBA", (x1 - x0, y1 - y0), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((-x0, -y0), ch, font=font, embedded_color=True)
    return im


SVG_CPU_LIMIT_S = 3.0  # normal clip art renders in < 1.5 s of CPU; a few pathological files take 20+ s


class _RenderTimeout(BadImage):
    pass


@contextlib.contextmanager
def _cpu_time_limit(seconds: float) -> Iterator[None]:
    """Abort the block after ``seconds`` of this process's CPU time (not wall time: stable on a busy machine).

    Uses SIGVTALRM, so it only applies in a main thread on POSIX (pool workers, the CLI); elsewhere no limit.
    """
    if not hasattr(signal, "ITIMER_VIRTUAL") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise _RenderTimeout(f"rendering took more than {seconds:g} s of CPU")

    previous = signal.signal(signal.SIGVTALRM, _raise)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


_ENTITY_DECL = re.compile(rb"""<!ENTITY\s+([\w.-]+)\s+(["'])(.*?)\2\s*>""", re.S)
_DOCTYPE = re.compile(rb"<!DOCTYPE[^\[>]*(\[.*?\]\s*)?>", re.S)


def _expand_internal_entities(data: bytes) -> bytes:
    """Inline ``<!ENTITY ns_svg "...">`` declarations (Adobe Illustrator exports).

    cairosvg's safe mode (defusedxml) rejects every entity; these internal ones are harmless, and turning on
    ``unsafe`` would also allow fetching external resources.
    """
    if b"<!ENTITY" not in data:
        return data
    entities = {m.group(1): m.group(3) for m in _ENTITY_DECL.finditer(data)}
    data = _DOCTYPE.sub(b"", data, count=1)
    for name, value in entities.items():
        data = data.replace(b"&" + name + b";", value)
    return data


_PERCENT_OPACITY = re.compile(rb"""(opacity\s*(?:=\s*["']|:)\s*)(\d+(?:\.\d+)?)%""")


def _fix_percent_opacity(data: bytes) -> bytes:
    """``opacity="100%"`` → ``opacity="1"``: valid CSS that cairosvg cannot parse (~0.5% of the clip art)."""
    return _PERCENT_OPACITY.sub(lambda m: m.group(1) + b"%g" % (float(m.group(2)) / 100), data)


def _render_svg(path: str, size: int) -> Image.Image:
    import cairosvg

    data = _fix_percent_opacity(_expand_internal_entities(Path(path).read_bytes()))
    # Render at 2× into a square (aspect kept), then crop to the drawing: many SVGs sit on a larger page.
    with _cpu_time_limit(SVG_CPU_LIMIT_S):
        png = cairosvg.svg2png(bytestring=data, url=path, output_width=2 * size, output_height=2 * size, unsafe=False)
    im = Image.open(io.BytesIO(png))
    im.load()
    return im


def _crop_to_content(im: Image.Image, margin: float = 0.04) -> Image.Image:
    """Crop transparent borders, leaving a small margin, so drawings fill the frame like photos' subjects."""
    if im.mode not in ("RGBA", "LA", "PA") and not (im.mode == "P" and "transparency" in im.info):
        return im
    rgba = im.convert("RGBA")
    bbox = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if bbox is None:
        raise BadImage("image is fully transparent")
    rgba = rgba.crop(bbox)
    pad = max(1, round(margin * max(rgba.size)))
    canvas = Image.new("RGBA", (rgba.width + 2 * pad, rgba.height + 2 * pad), (0, 0, 0, 0))
    canvas.paste(rgba, (pad, pad))
    return canvas


def render_item(
    spec: tuple[str, str],
    *,
    size: int = 160,
    fmt: str = "jpg",
    quality: int = 90,
    emoji_font: str = DEFAULT_ROOTS["emoji"],
) -> tuple[bytes, str]:
    """Render one item: composite on white, longer side ``size`` px, encoded as ``fmt`` → (bytes, ext)."""
    kind, arg = spec
    if kind == "emoji":
        im = _render_emoji(arg, emoji_font)
    elif kind == "svg":
        im = _render_svg(arg, size)
    elif kind == "raster":
        im = Image.open(arg)
        im.load()
    else:
        raise ValueError(f"unknown render kind {kind!r}")
    im = to_rgb(_crop_to_content(im))
    scale = size / max(im.size)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if new != im.size:
        im = im.resize(new, Image.Resampling.LANCZOS)
    return encode_image(im, fmt, quality), fmt
