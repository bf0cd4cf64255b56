"""Config validation before any work: one clear error per mistake, naming the key to fix."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config that cannot work; the message says which key to set and how."""


def _check_output_dir(cfg: DictConfig) -> None:
    out = cfg.get("paths", {}).get("output_dir")
    if not out:
        return
    path = Path(str(out))
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"paths.output_dir={path} is not writable (nearest existing folder: {probe})")


def _check_batches(cfg: DictConfig) -> None:
    batch = cfg.get("data", {}).get("batch_size")
    sub = cfg.get("module", {}).get("sub_batch_size")
    if batch is not None and int(batch) <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {batch}")
    if sub is not None and batch is not None:
        if int(sub) <= 0 or int(batch) % int(sub) != 0:
            raise ConfigError(
                f"module.sub_batch_size={sub} must be a positive divisor of data.batch_size={batch} "
                "(the per-rank batch of one optimizer step)"
            )


def validate_config(cfg: DictConfig) -> None:
    """Run every check; raise :class:`ConfigError` on the first failure."""
    _check_batches(cfg)
    _check_output_dir(cfg)
