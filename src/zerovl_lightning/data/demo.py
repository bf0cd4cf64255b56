"""Demo data: real image–caption pairs from Debian/PyPI packages, built into webdataset shards at run time.

Four sources (see offline-assets.md): Tux Paint stamps, Noto Color Emoji with their CLDR names, Open Clip
Art titles, and country flags. Each becomes ``<cache>/demo/<source>/{train,heldout}/shard-%06d.tar``
(+ ``stats.json``) with a **held-out split by caption text**: a caption is held out when the hash of its
normalised text ranks in the lowest ``heldout_fraction`` (capped at ``max_heldout`` captions so evaluation
stays quick), so no held-out caption is ever seen in training, even when several images share it. The
images and shards are never committed (their licences differ); everything is rebuilt into the git-ignored
cache, and a rebuild is skipped in well under a second when ``manifest.json`` matches the configuration.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import html
import io
import json
import math
import os
import random
import re
import signal
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageDraw, ImageFont

from ..assets import cache_dir as default_cache_dir
from .writers import (
    BadImage,
    ShardTask,
    WriteReport,
    _make_pool,
    encode_image,
    flatten_on_white,
    write_shards,
)

DEMO_VERSION = 3  # bump when the listing, filtering or rendering changes: cached demos are then rebuilt
SOURCES = ("tuxpaint", "emoji", "openclipart", "flags")
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"

DEFAULT_ROOTS: dict[str, str] = {
    "tuxpaint": "/usr/share/tuxpaint/stamps",
    "emoji": "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "openclipart": "/usr/share/openclipart/svg",
    "flags": "/usr/share/iso-flags-png-320x240",
    "iso_codes": "/usr/share/iso-codes/json/iso_3166-1.json",
}


@dataclass(frozen=True)
class SourceInfo:
    """Where a source comes from: the Debian package(s) and root keys it needs, PyPI modules, licence."""

    name: str
    debian: tuple[str, ...]
    root_keys: tuple[str, ...]
    python: tuple[str, ...]
    licence: str
    captions: str


SOURCE_INFO: dict[str, SourceInfo] = {
    "tuxpaint": SourceInfo(
        "tuxpaint",
        ("tuxpaint-stamps-default",),
        ("tuxpaint",),
        ("cairosvg",),
        "GPL-2",
        "one English sentence per stamp",
    ),
    "emoji": SourceInfo(
        "emoji",
        ("fonts-noto-color-emoji",),
        ("emoji",),
        ("emoji",),
        "OFL/Apache-2.0 + BSD",
        "Unicode/CLDR short names",
    ),
    "openclipart": SourceInfo(
        "openclipart",
        ("openclipart-svg",),
        ("openclipart",),
        ("cairosvg",),
        "public domain",
        "dc:title (or dc:description) of the SVG, filtered",
    ),
    "flags": SourceInfo(
        "flags",
        ("iso-flags-png-320x240", "iso-codes"),
        ("flags", "iso_codes"),
        (),
        "public domain",
        "'the flag of <country>'",
    ),
}
APT_PACKAGES = (
    "tuxpaint-stamps-default",
    "openclipart-svg",
    "fonts-noto-color-emoji",
    "iso-flags-png-320x240",
)
PYPI_NAMES = {"cairosvg": "cairosvg", "emoji": "emoji"}


class DemoAssetsMissing(RuntimeError):
    """A demo source's package is not installed; the message says which one and how to install it."""


class DemoItem(NamedTuple):
    """One image with its caption. ``render`` is the picklable argument of :func:`render_item`."""

    uid: str
    caption: str
    render: tuple[str, str]  # (kind, path or emoji string); kind in raster | svg | emoji


# ----------------------------------------------------------------------------------------------------
# Asset checks


def _roots(roots: Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    merged = {**DEFAULT_ROOTS, **{k: str(v) for k, v in (roots or {}).items()}}
    unknown = set(merged) - set(DEFAULT_ROOTS)
    if unknown:
        raise KeyError(f"Unknown demo roots {sorted(unknown)}; known: {sorted(DEFAULT_ROOTS)}")
    return {k: Path(v) for k, v in merged.items()}


def check_assets(
    sources: Sequence[str] = SOURCES, roots: Mapping[str, str | os.PathLike] | None = None
) -> None:
    """Raise :class:`DemoAssetsMissing` naming every missing Debian/PyPI package of ``sources`` at once."""
    r = _roots(roots)
    missing_deb: dict[str, list[str]] = {}
    missing_py: set[str] = set()
    for s in sources:
        if s not in SOURCE_INFO:
            raise KeyError(f"Unknown demo source {s!r}; known: {list(SOURCES)}")
        info = SOURCE_INFO[s]
        for key, pkg in zip(info.root_keys, info.debian):
            if not r[key].exists():
                missing_deb.setdefault(pkg, []).append(f"{s}: {r[key]}")
        for mod in info.python:
            try:
                __import__(mod)
            except (ImportError, OSError):  # cairosvg raises OSError when libcairo2 is absent
                missing_py.add(mod)
    if not missing_deb and not missing_py:
        return
    lines = ["The demo data cannot be built:"]
    if missing_deb:
        for pkg, where in missing_deb.items():
            lines.append(f"  - Debian package {pkg} is missing (not found: {'; '.join(where)})")
        lines.append(
            "  Install with: sudo apt-get install -y --no-install-recommends " + " ".join(sorted(missing_deb))
        )
        lines.append(
            "  (all demo packages: apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES) + ")"
        )
    if missing_py:
        names = " ".join(sorted(PYPI_NAMES.get(m, m) for m in missing_py))
        lines.append(f"  - Python packages missing: {names}")
        lines.append(f"  Install with: pip install {names}   (or: pip install 'zerovl-lightning[demo]')")
    raise DemoAssetsMissing("\n".join(lines))


