"""validate_config: each impossible setting fails before any work with one ConfigError naming its key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from shard_fixtures import write_source

from zerovl_lightning.config_checks import ConfigError, validate_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cfg_shards")
    write_source(root / "a", "a", 8, 4)
    write_source(root / "b", "b", 8, 4)
    return {"a": str(root / "a"), "b": str(root / "b")}


def _cfg(tmp_path: Path, shards: dict[str, str], **overrides):
    base = {
        "paths": {"output_dir": str(tmp_path / "run")},
        "ckpt_path": None,
        "data": {
            "_target_": "zerovl_lightning.data.datamodule.ZeroVLDataModule",
            "sources": {name: {"path": p} for name, p in shards.items()},
            "sampling": "debias",
            "weights": "size",
            "batch_size": 8,
            "num_workers": 0,
        },
        "module": {"sub_batch_size": None},
        "trainer": {"accumulate_grad_batches": 1, "gradient_clip_val": None},
        "callbacks": {"model_checkpoint": {"dirpath": str(tmp_path / "run" / "checkpoints")}},
    }
    cfg = OmegaConf.create(base)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def test_good_config_passes(tmp_path, shards):
    validate_config(_cfg(tmp_path, shards))
    validate_config(_cfg(tmp_path, shards, **{"module.sub_batch_size": 4, "data.weights": {"a": 1, "b": 3}}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"module.sub_batch_size": 3},
            r"module.sub_batch_size=3 must be a positive divisor of data.batch_size=8 .*e.g. 8, 4, 2, 1",
        ),
        ({"module.sub_batch_size": 16}, r"module.sub_batch_size=16 must be a positive divisor"),
        ({"module.sub_batch_size": 0}, r"module.sub_batch_size=0 must be positive"),
        ({"data.batch_size": 0}, r"data.batch_size=0 must be positive"),
        ({"data.batch_size": 7.5}, r"data.batch_size=7.5 must be an integer"),
        (
            {"module.sub_batch_size": 4, "trainer.accumulate_grad_batches": 2},
            r"trainer.accumulate_grad_batches=2 cannot be combined with module.sub_batch_size",
        ),
        (
            {"module.sub_batch_size": 4, "trainer.gradient_clip_val": 1.0},
            r"trainer.gradient_clip_val=1.0 does not apply under DGA.*module.dga.gradient_clip_val",
        ),
        ({"data.num_workers": -1}, r"data.num_workers=-1 must be >= 0"),
    ],
    ids=[
        "sub-not-divisor",
        "sub-larger",
        "sub-zero",
        "batch-zero",
        "batch-float",
        "dga-accumulate",
        "dga-clip",
        "workers",
    ],
)
def test_impossible_batches(tmp_path, shards, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(tmp_path, shards, **overrides))


def test_missing_shards(tmp_path, shards):
    missing = str(tmp_path / "nowhere" / "shard-{000000..000003}.tar")
    with pytest.raises(ConfigError, match=r"data.sources.b.path=.*nowhere.*not found"):
        validate_config(_cfg(tmp_path, shards, **{"data.sources.b.path": missing}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"data.sources.a.path=.*no \*\.tar shards in directory"):
        validate_config(_cfg(tmp_path, shards, **{"data.sources.a.path": str(empty)}))
    with pytest.raises(ConfigError, match=r"data.sources is empty"):
        validate_config(_cfg(tmp_path, shards, **{"data.sources": {}}))


def test_unknown_sources(tmp_path, shards):
    msg = r"data.weights names unknown source\(s\) \['c'\]; data.sources has \['a', 'b'\]"
    with pytest.raises(ConfigError, match=msg):
        validate_config(_cfg(tmp_path, shards, **{"data.weights": {"a": 1, "c": 2}}))
    with pytest.raises(ConfigError, match=r"data.order names unknown source\(s\) \['z'\]"):
        validate_config(_cfg(tmp_path, shards, **{"data.order": ["a", "z"]}))
    with pytest.raises(ConfigError, match=r"data.sampling='debiased' is unknown"):
        validate_config(_cfg(tmp_path, shards, **{"data.sampling": "debiased"}))
    with pytest.raises(ConfigError, match=r"data.sources.a: unknown key\(s\) \['pth'\]"):
        validate_config(_cfg(tmp_path, shards, **{"data.sources.a": {"pth": shards["a"]}}))
    with pytest.raises(ConfigError, match=r"data.weights=explicit needs data.sources.<name>.weight"):
        validate_config(_cfg(tmp_path, shards, **{"data.weights": "explicit"}))


def test_unwritable_output_folder(tmp_path, shards):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"paths.output_dir=.*a_file/run is not a writable folder"):
        validate_config(_cfg(tmp_path, shards, **{"paths.output_dir": str(blocker / "run")}))
    with pytest.raises(ConfigError, match=r"callbacks.model_checkpoint.dirpath=.*is not a writable folder"):
        validate_config(_cfg(tmp_path, shards, **{"callbacks.model_checkpoint.dirpath": str(blocker / "ck")}))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_folder(tmp_path, shards):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"paths.output_dir=.*ro/run is not a writable folder"):
        validate_config(_cfg(tmp_path, shards, **{"paths.output_dir": str(ro / "run")}))


def test_missing_checkpoint(tmp_path, shards):
    with pytest.raises(ConfigError, match=r"ckpt_path=.*gone.ckpt does not exist"):
        validate_config(_cfg(tmp_path, shards, ckpt_path=str(tmp_path / "gone.ckpt")))
    validate_config(_cfg(tmp_path, shards, ckpt_path="last"))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="zerovl_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_shipped_configs(tmp_path, monkeypatch):
    """The real conf/: the demo data without built shards, and a paper experiment without sources."""
    monkeypatch.setenv("ZEROVL_CACHE", str(tmp_path / "no-cache"))
    paths = [f"paths.{k}={tmp_path}" for k in ("root_dir", "output_dir", "work_dir")]
    with pytest.raises(ConfigError, match=r"data.sources.\w+.path=.*not found.*zerovl-data demo"):
        validate_config(_compose(paths))
    with pytest.raises(ConfigError, match=r"data.sources (is not set|is empty)"):
        validate_config(_compose([*paths, "experiment=zerovl_14m"]))
