"""module.lr_scales: per-part LR multipliers through the real Trainer (SGD, float64: the update is -lr·scale·g)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_dga import _batch32, _fit, _zerovl_module

from zerovl_lightning.param_groups import lr_scale_of, parameter_groups


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("sub_batch_size", [None, 2])
def test_scaled_part_moves_by_its_multiplier_and_the_rest_as_without(sub_batch_size):
    """One SGD step: the visual tower's update is exactly 0.1× the unscaled run's, everything else equal; the
    logged LR is the base LR. Plain step and DGA (manual optimization) alike."""
    batch = _batch32()
    plain, scaled = (
        _zerovl_module(sub_batch_size=sub_batch_size),
        _zerovl_module(sub_batch_size=sub_batch_size, lr_scales={"visual.*": 0.1}),
    )
    start = _params(plain)
    assert all(torch.equal(start[n], p) for n, p in _params(scaled).items())  # same init
    t_plain, cap_plain = _fit(plain, batch)
    t_scaled, cap_scaled = _fit(scaled, batch)
    after_plain, after_scaled = _params(plain), _params(scaled)
    n_visual = 0
    for name, p0 in start.items():
        d_plain, d_scaled = after_plain[name] - p0, after_scaled[name] - p0
        if name.startswith("clip.visual."):
            n_visual += 1
            assert torch.allclose(d_scaled, 0.1 * d_plain, rtol=1e-12, atol=1e-15), name
        else:
            assert torch.allclose(d_scaled, d_plain, rtol=1e-12, atol=1e-15), name
    moved = after_plain["clip.visual.conv1.weight"] - start["clip.visual.conv1.weight"]
    assert n_visual > 0 and float(moved.abs().max()) > 0
    assert float(t_scaled.callback_metrics["train/lr"]) == float(t_plain.callback_metrics["train/lr"]) == 0.5
    groups = t_scaled.optimizers[0].param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 0.1, 0.1]


def test_schedule_scales_every_group_by_its_own_base_lr():
    module = _zerovl_module(lr_scales={"text*": 0.25})
    module.scheduler_cfg = {"warmup_fraction": 0.5, "min_lr_ratio": 0.1}
    trainer, _ = _fit(module, _batch32(), steps=3)
    groups = trainer.optimizers[0].param_groups
    full = [g["lr"] for g in groups if g["lr_scale"] == 1.0]
    quarter = [g["lr"] for g in groups if g["lr_scale"] == 0.25]
    assert full and quarter and len(set(full)) == 1 and len(set(quarter)) == 1
    assert quarter[0] == pytest.approx(0.25 * full[0], rel=1e-15) and 0 < full[0] < 0.5


def test_first_matching_pattern_wins_and_no_scales_keeps_two_groups():
    assert lr_scale_of("visual.trunk.blocks.0.w", {"visual.trunk.*": 0.1, "visual.*": 0.5}) == 0.1
    assert lr_scale_of("visual.head.proj.weight", {"visual.trunk.*": 0.1, "visual.*": 0.5}) == 0.5
    assert lr_scale_of("text_projection", {"visual.*": 0.5}) == 1.0
    module = _zerovl_module()
    assert [g["lr_scale"] for g in module.parameter_groups()] == [1.0, 1.0]


def test_negative_multiplier_is_refused_naming_the_key():
    module = _zerovl_module(lr_scales={"visual.*": -1})
    with pytest.raises(ValueError, match=r"module\.lr_scales\['visual\.\*'\]=-1.*must be >= 0"):
        parameter_groups(module, 1e-3, {"visual.*": -1})


def test_pattern_matching_nothing_is_reported_and_changes_nothing(caplog):
    """An experiment's patterns under a swapped-in model (experiment=demo model=tiny): one warning naming the
    patterns, every group at the full LR."""
    module = _zerovl_module()
    with caplog.at_level(logging.WARNING, logger="zerovl_lightning.param_groups"):
        groups = parameter_groups(module, 1e-3, {"vision.*": 0.1})
    assert "module.lr_scales: ['vision.*'] match no trainable parameter" in caplog.text
    assert {g["lr"] for g in groups} == {1e-3} and {g["lr_scale"] for g in groups} == {1.0}
