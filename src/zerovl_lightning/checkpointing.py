"""Checkpoints a killed run can trust: atomic writes, integrity-checked resume, RNG states and logger run ids.

Lightning already stores model, optimizer, LR schedule, grad scaler, loop progress (step) and the
``state_dict`` of every callback and of the DataModule (data sampling state). This module adds the rest:

- :class:`AtomicCheckpointIO` — write to a temporary file in the same folder, ``fsync``, ``os.replace``,
  ``fsync`` the folder: a kill at any moment leaves either the old file or the new one, never a torn one.
- :func:`resolve_ckpt_path` — ``ckpt_path=last`` / a folder / a file → the newest checkpoint that actually
  loads (zip CRCs checked, unpickled with ``weights_only=True``); a corrupt one is skipped with a warning.
- :class:`BatchEndCheckpoint` — Lightning's ``ModelCheckpoint`` that saves only at the end of a training batch
  (periodic steps, last batch of an epoch, last step), the one moment Lightning resumes from exactly.
- :class:`RNGStateCheckpoint` — torch (CPU, CUDA), numpy and Python RNG states, per rank.
- :class:`RunIdCheckpoint` + :func:`prepare_resume` — the logger run ids, so a resumed run logs into the same
  wandb run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, open_dict

from .world import is_global_zero

log = logging.getLogger(__name__)

CKPT_SUFFIX = ".ckpt"
TMP_SUFFIX = ".tmp"
_PASS_THROUGH = {"best", "hpc", "registry"}  # ckpt_path values Lightning resolves itself


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message lists what was tried and why it failed."""


