"""ZeroVL's learning-rate schedule: linear warm-up, then cosine decay to a floor, set per optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR at ``step`` (0-based): ``(step+1)/warmup`` during warm-up, then cosine to the floor.

    The warm-up starts above zero so the first step already learns; after ``total_steps`` the floor is held.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.025, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """The paper's schedule: 2.5% linear warm-up, cosine to 0.1× peak."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup_steps = int(round(warmup_fraction * total_steps))
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, total_steps, warmup_steps, min_lr_ratio))
