"""Combining sources: which source(s) each optimizer step draws from — ZeroVL's debiased sampling & co.

Modes (``zerovl-method.md`` §1):

- ``debias``: every step draws its **whole global batch from one source** (ZeroVL), so a model cannot tell the
  samples of a batch apart by dataset style.
- ``shuffle``: one mixed stream — every sample of a batch picks its own source.
- ``sequential``: source after source, in the configured order.

Weights: ``size`` (p_k ∝ n_k, the paper's choice), ``uniform``, or ``explicit`` (per-source ``weight``).

Design — how a global batch stays single-source under DDP with several dataloader workers per rank
-------------------------------------------------------------------------------------------------------
*Steps, lanes, slots.* Step ``s`` of an epoch is produced on every rank by dataloader worker ``s mod W`` (the
worker's *lane*); torch's DataLoader with ``batch_size=None`` returns worker outputs round-robin, so steps
arrive in order. A *slot* is one (rank, lane) pair; each source's data is split into ``R·W`` disjoint slot
streams (``shards.SlotStream``: by shard, or by sample for small sources). To build step ``s`` a worker asks
this module which source(s) step ``s`` uses, then takes the next ``B`` good samples of that source from *its
own* slot stream. All ranks and workers compute the same plan from ``(seed, epoch)`` alone — no communication
— so the R local batches of a step always come from the same source, and no sample is read by two slots.

*Non-resampled epochs (exact).* Per-slot capacities (raw samples per slot, from per-shard counts) give every
lane the same quota of steps per source: ``q[k] = min_{r,w} cap[k, r, w] // B`` (size weights), or the
largest multiple of the weights that fits (uniform/explicit). Each lane's steps are a seeded permutation of
its quota multiset (sampling sources *without* replacement: frequencies equal the weights up to rounding, and
an epoch reads every sample of a balanced layout exactly once), so ``steps_per_epoch = W·Σ_k q[k]``.

*Shuffle / sequential.* ``shuffle`` gives every sample position of a step its own source: a seeded permutation
of the slot's own samples (one pass, size weights) or i.i.d. draws (otherwise). ``sequential`` lays each
lane's quotas out in the configured order.

*Resampled (large corpora).* Slot streams draw shards with replacement and never end; the source of step ``s``
is the ``s``-th draw of one RNG seeded from ``(seed, epoch)`` with probabilities p_k (i.i.d., the paper's
sampler); ``steps_per_epoch`` defaults to ``Σ n_k / (B·R)``.

*Epochs differ*: every permutation, draw, shard order and shuffle buffer is seeded with the epoch.

*Resume*: the plan is a pure function of ``(seed, epoch, step)``; the only other state is each slot's position
in each source stream (raw samples consumed, bad ones included), which the DataModule checkpoints per rank and
the worker seeks to without reading what came before (``SlotStream.seek``: O(buffer + one shard)). A resumed
run therefore sees exactly the sources *and* sample keys of an uninterrupted one (same ``world_size`` and
``num_workers`` required).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .options import SAMPLING as MODES
from .options import WEIGHTS as WEIGHTINGS
from .options import check_choice

_TAG_STEP, _TAG_LANE, _TAG_MIX = 101, 202, 303


def source_probabilities(
    sizes: Sequence[int], weighting: str, explicit: Sequence[float | None] | None = None
) -> np.ndarray:
    """p_k for ``size`` (∝ n_k), ``uniform`` or ``explicit`` weights (normalised; must be ≥ 0 and not all
    zero)."""
    check_choice("data.weights", weighting, WEIGHTINGS)
    if weighting == "size":
        w = np.asarray(sizes, dtype=np.float64)
    elif weighting == "uniform":
        w = np.ones(len(sizes), dtype=np.float64)
    else:
        if explicit is None or any(x is None for x in explicit):
            raise ValueError("weights='explicit' needs a `weight` for every source")
        w = np.asarray(explicit, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
        raise ValueError(f"source weights must be finite, ≥ 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


class SourceSampler:
    """The per-epoch plan of sources, identical on every rank and worker.

    Args:
        names: source names (index k ↔ ``names[k]``).
        probs: p_k (see :func:`source_probabilities`).
        capacities: int array [K, R, W] — raw samples of source k in slot (rank r, lane w) per pass; needed
        for
            exact (non-resampled) epochs, ignored when resampled.
        sizes: n_k, for the default epoch length of resampled mode.
        size_weighted: whether p is the size weighting (quotas are then the capacities themselves).
    """

    def __init__(
        self,
        names: Sequence[str],
        probs: Sequence[float],
        *,
        sizes: Sequence[int],
        capacities: np.ndarray | None,
        mode: str = "debias",
        resampled: bool = False,
        batch_size: int,
        world_size: int = 1,
        lanes: int = 1,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        size_weighted: bool = True,
        order: Sequence[str] | None = None,
    ) -> None:
        check_choice("data.sampling", mode, MODES)
        if batch_size < 1 or world_size < 1 or lanes < 1:
            raise ValueError("batch_size, world_size and lanes must be ≥ 1")
        self.names = list(names)
        self.probs = np.asarray(probs, dtype=np.float64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.mode, self.resampled, self.batch_size = mode, resampled, batch_size
        self.world_size, self.lanes, self.seed = world_size, lanes, int(seed)
        self.size_weighted = size_weighted
        order = list(order) if order is not None else list(self.names)
        unknown = [n for n in order if n not in self.names]
        if unknown:
            raise ValueError(f"unknown source(s) in order: {unknown}; known: {self.names}")
        self.order = [self.names.index(n) for n in order]
        if not resampled:
            if capacities is None:
                raise ValueError("non-resampled sampling needs per-slot capacities")
            capacities = np.asarray(capacities, dtype=np.int64)
            if capacities.shape != (len(self.names), world_size, lanes):
                raise ValueError(f"capacities shape {capacities.shape} != {(len(self.names), world_size, lanes)}")
        self.capacities = capacities
        self._quota = self._lane_quotas() if not resampled and mode != "shuffle" else None
        self.natural_steps = self._natural_steps()
        if self.natural_steps < 1:
            raise ValueError(
                f"no complete step fits in the data: batch_size={batch_size} × world_size={world_size} × "
                f"lanes={lanes} needs more samples per source slot (sizes {self.sizes.tolist()})"
            )
        if steps_per_epoch is None:
            steps_per_epoch = self.natural_steps
        elif steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be ≥ 1, got {steps_per_epoch}")
        elif not resampled and steps_per_epoch > self.natural_steps:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch} exceeds one pass over the data "
                f"({self.natural_steps} steps "
                "without repeating samples); use resampled=true for longer epochs"
            )
        self.steps_per_epoch = int(steps_per_epoch)

    # --------------------------------------------------------------------------------- epoch length

    def _lane_quotas(self) -> np.ndarray:
        """[K] steps of source k in every lane (non-resampled debias/sequential).

        The same quota in every lane and rank (what the smallest slot can serve) keeps the lanes equally
        long and each lane's mix of sources equal to the weights; the surplus of larger slots stays unread.
        """
        assert self.capacities is not None
        fit = (self.capacities // self.batch_size).min(axis=(1, 2))  # [K]
        if self.size_weighted:
            return fit
        quota = np.zeros_like(fit)
        active = np.flatnonzero(self.probs > 0)
        total = min(fit[k] / self.probs[k] for k in active)
        quota[active] = np.floor(self.probs[active] * total + 1e-9).astype(np.int64)
        return quota

    def _natural_steps(self) -> int:
        if self.resampled:
            return max(1, int(self.sizes.sum()) // (self.batch_size * self.world_size))
        if self._quota is not None:
            return int(self.lanes * self._quota.sum())
        assert self.capacities is not None  # shuffle: each slot fills floor(total / B) batches
        per_slot = self.capacities.sum(axis=0) // self.batch_size  # [R, W]
        return int(self.lanes * per_slot.min())

    def lane_steps(self, lane: int) -> range:
        """The epoch's steps produced by ``lane``."""
        return range(lane, self.steps_per_epoch, self.lanes)

    # ---------------------------------------------------------------------------------------- plans

    def step_sources(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch] source index of every step (debias/sequential); the same on every rank and
        worker."""
        if self.mode == "shuffle":
            raise ValueError("shuffle mode mixes sources inside a step; use lane_sources")
        out = np.empty(self.steps_per_epoch, dtype=np.int64)
        for lane in range(self.lanes):
            out[lane :: self.lanes] = self._lane_sequence(epoch, lane)
        return out

    def lane_sources(self, epoch: int, rank: int, lane: int) -> np.ndarray:
        """Sources for the steps of ``lane`` (in step order): [n] for debias/sequential, [n, B] for
        shuffle."""
        if self.mode != "shuffle":
            return self._lane_sequence(epoch, lane)
        n = len(self.lane_steps(lane))
        rng = np.random.default_rng([self.seed, epoch, _TAG_MIX, rank, lane])
        if not self.resampled and self.size_weighted:
            assert self.capacities is not None
            pool = np.repeat(np.arange(len(self.names)), self.capacities[:, rank, lane])
            return rng.permutation(pool)[: n * self.batch_size].reshape(n, self.batch_size)
        return self._draw(rng.random(n * self.batch_size)).reshape(n, self.batch_size)

    def _draw(self, u: np.ndarray) -> np.ndarray:
        cdf = np.cumsum(self.probs)
        cdf[-1] = 1.0
        return np.searchsorted(cdf, u, side="right").clip(max=len(self.names) - 1)

    def _lane_sequence(self, epoch: int, lane: int) -> np.ndarray:
        n = len(self.lane_steps(lane))
        if self.resampled:
            steps = np.arange(lane, self.steps_per_epoch, self.lanes)
            if self.mode == "debias":
                # The s-th draw of one RNG seeded from (seed, epoch): i.i.d. p_k, independent of lane and
                # rank.
                u = np.random.default_rng([self.seed, epoch, _TAG_STEP]).random(self.steps_per_epoch)
                return self._draw(u[steps])
            # sequential: blocks in order, lengths ∝ p_k over the epoch
            bounds = np.round(np.cumsum(self.probs[self.order]) * self.steps_per_epoch).astype(np.int64)
            block = np.searchsorted(bounds, steps, side="right").clip(max=len(self.order) - 1)
            return np.asarray(self.order)[block]
        assert self._quota is not None
        quota = self._quota
        if self.mode == "sequential":
            seq = np.concatenate([np.full(quota[k], k, dtype=np.int64) for k in self.order])
        else:
            rng = np.random.default_rng([self.seed, epoch, _TAG_LANE, lane])
            seq = rng.permutation(np.repeat(np.arange(len(self.names)), quota))
        return seq[:n]

    def describe(self) -> str:
        p = ", ".join(f"{n}={q:.3f}" for n, q in zip(self.names, self.probs))
        kind = "resampled" if self.resampled else "one pass"
        return f"{self.mode} sampling ({kind}), {self.steps_per_epoch} steps/epoch, p: {p}"
