"""Checkpoints a killed run can trust: atomic writes, integrity-checked resume, RNG states and logger run ids.

Lightning already stores model, optimizer, LR schedule, grad scaler, loop progress (step) and the
``state_dict`` of every callback and of the DataModule (data sampling state). This module adds the rest:

- :class:`AtomicCheckpointIO` — write to a temporary file in the same folder, ``fsync``, ``os.replace``,
  ``fsync`` the folder: a kill at any moment leaves either the old file or the new one, never a torn one.
- :func:`resolve_ckpt_path` — ``ckpt_path=last`` / a folder / a file → the checkpoint with the highest
  training step *stored in it* that actually loads (zip CRCs checked, unpickled with ``weights_only=True``); a
  corrupt one is skipped with a warning. Chosen on global rank 0 and handed to the ranks it launches.
- :class:`BatchEndCheckpoint` — Lightning's ``ModelCheckpoint`` that saves only at the end of a training batch
  (periodic steps, last batch of an epoch, last step), the one moment Lightning resumes from exactly.
- :class:`RNGStateCheckpoint` — torch (CPU, CUDA), numpy and Python RNG states, per rank.
- :class:`RunIdCheckpoint` + :func:`prepare_resume` — the logger run ids, so a resumed run logs into the same
  wandb run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import re
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, open_dict

from zerovl_lightning.errors import DiskError

from .world import is_global_zero, launcher_rank

log = logging.getLogger(__name__)

CKPT_SUFFIX = ".ckpt"
TMP_SUFFIX = ".tmp"
_PASS_THROUGH = {"best", "hpc", "registry"}  # ckpt_path values Lightning resolves itself
# Rank 0's choice, for the ranks Lightning's launcher starts from it (they inherit the environment).
RESOLVED_ENV = "ZEROVL_RESOLVED_CKPT_PATH"
_UNCHANGED_UNTIL_NEXT_STEP = {"state_dict", "optimizer_states"}  # checkpoint keys held by reference


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
    try:
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
    except (OSError, RuntimeError) as e:
        disk = _disk_problem(e, target.parent)
        if disk is None:
            raise
        kept = " the previous checkpoint is kept;" if target.exists() else ""
        raise DiskError(
            f"{target}: checkpoint not written, {disk};{kept} free space or point callbacks.*.dirpath "
            "(paths.output_dir) at another disk"
        ) from e
    _fsync_dir(target.parent)


def _disk_problem(exc: BaseException, folder: Path) -> str | None:
    """Say plainly when a failed write was the disk's fault (torch reports ENOSPC as "file write failed")."""
    import errno
    import shutil

    errnos, cur, torch_writer = set(), exc, False
    for _ in range(8):  # torch's writer raises RuntimeError("[enforce fail at inline_container.cc…") from ENOSPC
        if cur is None:
            break
        errnos.add(getattr(cur, "errno", None))
        torch_writer |= isinstance(cur, RuntimeError) and any(
            w in str(cur) for w in ("inline_container", "PytorchStreamWriter", "write failed")
        )
        cur = cur.__cause__ or cur.__context__
    if errno.EROFS in errnos:
        return f"{folder} is on a read-only file system"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if errnos & {errno.ENOSPC, errno.EDQUOT} or (torch_writer and free is not None and free < 64 * 2**20):
        return "the disk is full" + (f" ({free / 2**20:.1f} MiB free on {folder})" if free is not None else "")
    return None


def checkpoint_size_estimate(module: torch.nn.Module) -> int:
    """Bytes of a training checkpoint of ``module``: weights plus two optimizer moments (AdamW)."""
    return 3 * sum(p.numel() * p.element_size() for p in module.parameters())


