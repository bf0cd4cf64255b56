"""Launcher facts: rank before the process group (SLURM too), global → per-rank batch, SLURM task counts,
one run folder per job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from shard_fixtures import write_source

from zerovl_lightning import world
from zerovl_lightning.checkpointing import remove_stale_temp_files
from zerovl_lightning.data.datamodule import ZeroVLDataModule
from zerovl_lightning.model import build_tiny

_RANK_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in (*_RANK_VARS, "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS_PER_NODE",
                "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_srun_tasks_other_than_rank_zero_leave_temp_files_alone(tmp_path: Path, clean_env: Any) -> None:
    """Under srun only SLURM_PROCID says the rank: task 3 must not delete (another task may be writing)."""
    tmp = tmp_path / ".last.ckpt.123-abcd.tmp"
    tmp.write_bytes(b"partial")
    clean_env.setenv("SLURM_PROCID", "3")
    assert not world.is_global_zero()
    assert remove_stale_temp_files(tmp_path) == [] and tmp.exists()
    clean_env.setenv("SLURM_PROCID", "0")
    assert world.is_global_zero()
    assert remove_stale_temp_files(tmp_path) == [tmp] and not tmp.exists()


def test_global_batch_per_rank_and_errors() -> None:
    assert world.per_rank_batch(1024, 16) == 64
    with pytest.raises(ValueError, match=r"data.global_batch_size=1000 is not divisible by the world size 16"):
        world.per_rank_batch(1000, 16)
    world.check_sub_batch(32, 64, "method.sub_batch_size", "x")
    with pytest.raises(ValueError, match=r"method.sub_batch_size=48 must divide the per-rank batch 64"):
        world.check_sub_batch(48, 64, "method.sub_batch_size", "data.global_batch_size=1024 over 16 ranks")


def test_datamodule_derives_the_per_rank_batch_from_the_world(tmp_path: Path) -> None:
    write_source(tmp_path / "s", "s", 64, 8)
    tiny = build_tiny()
    kw: dict[str, Any] = dict(sources={"s": str(tmp_path / "s")}, num_workers=1, global_batch_size=8,
                              tokenizer=tiny.tokenizer, preprocess_cfg=tiny.preprocess_cfg)
    dm = ZeroVLDataModule(world_size=4, rank=1, **kw)
    dm.setup("fit")
    assert dm.batch_size == 2 and dm.steps_per_epoch == 8  # 64 samples / global 8
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        ZeroVLDataModule(world_size=3, rank=0, **kw).setup("fit")


def test_tasks_per_node_parses_slurm_forms(clean_env: Any) -> None:
    assert world.tasks_per_node() == "auto"
    for raw in ("8", "8(x2)", "8(x2),8"):
        assert world.tasks_per_node(raw) == 8
    with pytest.raises(ValueError, match="different numbers of tasks"):
        world.tasks_per_node("8(x2),4")
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")
    assert world.tasks_per_node() == 4


def test_run_stamp_is_the_job_under_srun(clean_env: Any) -> None:
    clean_env.setenv("SLURM_JOB_ID", "4242")
    assert world.run_stamp() != "slurm_4242"  # a shell inside an allocation: not a task of a step
    clean_env.setenv("SLURM_STEP_ID", "0")
    assert world.run_stamp() == "slurm_4242"
    clean_env.setenv("SLURM_STEP_ID", "2")
    assert world.run_stamp() == "slurm_4242.2"
