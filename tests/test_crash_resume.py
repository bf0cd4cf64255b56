"""Crash test: a training process SIGKILLed at a random step after a checkpoint resumes with
``ckpt_path=last`` and continues exactly like an uninterrupted run — same losses, same samples, bitwise the
same parameters.

Both runs go through ``zerovl_lightning.train.run`` on the shipped configs (``callbacks=default``: epoch and
step checkpoints, RNG states, run ids, the non-finite guard) with the real ``ZeroVLDataModule`` (two sources,
two loader workers, debiased sampling, augmentation), so the data sampling state, the LR schedule, the
optimizer moments and the mixup/DGA path all have to come back from the checkpoint. CPU fp32 with one thread
is deterministic, so the comparison is exact (``float.hex`` of every loss, ``torch.equal`` of every tensor).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from crash_worker import overrides
from shard_fixtures import write_source

TESTS = Path(__file__).parent
MAX_STEPS = 20
EVERY = 4  # step checkpoint interval
KEEP = 2
# A tight temperature range and a high LR make the learnable temperature hit its clamp within a few steps, so
# the test also checks that the clamp belongs to the checkpointed state of a step.
CLAMPED = ["model.temperature_range=[0.06995,0.07005]", "module.optimizer.lr=1e-3"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("crash_shards")
    write_source(root / "a", "a", 40, 10)
    write_source(root / "b", "b", 24, 8)
    return {"a": str(root / "a"), "b": str(root / "b")}


def _launch(
    out: Path,
    record: Path,
    sources: dict[str, str],
    extra: list[str],
    hold_at: int | None = None,
    log_name: str = "worker",
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if hold_at is not None:
        env["ZEROVL_HOLD_AT_STEP"] = str(hold_at)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(TESTS / "crash_worker.py"),
        *overrides(out, record, sources, max_steps=MAX_STEPS, every_n_steps=EVERY, keep=KEEP, extra=extra),
    ]
    log = open(out / f"{log_name}.log", "w")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(cmd, cwd=TESTS, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, out: Path, name: str, timeout: float = 300) -> None:
    rc = proc.wait(timeout=timeout)
    proc.log.close()  # type: ignore[attr-defined]
    if rc != 0:
        tail = (out / f"{name}.log").read_text()[-4000:]
        pytest.fail(f"{name} run exited with {rc}:\n{tail}")


def _records(path: Path) -> dict[int, tuple[str, str]]:
    """step -> (loss hex, sample keys); a line cut by the kill is dropped."""
    rows: dict[int, tuple[str, str]] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        if len(parts) == 3:
            rows[int(parts[0])] = (parts[1], parts[2])
    return rows


def _kill_after(proc: subprocess.Popen, record: Path, step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _records(record)
        if done and max(done) >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.log.close()  # type: ignore[attr-defined]
            return max(_records(record))
        if proc.poll() is not None:
            pytest.fail(f"run to be killed exited by itself with {proc.returncode} before step {step}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"run did not reach step {step} in {timeout} s")


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(CLAMPED, id="plain-step"),
        pytest.param(
            [*CLAMPED, "++module.sub_batch_size=4", "++module.mixup.enabled=true"],
            id="dga-mixup",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, sources, extra):
    # A random step after the first step checkpoint; ZEROVL_CRASH_KILL_STEP=k replays a failure.
    kill_step = int(os.environ.get("ZEROVL_CRASH_KILL_STEP") or random.randint(EVERY + 1, MAX_STEPS - 2))
    ctx = f"(killed after step {kill_step}; ZEROVL_CRASH_KILL_STEP={kill_step} reproduces)"
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "crashed"
    ref_rec, crash_rec, resume_rec = tmp_path / "ref.txt", tmp_path / "crash.txt", tmp_path / "resume.txt"

    ref = _launch(ref_dir, ref_rec, sources, extra, log_name="reference")
    crash = _launch(run_dir, crash_rec, sources, extra, hold_at=MAX_STEPS - 1, log_name="crashed")
    killed_at = _kill_after(crash, crash_rec, kill_step)
    _finish(ref, ref_dir, "reference")
    resume = _launch(run_dir, resume_rec, sources, [*extra, "ckpt_path=last"], log_name="resumed")
    _finish(resume, run_dir, "resumed")

    reference, before, after = _records(ref_rec), _records(crash_rec), _records(resume_rec)
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    for step, row in before.items():  # the two processes are deterministic twins up to the kill
        assert row == reference[step], f"step {step} differs before the kill {ctx}"
    first = min(after)
    assert 1 < first <= killed_at + 1, f"resumed at step {first}, killed after {killed_at} {ctx}"
    assert killed_at - (first - 1) <= EVERY, f"lost more than one checkpoint interval {ctx}"
    assert sorted(after) == list(range(first, MAX_STEPS + 1)), ctx
    for step in sorted(after):
        assert after[step][1] == reference[step][1], f"step {step}: different samples after resume {ctx}"
        got, want = float.fromhex(after[step][0]), float.fromhex(reference[step][0])
        assert after[step][0] == reference[step][0], f"step {step}: loss {got!r} != {want!r} {ctx}"
    final, expected = torch.load(run_dir / "final.pt"), torch.load(ref_dir / "final.pt")
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), f"{name} differs after resume {ctx}"

    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob(".*.tmp")), "a partial checkpoint write was left behind"
    assert len(list(ckpts.glob("step_*.ckpt"))) <= KEEP + 1  # + the one resumed from, which Lightning keeps
    ckpt = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)  # what Trainer.fit loads
    assert ckpt["global_step"] == MAX_STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "ZeroVLDataModule", "mixup"):
        assert key in ckpt, key
    assert ckpt["ZeroVLDataModule"]["ranks"][0]["positions"], "data sampling positions missing"
    callbacks = ckpt["callbacks"]
    for name in ("RNGStateCheckpoint", "RunIdCheckpoint", "NonFiniteGuard"):
        assert name in callbacks, name
    assert callbacks["RunIdCheckpoint"]["run_ids"] == {}  # CSVLogger(version="") has no run id to keep
    shutil.rmtree(ref_dir / "checkpoints")  # ~40 MB each; keep logs for inspection
    shutil.rmtree(ckpts)