def warn_if_low_disk_space(folder: _PATH, needed: int) -> bool:
    """Warn (once, before the first save) when ``folder`` has less than ``needed`` bytes free."""
    import shutil

    d = Path(folder)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return False
    if free >= needed:
        return False
    rank_zero_warn(
        f"Only {free / 2**20:.1f} MiB free for checkpoints in {folder}; a checkpoint needs about "
        f"{needed / 2**20:.1f} MiB (written next to the previous one): free space or set callbacks.*.dirpath"
    )
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe local writes (remote URLs keep Lightning's way).

    Lightning's own save goes through an fsspec transaction (write + move) but never fsyncs, so after a node
    crash the renamed file can be empty or short. Pass it as ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            atomic_torch_save(checkpoint, path)


# ------------------------------------------------------------------------------------------- integrity
def check_archive(path: _PATH) -> Path:
    """Raise :class:`CheckpointError` unless ``path`` is a complete ``torch.save`` zip with intact CRCs."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file; give the path of a .ckpt file (or `last` to resume)")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a checkpoint file")
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
        raise CheckpointError(
            f"{p}: not a complete torch zip archive ({size} bytes; truncated, or not a checkpoint?): {e}"
        ) from e
    if bad is not None:
        raise CheckpointError(f"{p}: CRC mismatch in member {bad!r} (corrupt data)")
    return p


def check_checkpoint(path: _PATH) -> dict[str, Any]:
    """Load ``path`` the way a resume will, cheaply; raise :class:`CheckpointError` saying why it is unusable.

    Checks: non-empty; a complete zip (a truncated ``torch.save`` file loses its central directory); every
    member's CRC-32 (bit rot, torn writes; one sequential read of the file); unpickles with
    ``weights_only=True`` (what ``Trainer.fit`` does by default), memory-mapped so tensors are not copied;
    has the keys a resume needs. Returns the loaded dict
    (tensors memory-mapped; drop it when done).
    """
    p = check_archive(path)
    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle makes the file unusable for resume
        raise CheckpointError(f"{p}: torch.load failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    missing = [k for k in ("state_dict", "global_step", "loops") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{p}: not a Lightning training checkpoint (missing {missing})")
    return ckpt


def _step_of(path: Path) -> int:
    m = re.search(r"step[_=-]?(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def stored_step(path: _PATH) -> int:
    """The ``global_step`` recorded inside a checkpoint (cheap: tensors memory-mapped), -1 when unreadable."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", mmap=True, weights_only=True)
        return int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - unreadable files sort last; check_checkpoint says why later
        return -1


def list_checkpoints(directory: _PATH) -> list[Path]:
    """``*.ckpt`` files of a folder, most trained first: by the training step stored in each file (never by
    modification time, which ``cp -r`` or ``touch`` changes); at equal steps ``last*`` first, then by name."""
    d = Path(directory)
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if p.suffix == CKPT_SUFFIX and p.is_file() and not p.name.startswith(".")]
    steps = {p: stored_step(p) for p in files}
    return sorted(files, key=lambda p: (-steps[p], not p.stem.startswith("last"), p.name))


def _global_rank() -> int:
    """This process's global rank as Lightning detects it (RANK, SLURM_PROCID, LOCAL_RANK, ...)."""
    return launcher_rank()


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
    """The first candidate that passes :func:`check_checkpoint`; warns naming the unusable and chosen files.

    Candidates whose stored step cannot be read (truncated, garbage) sort last in :func:`list_checkpoints`;
    they are checked too, so the warning names every unusable file, wherever it sorted.
    """
    failures: list[str] = []
    chosen: Path | None = None
    for path in candidates:
        if chosen is not None and stored_step(path) >= 0:
            continue
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            failures.append(str(e))
            log.warning("Checkpoint unusable: %s", e)
            continue
        if chosen is None:
            chosen = path
    if chosen is None:
        raise CheckpointError(
            "No loadable checkpoint among "
            + ", ".join(str(p) for p in candidates)
            + (": " + " | ".join(failures) if failures else "")
        )
    if failures:
        rank_zero_warn(f"Resuming from {chosen} instead of the unusable " + " | ".join(failures))
    return chosen


