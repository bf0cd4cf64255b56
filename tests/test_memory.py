"""Memory stays flat: RSS after 500 tiny training steps is within 10% of RSS after 50.

The whole shipped path runs (``train.run`` on ``callbacks=default``: step/epoch checkpoints written
atomically, guards, RNG states, LR monitor; the CSV logger logging every step; the real DataModule decoding
in the main process and starting a new epoch every few steps), so growth from logging, metric caches,
checkpointing or per-epoch data objects would show.
"""

from __future__ import annotations

import gc

import lightning as L
import psutil
import pytest
import torch
from crash_worker import compose, overrides
from shard_fixtures import write_source

SAMPLES: dict[int, int] = {}


class RSSProbe(L.Callback):
    """Resident set size (bytes) after optimizer steps 50 and 500, after a garbage collection."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (50, 500):
            gc.collect()
            SAMPLES[trainer.global_step] = psutil.Process().memory_info().rss


@pytest.mark.slow  # ~1 min on a shared CPU
def test_rss_flat_over_500_steps(tmp_path):
    from zerovl_lightning import train

    write_source(tmp_path / "a", "a", 40, 10)
    write_source(tmp_path / "b", "b", 24, 8)
    sources = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    extra = [
        "data.num_workers=0",
        "+callbacks.rss._target_=test_memory.RSSProbe",
        "callbacks.model_checkpoint.every_n_epochs=20",
    ]
    run_dir, record = tmp_path / "run", tmp_path / "rec.txt"
    cfg = compose(overrides(run_dir, record, sources, max_steps=500, every_n_steps=100, extra=extra))
    torch.set_num_threads(1)
    SAMPLES.clear()
    train.run(cfg)
    assert set(SAMPLES) == {50, 500}
    growth = SAMPLES[500] / SAMPLES[50] - 1
    mib = {k: v / 2**20 for k, v in SAMPLES.items()}
    print(f"RSS MiB at steps 50/500: {mib}, growth {growth:.2%}")
    assert growth <= 0.10, f"RSS grew {growth:.1%} between step 50 and 500: {mib} MiB"
