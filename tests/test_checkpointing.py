"""Checkpoints: atomic writes survive kills, a corrupt newest checkpoint falls back to the previous one with a
warning naming both, retention keeps the newest k, epoch checkpoints resume without repeating a batch, RNG
states / grad scaler / guard counters / run ids come back, and a resumed wandb run keeps its id."""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from zerovl_lightning import checkpointing as ck
from zerovl_lightning.checkpointing import (
    AtomicCheckpointIO,
    BatchEndCheckpoint,
    CheckpointError,
    RNGStateCheckpoint,
    RunIdCheckpoint,
    atomic_torch_save,
    prepare_resume,
    resolve_ckpt_path,
)
from zerovl_lightning.guards import NonFiniteGuard

STEPS_PER_EPOCH = 6


class Noisy(L.LightningModule):
    """Linear regression whose loss uses torch, numpy and Python RNG draws, recorded per step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.draws: dict[int, tuple[float, float, float]] = {}
        self.xs: dict[int, float] = {}
        self.epochs: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        noise = torch.rand(1)
        self.draws[self.global_step] = (float(noise), float(np.random.rand()), random.random())
        self.xs[self.global_step] = float(batch[0][0, 0])
        self.epochs[self.global_step] = self.current_epoch
        return (self.layer(batch[0]) * (1 + noise)).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data() -> DataLoader:
    x = torch.arange(STEPS_PER_EPOCH * 4 * 4, dtype=torch.float32).view(-1, 4)
    return DataLoader(TensorDataset(x), batch_size=4)  # in order: epoch e's batch i is the same every epoch


def _fit(
    tmp_path: Path,
    steps: int,
    ckpt_path: str | None = None,
    every: int = 2,
    keep: int = 3,
    rng: bool = True,
    plugins: list | None = None,
    **trainer_kw,
) -> tuple[L.Trainer, Noisy]:
    module = Noisy()
    common = {
        "dirpath": tmp_path / "checkpoints",
        "save_last": True,
        "enable_version_counter": False,
        "auto_insert_metric_name": False,
    }
    callbacks = [  # as conf/callbacks/{step,model}_checkpoint.yaml
        BatchEndCheckpoint(
            filename="step_{step:06d}",
            every_n_train_steps=every,
            save_top_k=keep,
            monitor="step",
            mode="max",
            save_on_last_step=False,
            **common,
        ),
        BatchEndCheckpoint(
            filename="epoch_{epoch:03d}_step_{step:06d}", every_n_epochs=1, save_top_k=-1, **common
        ),
        RunIdCheckpoint(),
        NonFiniteGuard(),
    ]
    if rng:
        callbacks.append(RNGStateCheckpoint())
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=100,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *(plugins or [])],
        **trainer_kw,
    )
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return trainer, module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Noisy]:
    """8 steps (epoch = 6 steps), step checkpoints every 2 keeping 3, epoch checkpoints, last.ckpt."""
    root = tmp_path_factory.mktemp("ckpt_run")
    L.seed_everything(7)
    _, module = _fit(root, 8)
    return root, module


# --------------------------------------------------------------------------------------------- atomic writes
def test_atomic_save_replaces_the_whole_file(tmp_path):
    path = tmp_path / "a" / "x.ckpt"
    atomic_torch_save({"v": 1}, path)
    atomic_torch_save({"v": 2}, path)
    assert torch.load(path)["v"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.ckpt"]


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"v": "old"}, path)

    def half_then_die(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.atomic_io.torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"v": "new"}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temp file was cleaned up


# The child runs the exact source of atomic_torch_save, without importing Lightning (a 1 s start, not 10 s).
_WRITER = "\n".join(
    [
        "import contextlib, os, sys, uuid",
        "from pathlib import Path",
        "import torch",
        f"TMP_SUFFIX = {ck.TMP_SUFFIX!r}",
        "from typing import Any",
        "_PATH = str",
        inspect.getsource(ck.atomic_io._fsync_dir),
        inspect.getsource(ck.atomic_torch_save),
        textwrap.dedent("""
        blob = torch.randn(4_000_000)  # 16 MB: a write takes long enough to be hit
        i = 0
        while True:
            i += 1
            atomic_torch_save({"step": i, "blob": blob + i}, sys.argv[1])
            print(i, flush=True)
    """),
    ]
)


def test_sigkill_during_writes_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that rewrites one checkpoint in a loop, until a kill lands mid-write (a temp file is
    left behind): the checkpoint still loads, holding the last complete save."""
    path = tmp_path / "last.ckpt"
    hit_mid_write = False
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        done = int(proc.stdout.readline())  # at least one complete save exists
        time.sleep(random.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        ckpt = torch.load(path)
        assert ckpt["step"] >= done
        hit_mid_write = bool(ck.remove_stale_temp_files(tmp_path))
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
        if hit_mid_write:
            break
    assert hit_mid_write, "no kill landed during a write in 5 tries"


# --------------------------------------------------------------------------------------------- retention
def test_retention_keeps_newest_k_step_checkpoints(run):
    root, _ = run
    names = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert names == [
        "epoch_000_step_000006.ckpt",
        "epoch_001_step_000008.ckpt",
        "last.ckpt",
        "step_000004.ckpt",
        "step_000006.ckpt",
        "step_000008.ckpt",
    ]
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_checkpoint_holds_every_state_and_loads_weights_only(run):
    root, _ = run
    ckpt = torch.load(root / "checkpoints" / "step_000006.ckpt", weights_only=True)  # Trainer.fit's default
    assert ckpt["global_step"] == 6
    assert ckpt["optimizer_states"][0]["state"], "AdamW moments"
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 6
    callbacks = ckpt["callbacks"]
    rng = callbacks["RNGStateCheckpoint"]["per_rank"][0]
    assert set(rng) >= {"torch", "numpy", "python"}
    assert callbacks["NonFiniteGuard"] == {"skipped_steps": 0, "amp_overflow_steps": 0, "consecutive_skips": 0}
    assert callbacks["RunIdCheckpoint"] == {"run_ids": {}}  # logger=False


# --------------------------------------------------------------------------------------------- resume
def _copy_ckpts(run_root: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run_root / "checkpoints", dst / "checkpoints")
    for p in sorted((dst / "checkpoints").iterdir()):  # keep the original order of modification times
        os.utime(p, ns=(p.stat().st_mtime_ns, (run_root / "checkpoints" / p.name).stat().st_mtime_ns))
    return dst / "checkpoints"


def test_corrupt_newest_falls_back_with_warning(run, tmp_path):
    root, _ = run
    d = _copy_ckpts(root, tmp_path)
    last = d / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated by a crash
    with pytest.warns(
        UserWarning,
        match=r"Resuming from .*epoch_001_step_000008.ckpt instead of the unusable "
        r".*last.ckpt.*not a complete torch zip archive",
    ):
        assert resolve_ckpt_path("last", d) == str(d / "epoch_001_step_000008.ckpt")
    # bit rot in the data of the next one: the CRC check catches what torch.load would silently accept
    nxt = d / "epoch_001_step_000008.ckpt"
    data = bytearray(nxt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    nxt.write_bytes(bytes(data))
    (d / "step_000008.ckpt").write_bytes(b"")  # a zero-byte file
    with pytest.warns(UserWarning, match=r"Resuming from .*step_000006.ckpt instead of the unusable") as rec:
        chosen = resolve_ckpt_path("last", d)
    message = str(rec[0].message)
    for why in (
        "last.ckpt: not a complete torch zip",
        "epoch_001_step_000008.ckpt: CRC mismatch",
        "step_000008.ckpt: empty file",
    ):
        assert why in message
    assert chosen in {str(d / "step_000006.ckpt"), str(d / "epoch_000_step_000006.ckpt")}
    # ... and the run resumes from it
    trainer, module = _fit(tmp_path / "resumed", 10, ckpt_path=chosen)
    assert trainer.global_step == 10 and min(module.draws) == 6


def test_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"garbage")
    (tmp_path / "step_000002.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"No loadable checkpoint.*last.ckpt.*step_000002.ckpt"):
        resolve_ckpt_path("last", tmp_path)


def test_resolve_variants(run, tmp_path):
    root, _ = run
    d = _copy_ckpts(root, tmp_path)
    assert resolve_ckpt_path(None, d) is None
    assert resolve_ckpt_path("null", d) is None
    assert resolve_ckpt_path("best", d) == "best"
    with pytest.warns(UserWarning, match="no checkpoint in .*nowhere; starting from scratch"):
        assert resolve_ckpt_path("last", tmp_path / "nowhere") is None
    assert resolve_ckpt_path(str(tmp_path), None) == str(d / "last.ckpt")  # a run folder with checkpoints/
    assert resolve_ckpt_path(str(d / "step_000004.ckpt"), None) == str(d / "step_000004.ckpt")
    step6 = d / "step_000006.ckpt"
    step6.write_bytes(step6.read_bytes()[:1000])
    # falls back to a checkpoint not past the requested step (here the epoch checkpoint of the same step)
    with pytest.warns(UserWarning, match=r"Resuming from .*epoch_000_step_000006.ckpt instead of the unusable "):
        assert resolve_ckpt_path(str(step6), None) == str(d / "epoch_000_step_000006.ckpt")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        resolve_ckpt_path(str(d / "gone.ckpt"), None)
    stale = d / ".last.ckpt.123-abcd.tmp"
    stale.write_bytes(b"partial")
    resolve_ckpt_path("last", d)
    assert not stale.exists()


def test_epoch_checkpoint_resumes_without_repeating_a_batch(run, tmp_path):
    """Lightning replays a batch when resuming a save made in on_train_epoch_end; ours is made at the last
    batch, so the resumed run continues with epoch 1's first batch, exactly as the uninterrupted run."""
    root, uninterrupted = run
    d = _copy_ckpts(root, tmp_path)
    L.seed_everything(7)
    _, resumed = _fit(tmp_path / "r", 8, ckpt_path=str(d / "epoch_000_step_000006.ckpt"))
    assert sorted(resumed.xs) == [6, 7]
    assert resumed.xs == {s: uninterrupted.xs[s] for s in (6, 7)}  # epoch 1's first two batches
    assert resumed.xs[7] != resumed.xs[6]  # Lightning's epoch-end restore would replay batch 0 here
    assert resumed.epochs == {6: 1, 7: 1} == {s: uninterrupted.epochs[s] for s in (6, 7)}


def test_rng_states_come_back_before_the_first_resumed_step(run, tmp_path):
    root, uninterrupted = run
    d = _copy_ckpts(root, tmp_path)
    L.seed_everything(7)  # what train.run does; then model init, loaders etc. draw from the RNGs
    _, resumed = _fit(tmp_path / "r", 8, ckpt_path=str(d / "step_000004.ckpt"))
    assert resumed.draws == {s: uninterrupted.draws[s] for s in (4, 5, 6, 7)}
    # without the callback the draws differ: the test would notice a missing restore
    L.seed_everything(7)
    _, plain = _fit(tmp_path / "p", 8, ckpt_path=str(d / "step_000004.ckpt"), rng=False)
    assert plain.draws[4] != uninterrupted.draws[4]


def test_grad_scaler_state_round_trips(tmp_path):
    """fp16 AMP: the GradScaler's scale and growth tracker are in the checkpoint and restored."""

    def plugin() -> MixedPrecision:
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**20))

    first = plugin()
    _fit(tmp_path, 4, every=2, plugins=[first])
    saved = torch.load(tmp_path / "checkpoints" / "step_000004.ckpt", weights_only=True)["MixedPrecision"]
    assert saved["scale"] == first.scaler.get_scale() < 2.0**20  # it did back off: a real state to restore
    second = plugin()
    _fit(tmp_path / "r", 4, ckpt_path=str(tmp_path / "checkpoints" / "step_000004.ckpt"), plugins=[second])
    assert second.scaler.get_scale() == saved["scale"]
    assert second.scaler.state_dict()["_growth_tracker"] == saved["_growth_tracker"]