def resolve_ckpt_path(cfg_value: str | os.PathLike | None, checkpoint_dir: _PATH | None) -> str | None:
    """Turn the ``ckpt_path`` setting into a checkpoint that loads, or ``None`` to start fresh.

    - ``None`` / ``""`` / ``"null"`` → ``None``.
    - ``"last"`` → the loadable ``*.ckpt`` of ``checkpoint_dir`` with the highest stored step (``None`` with
      a warning when there is none, so a job script can always pass ``ckpt_path=last``: a first launch starts
      fresh, requeues resume).
    - a folder (a run's output folder with ``checkpoints/`` inside, or the checkpoints folder) → its loadable
      checkpoint with the highest stored step; an error if it has none.
    - a file → that file if it loads, else the most trained loadable checkpoint next to it whose stored step
      is not above the file's (any, when the file's step is unknown), with a warning.

    Steps come from inside the files, never from modification times (``cp -r`` and ``touch`` change those).
    Global rank 0 (Lightning's rank detection: ``RANK``, ``SLURM_PROCID``, ``LOCAL_RANK``) resolves and logs
    "Resuming from <file> (global step N)"; the choice is put in ``$ZEROVL_RESOLVED_CKPT_PATH``, which the
    ranks Lightning's DDP launcher starts from rank 0 inherit and use as is. Ranks started by an external
    launcher (torchrun, SLURM) resolve on their own from the same files, which gives the same choice because
    it depends only on the files' contents.
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
    shared = os.environ.get(RESOLVED_ENV)
    if shared and _global_rank() != 0 and Path(shared).is_file():
        return shared  # rank 0 chose before launching this process (Lightning's DDP launcher)
    chosen = _resolve(value, checkpoint_dir)
    if chosen is not None and _global_rank() == 0:
        os.environ[RESOLVED_ENV] = chosen  # inherited by the ranks Lightning launches from this process
        log.info("Resuming from %s (global step %d)", chosen, stored_step(chosen))
    return chosen


def _resolve(value: str, checkpoint_dir: _PATH | None) -> str | None:
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
    step = stored_step(path)
    step = step if step >= 0 else _step_of(path)  # an unreadable file: the step in its name, if any
    older = [p for p in list_checkpoints(path.parent) if p.resolve() != path.resolve()]
    if step >= 0:
        older = [p for p in older if 0 <= stored_step(p) <= step]
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

    The state is *taken* at the batch end but *written* (with the removals of the files it replaces) right
    after Lightning has logged that batch, at the next hook (next batch, validation, epoch or train end, or an
    exception), the loggers flushed first. So a kill at any moment leaves every row logged before the newest
    checkpoint on disk: Lightning logs a batch's training metrics after ``on_train_batch_end``, and a
    checkpoint written there would let a kill lose that row (the resumed run starts after it). Nothing
    changes the weights or the optimizer state between the two moments (the next optimizer step comes after
    the next ``on_train_batch_start``); the other states are copied when taken.
    """

    def __init__(self, *args: Any, save_on_last_step: bool = True, **kwargs: Any) -> None:
        # True: Lightning never defers a batch-end save to validation end; our epoch hook below is a no-op.
        kwargs["save_on_train_epoch_end"] = True
        super().__init__(*args, **kwargs)
        self.save_on_last_step = save_on_last_step
        # The epoch of the validation that follows the batch being saved (stored in the checkpoint being
        # written), and the one read from the checkpoint resumed from; None: no validation pending.
        self._validation_follows: int | None = None
        self._validation_pending: int | None = None
        self._queued: list[tuple[str, str, dict[str, Any] | None]] = []  # ("save" | "remove", path, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "validation_follows": self._validation_follows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._validation_pending = state_dict.get("validation_follows")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero and self.dirpath:
            # a temp file next to the kept one: twice the size must fit
            warn_if_low_disk_space(self.dirpath, 2 * checkpoint_size_estimate(pl_module))
        if self._validation_pending is not None:
            epoch, self._validation_pending = self._validation_pending, None
            run_pending_validation(trainer, epoch)

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
        self._validation_follows = trainer.current_epoch if validation_follows(trainer) else None
        try:
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        finally:
            self._validation_follows = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No new save here (the epoch's checkpoint is its last batch's, see the class docstring)."""
        self._write_queued(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No save here either: a validation-end state is not a batch-end state."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._write_queued(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_queued(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._write_queued(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._write_queued(trainer)  # the state taken at the last batch end is sound whatever failed after it

    # Lightning's ModelCheckpoint bookkeeping calls these two; they queue instead of touching the disk.
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)  # every rank
        # Weights and optimizer tensors stay references (unchanged until the next step); everything else is
        # copied now (callback histories, loop counters, data position move on before the write).
        checkpoint = {k: v if k in _UNCHANGED_UNTIL_NEXT_STEP else copy.deepcopy(v) for k, v in checkpoint.items()}
        self._queued.append(("save", filepath, checkpoint))
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self._queued.append(("remove", filepath, None))

    def _write_queued(self, trainer: L.Trainer) -> None:
        if not self._queued:
            return
        for logger in trainer.loggers:
            logger.save()  # the rows logged before this state was taken reach the disk first
        queued, self._queued = self._queued, []
        for action, filepath, checkpoint in queued:
            if action == "remove":
                trainer.strategy.remove_checkpoint(filepath)
                continue
            trainer.strategy.save_checkpoint(checkpoint, filepath)  # rank 0 writes
            trainer.strategy.barrier("BatchEndCheckpoint.save")
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _is_last_batch(trainer: L.Trainer, batch_idx: int) -> bool:
        return is_last_batch(trainer, batch_idx)

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


def is_last_batch(trainer: L.Trainer, batch_idx: int | None = None) -> bool:
    """Whether the current training batch (``batch_idx`` of its epoch, default: the loop's count) ends the epoch."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch:
        return True
    total = trainer.num_training_batches
    index = progress.current.ready - 1 if batch_idx is None else batch_idx
    return total != float("inf") and index + 1 >= total


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch (at its ``on_advance_end``)."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    return fetcher is not None and bool(loop._should_check_val_fx(fetcher))


def run_pending_validation(trainer: L.Trainer, epoch: int) -> None:
    """Run the validation a resumed checkpoint was written just before (the killed run's record of it is lost).

    Lightning resumes a batch-end checkpoint *after* the validation that followed that batch (its loop counters
    are fast-forwarded past it), so without this the resumed run never writes that validation's record, and
    ``ModelCheckpoint(monitor="val/...")`` / early stopping never see it. Called at ``on_train_start``, before
    the first resumed batch, exactly where the uninterrupted run validated, as epoch ``epoch`` (the resumed
    loop already counts the next one) and at the same logged step (``_batches_that_stepped`` is not yet
    advanced). Evaluation loaders must not draw from the global RNGs (ours use their own generator), so the
    training randomness after it is unchanged.
    """
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.restarting = False  # a fresh validation, not the continuation of an interrupted one
    progress = trainer.fit_loop.epoch_progress.current
    resumed_epoch, progress.completed = progress.completed, epoch  # trainer.current_epoch during it
    trainer.validating = True
    try:
        val_loop.run()
    finally:
        trainer.training = True
        progress.completed = resumed_epoch


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
    """Saves every rank's RNG states with each checkpoint; puts them back where the killed run drew next.

    The states are captured when the checkpoint is written (``on_train_batch_end`` of step s). Where the next
    draw happens decides when they go back:

    - mid-epoch: at ``on_train_batch_start`` of the resumed step s+1, not at load time — in between Lightning
      rebuilds the (resumed) dataloader iterator, which draws its worker base seed from the global torch RNG,
      a draw the uninterrupted run made at the start of the epoch, not here;
    - at the last batch of an epoch: at load time, because the next epoch's iterator (its shuffle, its base
      seed) is the uninterrupted run's next draw, and Lightning builds it before any hook of the resumed run.

    Exact provided nothing between that hook and the next draw point uses the global RNGs in the main process
    (true when data randomness lives in loader workers or own generators, evaluation loaders included).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._rank = 0
        self._world = 1
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        mine = capture_rng_states()
        if self._world > 1 and dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            # Checkpoints are dumped on every rank (only rank 0 writes), so a collective is safe here.
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        epoch_end = self._trainer is not None and self._trainer.training and is_last_batch(self._trainer)
        return {"per_rank": states, "epoch_end": epoch_end}

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
        if state_dict.get("epoch_end"):
            restore_rng_states(self._pending)  # before Lightning builds the next epoch's iterator
            self._pending = None

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
    """Resolve ``cfg.ckpt_path`` to a loadable checkpoint; loggers continue their history from its step.

    Call before instantiating loggers. CSV and TensorBoard loggers get the checkpoint's step
    (:func:`zerovl_lightning.logger_resume.configure_logger_resume`). Sets ``cfg.logger.<wandb>.id`` (unless
    already set) and ``resume="allow"`` when the checkpoint recorded a ``WandbLogger`` run id.
    Returns the checkpoint path for ``trainer.fit``.
    """
    from zerovl_lightning.logger_resume import configure_logger_resume

    path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir_of(cfg))
    if path is None or path in _PASS_THROUGH or not Path(path).is_file():
        return path
    configure_logger_resume(cfg, stored_step(path))
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
