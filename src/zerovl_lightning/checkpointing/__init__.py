"""Checkpoints a killed run can trust: atomic writes, integrity-checked resume, RNG states and logger run ids.

Lightning already stores model, optimizer, LR schedule, grad scaler, loop progress (step) and the
``state_dict`` of every callback and of the DataModule (data sampling state). This package adds the rest, one file each:

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

from .atomic_io import (
    CKPT_SUFFIX,
    TMP_SUFFIX,
    AtomicCheckpointIO,
    atomic_torch_save,
    checkpoint_size_estimate,
    warn_if_low_disk_space,
)
from .batch_end import BatchEndCheckpoint, is_last_batch, run_pending_validation, validation_follows
from .resolve import (
    RESOLVED_ENV,
    CheckpointError,
    check_archive,
    check_checkpoint,
    list_checkpoints,
    newest_loadable,
    remove_stale_temp_files,
    resolve_ckpt_path,
    stored_step,
)
from .resume import checkpoint_dir_of, prepare_resume
from .rng_state import RNGStateCheckpoint, capture_rng_states, restore_rng_states
from .run_ids import RunIdCheckpoint, logger_run_ids, read_run_ids

__all__ = [
    "CKPT_SUFFIX",
    "RESOLVED_ENV",
    "TMP_SUFFIX",
    "AtomicCheckpointIO",
    "BatchEndCheckpoint",
    "CheckpointError",
    "RNGStateCheckpoint",
    "RunIdCheckpoint",
    "atomic_torch_save",
    "capture_rng_states",
    "check_archive",
    "check_checkpoint",
    "checkpoint_dir_of",
    "checkpoint_size_estimate",
    "is_last_batch",
    "list_checkpoints",
    "logger_run_ids",
    "newest_loadable",
    "prepare_resume",
    "read_run_ids",
    "remove_stale_temp_files",
    "resolve_ckpt_path",
    "restore_rng_states",
    "run_pending_validation",
    "stored_step",
    "validation_follows",
    "warn_if_low_disk_space",
]