# --------------------------------------------------------------------------------------------- logger ids
def _fake_ckpt(path: Path, run_ids: dict[str, str]) -> None:
    torch.save(
        {
            "state_dict": {},
            "global_step": 3,
            "loops": {},
            "callbacks": {"RunIdCheckpoint": {"run_ids": run_ids}},
        },
        path,
    )


def test_prepare_resume_reopens_the_wandb_run(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    _fake_ckpt(d / "last.ckpt", {"WandbLogger": "abc123", "CSVLogger": ""})
    cfg = OmegaConf.create(
        {
            "ckpt_path": "last",
            "callbacks": {"model_checkpoint": {"dirpath": str(d)}},
            "logger": {
                "wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "id": None},
                "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger"},
            },
        }
    )
    OmegaConf.set_struct(cfg, True)  # as Hydra hands it over
    assert prepare_resume(cfg) == str(d / "last.ckpt")
    assert cfg.logger.wandb.id == "abc123" and cfg.logger.wandb.resume == "allow"
    assert "id" not in cfg.logger.csv
    cfg.logger.wandb.id = "mine"  # an explicit id wins
    prepare_resume(cfg)
    assert cfg.logger.wandb.id == "mine"
    cfg.ckpt_path = None
    assert prepare_resume(cfg) is None


@pytest.mark.slow  # starts wandb (offline) twice
def test_wandb_run_id_survives_resume(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="zerovl-test", save_dir=str(tmp_path), offline=True)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[RunIdCheckpoint(), BatchEndCheckpoint(dirpath=tmp_path / "checkpoints")],
    )
    trainer.fit(Noisy(), _data())
    run_id = logger.experiment.id
    import wandb

    wandb.finish()
    wandb_cfg = {
        "_target_": "lightning.pytorch.loggers.WandbLogger",
        "project": "zerovl-test",
        "save_dir": str(tmp_path),
        "offline": True,
        "id": None,
    }
    callbacks = {"c": {"dirpath": str(tmp_path / "checkpoints")}}
    cfg = OmegaConf.create({"ckpt_path": "last", "callbacks": callbacks, "logger": {"wandb": wandb_cfg}})
    prepare_resume(cfg)
    from hydra.utils import instantiate

    resumed = instantiate(cfg.logger.wandb)
    assert resumed.experiment.id == run_id
    wandb.finish()
