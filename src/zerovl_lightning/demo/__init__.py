"""Demo data: real image–caption pairs from Debian/PyPI packages, built into webdataset shards at run time.

Four sources (see offline-assets.md): Tux Paint stamps, Noto Color Emoji with their CLDR names, Open Clip
Art titles, and country flags. Each becomes ``<cache>/demo/<source>/{train,heldout}/shard-%06d.tar``
(+ ``stats.json``) with a **held-out split by caption text**: a caption is held out when the hash of its
normalised text ranks in the lowest ``heldout_fraction`` (capped at ``max_heldout`` captions so evaluation
stays quick), so no held-out caption is ever seen in training, even when several images share it. The
images and shards are never committed (their licences differ); everything is rebuilt into the git-ignored
cache, and a rebuild is skipped in well under a second when ``manifest.json`` matches the configuration.

Layout: ``packages.py`` (which Debian/PyPI packages each source needs, :func:`check_assets`), ``listing.py``
(items and captions from the installed packages), ``render.py`` (images for the shards), ``captions.py`` (the
held-out split), ``build.py`` (orchestration: :func:`build_demo`). The library's data package does not depend
on any of it; ``zerovl-data demo`` is the command.
"""

from __future__ import annotations

from .build import build_demo, demo_root, demo_split_dirs
from .captions import caption_hash, heldout_captions, normalize_caption
from .listing import list_emoji, list_flags, list_openclipart, list_source, list_tuxpaint
from .packages import (
    APT_PACKAGES,
    DEFAULT_ROOTS,
    DEMO_VERSION,
    MANIFEST,
    PYPI_NAMES,
    SOURCE_INFO,
    SOURCES,
    SPLITS,
    DemoAssetsMissing,
    DemoItem,
    DemoSource,
    check_assets,
)
from .render import SVG_CPU_LIMIT_S, render_item

__all__ = [
    "APT_PACKAGES",
    "DEFAULT_ROOTS",
    "DEMO_VERSION",
    "DemoAssetsMissing",
    "DemoItem",
    "DemoSource",
    "MANIFEST",
    "PYPI_NAMES",
    "SOURCES",
    "SOURCE_INFO",
    "SPLITS",
    "SVG_CPU_LIMIT_S",
    "build_demo",
    "caption_hash",
    "check_assets",
    "demo_root",
    "demo_split_dirs",
    "heldout_captions",
    "list_emoji",
    "list_flags",
    "list_openclipart",
    "list_source",
    "list_tuxpaint",
    "normalize_caption",
    "render_item",
]
