"""The DataLoader of ``ZeroVLDataModule``: ``len() == steps_per_epoch`` and the epoch hand-over to the stream.

Lightning calls ``loader.sampler.set_epoch(epoch)`` at every epoch start and ends an epoch after ``len(loader)``
batches; the loader starts each epoch from the DataModule's :class:`~.consumption.ConsumptionTracker`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, Sampler

from .stream import ZeroVLStream

if TYPE_CHECKING:
    from .datamodule import ZeroVLDataModule


class _EpochSampler(Sampler[None]):
    """The index sampler of an iterable-style loader (endless ``None``, like torch's own) plus ``set_epoch``.

    Lightning calls ``loader.sampler.set_epoch(epoch)`` at every epoch start; that is how the stream learns
    the epoch, since Lightning ends an epoch after ``len(loader)`` batches without exhausting the iterator.
    """

    def __init__(self, stream: ZeroVLStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


class ZeroVLLoader(DataLoader):
    """DataLoader over :class:`ZeroVLStream`: ``len() == steps_per_epoch``, epoch and resume bookkeeping."""

    def __init__(self, datamodule: ZeroVLDataModule, stream: ZeroVLStream, **kwargs: Any) -> None:
        super().__init__(stream, batch_size=None, persistent_workers=False, **kwargs)
        object.__setattr__(self, "sampler", _EpochSampler(stream))  # DataLoader freezes `sampler` after init
        self._dm = datamodule

    def __len__(self) -> int:
        return self.dataset.sampler.steps_per_epoch  # type: ignore[attr-defined]

    # Lightning asks loaders for these to decide whether a mid-epoch resume is exact; the sampling state
    # itself lives in ZeroVLDataModule.state_dict (it needs every rank's positions, which a loader cannot
    # gather).
    def state_dict(self) -> dict[str, Any]:
        return {"state": "in ZeroVLDataModule.state_dict"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """No-op: :meth:`ZeroVLDataModule.load_state_dict` restores the position."""

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        dm, stream = self._dm, self.dataset
        assert isinstance(stream, ZeroVLStream)
        dm.tracker.prepare_epoch(stream, dm.rank)
        observe_here = dm.trainer is None
        for batch in super().__iter__():
            yield dm.tracker.observe(batch) if observe_here else batch
        dm._next_epoch = dm.tracker.epoch_done(stream, dm.rank)
