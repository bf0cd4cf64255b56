"""A callback for the multi-node test (imported by ``zerovl-train`` through ``+callbacks.probe._target_``):
each rank records the sources of its batches, the checkpoint it resumed from, and its final parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class Probe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.sources: list[list[str]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.sources.append(list(batch["source"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        params = torch.cat([p.detach().reshape(-1).double() for p in pl_module.parameters()])
        torch.save(params, self.out / f"params{rank}.pt")
        record = {
            "rank": rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "node_rank": trainer.node_rank,
            "batch_size": len(self.sources[0]) if self.sources else 0,
            "sources": self.sources,
            "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "output_dir": str(Path.cwd()),
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))
