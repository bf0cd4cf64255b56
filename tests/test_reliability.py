"""Issue 13, one test per finding: resume keeps the loggers' history, checkpoints are chosen by the step
stored in them, stats.json is verified against the shards, high-bit-depth and transparent images decode
right (train = eval), changed batch size / workers refuse to resume, a diverged run fails, errors name the key.

Runs go through ``zerovl_lightning.train.run`` on the shipped configs (``tests/crash_worker.py`` overrides:
tiny model, the real ``ZeroVLDataModule``, the real Trainer and checkpoint callbacks).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from crash_worker import compose, overrides
from omegaconf import OmegaConf
from PIL import Image
from shard_fixtures import write_source

from zerovl_lightning import checkpointing as ck
from zerovl_lightning.checkpointing import CheckpointError, resolve_ckpt_path
from zerovl_lightning.config_checks import ConfigError, validate_config

STEPS = 8
EVERY = 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rel_shards")
    write_source(root / "a", "a", 40, 10)
    write_source(root / "b", "b", 24, 8)
    return {"a": str(root / "a"), "b": str(root / "b")}


def _overrides(out: Path, sources: dict[str, str], *extra: str, steps: int = STEPS) -> list[str]:
    return overrides(
        out, out / "record.txt", sources, max_steps=steps, every_n_steps=EVERY, keep=5,
        extra=["data.num_workers=0", *extra],
    )


def _train(out: Path, sources: dict[str, str], *extra: str, steps: int = STEPS) -> dict[str, float]:
    from zerovl_lightning import train

    torch.set_num_threads(1)
    return train.run(compose(_overrides(out, sources, *extra, steps=steps)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sources) -> Path:
    """One finished 8-step run with step checkpoints at 4 and 8 (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("rel_run")
    _train(out, sources)
    return out


def _csv_steps(out: Path) -> list[int]:
    with open(out / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


# ------------------------------------------------------------------------------------------- 1: history
def test_resume_keeps_the_csv_history_once(finished_run, sources, tmp_path):
    """Finding 1: resuming from step 4 of an 8-step run keeps steps 0-3 and logs 4-7 once (not twice)."""
    before = _csv_steps(finished_run)
    assert before == list(range(STEPS))
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "record.txt").unlink()
    _train(out, sources, f"ckpt_path={out}/checkpoints/step_000004.ckpt")
    assert _csv_steps(out) == list(range(STEPS))


def test_tensorboard_purges_re_run_steps(finished_run):
    cfg = OmegaConf.create({"logger": {"tb": {"_target_": "lightning.pytorch.loggers.TensorBoardLogger"},
                                       "csv": {"_target_": "zerovl_lightning.logger_resume.ResumableCSVLogger"}}})
    from zerovl_lightning.logger_resume import configure_logger_resume

    configure_logger_resume(cfg, 4)
    assert cfg.logger.tb.purge_step == 4 and cfg.logger.csv.resume_step == 4


# ------------------------------------------------------------------------------------------- 2: by step
def test_last_is_chosen_by_stored_step_not_mtime(finished_run, tmp_path, caplog):
    """Finding 2: after `cp -r` and a `touch` of an older checkpoint, `last` still resumes from step 8."""
    shutil.copytree(finished_run, tmp_path / "copy")
    d = tmp_path / "copy" / "checkpoints"
    old = d / "step_000004.ckpt"
    future = time.time() + 3600
    os.utime(old, (future, future))  # the newest by mtime
    (d / "last.ckpt").unlink()  # only step-named files left: the choice is by content
    renamed = d / "zzz.ckpt"
    (d / "step_000008.ckpt").rename(renamed)  # a name without a step
    caplog.set_level(logging.INFO, logger="zerovl_lightning.checkpointing")
    chosen = resolve_ckpt_path("last", d)
    assert ck.stored_step(chosen) == STEPS
    assert f"Resuming from {chosen} (global step {STEPS})" in caplog.text


def test_choice_is_made_once_on_rank_zero(finished_run, monkeypatch, tmp_path):
    d = finished_run / "checkpoints"
    monkeypatch.delenv(ck.RESOLVED_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    chosen = resolve_ckpt_path("last", d)
    assert os.environ[ck.RESOLVED_ENV] == chosen  # what Lightning's launcher hands to ranks 1..N-1
    monkeypatch.setenv("RANK", "1")
    other = tmp_path / "other.ckpt"
    shutil.copy(d / "step_000004.ckpt", other)
    monkeypatch.setenv(ck.RESOLVED_ENV, str(other))
    calls = []
    monkeypatch.setattr(ck.resolve, "_resolve", lambda *a: calls.append(a))
    assert resolve_ckpt_path("last", d) == str(other)  # rank 1 takes rank 0's choice, does not look itself
    assert calls == []


def test_srun_tasks_take_rank_zeros_choice_from_the_run_folder(finished_run, monkeypatch, tmp_path):
    """Under srun / torchrun no rank inherits rank 0's environment: rank 0 leaves its choice in the run's
    checkpoint folder, the other tasks read it instead of checking the files themselves."""
    d = tmp_path / "checkpoints"
    shutil.copytree(finished_run / "checkpoints", d)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", ck.RESOLVED_ENV, "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(var, value)
    chosen = resolve_ckpt_path("last", d)
    assert ck.stored_step(chosen) == 8
    assert json.loads((d / ".resume-choice-slurm-77-0-0.json").read_text()) == {"ckpt_path": chosen}
    assert not list(d.glob("*.tmp"))

    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.delenv(ck.RESOLVED_ENV)  # an srun task inherits nothing from rank 0
    calls = []
    monkeypatch.setattr(ck.resolve, "_resolve", lambda *a: calls.append(a))
    assert resolve_ckpt_path("last", d) == chosen
    assert calls == []  # took the choice, read no checkpoint

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the old choice is not this launch's
    monkeypatch.setenv(ck.resolve.CHOICE_WAIT_ENV, "0.5")
    with pytest.raises(CheckpointError, match=r"rank 1: no checkpoint choice from rank 0 in .*slurm-77-0-1\.json"):
        resolve_ckpt_path("last", d)
    assert calls == []


# ------------------------------------------------------------------------------------------- 7: messages
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"trainer": {"max_steps": 0}}, "trainer.max_steps=0 must be positive"),
        ({"trainer": {"max_epochs": -3}}, "trainer.max_epochs=-3 must be positive"),
        ({"module": {"optimizer": {"lr": "fast"}}}, "module.optimizer.lr='fast' must be a number"),
        ({"module": {"optimizer": {"lr": -1.0}}}, "module.optimizer.lr=-1.0 must be a positive"),
        ({"module": {"scheduler": {"warmup_fraction": 2}}}, "module.scheduler.warmup_fraction=2.0 must be"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    cfg = OmegaConf.merge({"paths": {"output_dir": str(tmp_path)}}, override)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_config(cfg)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated"])
def test_eval_and_export_check_the_checkpoint(finished_run, tmp_path, kind):
    from zerovl_lightning.export import load_dual_encoder

    path = tmp_path / "model.ckpt"
    good = (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    data = {"missing": None, "empty": b"", "garbage": b"12 not a checkpoint\n" * 50,
            "truncated": good[: len(good) // 2]}[kind]
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(CheckpointError, match=str(path)):
        load_dual_encoder(ckpt_path=str(path))


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- 6: NaN
def test_diverged_run_fails_and_saves_no_non_finite_model(sources, tmp_path):
    """Finding 6: lr=1e6 makes every step non-finite; the run stops with NonFiniteError (non-zero exit) and
    no checkpoint on disk holds non-finite weights."""
    from zerovl_lightning.guards import NonFiniteError

    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="in a row|non-finite weights"):
        _train(out, sources, "module.optimizer.lr=1e6", "callbacks.non_finite_guard.max_consecutive_skips=3",
               steps=24)
    for path in (out / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


# ------------------------------------------------------------------------------------------- 5: changed data
@pytest.mark.parametrize(
    ("override", "key"), [("data.batch_size=4", "data.batch_size: 8 in the checkpoint, 4 now"),
                          ("data.num_workers=2", "data.num_workers: 1 in the checkpoint, 2 now")]
)
def test_resume_with_changed_batch_or_workers_is_refused(finished_run, sources, tmp_path, override, key):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    with pytest.raises(ConfigError, match=key + r".*data\.allow_inexact_resume=true"):
        _train(out, sources, f"ckpt_path={out}/checkpoints/step_000004.ckpt", override)


def test_allow_inexact_resume_returns_what_changed():
    from zerovl_lightning.config_checks import check_data_resume

    saved, now = {"batch_size": 8, "lanes": 1, "seed": 1}, {"batch_size": 4, "lanes": 1, "seed": 2}
    assert check_data_resume(saved, now, allow_inexact=True) == ["batch_size", "seed"]
    assert check_data_resume(saved, {**saved, "seed": 3}, allow_inexact=False) == ["seed"]  # only warned


# ------------------------------------------------------------------------------------------- 9: bad samples
def test_bad_sample_summary_reaches_the_log(sources, tmp_path, caplog):
    """Finding 9: the per-source summary of skipped samples is printed at epoch end and at the end."""
    from shard_fixtures import BAD_EXPECTED, write_bad_source

    write_bad_source(tmp_path / "bad")
    caplog.set_level(logging.INFO, logger="zerovl_lightning.data.bad_sample_report")
    srcs = {"a": sources["a"], "bad": str(tmp_path / "bad")}
    _train(tmp_path / "run", srcs, "trainer.max_epochs=1", "trainer.max_steps=-1", "data.batch_size=4",
           "data.weights=uniform")
    lines = [r.getMessage() for r in caplog.records if "bad samples skipped" in r.getMessage()]
    assert any("(epoch 0, all ranks)" in line for line in lines)
    assert any("end of training" in line for line in lines)
    want = ", ".join(f"{k}={n}" for k, n in sorted(BAD_EXPECTED.items()))
    assert f"bad: {want}" in lines[-1] and "a: none" in lines[-1], lines[-1]


# ------------------------------------------------------------------------------------------- 3: stats.json
def _edit_stats(d: Path, fn) -> None:
    import json

    p = d / "stats.json"
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


@pytest.mark.parametrize("factor", [2, 0.5])
def test_stats_counts_that_contradict_the_shards_are_an_error(tmp_path, factor):
    from zerovl_lightning.data.shards import SourceInfo
    from zerovl_lightning.errors import DataError

    write_source(tmp_path, "s", 20, 10)

    def scale(st):
        st["num_samples"] = int(st["num_samples"] * factor)
        for x in st["shards"]:
            x["num_samples"] = int(x["num_samples"] * factor)
        return st

    _edit_stats(tmp_path, scale)
    with pytest.raises(DataError, match=r"stats\.json: shard-000000\.tar holds 10 samples, the stats say "
                       r".*zerovl-data img2dataset"):
        SourceInfo.build("s", str(tmp_path))


def test_stats_listing_a_missing_shard_or_malformed_is_an_error(tmp_path):
    from zerovl_lightning.data.shards import SourceInfo
    from zerovl_lightning.errors import DataError

    write_source(tmp_path, "s", 20, 10)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match=r"lists shard\(s\) missing on disk: shard-000001\.tar"):
        SourceInfo.build("s", str(tmp_path))
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.raises(DataError, match=rf"{tmp_path}/stats\.json: not valid JSON"):
        SourceInfo.build("s", str(tmp_path))


def test_stats_sum_and_unlisted_shards_are_checked(tmp_path):
    from zerovl_lightning.data.shards import SourceInfo
    from zerovl_lightning.errors import DataError

    write_source(tmp_path, "s", 30, 10)
    info = SourceInfo.build("s", str(tmp_path / "shard-00000{0,1}.tar"))
    assert info.num_samples == 20  # the selected shards' counts, not the folder's total (30)
    _edit_stats(tmp_path, lambda st: {**st, "num_samples": 60})
    with pytest.raises(DataError, match="num_samples=60 but its shards add up to 30"):
        SourceInfo.build("s", str(tmp_path))
    _edit_stats(tmp_path, lambda st: {**st, "num_samples": 20, "shards": st["shards"][:2]})
    with pytest.raises(DataError, match=r"does not list shard\(s\) shard-000002\.tar"):
        SourceInfo.build("s", str(tmp_path))


# ------------------------------------------------------------------------------------------- 4: pixels, text
def _decode(data: bytes, ext: str = "png") -> np.ndarray:
    from zerovl_lightning.data.shards import BadSampleCounter, decode_sample

    counter = BadSampleCounter()
    out = decode_sample({ext: data, "txt": b"a caption", "__key__": "k"}, counter)
    assert out is not None, counter.counts
    return np.asarray(out[0])


def test_sixteen_bit_png_is_scaled_not_clipped():
    img = _decode(_png(np.full((8, 8), 200, np.uint16)))  # 200/65535: almost black
    assert img.shape == (8, 8, 3) and int(img.max()) == 1  # round(200 * 255 / 65535)
    img = _decode(_png(np.full((8, 8), 65535, np.uint16)))
    assert int(img.min()) == 255


def test_transparent_pixels_are_white_in_training_and_in_evaluation():
    from zerovl_lightning.eval.transforms import eval_transform

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half transparent black
    train = _decode(_png(rgba))
    assert (train[4:] == 255).all() and (train[:4] == (255, 0, 0)).all()
    # the eval path (8 px: no resize), un-normalised: the same pixels
    to_tensor = eval_transform({"size": 8, "mean": (0.0,) * 3, "std": (1.0,) * 3})
    pixels = (to_tensor(Image.open(io.BytesIO(_png(rgba)))) * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert np.array_equal(train, pixels.numpy())


def test_float_tiff_and_non_utf8_captions_through_the_folder_writer(tmp_path):
    """A float TIFF (values in [0, 1]) is written as its grey, not black; a non-UTF-8 caption sidecar is
    skipped and counted as bad_text_encoding (as the loader counts it), never written with U+FFFD."""
    import webdataset as wds

    from zerovl_lightning.data.sources import write_folder_shards

    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(np.full((16, 16), 0.5, np.float32)).save(src / "grey.tif")
    (src / "grey.txt").write_text("a grey square\n")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "black.png")
    (src / "black.txt").write_bytes(b"caf\xe9 latin-1\n")
    report = write_folder_shards(src, tmp_path / "out", progress=False)
    assert report.stats["num_samples"] == 1
    assert report.stats["skipped"]["bad_text_encoding"] == 1
    (sample,) = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    assert sample["txt"] == b"a grey square"
    pixels = _decode(sample["jpg"], "jpg")
    assert abs(int(pixels.mean()) - 128) <= 2


# ------------------------------------------------------------------------------------------- 10: disk
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(small_disk):
    from zerovl_lightning.errors import DiskError, known_error_message

    target = small_disk / "last.ckpt"
    ck.atomic_torch_save({"w": torch.zeros(1000)}, target)
    before = target.read_bytes()
    with pytest.raises(DiskError, match=r"last\.ckpt: checkpoint not written, the disk is full .*MiB free.*"
                       r"the previous checkpoint is kept") as exc:
        ck.atomic_torch_save({"w": torch.zeros(400_000)}, target)  # 1.6 MB > 1 MiB
    assert target.read_bytes() == before
    assert [p.name for p in small_disk.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert known_error_message(exc.value).startswith("DiskError: ")


def test_low_disk_space_is_warned_before_the_first_checkpoint(small_disk):
    model = torch.nn.Linear(1000, 1000)  # 4 MB of weights: ~24 MB with a temp file next to the kept one
    with pytest.warns(UserWarning, match=r"Only .* MiB free for checkpoints in .*small"):
        assert ck.warn_if_low_disk_space(small_disk / "checkpoints", 2 * ck.checkpoint_size_estimate(model))
    assert not ck.warn_if_low_disk_space(small_disk, 1000)


def test_eval_without_a_model_or_with_unknown_tasks_names_the_key():
    from zerovl_lightning.evaluate import build_evaluators
    from zerovl_lightning.export import load_dual_encoder

    with pytest.raises(ConfigError, match="give exactly one of ckpt_path, export_dir"):
        load_dual_encoder()
    with pytest.raises(ConfigError, match=r"tasks=\['retrival'\]: unknown \['retrival'\]"):
        build_evaluators(OmegaConf.create({"tasks": ["retrival"]}))
