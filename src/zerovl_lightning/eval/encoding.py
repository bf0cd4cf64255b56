"""Running a model for evaluation: eval mode / no grad / fp32 (restored afterwards), and this rank's share of a
map-style dataset."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


class evaluating:  # noqa: N801  (used as a context manager, reads like one)
    """Eval mode, no grad, fp32 autocast off for the duration; restores the previous train/eval mode.

    Evaluation runs inside training callbacks, so it must leave the model exactly as it found it.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.was_training = model.training
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        self._no_grad = torch.no_grad()
        self._autocast = torch.autocast(self.device.type, enabled=False)

    def __enter__(self) -> evaluating:
        self.model.eval()
        self._no_grad.__enter__()
        self._autocast.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._autocast.__exit__(*exc)
        self._no_grad.__exit__(*exc)
        self.model.train(self.was_training)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch of images to the model's device and parameter dtype."""
        return images.to(self.device, self.dtype, non_blocking=True)


def rank_subset(dataset: Dataset) -> Dataset:
    """This rank's share (indices rank, rank + W, …) of a map-style dataset; the whole set without DDP."""
    from zerovl_lightning.distributed import world_info

    world = world_info()
    if not world.distributed:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(world.rank, len(dataset), world.world_size)))  # type: ignore[arg-type]
