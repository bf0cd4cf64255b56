"""Optimizer parameter groups: weight decay on matrices only, and per-part LR multipliers (``module.lr_scales``).

ZeroVL fine-tunes pretrained unimodal towers while its projections start from scratch; one LR cannot serve both
(the demo's projections want ~3e-3, which wrecks a pretrained trunk). ``lr_scales`` maps fnmatch patterns over
parameter names as open_clip spells them (``visual.trunk.*``, ``text.transformer.*``) to a multiplier of the peak
LR; the first pattern a name matches wins, the rest keep 1. Every group stores its ``lr_scale``, so the schedule
(a LambdaLR over each group's own base LR) and the logged base LR stay right.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

log = logging.getLogger(__name__)
NO_DECAY_MARKERS = ("logit_scale", "bias", "norm", "bn")


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Gains, biases and the temperature get no weight decay (as OpenCLIP)."""
    return p.ndim < 2 or any(m in name for m in NO_DECAY_MARKERS)


def lr_scale_of(name: str, lr_scales: Mapping[str, float]) -> float:
    """The multiplier of the first pattern ``name`` matches (1.0 when none does)."""
    return next((float(s) for pattern, s in lr_scales.items() if fnmatchcase(name, pattern)), 1.0)


def parameter_groups(
    model: nn.Module, lr: float | None, lr_scales: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in groups of (weight decay or not) × LR multiplier.

    Groups 0 and 1 are always the full-LR decay and no-decay groups (possibly empty: the optimizer state of a run
    without ``lr_scales`` keeps its two groups); scaled groups follow. ``lr``: the optimizer's peak LR (needed
    with ``lr_scales``; None leaves every group at the optimizer's own). A pattern that matches no trainable
    parameter is reported with a warning (a typo would otherwise silently train that part at the full LR).
    """
    lr_scales = dict(lr_scales or {})
    if lr_scales and lr is None:
        raise ValueError("module.lr_scales needs module.optimizer.lr (the peak LR the multipliers scale)")
    for pattern, scale in lr_scales.items():
        if float(scale) < 0:
            raise ValueError(f"module.lr_scales[{pattern!r}]={scale}: an LR multiplier must be >= 0")
    # names as in the open_clip model (a DualEncoder's ``clip.`` prefix dropped): visual.trunk.*, text.*, logit_scale
    named = [(n.removeprefix("clip."), p) for n, p in model.named_parameters() if p.requires_grad]
    unused = [pat for pat in lr_scales if not any(fnmatchcase(n, pat) for n, _ in named)]
    if unused:  # a warning, not an error: an experiment's patterns may not fit a model swapped in under it
        log.warning(
            "module.lr_scales: %s match no trainable parameter (names look like %s) and have no effect; fix the "
            "pattern or unlock that part of the tower",
            unused,
            [n for n, _ in named[:3]],
        )
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): [], (1.0, True): []}
    for name, p in named:
        groups.setdefault((lr_scale_of(name, lr_scales), _no_decay(name, p)), []).append(p)
    out = []
    for scale, no_decay in sorted(groups, key=lambda k: (k[0] != 1.0, -k[0], k[1])):
        group: dict[str, Any] = {"params": groups[(scale, no_decay)], "lr_scale": scale}
        if lr is not None:
            group["lr"] = lr * scale
        if no_decay:
            group["weight_decay"] = 0.0
        out.append(group)
    return out
