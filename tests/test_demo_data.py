"""The demo-data builder: sources, caption-disjoint held-out split, determinism, idempotency, error messages.

Most tests build a small subset (``limit`` items per source) from the installed Debian packages; the full
build is one ``slow`` test.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import pytest
from helpers_shards import read_shards
from PIL import Image

from zerovl_lightning import demo
from zerovl_lightning.data import cli
from zerovl_lightning.data.stats import read_stats
from zerovl_lightning.data.writers import ShardTask, write_shards
from zerovl_lightning.demo import (
    SOURCES,
    DemoAssetsMissing,
    build_demo,
    check_assets,
    demo_split_dirs,
    heldout_captions,
    list_emoji,
    list_openclipart,
    list_source,
    normalize_caption,
    render_item,
)

try:
    check_assets()
    _MISSING = ""
except DemoAssetsMissing as e:
    _MISSING = str(e)
needs_assets = pytest.mark.skipif(bool(_MISSING), reason=f"demo packages not installed: {_MISSING}")

LIMIT = 15


@pytest.fixture(scope="module")
def subset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if _MISSING:
        pytest.skip(_MISSING)
    cache = tmp_path_factory.mktemp("democache")
    build_demo(cache, limit=LIMIT, workers=0, progress=False)
    return cache


def _captions(d: Path) -> set[str]:
    return {normalize_caption(s["txt"]) for s in read_shards(d).values()}


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("shard-*.tar"))
    }


def _expected_total(source: str) -> int:
    """Train items plus one held-out item per held-out caption (repeated held-out captions are ambiguous queries)."""
    captions = [normalize_caption(it.caption) for it in list_source(source)[:LIMIT]]
    held = heldout_captions(captions, fraction=0.2, max_heldout=400)
    return sum(c not in held for c in captions) + len(held & set(captions))


@needs_assets
def test_subset_has_every_source_and_contract_layout(subset_cache: Path) -> None:
    dirs = demo_split_dirs(subset_cache)
    assert sorted(dirs) == sorted(SOURCES)
    for source, splits in dirs.items():
        total = 0
        for split, d in splits.items():
            stats = read_stats(d)
            samples = read_shards(d)
            assert stats["num_samples"] == len(samples) == sum(s["num_samples"] for s in stats["shards"])
            assert stats["split"] == split and stats["source"] == source
            total += len(samples)
            for key, s in samples.items():
                assert key.startswith(f"{source}_")
                assert {"jpg", "txt", "json"} <= set(s)
                meta = s["json"]
                assert meta["source"] == source and meta["split"] == split
                assert isinstance(meta["image_id"], int) and isinstance(meta["caption_id"], int)
                im = Image.open(io.BytesIO(s["jpg"]))
                assert im.mode == "RGB" and max(im.size) == 160
        assert total == _expected_total(source)  # nothing else lost in the subset (the first items all render)
        held = [
            normalize_caption(s["txt"] if isinstance(s["txt"], str) else s["txt"].decode())
            for s in read_shards(splits["heldout"]).values()
        ]
        assert len(held) == len(set(held))  # one image per held-out caption
        assert read_stats(splits["heldout"])["num_samples"] >= 1


@needs_assets
def test_heldout_captions_never_appear_in_train(subset_cache: Path) -> None:
    for source, splits in demo_split_dirs(subset_cache).items():
        train, held = _captions(splits["train"]), _captions(splits["heldout"])
        assert train and held, source
        assert not train & held, source


@needs_assets
def test_build_is_deterministic_and_idempotent(subset_cache: Path, tmp_path: Path) -> None:
    other = tmp_path / "again"
    build_demo(other, limit=LIMIT, workers=2, progress=False)  # the pool gives the same bytes as in-process
    assert _digests(other / "demo") == _digests(subset_cache / "demo")

    t0 = time.perf_counter()
    manifest = build_demo(other, limit=LIMIT, workers=2, progress=False)
    assert manifest["status"] == "up-to-date" and time.perf_counter() - t0 < 1.0
    assert set(manifest["sources"]) == set(SOURCES)
    assert manifest["totals"]["train"] + manifest["totals"]["heldout"] == sum(_expected_total(s) for s in SOURCES)

    # another configuration (here: image size) is a rebuild, not a silent reuse
    rebuilt = build_demo(other, limit=LIMIT, image_size=96, workers=0, progress=False, sources=["flags"])
    assert rebuilt["status"] == "built"
    (s, *_) = read_shards(other / "demo" / "flags" / "train").values()
    assert max(Image.open(io.BytesIO(s["jpg"])).size) == 96


def test_heldout_split_by_caption_text() -> None:
    captions = [f"A thing number {i}." for i in range(100)] + ["A flower.", "a flower", "A  FLOWER."] * 3
    held = heldout_captions(captions, fraction=0.2)
    assert len(held) == round(0.2 * 101)
    assert held == heldout_captions(list(reversed(captions)), fraction=0.2)  # order does not matter
    # spelling variants of one caption are one group: all held out or none
    assert normalize_caption("A  FLOWER.") == normalize_caption("a flower")
    assert heldout_captions(captions, fraction=0.2, max_heldout=7) <= held
    assert len(heldout_captions(captions, fraction=0.2, max_heldout=7)) == 7
    assert heldout_captions(captions, fraction=0.0) == set()


def test_missing_package_error_names_package_and_apt_command(tmp_path: Path) -> None:
    with pytest.raises(DemoAssetsMissing) as e:
        build_demo(tmp_path, roots={"tuxpaint": tmp_path / "nope", "flags": tmp_path / "nope2"}, progress=False)
    msg = str(e.value)
    assert "tuxpaint-stamps-default" in msg and "iso-flags-png-320x240" in msg
    assert "apt-get install -y --no-install-recommends iso-flags-png-320x240 tuxpaint-stamps-default" in msg
    assert not (tmp_path / "demo" / "tuxpaint").exists()


def test_cli_reports_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(demo.DEFAULT_ROOTS, "openclipart", str(tmp_path / "absent"))
    assert cli.main(["demo", "--cache", str(tmp_path), "--sources", "openclipart", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "openclipart-svg" in err and "apt-get install" in err


def _svg(title: str, desc: str = "") -> str:
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'width="40" height="20"><metadata><rdf:RDF><cc:Work rdf:about="">'
        f"<dc:title>{title}</dc:title><dc:description>{desc}</dc:description>"
        "<dc:creator><cc:Agent><dc:title>Some Artist</dc:title></cc:Agent></dc:creator>"
        '</cc:Work></rdf:RDF></metadata><rect x="5" y="5" width="30" height="10" fill="#c00"/></svg>'
    )


def test_openclipart_title_filters(tmp_path: Path) -> None:
    root = tmp_path / "svg"
    files = {
        "animals/good.svg": _svg("A happy whale"),
        "animals/prefixed.svg": _svg("Clipart by Nicu Buculei - Nice tree"),
        "animals/underscored.svg": _svg("pink_cake"),
        "animals/idlike.svg": _svg("bee1"),
        "animals/idlike_with_desc.svg": _svg("guitar1", "electric guitar"),
        "animals/email.svg": _svg("drawn by me@example.org"),
        "animals/escaped.svg": _svg("Fish &amp; chips"),
        "computer/icons/theme/icon.svg": _svg("A perfectly fine title"),
        **{f"cards/c{i}.svg": _svg("card") for i in range(4)},
        **{f"cards/d{i}.svg": _svg("Two cards") for i in range(3)},
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    os.symlink(root / "animals/good.svg", root / "animals/link.svg")

    got = {it.uid: it.caption for it in list_openclipart(root)}
    assert got == {
        "animals/escaped": "Fish & chips",
        "animals/good": "A happy whale",
        "animals/idlike_with_desc": "electric guitar",
        "animals/prefixed": "Nice tree",
        "animals/underscored": "pink cake",
        "cards/d0": "Two cards",
        "cards/d1": "Two cards",
        "cards/d2": "Two cards",
    }
    data, ext = render_item(("svg", str(root / "animals/good.svg")), size=64)
    # cropped to the 3:1 red rectangle (plus a 4% margin), not the 2:1 page; longer side 64
    w, h = Image.open(io.BytesIO(data)).size
    assert ext == "jpg" and w == 64 and abs(h - 25) <= 1


def test_svg_with_internal_entities_and_percent_opacity_renders(tmp_path: Path) -> None:
    # Adobe Illustrator exports declare namespaces as entities (refused by cairosvg's safe parser), and some
    # files write opacity as a percentage (which cairosvg cannot parse): both are repaired before rendering.
    svg = tmp_path / "ai.svg"
    svg.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
        '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd" [\n\t<!ENTITY ns_svg "http://www.w3.org/2000/svg">\n]>'
        '<svg xmlns="&ns_svg;" width="20" height="20"><rect width="20" height="20" fill="#00f" '
        'stroke-opacity="100%" style="opacity:100%"/></svg>'
    )
    data, _ = render_item(("svg", str(svg)), size=32)
    im = Image.open(io.BytesIO(data))
    r, g, b = im.getpixel((16, 16))
    assert b > 200 and r < 60 and g < 60  # the blue square, not a white/empty page


def test_unrenderable_svg_is_counted_not_fatal(tmp_path: Path) -> None:
    bad = tmp_path / "bad.svg"
    bad.write_text("<svg><this is not xml")
    good = tmp_path / "good.svg"
    good.write_text(_svg("ok"))
    tasks = [
        ShardTask("s_0", "broken", {"image_id": 0, "caption_id": 0}, ("svg", str(bad))),
        ShardTask("s_1", "fine", {"image_id": 1, "caption_id": 1}, ("svg", str(good))),
    ]
    report = write_shards(tasks, tmp_path / "out", render_item, source="s", progress=False)
    assert report.stats["num_samples"] == 1 and report.stats["skipped"]["unreadable_image"] == 1


@needs_assets
def test_emoji_listing_follows_the_asset_notes() -> None:
    items = list_emoji()
    assert 1800 <= len(items) <= 1950
    assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for it in items for c in it.render[1])
    caps = {it.caption for it in items}
    assert "woman in manual wheelchair" in caps and not any(":" in c[:1] or "_" in c for c in caps)
    data, _ = render_item(items[0].render)
    assert max(Image.open(io.BytesIO(data)).size) == 160


@pytest.mark.slow
@needs_assets
def test_full_demo_build_counts(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    m = build_demo(tmp_path, progress=False)
    took = time.perf_counter() - t0
    s = m["sources"]
    expected = {  # (train samples range, heldout samples range); offline-assets.md gives the source sizes
        "tuxpaint": ((650, 850), (120, 260)),
        "emoji": ((1400, 1560), (330, 400)),
        "openclipart": ((2100, 2500), (380, 520)),
        "flags": ((180, 220), (40, 60)),
    }
    for name, ((tlo, thi), (hlo, hhi)) in expected.items():
        assert tlo <= s[name]["train"]["num_samples"] <= thi, (name, s[name])
        assert hlo <= s[name]["heldout"]["num_samples"] <= hhi, (name, s[name])
        assert s[name]["heldout"]["num_unique_captions"] <= 400
        assert s[name]["train"]["num_shards"] >= 8
        assert not _captions(tmp_path / "demo" / name / "train") & _captions(tmp_path / "demo" / name / "heldout")
    print(
        f"full demo build: {took:.1f}s",
        {k: (v["train"]["num_samples"], v["heldout"]["num_samples"]) for k, v in s.items()},
    )
