"""Every rank's RNG states (torch CPU/CUDA, numpy, Python) saved with each checkpoint and put back where the
killed run drew next."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..distributed import all_gather_object
from .batch_end import is_last_batch


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
        # Checkpoints are dumped on every rank (only rank 0 writes), so a collective is safe here.
        states = all_gather_object(mine) if self._world > 1 else [mine]
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
