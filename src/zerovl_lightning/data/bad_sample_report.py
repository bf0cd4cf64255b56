"""Bad-sample counts reach the terminal: a per-source summary at every epoch end and at the end of training.

The loader skips and counts bad inputs (``bad_samples.BAD_KINDS``). :class:`BadSampleReport` reads the counts from
the DataModule (one collective per epoch end), logs them as ``data/bad/<source>/<kind>`` metrics and prints,
summed over ranks::

    bad samples skipped (epoch 0, all ranks): bad: corrupt_image=2, empty_shard=1; good: none
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L

log = logging.getLogger(__name__)


def format_bad_counts(counts: Mapping[str, Mapping[str, int]], sources: list[str], when: str) -> str:
    """One line: per source, its non-zero counts by kind (``none`` for a clean source)."""
    parts = []
    for name in sources or sorted(counts):
        c = {k: n for k, n in sorted((counts.get(name) or {}).items()) if n}
        parts.append(f"{name}: " + (", ".join(f"{k}={n}" for k, n in c.items()) if c else "none"))
    total = sum(n for c in counts.values() for n in c.values())
    return f"bad samples skipped ({when}, all ranks): {total} in all — " + "; ".join(parts)


class BadSampleReport(L.Callback):
    """Log the DataModule's ``bad_sample_counts(sync=True)`` at each train epoch end (metrics and a line) and at
    train end (a line).

    ``bad_sample_counts(sync=True)`` is a collective, so every rank calls it; rank 0 prints. Works with any
    DataModule that has that method (else does nothing).
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = self._report(trainer, f"epoch {trainer.current_epoch}")
        flat = {f"data/bad/{s}/{kind}": float(n) for s, kinds in (counts or {}).items() for kind, n in kinds.items()}
        if flat:
            pl_module.log_dict(flat, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, f"end of training, step {trainer.global_step}")

    @staticmethod
    def _report(trainer: L.Trainer, when: str) -> dict[str, dict[str, int]] | None:
        """The counts summed over ranks (a collective: every rank calls it); rank 0 prints them."""
        dm = getattr(trainer, "datamodule", None)
        counts_of = getattr(dm, "bad_sample_counts", None)
        if not callable(counts_of):
            return None
        counts = counts_of(sync=True)
        if not trainer.is_global_zero:
            return counts
        sources = [i.name for i in getattr(dm, "infos", [])]
        line = format_bad_counts(counts, sources, when)
        (log.warning if any(n for c in counts.values() for n in c.values()) else log.info)(line)
        return counts
