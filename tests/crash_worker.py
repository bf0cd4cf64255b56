"""A training run for the crash tests: ``python tests/crash_worker.py [hydra overrides...]``.

Composes the real ``conf/`` (``train.yaml``) with the given overrides, resolves ``ckpt_path`` with
:func:`zerovl_lightning.checkpointing.prepare_resume` and runs :func:`zerovl_lightning.train.run`, so the
test exercises the shipped config groups, the real DataModule and the module's real step.

:class:`Recorder` (added as a callback by :func:`overrides`) appends one line per optimizer step to its
``path``: ``<global_step> <loss as float.hex> <sample keys>`` — exact values, readable after a SIGKILL (each
line is flushed). With ``ZEROVL_HOLD_AT_STEP=k`` in the environment it blocks after recording step k, so a
test that kills the process at a random earlier step never races the end of training. At the end of
training it saves the module's ``state_dict`` to ``final``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch


class Recorder(L.Callback):
    def __init__(self, path: str, final: str) -> None:
        self.path, self.final = path, final
        self.hold_at = int(os.environ.get("ZEROVL_HOLD_AT_STEP", "-1"))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        keys = ",".join(batch["key"])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{trainer.global_step} {float(loss).hex()} {keys}\n")
        if trainer.global_step == self.hold_at:
            time.sleep(600)  # the test kills us before this returns

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.final)


def overrides(
    out_dir: str | Path,
    record: str | Path,
    sources: Mapping[str, str],
    *,
    max_steps: int,
    every_n_steps: int,
    keep: int = 2,
    extra: Sequence[str] = (),
) -> list[str]:
    """Hydra overrides of a tiny CPU run on ``sources`` writing everything under ``out_dir``."""
    out = Path(out_dir)
    srcs = ",".join(f"{name}:{{path:'{path}'}}" for name, path in sources.items())
    return [
        "model=tiny",
        "data=custom",
        "trainer=cpu",
        "callbacks=default",
        "logger=csv",
        f"paths.root_dir={out}",
        f"paths.output_dir={out}",
        f"paths.work_dir={out}",
        f"paths.log_dir={out}/logs",
        f"++data.sources={{{srcs}}}",
        "data.batch_size=8",
        "data.num_workers=2",
        "data.shuffle_buffer=16",
        "data.image_size=32",
        f"trainer.max_steps={max_steps}",
        "trainer.max_epochs=1000",
        "trainer.log_every_n_steps=1",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "++trainer.plugins=[{_target_:zerovl_lightning.checkpointing.AtomicCheckpointIO}]",
        f"callbacks.step_checkpoint.every_n_train_steps={every_n_steps}",
        f"callbacks.step_checkpoint.save_top_k={keep}",
        "+callbacks.recorder._target_=crash_worker.Recorder",
        f"+callbacks.recorder.path={record}",
        f"+callbacks.recorder.final={out}/final.pt",
        *extra,
    ]


def compose(overrides: Sequence[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="zerovl_lightning.conf", version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def main(argv: Sequence[str]) -> None:
    torch.set_num_threads(1)  # bitwise-reproducible CPU reductions, and fair to the shared test machine
    from zerovl_lightning import train
    from zerovl_lightning.checkpointing import prepare_resume

    cfg = compose(argv)
    # What train.run does first (see checkpointing.prepare_resume); idempotent if train.run does it too.
    cfg.ckpt_path = prepare_resume(cfg)
    train.run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
