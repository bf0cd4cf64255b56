"""A measuring callback that benchmarks add to a real ``zerovl-train`` run (``+callbacks.probe._target_=probe.Probe``,
with bench/ on ``sys.path``): device-synced step times, peak memory and, optionally, the first step's gradients.

It writes its figures to ``<out>.json`` (and ``<out>.grads.pt``) at the end of fit, so the run itself stays the
console script's own code path and the benchmark reads files, not the callback object Hydra built.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class SavedTensorBytes:
    """Peak bytes of activations autograd holds for backward (parameters excluded): the CPU stand-in for CUDA's
    ``max_memory_allocated`` — it is the part of memory that DGA's sub-batches bound (weights and optimizer
    state are the same in every run)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.param_ptrs = {p.data_ptr() for p in params}
        self.live = 0
        self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if t.data_ptr() in self.param_ptrs:
            return t
        return _Held(t, self)

    @staticmethod
    def _unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    """A saved tensor whose bytes count as live until autograd frees its graph node."""

    __slots__ = ("nbytes", "owner", "tensor")

    def __init__(self, tensor: torch.Tensor, owner: SavedTensorBytes) -> None:
        self.tensor, self.owner, self.nbytes = tensor, owner, tensor.numel() * tensor.element_size()
        owner.live += self.nbytes
        owner.peak = max(owner.peak, owner.live)

    def __del__(self) -> None:
        self.owner.live -= self.nbytes


class Probe(L.Callback):
    """Step times (device sync at every batch end), samples/s after ``warmup_steps`` optimizer steps, peak memory
    (CUDA max allocated; on CPU the peak of saved activations), and with ``save_grads`` the gradients the
    optimizer sees at the first step (after DDP reduction and AMP unscaling), as float64 on CPU."""

    def __init__(self, out: str, warmup_steps: int = 1, save_grads: bool = False, track_memory: bool = True) -> None:
        self.out = Path(out)
        self.warmup_steps = int(warmup_steps)
        self.save_grads = bool(save_grads)
        # CPU memory tracking hooks every tensor autograd saves (a Python call per tensor, forward and backward):
        # throughput benchmarks switch it off, so they time the training step and not the measuring.
        self.track_memory = bool(track_memory)
        self.marks: list[tuple[float, int, int]] = []  # (time, samples of this batch, global step after it)
        self.saved: SavedTensorBytes | None = None

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        elif self.track_memory:
            self.saved = SavedTensorBytes(list(pl_module.parameters()))
            self.saved.hooks.__enter__()
        self._sync(pl_module)
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self.marks.append((time.perf_counter(), int(batch["image"].shape[0]), int(trainer.global_step)))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.save_grads and trainer.global_step == 0:
            grads = {n: p.grad.detach().double().cpu() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.out.with_suffix(".grads.pt"))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved is not None:
            self.saved.hooks.__exit__(None, None, None)
        # the steady window: batches after the end of optimizer step `warmup_steps`
        t0 = next((t for t, _, step in self.marks if step >= self.warmup_steps), None)
        after = [(t, n) for t, n, step in self.marks if t0 is not None and t > t0]
        seconds = after[-1][0] - t0 if after else float("nan")
        samples = sum(n for _, n in after)
        if pl_module.device.type == "cuda":
            peak, metric = torch.cuda.max_memory_allocated(pl_module.device), "cuda_max_memory_allocated"
        else:
            peak, metric = (self.saved.peak, "saved_activation_bytes") if self.saved else (0, "not_tracked")
        result = {
            "optimizer_steps": int(trainer.global_step),
            "batches": len(self.marks),
            "timed_samples": samples,
            "timed_seconds": seconds,
            "samples_per_sec": samples / seconds if after else float("nan"),
            "peak_mem_bytes": int(peak),
            "peak_mem_metric": metric,
            "fit_seconds": time.perf_counter() - self.start,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
