"""Shard writers: ZeroVL CSV → shards round trip, image folders, img2dataset indexing, idempotency, resume,
bad-image accounting and the ``zerovl-data`` CLI. All inputs are tiny PIL images in ``tmp_path``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from helpers_shards import image_bytes, make_zerovl_csv, read_shards, tiny_image, write_tiny_shards
from PIL import Image

from zerovl_lightning.data import cli
from zerovl_lightning.data.sources import index_img2dataset, write_csv_shards, write_folder_shards
from zerovl_lightning.data.stats import read_stats, shard_paths
from zerovl_lightning.data.writers import ShardTask, write_shards


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(d.glob("shard-*.tar"))}


def test_csv_round_trip_preserves_captions_ids_and_images(tmp_path: Path) -> None:
    rows = make_zerovl_csv(tmp_path / "raw", "toy", n_images=6, captions_per_image=3)
    report = write_csv_shards(tmp_path / "raw", "toy", tmp_path / "out", samples_per_shard=5, progress=False)

    assert report.status == "written"
    samples = read_shards(tmp_path / "out")
    assert len(samples) == len(rows) == 18
    by_caption_id = {s["json"]["caption_id"]: s for s in samples.values()}
    assert set(by_caption_id) == {r["caption_id"] for r in rows}
    for r in rows:
        s = by_caption_id[r["caption_id"]]
        assert s["txt"] == r["caption"]  # unicode, commas and quotes survive the CSV and the tar
        assert s["json"]["image_id"] == r["image_id"]
        assert s["json"]["source"] == "toy"
        assert s["json"]["image"] == r["image"]
        # JPEG inputs are stored byte for byte (no re-encoding loss)
        assert s["jpg"] == (tmp_path / "raw" / "toy" / "train" / r["image"]).read_bytes()
    # several captions per image, each a sample sharing the image id
    per_image: dict[int, int] = {}
    for s in samples.values():
        per_image[s["json"]["image_id"]] = per_image.get(s["json"]["image_id"], 0) + 1
    assert per_image == {100 + i: 3 for i in range(6)}

    stats = read_stats(tmp_path / "out")
    assert (stats["num_samples"], stats["num_images"], stats["num_shards"]) == (18, 6, 4)
    assert [s["num_samples"] for s in stats["shards"]] == [5, 5, 5, 3]
    assert stats["skipped"] == {"empty_caption": 0, "bad_text_encoding": 0, "missing_image": 0, "unreadable_image": 0}
    assert [Path(p).name for p in shard_paths(tmp_path / "out")] == [f"shard-{i:06d}.tar" for i in range(4)]
    # the default shuffle spreads the captions of one image over several shards
    shard_of_image: dict[int, set[str]] = {}
    for shard in sorted((tmp_path / "out").glob("shard-*.tar")):
        for s in _image_ids_in_shard(shard):
            shard_of_image.setdefault(s, set()).add(shard.name)
    assert any(len(v) > 1 for v in shard_of_image.values())


def _image_ids_in_shard(shard: Path) -> list[int]:
    with tarfile.open(shard) as tf:
        return [json.loads(tf.extractfile(m).read())["image_id"] for m in tf if m.name.endswith(".json")]


def test_csv_keeps_order_without_shuffle_and_rejects_bad_columns(tmp_path: Path) -> None:
    rows = make_zerovl_csv(tmp_path / "raw", "toy", n_images=3, captions_per_image=2)
    write_csv_shards(tmp_path / "raw", "toy", tmp_path / "out", shuffle_seed=None, progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tf))
    assert keys == [f"toy_{r['caption_id']:010d}" for r in rows]

    bad = tmp_path / "raw2" / "x"
    bad.mkdir(parents=True)
    (bad / "train_anno.csv").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(ValueError, match="missing columns"):
        write_csv_shards(tmp_path / "raw2", "x", tmp_path / "out2", progress=False)


def test_bad_images_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = make_zerovl_csv(tmp_path / "raw", "toy", n_images=5, captions_per_image=2)
    train = tmp_path / "raw" / "toy" / "train"
    good = (train / "img_000.jpg").read_bytes()
    (train / "img_001.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (train / "img_002.jpg").write_bytes(b"")  # zero bytes
    (train / "img_003.jpg").unlink()  # missing
    # one empty caption on the good image 4
    csv_path = tmp_path / "raw" / "toy" / "train_anno.csv"
    text = csv_path.read_text(encoding="utf-8").splitlines()
    last = rows[-1]
    text[-1] = f"{last['image']},{last['image_id']},,{last['caption_id']}"
    csv_path.write_text("\n".join(text) + "\n", encoding="utf-8")

    report = write_csv_shards(tmp_path / "raw", "toy", tmp_path / "out", samples_per_shard=4, progress=False)
    stats = report.stats
    assert stats["skipped"] == {"empty_caption": 1, "bad_text_encoding": 0, "missing_image": 2, "unreadable_image": 4}
    assert stats["num_samples"] == 3 and stats["num_images"] == 2
    samples = read_shards(tmp_path / "out")
    assert sorted(s["json"]["image_id"] for s in samples.values()) == [100, 100, 104]
    assert len(stats["bad_examples"]) >= 1


def test_folder_with_sidecars_and_mapping_file(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    tiny_image(0).save(d / "a.png")
    (d / "a.txt").write_text("a red square\n\na second caption for a\n")
    tiny_image(1, mode="RGBA").save(d / "sub" / "b.webp")
    tiny_image(2).save(d / "c.bmp")  # not a webdataset image type: re-encoded as JPEG
    tiny_image(3).save(d / "nocap.jpg")  # no caption anywhere
    (d / "captions.tsv").write_text("file_name\ttext\nsub/b.webp\ta blue-ish thing\n./c.bmp\tyellow\nmissing.png\tx\n")

    report = write_folder_shards(d, tmp_path / "out", progress=False)
    samples = read_shards(tmp_path / "out")
    got = sorted(
        (s["json"]["image"], s["txt"], next(k for k in s if k not in ("txt", "json"))) for s in samples.values()
    )
    assert got == [
        ("a.png", "a red square", "png"),
        ("a.png", "a second caption for a", "png"),
        ("c.bmp", "yellow", "jpg"),
        ("sub/b.webp", "a blue-ish thing", "webp"),
    ]
    c = next(s for s in samples.values() if s["json"]["image"] == "c.bmp")
    assert Image.open(io.BytesIO(c["jpg"])).size == (12, 14)
    st = report.stats
    assert (st["num_samples"], st["num_images"], st["source"]) == (4, 3, "imgs")
    assert st["images_without_caption"] == 1 and st["captions_without_image"] == 1


def test_max_side_downsizes(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (300, 150), (10, 200, 30)).save(d / "big.png")
    (d / "big.txt").write_text("a wide green image")
    write_folder_shards(d, tmp_path / "out", max_side=64, progress=False)
    (s,) = read_shards(tmp_path / "out").values()
    assert Image.open(io.BytesIO(s["jpg"])).size == (64, 32)


def test_second_run_is_skipped_and_changed_input_rewrites(tmp_path: Path) -> None:
    make_zerovl_csv(tmp_path / "raw", "toy", n_images=4, captions_per_image=2)
    out = tmp_path / "out"
    write_csv_shards(tmp_path / "raw", "toy", out, samples_per_shard=3, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    again = write_csv_shards(tmp_path / "raw", "toy", out, samples_per_shard=3, progress=False)
    assert again.status == "up-to-date" and again.shards_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == before

    # fewer rows: rewritten, and the shard that no longer exists in the plan is removed
    make_zerovl_csv(tmp_path / "raw", "toy", n_images=2, captions_per_image=2)
    changed = write_csv_shards(tmp_path / "raw", "toy", out, samples_per_shard=3, progress=False)
    assert changed.status == "written"
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert changed.stats["num_samples"] == 4 == len(read_shards(out))


class Killed(BaseException):
    """Stands for SIGKILL/Ctrl-C: not an Exception, so the writer cannot swallow it as a bad image."""


def test_killed_writer_resumes_and_ignores_stale_temp_files(tmp_path: Path) -> None:
    tasks = [ShardTask(f"k_{i:04d}", f"caption {i}", {"image_id": i, "caption_id": i}, i) for i in range(10)]
    calls: list[int] = []

    def load(i: int) -> tuple[bytes, str]:
        calls.append(i)
        return image_bytes(i), "png"

    def dying_load(i: int) -> tuple[bytes, str]:
        if i == 6:
            raise Killed
        return load(i)

    out = tmp_path / "out"
    with pytest.raises(Killed):
        write_shards(tasks, out, dying_load, source="s", samples_per_shard=4, progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]  # only the finished one
    assert not (out / "stats.json").exists()
    (out / "shard-000001.tar.tmp999999999").write_bytes(b"half a shard from a killed run (pid gone)")
    (out / "shard-000002.tar.tmp").write_bytes(b"a temp file of an older writer")

    calls.clear()
    report = write_shards(tasks, out, load, source="s", samples_per_shard=4, progress=False)
    assert report.status == "resumed" and report.shards_written == 2
    assert sorted(calls) == list(range(4, 10))  # shard 0 was not redone
    assert not list(out.glob("*.tmp*")) and not (out / ".progress").exists()
    assert report.stats["num_samples"] == 10

    fresh = write_shards(tasks, tmp_path / "fresh", load, source="s", samples_per_shard=4, progress=False)
    assert _digests(out) == _digests(tmp_path / "fresh")  # resumed output = uninterrupted output, byte for byte
    assert read_stats(out)["shards"] == fresh.stats["shards"]


def test_truncated_finished_shard_is_rewritten(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path / "s", n=12, samples_per_shard=4)
    shard = tmp_path / "s" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:100])  # damaged after the fact: size no longer matches stats
    report = write_tiny_shards(tmp_path / "s", n=12, samples_per_shard=4)
    assert report.status == "written"
    assert len(read_shards(tmp_path / "s")) == 12


def test_worker_pool_gives_identical_shards(tmp_path: Path) -> None:
    make_zerovl_csv(tmp_path / "raw", "toy", n_images=6, captions_per_image=2, fmt="PNG")
    a = write_csv_shards(tmp_path / "raw", "toy", tmp_path / "a", samples_per_shard=5, progress=False)
    b = write_csv_shards(tmp_path / "raw", "toy", tmp_path / "b", samples_per_shard=5, workers=2, progress=False)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert a.stats["fingerprint"] == b.stats["fingerprint"]


def _img2dataset_dir(d: Path) -> None:
    """Two shards like img2dataset writes them; only the first has its NNNNN_stats.json."""
    d.mkdir()
    for shard, keys in (
        ("00000", ["000000000", "000000001", "000000002"]),
        ("00001", ["000010000", "000010001"]),
    ):
        with tarfile.open(d / f"{shard}.tar", "w") as tf:
            for i, k in enumerate(keys):
                for ext, data in (("jpg", image_bytes(i, "JPEG")), ("txt", b"a caption"), ("json", b"{}")):
                    ti = tarfile.TarInfo(f"{k}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
            if shard == "00001":  # a sample whose download failed: caption but no image
                ti = tarfile.TarInfo("000010002.txt")
                ti.size = 1
                tf.addfile(ti, io.BytesIO(b"x"))
    (d / "00000_stats.json").write_text(json.dumps({"successes": 3, "failed_to_download": 1}))
    (d / "00000.parquet").write_bytes(b"PAR1")


def test_img2dataset_output_is_indexed_as_is(tmp_path: Path) -> None:
    d = tmp_path / "i2d"
    _img2dataset_dir(d)
    before = _digests_all(d)
    report = index_img2dataset(d, progress=False)
    stats = read_stats(d)
    assert (stats["num_samples"], stats["num_shards"], stats["num_images"]) == (5, 2, 5)
    assert [(s["file"], s["num_samples"]) for s in stats["shards"]] == [("00000.tar", 3), ("00001.tar", 2)]
    assert stats["counted_from"] == {"img2dataset_stats": 1, "tar_scan": 1}
    assert stats["skipped"] == {"no_image": 1}
    assert report.status == "written"
    assert _digests_all(d) == before  # the shards themselves are untouched
    assert index_img2dataset(d, progress=False).status == "up-to-date"
    assert index_img2dataset(d, count="scan", progress=False).stats["counted_from"] == {"tar_scan": 2}


def _digests_all(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in d.glob("*.tar")}


def test_read_stats_without_stats_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="zerovl-data"):
        read_stats(tmp_path)


def test_cli_csv_stats_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_zerovl_csv(tmp_path / "raw", "toy", n_images=3, captions_per_image=2)
    out = tmp_path / "shards" / "toy"
    assert cli.main(["csv", str(tmp_path / "raw"), "toy", str(out), "--quiet", "--samples-per-shard", "4"]) == 0
    text = capsys.readouterr().out
    assert "samples" in text and "written" in text
    assert read_stats(out)["num_samples"] == 6

    write_tiny_shards(tmp_path / "shards" / "other", source="other", n=7, samples_per_shard=3)
    assert cli.main(["stats", str(tmp_path / "shards")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("other") and " 7 " in line for line in lines)
    assert any(line.startswith("toy") and " 6 " in line for line in lines)

    assert cli.main(["csv", str(tmp_path / "raw"), "nope", str(tmp_path / "x"), "--quiet"]) == 2
    assert "annotation file not found" in capsys.readouterr().err
