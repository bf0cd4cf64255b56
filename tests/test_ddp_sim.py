"""``trainer=ddp_sim``: two CPU processes (gloo) train the smoke experiment — debiased sampling, mixup and DGA
under DDP — through the ``zerovl-train`` console script, as on a multi-GPU node."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_configs import write_smoke_data, zerovl_train


@pytest.mark.ddp
def test_ddp_sim_trains_a_few_steps_with_two_processes(tmp_path: Path) -> None:
    cache = write_smoke_data(tmp_path / "cache")
    run = tmp_path / "run"
    proc = zerovl_train(
        ["experiment=smoke", "trainer=ddp_sim", "trainer.max_steps=3", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        cache=cache,
    )
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    train = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in train] == [0, 1, 2]
    assert all(float(r["train/global_batch_size"]) == 2 * 8 for r in train)  # 2 ranks × data.batch_size
    assert all(float(r["train/sub_batches"]) == 2 for r in train)  # DGA: 8 / module.sub_batch_size
    assert all(float(r["train/loss"]) > 0 for r in train)
    evaluated = [r for r in rows if r.get("val/tuxpaint/rsum")]
    assert len(evaluated) == 1 and int(evaluated[0]["step"]) == 3
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
