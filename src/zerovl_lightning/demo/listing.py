"""Listing the demo sources from the installed packages: one :class:`~.packages.DemoItem` (image reference +
caption) per image, cheap (no image is decoded here); clip-art titles are filtered into usable captions."""

from __future__ import annotations

import html
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from .packages import (
    DEFAULT_ROOTS,
    SOURCES,
    DemoItem,
    _roots,
)


def clean_ws(s: str) -> str:
    """Runs of whitespace → one space, trimmed (captions from every source)."""
    return re.sub(r"\s+", " ", s).strip()


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
        caption = clean_ws(lines[0]) if lines else ""
        if caption:
            items.append(DemoItem(txt.relative_to(base).with_suffix("").as_posix(), caption, (kind, str(img))))
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
        caption = clean_ws(d["en"].strip(":").replace("_", " "))
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
        out.append(clean_ws(html.unescape(_TAG.sub(" ", mm.group(1)))) if mm else "")
    return out[0], out[1]


def _clean_clipart_text(t: str) -> str:
    return clean_ws(_CLIPART_BY.sub("", t).replace("_", " "))


def _usable_clipart_text(t: str, max_len: int) -> bool:
    return (
        bool(t)
        and len(t) <= max_len
        and re.search(r"[A-Za-z]{3}", t) is not None
        and not _MIXED_TOKEN.search(t)
        and not _EMAIL_URL.search(t)
        and "\n" not in t
    )


def list_openclipart(root: str | os.PathLike = DEFAULT_ROOTS["openclipart"], max_repeats: int = 3) -> list[DemoItem]:
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