# ------------------------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    """Make a rename durable: without this a power loss can forget the new directory entry."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows, some network filesystems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_local(path: _PATH) -> bool:
    s = str(path)
    return "://" not in s or s.startswith("file://")


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (temp file, fsync, rename, dir fsync)."""
    target = Path(str(path).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and not ending in .ckpt: neither Lightning's "last" lookup nor ours takes it for a checkpoint.
    tmp = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe local writes (remote URLs keep Lightning's way).

    Lightning's own save goes through an fsspec transaction (write + move) but never fsyncs, so after a node
    crash the renamed file can be empty or short. Pass it as ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            atomic_torch_save(checkpoint, path)


# ------------------------------------------------------------------------------------------- integrity
def check_checkpoint(path: _PATH) -> dict[str, Any]:
    """Load ``path`` the way a resume will, cheaply; raise :class:`CheckpointError` saying why it is unusable.

    Checks: non-empty; a complete zip (a truncated ``torch.save`` file loses its central directory); every
    member's CRC-32 (bit rot, torn writes; one sequential read of the file); unpickles with
    ``weights_only=True`` (what ``Trainer.fit`` does by default), memory-mapped so tensors are not copied;
    has the keys a resume needs. Returns the loaded dict
    (tensors memory-mapped; drop it when done).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{p}: cannot stat ({e})") from e
    if size == 0:
        raise CheckpointError(f"{p}: empty file (0 bytes)")
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{p}: not a complete torch zip archive ({size} bytes; truncated?): {e}") from e
    if bad is not None:
        raise CheckpointError(f"{p}: CRC mismatch in member {bad!r} (corrupt data)")
    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle makes the file unusable for resume
        raise CheckpointError(
            f"{p}: torch.load failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from e
    missing = [
        k for k in ("state_dict", "global_step", "loops") if not isinstance(ckpt, dict) or k not in ckpt
    ]
    if missing:
        raise CheckpointError(f"{p}: not a Lightning training checkpoint (missing {missing})")
    return ckpt


def _step_of(path: Path) -> int:
    m = re.search(r"step[_=-]?(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def list_checkpoints(directory: _PATH) -> list[Path]:
    """``*.ckpt`` files of a folder, newest first (by mtime; at equal times ``last*``, then higher step)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if p.suffix == CKPT_SUFFIX and p.is_file() and not p.name.startswith(".")]
    return sorted(
        files, key=lambda p: (p.stat().st_mtime_ns, p.stem.startswith("last"), _step_of(p)), reverse=True
    )


def _is_rank_zero() -> bool:
    return is_global_zero()  # Lightning's rank lookup: torchrun, SLURM (srun sets no RANK), LSF


def remove_stale_temp_files(directory: _PATH) -> list[Path]:
    """Delete temp files of writes killed mid-way (rank 0, before training); returns what it removed."""
    d = Path(directory)
    if not d.is_dir() or not _is_rank_zero():
        return []
    removed = []
    for p in d.glob(f".*{CKPT_SUFFIX}.*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    if removed:
        log.warning(
            "Removed %d partial checkpoint write(s) left by a killed run: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def newest_loadable(candidates: list[Path]) -> Path:
    """The first candidate that passes :func:`check_checkpoint`; warns naming the skipped and chosen files."""
    failures: list[str] = []
    for path in candidates:
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            failures.append(str(e))
            log.warning("Checkpoint unusable, trying an older one: %s", e)
            continue
        if failures:
            rank_zero_warn(
                f"Resuming from {path} instead of the newer {candidates[0]}, which is unusable: "
                + " | ".join(failures)
            )
        return path
    raise CheckpointError(
        "No loadable checkpoint among "
        + ", ".join(str(p) for p in candidates)
        + (": " + " | ".join(failures) if failures else "")
    )


def resolve_ckpt_path(cfg_value: str | os.PathLike | None, checkpoint_dir: _PATH | None) -> str | None:
    """Turn the ``ckpt_path`` setting into a checkpoint that loads, or ``None`` to start fresh.

    - ``None`` / ``""`` / ``"null"`` → ``None``.
    - ``"last"`` → the newest loadable ``*.ckpt`` in ``checkpoint_dir`` (``None`` with a warning when there is
      none, so a job script can always pass ``ckpt_path=last``: a first launch starts fresh, requeues resume).
    - a folder (a run's output folder with ``checkpoints/`` inside, or the checkpoints folder) → its newest
      loadable checkpoint; an error if it has none.
    - a file → that file if it loads, else the newest loadable checkpoint next to it whose name has a step
      not above the file's (any, when the name has no step), with a warning.
    - ``"best"``, ``"hpc"``, ``"registry"`` → passed through to Lightning unchanged.

    Newer-but-corrupt files (a node crash during a write on a filesystem that ignores fsync, a copy cut short)
    are skipped with a warning naming the skipped and the chosen file.
    """
    if cfg_value is None:
        return None
    value = str(cfg_value).strip()
    if value in {"", "null", "None"}:
        return None
    if value in _PASS_THROUGH or value.startswith("registry:"):
        return value
    if value == "last":
        if checkpoint_dir is None:
            raise CheckpointError("ckpt_path=last needs the run's checkpoint folder (callbacks.*.dirpath)")
        remove_stale_temp_files(checkpoint_dir)
        candidates = list_checkpoints(checkpoint_dir)
        if not candidates:
            rank_zero_warn(f"ckpt_path=last: no checkpoint in {checkpoint_dir}; starting from scratch")
            return None
        return str(newest_loadable(candidates))
    path = Path(value).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        remove_stale_temp_files(folder)
        candidates = list_checkpoints(folder)
        if not candidates:
            raise CheckpointError(f"ckpt_path={value}: no *{CKPT_SUFFIX} file in {folder}")
        return str(newest_loadable(candidates))
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={value}: no such file or folder")
    # Fall back only to checkpoints not past the requested one (by the step in their names); a corrupted file
    # has a fresh mtime, so times cannot tell "older" here.
    step = _step_of(path)
    older = [p for p in list_checkpoints(path.parent) if p.resolve() != path.resolve()]
    if step >= 0:
        older = [p for p in older if 0 <= _step_of(p) <= step]
    return str(newest_loadable([path, *older]))


# ------------------------------------------------------------------------------------------- when to save
class BatchEndCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves only in ``on_train_batch_end``, never at epoch or validation end.

    Why: Lightning (2.6) resumes a checkpoint written in ``on_train_epoch_end`` by running one more batch of
    the finished epoch (its loop counters say "epoch processed, not completed"), so a resumed run repeats a
    batch and drifts from the uninterrupted one. A checkpoint written at the end of the epoch's *last batch*
    holds the same weights and is resumed exactly. So this class moves the epoch trigger there:

    - ``every_n_train_steps=N``: after every N-th optimizer step (as ``ModelCheckpoint``);
    - ``every_n_epochs=E``: after the last batch of every E-th epoch;
    - ``save_on_last_step``: after the step that reaches ``trainer.max_steps`` (the run's final state).

    ``save_top_k`` / ``monitor`` / ``save_last`` keep their meaning (``monitor="step", mode="max",
    save_top_k=k`` keeps the newest k). ``train_time_interval`` keeps Lightning's handling.
    """

    def __init__(self, *args: Any, save_on_last_step: bool = True, **kwargs: Any) -> None:
        # True: Lightning never defers a batch-end save to validation end; our epoch hook below is a no-op.
        kwargs["save_on_train_epoch_end"] = True
        super().__init__(*args, **kwargs)
        self.save_on_last_step = save_on_last_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._train_time_interval is not None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_skip_saving_checkpoint(trainer) or not self._stepped(trainer, batch_idx):
            return
        if not (self._step_due(trainer) or self._epoch_due(trainer, batch_idx) or self._last_step(trainer)):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            rank_zero_warn(f"{type(self).__name__}: monitor {self.monitor!r} not logged; ranking by step")
            candidates[self.monitor] = torch.tensor(float(trainer.global_step))
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No save here: the epoch's checkpoint was written at its last batch (see the class docstring)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No save here either: a validation-end state is not a batch-end state."""

    @staticmethod
    def _is_last_batch(trainer: L.Trainer, batch_idx: int) -> bool:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return True
        total = trainer.num_training_batches
        return total != float("inf") and batch_idx + 1 >= total

    def _stepped(self, trainer: L.Trainer, batch_idx: int) -> bool:
        """False in the middle of gradient accumulation (no optimizer step happened on this batch)."""
        accumulate = trainer.accumulate_grad_batches
        return (batch_idx + 1) % accumulate == 0 or self._is_last_batch(trainer, batch_idx)

    def _step_due(self, trainer: L.Trainer) -> bool:
        n = self._every_n_train_steps
        return n >= 1 and trainer.global_step % n == 0

    def _epoch_due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        e = self._every_n_epochs
        return e >= 1 and (trainer.current_epoch + 1) % e == 0 and self._is_last_batch(trainer, batch_idx)

    def _last_step(self, trainer: L.Trainer) -> bool:
        return bool(self.save_on_last_step) and 0 < trainer.max_steps <= trainer.global_step


# ------------------------------------------------------------------------------------------- RNG states
def capture_rng_states() -> dict[str, Any]:
    """This process's torch/CUDA/numpy/Python RNG states, as types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": list(py_state),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            rank_zero_warn(
                f"Checkpoint holds {len(cuda)} CUDA RNG states, this machine has "
                f"{torch.cuda.device_count()} devices: CUDA RNG not restored"
            )


class RNGStateCheckpoint(L.Callback):
    """Saves every rank's RNG states with each checkpoint; puts them back right before the first resumed step.

    Restoring at ``on_train_batch_start`` (not at load time) matters: between loading and the first step
    Lightning builds dataloader iterators, which draw their worker base seed from the global torch RNG. The
    states are captured when the checkpoint is written (``on_train_batch_end`` of step s for step ckpts),
    so the resumed step s+1 draws exactly what the uninterrupted run drew, provided nothing between that hook
    and the next ``on_train_batch_start`` draws from the global RNGs in the main process (true when data
    randomness lives in loader workers or own generators, and no validation runs at that step).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._rank = 0
        self._world = 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank, self._world = trainer.global_rank, trainer.world_size

    def state_dict(self) -> dict[str, Any]:
        mine = capture_rng_states()
        if self._world > 1 and dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            # Checkpoints are dumped on every rank (only rank 0 writes), so a collective is safe here.
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("per_rank") or []
        if not states:
            return
        if len(states) != self._world:
            rank_zero_warn(
                f"Checkpoint has RNG states of {len(states)} ranks, this run has {self._world}: "
                "every rank gets rank 0's states (randomness will not replay exactly)"
            )
        self._pending = states[self._rank] if len(states) == self._world else states[0]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None


# ------------------------------------------------------------------------------------------- logger run ids
def logger_run_ids(trainer: L.Trainer) -> dict[str, str]:
    """``{logger class name: run id / version}`` of the trainer's loggers (wandb: the run id)."""
    ids: dict[str, str] = {}
    for lg in trainer.loggers:
        version = getattr(lg, "version", None)
        if version is not None and version != "":
            ids[type(lg).__name__] = str(version)
    return ids


class RunIdCheckpoint(L.Callback):
    """Stores the loggers' run ids in each checkpoint: :func:`prepare_resume` reopens the same wandb run."""

    def __init__(self) -> None:
        self.run_ids: dict[str, str] = {}
        self.resumed_from: dict[str, str] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            self.run_ids = logger_run_ids(trainer)
        return {"run_ids": dict(self.run_ids)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resumed_from = dict(state_dict.get("run_ids", {}))


def read_run_ids(checkpoint: Mapping[str, Any] | _PATH) -> dict[str, str]:
    """Run ids stored by :class:`RunIdCheckpoint` in a checkpoint (a loaded dict or a path)."""
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else check_checkpoint(checkpoint)
    state = (ckpt.get("callbacks") or {}).get(RunIdCheckpoint.__qualname__) or {}
    return dict(state.get("run_ids", {}))


def checkpoint_dir_of(cfg: DictConfig) -> str | None:
    """The run's checkpoint folder: ``dirpath`` of the first checkpoint entry of ``cfg.callbacks``."""
    for node in (cfg.get("callbacks") or {}).values():
        if isinstance(node, DictConfig) and node.get("dirpath"):
            return str(node.dirpath)
    out = cfg.get("paths", {}).get("output_dir")
    return str(Path(str(out)) / "checkpoints") if out else None


def prepare_resume(cfg: DictConfig) -> str | None:
    """Resolve ``cfg.ckpt_path`` to a loadable checkpoint and point a wandb logger at the checkpoint's run.

    Call before instantiating loggers. Sets ``cfg.logger.<wandb>.id`` (unless already set) and
    ``resume="allow"`` when the checkpoint recorded a ``WandbLogger`` run id.
    Returns the checkpoint path for ``trainer.fit``.
    """
    path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir_of(cfg))
    if path is None or path in _PASS_THROUGH or not Path(path).is_file():
        return path
    run_id = read_run_ids(path).get("WandbLogger")
    loggers = cfg.get("logger") or {}
    for name, node in loggers.items():
        if not (isinstance(node, DictConfig) and "WandbLogger" in str(node.get("_target_", ""))):
            continue
        with open_dict(node):
            if run_id and not node.get("id"):
                node.id = run_id
                log.info("Resuming wandb run %s (logger.%s.id)", run_id, name)
            if node.get("id"):
                node.resume = node.get("resume") or "allow"
    return path