# ----------------------------------------------------------------------------------------------------
# Listing the sources (cheap: no image is decoded here)


def list_tuxpaint(root: str | os.PathLike = DEFAULT_ROOTS["tuxpaint"]) -> list[DemoItem]:
    """Stamps with a caption: line 1 of ``<name>.txt`` (then translations); image ``.png``, else ``.svg``."""
    base = Path(root)
    items = []
    for txt in sorted(base.rglob("*.txt")):
        stem = txt.with_suffix("")
        png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
        kind, img = ("raster", png) if png.is_file() else ("svg", svg) if svg.is_file() else (None, None)
        if img is None:
            continue
        lines = txt.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
        caption = _clean_ws(lines[0]) if lines else ""
        if caption:
            items.append(
                DemoItem(txt.relative_to(base).with_suffix("").as_posix(), caption, (kind, str(img)))
            )
    return items


def list_emoji(font: str | os.PathLike = DEFAULT_ROOTS["emoji"], max_version: float = 15) -> list[DemoItem]:
    """Fully-qualified emoji, no skin tones, Emoji version ≤ ``max_version`` (newer: rendered as 2 glyphs)."""
    import emoji as emoji_pkg

    fully = emoji_pkg.STATUS["fully_qualified"]
    items = []
    for e, d in emoji_pkg.EMOJI_DATA.items():
        if d.get("status") != fully or d.get("E", 99) > max_version:
            continue
        if any(0x1F3FB <= ord(c) <= 0x1F3FF for c in e):
            continue
        caption = _clean_ws(d["en"].strip(":").replace("_", " "))
        uid = "-".join(f"{ord(c):04x}" for c in e)
        items.append(DemoItem(uid, caption, ("emoji", e)))
    items.sort(key=lambda it: it.uid)
    return items


_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_AGENT = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)
_TITLE = re.compile(r"<dc:title\b[^>]*>(.*?)</dc:title>", re.S)
_DESC = re.compile(r"<dc:description\b[^>]*>(.*?)</dc:description>", re.S)
_TAG = re.compile(r"<[^>]+>")
_CLIPART_BY = re.compile(r"^\s*clip\s*art\s+by\s+[^-]*-\s*", re.I)
_MIXED_TOKEN = re.compile(r"(?=\S*[A-Za-z])(?=\S*\d)\S+")  # "bee1", "0x85caca8", "BlueMan#210"
_EMAIL_URL = re.compile(r"\S+@\S+\.\S+|https?://|www\.", re.I)


def _svg_metadata(text: str) -> tuple[str, str]:
    """(title, description) of the work itself, not of the creator/publisher agents."""
    m = _WORK.search(text)
    if not m:
        return "", ""
    work = _AGENT.sub("", m.group(0))
    out = []
    for rx in (_TITLE, _DESC):
        mm = rx.search(work)
        out.append(_clean_ws(html.unescape(_TAG.sub(" ", mm.group(1)))) if mm else "")
    return out[0], out[1]


def _clean_clipart_text(t: str) -> str:
    return _clean_ws(_CLIPART_BY.sub("", t).replace("_", " "))


def _usable_clipart_text(t: str, max_len: int) -> bool:
    return (
        bool(t)
        and len(t) <= max_len
        and re.search(r"[A-Za-z]{3}", t) is not None
        and not _MIXED_TOKEN.search(t)
        and not _EMAIL_URL.search(t)
        and "\n" not in t
    )


def list_openclipart(
    root: str | os.PathLike = DEFAULT_ROOTS["openclipart"], max_repeats: int = 3
) -> list[DemoItem]:
    """SVGs captioned by their RDF title, filtered as the titles are noisy.

    Dropped: ``computer/icons`` (theme icons titled by their theme), symlinks, titles seen more than
    ``max_repeats`` times ("gramastar", "card"), id-like titles ("bee1", "fc23"), e-mail addresses and URLs.
    A dropped title falls back to a short ``dc:description`` that passes the same filters.
    """
    base = Path(root)
    raw = []
    for p in sorted(base.rglob("*.svg")):
        rel = p.relative_to(base).as_posix()
        if rel.startswith("computer/icons/") or p.is_symlink() or not p.is_file():
            continue
        title, desc = _svg_metadata(p.read_bytes().decode("utf-8", errors="replace"))
        raw.append((rel, str(p), _clean_clipart_text(title), _clean_clipart_text(desc)))
    title_counts = Counter(t.lower() for _, _, t, _ in raw)
    desc_counts = Counter(d.lower() for _, _, _, d in raw)
    items = []
    for rel, path, title, desc in raw:
        if title_counts[title.lower()] <= max_repeats and _usable_clipart_text(title, 120):
            caption = title
        elif desc and desc_counts[desc.lower()] <= max_repeats and _usable_clipart_text(desc, 100):
            caption = desc
        else:
            continue
        items.append(DemoItem(rel.removesuffix(".svg"), caption, ("svg", path)))
    return items


