"""What training consumed on this rank, and where the next epoch starts: the resume state of the data stream.

Every batch that reaches ``training_step`` passes through :meth:`ConsumptionTracker.observe` (the DataModule's
``on_before_batch_transfer``, or the loader itself without a Trainer), so a checkpoint taken after step k holds
exactly the state after k batches, whatever the loader prefetched. The state is epoch, steps consumed, each
worker lane's position in each source and the cumulative bad-sample counts; :meth:`restore` puts a saved one back
and :meth:`prepare_epoch` starts the stream from it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from .stream import ZeroVLStream

log = logging.getLogger(__name__)


class ConsumptionTracker:
    """This rank's consumed steps, lane positions and cumulative bad counts, plus a pending resume point."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step = 0
        self.positions: dict[int, dict[str, int]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self._resume: dict[str, Any] | None = None

    def observe(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record a consumed batch (its ``_stream`` record, removed) and attach the cumulative ``bad_counts``."""
        st = batch.pop("_stream", None)
        if st is None:
            return batch
        if st["epoch"] != self.epoch:
            self.epoch, self.positions = st["epoch"], {}
        self.step = st["step"] + 1
        self.positions[st["lane"]] = dict(st["positions"])
        for src, delta in st["bad"].items():
            c = self.counts.setdefault(src, {})
            for kind, n in delta.items():
                c[kind] = c.get(kind, 0) + n
        batch["bad_counts"] = self.flat_counts()
        return batch

    def flat_counts(self) -> dict[str, int]:
        return {f"{s}/{k}": n for s, c in self.counts.items() for k, n in c.items() if n}

    def local_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "positions": copy.deepcopy(self.positions),
            "bad_counts": copy.deepcopy(self.counts),
        }

    def restore(self, epoch: int, step: int, mine: dict[str, Any], exact: bool) -> None:
        """Resume after ``step`` of ``epoch`` with this rank's saved state (positions and counts only if exact)."""
        self.epoch, self.step, self.positions = epoch, step, {}
        self.counts = copy.deepcopy(mine["bad_counts"]) if exact else {}
        self._resume = {"epoch": epoch, "step": step, "positions": mine["positions"] if exact else {}, "exact": exact}

    def prepare_epoch(self, stream: ZeroVLStream, rank: int) -> None:
        """Before iterating an epoch: start at step 0, or mid-epoch from a restored state."""
        stream.start_step, stream.start_positions = 0, {}
        self.epoch, self.step, self.positions = stream.epoch, 0, {}
        resume, self._resume = self._resume, None
        if resume is None:
            return
        if resume["epoch"] != stream.epoch:
            if stream.epoch < resume["epoch"]:
                log.warning(
                    "restored sampling state is for epoch %d, loader runs epoch %d", resume["epoch"], stream.epoch
                )
            return
        step = int(resume["step"])
        if step == 0:
            return
        stream.start_step = step
        if resume.get("exact", True):
            stream.start_positions = {int(k): dict(v) for k, v in resume["positions"].items()}
        self.epoch, self.step = stream.epoch, step
        self.positions = copy.deepcopy(stream.start_positions)
        if rank == 0:
            log.info("resuming sampling at epoch %d step %d", stream.epoch, step)

    def epoch_done(self, stream: ZeroVLStream, rank: int) -> int:
        """A full pass ended: the next ``iter()`` runs the next epoch unless Lightning sets one; returns it."""
        stream.epoch += 1
        if self.counts:
            log.warning("rank %d: bad samples skipped so far: %s", rank, self.flat_counts())
        return stream.epoch
