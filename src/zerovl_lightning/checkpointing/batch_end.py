"""When to save: at the end of a training batch, the one moment Lightning resumes from exactly."""

from __future__ import annotations

import copy
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from .atomic_io import checkpoint_size_estimate, warn_if_low_disk_space

_UNCHANGED_UNTIL_NEXT_STEP = {"state_dict", "optimizer_states"}  # checkpoint keys held by reference


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

    def _stepped(self, trainer: L.Trainer, batch_idx: int) -> bool:
        """False in the middle of gradient accumulation (no optimizer step happened on this batch)."""
        accumulate = trainer.accumulate_grad_batches
        return (batch_idx + 1) % accumulate == 0 or is_last_batch(trainer, batch_idx)

    def _step_due(self, trainer: L.Trainer) -> bool:
        n = self._every_n_train_steps
        return n >= 1 and trainer.global_step % n == 0

    def _epoch_due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        e = self._every_n_epochs
        return e >= 1 and (trainer.current_epoch + 1) % e == 0 and is_last_batch(trainer, batch_idx)

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