def list_flags(
    root: str | os.PathLike = DEFAULT_ROOTS["flags"],
    iso_codes: str | os.PathLike = DEFAULT_ROOTS["iso_codes"],
) -> list[DemoItem]:
    """ISO 3166-1 countries with a flag PNG, captioned "the flag of <common_name or name>"."""
    countries = json.loads(Path(iso_codes).read_text(encoding="utf-8"))["3166-1"]
    items = []
    for c in sorted(countries, key=lambda c: c["alpha_2"]):
        png = Path(root) / f"{c['alpha_2'].lower()}.png"
        if png.is_file():
            name = c.get("common_name") or c["name"]
            items.append(DemoItem(c["alpha_2"].lower(), f"the flag of {name}", ("raster", str(png))))
    return items


def list_source(source: str, roots: Mapping[str, str | os.PathLike] | None = None) -> list[DemoItem]:
    """The items of one demo source, in a deterministic order."""
    r = _roots(roots)
    if source == "tuxpaint":
        return list_tuxpaint(r["tuxpaint"])
    if source == "emoji":
        return list_emoji(r["emoji"])
    if source == "openclipart":
        return list_openclipart(r["openclipart"])
    if source == "flags":
        return list_flags(r["flags"], r["iso_codes"])
    raise KeyError(f"Unknown demo source {source!r}; known: {list(SOURCES)}")


# ----------------------------------------------------------------------------------------------------
# Rendering (runs in pool workers: module-level and picklable)


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
        png = cairosvg.svg2png(
            bytestring=data, url=path, output_width=2 * size, output_height=2 * size, unsafe=False
        )
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
    im = flatten_on_white(_crop_to_content(im))
    scale = size / max(im.size)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if new != im.size:
        im = im.resize(new, Image.Resampling.LANCZOS)
    return encode_image(im, fmt, quality), fmt


# ----------------------------------------------------------------------------------------------------
# The held-out split


def _clean_ws(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def normalize_caption(caption: str) -> str:
    """Caption text for de-duplication and the split: NFKC, case-folded, single spaces, no final period."""
    return _clean_ws(unicodedata.normalize("NFKC", caption).casefold()).rstrip(" .!?…")


def caption_hash(caption: str) -> float:
    """A stable number in [0, 1) from the normalised caption (the same on every machine and Python)."""
    h = hashlib.sha1(normalize_caption(caption).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def heldout_captions(
    captions: Sequence[str], fraction: float = 0.2, max_heldout: int | None = 400
) -> set[str]:
    """The normalised captions held out: the ``fraction`` of distinct captions with the lowest hash, at most
    ``max_heldout``. Whole caption groups move together, so no held-out text is seen in training."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("heldout fraction must be in [0, 1)")
    distinct = sorted({normalize_caption(c) for c in captions})
    k = round(fraction * len(distinct))
    if fraction > 0 and len(distinct) > 1:
        k = max(k, 1)
    if max_heldout is not None:
        k = min(k, max_heldout)
    ranked = sorted(distinct, key=lambda c: (caption_hash(c), c))
    return set(ranked[:k])


# ----------------------------------------------------------------------------------------------------
# Building


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


# ----------------------------------------------------------------------------------------------------
# Zero-shot classification set (cheap to provide here; evaluation code owns how it is used)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def load_fashion_mnist(
    split: str = "t10k",
    root: str | os.PathLike = FASHION_MNIST_DIR,
    limit: int | None = None,
    invert: bool = True,
) -> tuple[Any, Any, tuple[str, ...]]:
    """(images uint8 [N,28,28], labels int64 [N], class names) from Debian ``dataset-fashion-mnist``.

    ``invert`` makes them dark-on-white like the clip-art training images.
    """
    import numpy as np

    base = Path(root)
    img_path, lbl_path = base / f"{split}-images-idx3-ubyte.gz", base / f"{split}-labels-idx1-ubyte.gz"
    if not img_path.is_file():
        raise DemoAssetsMissing(
            f"Fashion-MNIST not found at {img_path}: sudo apt-get install -y --no-install-recommends "
            "dataset-fashion-mnist"
        )
    with gzip.open(img_path) as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lbl_path) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if invert:
        images = 255 - images
    return images.copy(), labels.copy(), FASHION_MNIST_CLASSES
