"""Source plans of data/sampling.py: debias, shuffle, sequential; weights, epochs, statistical bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from zerovl_lightning.data.sampling import SourceSampler, source_probabilities
from zerovl_lightning.data.shards import slot_capacities

NAMES = ["a", "b", "c"]


def _caps(per_slot: list[int], world: int, lanes: int) -> np.ndarray:
    """[K, R, W] with the same capacity in every slot of a source."""
    return np.stack([np.full((world, lanes), n) for n in per_slot])


def test_resampled_debias_frequencies_within_binomial_bound() -> None:
    """i.i.d. source draws: each count lies within 4.5 σ of n·p_k (a false alarm has probability < 1e-4)."""
    p = source_probabilities([500, 300, 200], "size")
    s = SourceSampler(
        NAMES,
        p,
        sizes=[500, 300, 200],
        capacities=None,
        resampled=True,
        batch_size=4,
        world_size=2,
        lanes=2,
        steps_per_epoch=6000,
        seed=3,
    )
    src = s.step_sources(epoch=0)
    n = len(src)
    for k, pk in enumerate(p):
        sigma = math.sqrt(n * pk * (1 - pk))
        assert abs((src == k).sum() - n * pk) <= 4.5 * sigma, (k, (src == k).sum(), n * pk)


def test_plan_is_identical_on_every_rank_and_lane_interleaving_is_the_step_order() -> None:
    p = source_probabilities([1, 1, 1], "uniform")
    s = SourceSampler(
        NAMES,
        p,
        sizes=[1, 1, 1],
        capacities=None,
        resampled=True,
        batch_size=2,
        world_size=4,
        lanes=3,
        steps_per_epoch=100,
        seed=0,
    )
    full = s.step_sources(5)
    for rank in range(4):
        for lane in range(3):
            assert np.array_equal(s.lane_sources(5, rank, lane), full[lane::3])


def test_epochs_differ_and_are_reproducible() -> None:
    caps = _caps([40, 24, 16], world=2, lanes=2)
    kw = dict(sizes=[160, 96, 64], capacities=caps, batch_size=4, world_size=2, lanes=2, seed=7)
    s = SourceSampler(NAMES, source_probabilities([160, 96, 64], "size"), **kw)
    e0, e1 = s.step_sources(0), s.step_sources(1)
    assert not np.array_equal(e0, e1)
    again = SourceSampler(NAMES, source_probabilities([160, 96, 64], "size"), **kw)
    assert np.array_equal(again.step_sources(1), e1)
    other_seed = SourceSampler(NAMES, source_probabilities([160, 96, 64], "size"), **{**kw, "seed": 8})
    assert not np.array_equal(other_seed.step_sources(0), e0)


def test_one_pass_debias_uses_exact_size_quotas() -> None:
    """Without replacement: source k gets exactly cap/B steps per lane; frequencies equal size weights."""
    caps = _caps([40, 24, 16], world=2, lanes=2)  # per slot; B=4 → 10, 6, 4 steps per lane
    s = SourceSampler(
        NAMES,
        source_probabilities([160, 96, 64], "size"),
        sizes=[160, 96, 64],
        capacities=caps,
        batch_size=4,
        world_size=2,
        lanes=2,
    )
    assert s.steps_per_epoch == 2 * (10 + 6 + 4)
    for epoch in range(3):
        src = s.step_sources(epoch)
        assert np.bincount(src, minlength=3).tolist() == [20, 12, 8]
        for lane in range(2):
            assert np.bincount(src[lane::2], minlength=3).tolist() == [10, 6, 4]


def test_one_pass_uneven_slots_use_the_smallest_slot_in_every_lane() -> None:
    """Every lane gets the quota of the smallest slot, so lanes stay equally long and equally mixed."""
    caps = np.array([[[13, 9], [10, 12]], [[8, 8], [8, 8]]])  # [K=2, R=2, W=2]
    s = SourceSampler(
        ["a", "b"], [0.5, 0.5], sizes=[44, 32], capacities=caps, batch_size=4, world_size=2, lanes=2
    )
    assert s.steps_per_epoch == 2 * (2 + 2)
    src = s.step_sources(0)
    for lane in range(2):
        assert np.bincount(src[lane::2]).tolist() == [2, 2]


def test_explicit_and_uniform_weights_fit_the_smallest_source() -> None:
    caps = _caps([40, 24, 8], world=1, lanes=1)  # B=4: 10, 6, 2 steps available
    uni = SourceSampler(
        NAMES,
        source_probabilities([40, 24, 8], "uniform"),
        sizes=[40, 24, 8],
        capacities=caps,
        batch_size=4,
        size_weighted=False,
    )
    assert np.bincount(uni.step_sources(0)).tolist() == [2, 2, 2]
    p = source_probabilities([40, 24, 8], "explicit", [2.0, 1.0, 0.0])
    exp = SourceSampler(NAMES, p, sizes=[40, 24, 8], capacities=caps, batch_size=4, size_weighted=False)
    assert np.bincount(exp.step_sources(0), minlength=3).tolist() == [10, 5, 0]


def test_sequential_goes_source_after_source_in_the_given_order() -> None:
    caps = _caps([8, 12, 4], world=1, lanes=2)
    s = SourceSampler(
        NAMES,
        source_probabilities([16, 24, 8], "size"),
        sizes=[16, 24, 8],
        capacities=caps,
        mode="sequential",
        batch_size=4,
        lanes=2,
        order=["c", "a", "b"],
    )
    assert s.step_sources(0).tolist() == [2, 2, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert np.array_equal(s.step_sources(0), s.step_sources(1))  # the order is the order
    res = SourceSampler(
        NAMES,
        [0.5, 0.25, 0.25],
        sizes=[16, 8, 8],
        capacities=None,
        mode="sequential",
        resampled=True,
        batch_size=4,
        lanes=2,
        steps_per_epoch=8,
    )
    assert res.step_sources(0).tolist() == [0, 0, 0, 0, 1, 1, 2, 2]


def test_shuffle_mixes_sources_and_one_pass_uses_each_slot_exactly() -> None:
    caps = _caps([12, 8, 4], world=2, lanes=2)  # 24 per slot, B=4 → 6 steps per lane
    s = SourceSampler(
        NAMES,
        source_probabilities([48, 32, 16], "size"),
        sizes=[48, 32, 16],
        capacities=caps,
        mode="shuffle",
        batch_size=4,
        world_size=2,
        lanes=2,
    )
    assert s.steps_per_epoch == 12
    plan = s.lane_sources(0, rank=1, lane=0)
    assert plan.shape == (6, 4)
    assert np.bincount(plan.ravel(), minlength=3).tolist() == [12, 8, 4]
    assert any(len(set(row.tolist())) > 1 for row in plan)
    assert not np.array_equal(plan, s.lane_sources(0, rank=0, lane=0))  # ranks draw their own mixes
    with pytest.raises(ValueError, match="shuffle"):
        s.step_sources(0)


def test_epoch_length_validation() -> None:
    caps = _caps([8, 8, 8], world=1, lanes=1)
    p = source_probabilities([8, 8, 8], "size")
    with pytest.raises(ValueError, match="exceeds one pass"):
        SourceSampler(NAMES, p, sizes=[8, 8, 8], capacities=caps, batch_size=4, steps_per_epoch=7)
    short = SourceSampler(NAMES, p, sizes=[8, 8, 8], capacities=caps, batch_size=4, steps_per_epoch=4)
    assert len(short.step_sources(0)) == 4
    with pytest.raises(ValueError, match="no complete step"):
        SourceSampler(NAMES, p, sizes=[8, 8, 8], capacities=caps, batch_size=16)
    with pytest.raises(ValueError, match="sampling must be"):
        SourceSampler(NAMES, p, sizes=[8, 8, 8], capacities=caps, batch_size=4, mode="random")
    with pytest.raises(ValueError, match="unknown source"):
        SourceSampler(NAMES, p, sizes=[8, 8, 8], capacities=caps, batch_size=4, order=["a", "zz"])


def test_source_probabilities() -> None:
    assert source_probabilities([3, 1], "size").tolist() == [0.75, 0.25]
    assert source_probabilities([3, 1], "uniform").tolist() == [0.5, 0.5]
    assert source_probabilities([3, 1], "explicit", [1, 3]).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError):
        source_probabilities([3, 1], "explicit", [1, None])
    with pytest.raises(ValueError):
        source_probabilities([3, 1], "explicit", [0, 0])
    with pytest.raises(ValueError):
        source_probabilities([3, 1], "popular")


def test_slot_capacities() -> None:
    assert slot_capacities([10, 10, 10, 3], 2, "shard").tolist() == [20, 13]
    assert slot_capacities([10, 10, 10, 3], 2, "sample").tolist() == [17, 16]
    assert slot_capacities([5], 4, "sample").tolist() == [2, 1, 1, 1]
