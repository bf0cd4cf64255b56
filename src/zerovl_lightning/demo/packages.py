"""Where the demo sources come from: the Debian/PyPI packages each needs, their roots, and the check that
names every missing one at once."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
class DemoSource:
    """Where a source comes from: the Debian package(s) and root keys it needs, PyPI modules, licence."""

    name: str
    debian: tuple[str, ...]
    root_keys: tuple[str, ...]
    python: tuple[str, ...]
    licence: str
    captions: str


SOURCE_INFO: dict[str, DemoSource] = {
    "tuxpaint": DemoSource(
        "tuxpaint",
        ("tuxpaint-stamps-default",),
        ("tuxpaint",),
        ("cairosvg",),
        "GPL-2",
        "one English sentence per stamp",
    ),
    "emoji": DemoSource(
        "emoji",
        ("fonts-noto-color-emoji",),
        ("emoji",),
        ("emoji",),
        "OFL/Apache-2.0 + BSD",
        "Unicode/CLDR short names",
    ),
    "openclipart": DemoSource(
        "openclipart",
        ("openclipart-svg",),
        ("openclipart",),
        ("cairosvg",),
        "public domain",
        "dc:title (or dc:description) of the SVG, filtered",
    ),
    "flags": DemoSource(
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


def _roots(roots: Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    merged = {**DEFAULT_ROOTS, **{k: str(v) for k, v in (roots or {}).items()}}
    unknown = set(merged) - set(DEFAULT_ROOTS)
    if unknown:
        raise KeyError(f"Unknown demo roots {sorted(unknown)}; known: {sorted(DEFAULT_ROOTS)}")
    return {k: Path(v) for k, v in merged.items()}


def check_assets(sources: Sequence[str] = SOURCES, roots: Mapping[str, str | os.PathLike] | None = None) -> None:
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
        lines.append("  Install with: sudo apt-get install -y --no-install-recommends " + " ".join(sorted(missing_deb)))
        lines.append("  (all demo packages: apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES) + ")")
    if missing_py:
        names = " ".join(sorted(PYPI_NAMES.get(m, m) for m in missing_py))
        lines.append(f"  - Python packages missing: {names}")
        lines.append(f"  Install with: pip install {names}   (or: pip install 'zerovl-lightning[demo]')")
    raise DemoAssetsMissing("\n".join(lines))
