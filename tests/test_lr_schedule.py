"""ZeroVL's schedule: linear warm-up over 2.5% of steps, cosine to 0.1x peak, stepped per optimizer step."""

from __future__ import annotations

import pytest
import torch

from zerovl_lightning.lr_schedule import warmup_cosine, warmup_cosine_factor


def test_factor_shape():
    total, warm = 400, 10
    f = [warmup_cosine_factor(s, total, warm, 0.1) for s in range(total + 5)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear ramp (s+1)/10
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert f[10] == pytest.approx(1.0)
    assert f[10 + 195] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-2)  # half way through the cosine
    assert f[total] == pytest.approx(0.1) and f[-1] == pytest.approx(0.1)  # floor held
    assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))  # monotone decay


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-4)
    sched = warmup_cosine(opt, total_steps=80, warmup_fraction=0.025)  # 2 warm-up steps
    lrs = []
    for _ in range(80):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5e-4) and lrs[1] == pytest.approx(1e-4)
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


@pytest.mark.parametrize("bad", [dict(total_steps=0), dict(total_steps=10, warmup_fraction=1.0)])
def test_bad_arguments(bad):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError):
        warmup_cosine(opt, **bad)
