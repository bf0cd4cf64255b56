"""Decoupled gradient accumulation (ZeroVL §4): the exact full-batch gradient at the memory of one sub-batch.

One step over K sub-batches per rank (global batch N = W·K·b):

1. Pass 1, no grad, train mode: encode every sub-batch, cache its embeddings (fp32) and the RNG state it
   started from (CPU + the model's CUDA device; per rank — never a global reseed, which would correlate
   dropout across ranks). Buffers changed by forward (BatchNorm running stats) are restored afterwards, so
   only pass 2 updates them, once. The last sub-batch keeps its graph (unless the model has BatchNorm
   running statistics) and is back-propagated first in pass 2 instead of being recomputed: a step costs
   2K − 1 sub-batch forwards and K backwards, with the peak memory of one sub-batch.
2. Gather U, V [N, D] from all ranks (one collective); compute ∂L/∂u_loc, ∂L/∂v_loc in closed form
   (:func:`~zerovl_lightning.loss.embedding_gradients`; the autograd oracle on request) and this rank's share
   of ∂L/∂logit_scale.
3. Pass 2, per sub-batch: restore its RNG state, encode with grad, back-propagate the surrogate
   Σ⟨g_u, u⟩ + Σ⟨g_v, v⟩ (+ g_τ·logit_scale on the last backward), whose gradient is exactly the cached one.
   The surrogate is a scalar so the caller's ``backward`` can be Lightning's ``manual_backward`` (AMP loss
   scaling included).
4. Reduction under DDP — by DDP's own reducer, once: the first K − 1 backwards run inside ``no_sync()``
   (gradients accumulate locally), the last one is synced, so the reducer all-reduces every bucket exactly
   once, overlapped with that backward, in place (``gradient_as_bucket_view`` works; no second copy of the
   gradients). Each rank holds its additive share of ∂L/∂θ and DDP *averages*, so the surrogate is scaled by
   W. The caller's ``backward`` must prepare the reducer when sync is on (Lightning's ``manual_backward``
   does; with a bare ``DistributedDataParallel`` call ``ddp.reducer.prepare_for_backward([])`` first).

Exact for any per-sample stochastic layer (dropout, drop-path, patch dropout) thanks to the RNG replay. Layers
coupling samples in train mode (BatchNorm batch statistics) see sub-batches, so DGA is exact for the loss
*with sub-batch statistics*, not for a full-batch BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zerovl_lightning.distributed import WorldInfo, all_gather_no_grad, world_info
from zerovl_lightning.loss import (
    EmbeddingGrads,
    SoftTargets,
    embedding_gradients,
    embedding_gradients_autograd,
    to_fp32,
)

Encode = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
# Computes this rank's loss share and ∂L/∂(local embeddings) from gathered detached embeddings: the seam where
# an objective plugs in (same signature as loss.embedding_gradients).
GradFn = Callable[..., EmbeddingGrads]


@dataclass
class RNGState:
    """The generator states a sub-batch's forward draws from: CPU and (if any) one CUDA device."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    device: torch.device | None = None

    @classmethod
    def capture(cls, device: torch.device | None = None) -> RNGState:
        if device is not None and device.type == "cuda":
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
        return cls(torch.get_rng_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@dataclass
class DGAResult:
    """``loss``: the full-batch loss with the step's targets (same value on every rank, detached)."""

    loss: torch.Tensor
    num_sub_batches: int
    grads: EmbeddingGrads


def split_batch(batch: Mapping[str, Any], sub_batch_size: int) -> list[dict[str, Any]]:
    """Split a batch dict along dim 0 into sub-batches of ``sub_batch_size`` (tensors and lists alike)."""
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list, tuple))}
    if len(sizes) != 1:
        raise ValueError(f"batch fields disagree on the batch size: {sorted(sizes)}")
    (size,) = sizes
    if sub_batch_size <= 0 or size % sub_batch_size:
        raise ValueError(f"sub-batch size {sub_batch_size} does not divide the batch size {size}")
    return [
        {
            k: (v[i : i + sub_batch_size] if isinstance(v, (torch.Tensor, list, tuple)) else v)
            for k, v in batch.items()
        }
        for i in range(0, size, sub_batch_size)
    ]


def _default_backward(tensor: torch.Tensor) -> None:
    tensor.backward()


def has_running_stats(model: nn.Module) -> bool:
    """True if a train-mode forward updates buffers whose value depends on the update order (BatchNorm)."""
    return any(
        isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
        for m in model.modules()
    )


class DecoupledStep:
    """The two-pass DGA step; stateless between steps, so one instance serves the whole run.

    Args:
        closed_form: closed-form embedding gradients (fast path); False uses the autograd oracle.
        replay_rng: restore each sub-batch's RNG state in pass 2 (False only to demonstrate why it matters).
        keep_last_graph: run the last sub-batch of pass 1 with its graph and back-propagate it first in pass 2
            instead of recomputing it: 2K − 1 forwards instead of 2K, same peak memory (its graph is the
            only one alive). Off automatically for models with BatchNorm running statistics, whose update
            order it would change.
    """

    def __init__(
        self,
        closed_form: bool = True,
        replay_rng: bool = True,
        keep_last_graph: bool = True,
    ) -> None:
        self.closed_form = closed_form
        self.replay_rng = replay_rng
        self.keep_last_graph = keep_last_graph

    def embedding_gradients(self) -> GradFn:
        """The objective's embedding gradients (InfoNCE: closed form, or the autograd oracle)."""
        return embedding_gradients if self.closed_form else embedding_gradients_autograd

    def __call__(
        self,
        model: nn.Module,
        encode: Encode,
        sub_batches: Sequence[Any],
        logit_scale: nn.Parameter,
        targets: SoftTargets | None = None,
        backward: Callable[[torch.Tensor], None] = _default_backward,
        world: WorldInfo | None = None,
        no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> DGAResult:
        """Accumulate ∂L/∂θ of the full-batch loss into ``.grad`` of ``model``'s parameters; return the loss.

        ``encode(sub_batch) -> (u [b, D], v [b, D])`` unit embeddings (mixup applied inside); called twice
        per sub-batch (once for the last one with ``keep_last_graph``). ``targets`` index the gathered batch:
        rank-major, then sub-batches in order. Gradients must be zero (or None) on entry; ``logit_scale``
        (log 1/τ) gets its gradient iff it requires grad. ``backward`` receives one scalar per sub-batch.
        ``no_sync``: under a process group, the DDP wrapper's ``no_sync`` (required there): DDP's reducer
        then reduces once, on the last backward.
        """
        world = world if world is not None else world_info()
        if world.distributed and no_sync is None:
            raise ValueError(
                "DecoupledStep under a process group needs the DDP wrapper's no_sync (no_sync=ddp.no_sync): "
                "DDP's reducer does the one gradient reduction"
            )
        device = logit_scale.device
        last = len(sub_batches) - 1
        keep_last = self.keep_last_graph and not has_running_stats(model)

        # ---- pass 1: cache embeddings + RNG states; no graph, except the last sub-batch's with keep_last
        rng_states: list[RNGState] = []
        image_cache, text_cache = [], []
        buffers = [b.detach().clone() for b in model.buffers()]
        kept: tuple[torch.Tensor, torch.Tensor] | None = None
        for k, sub in enumerate(sub_batches):
            rng_states.append(RNGState.capture(device))
            if keep_last and k == last:
                _restore_buffers(model, buffers)  # only graph-building forwards leave their buffer updates
                with torch.enable_grad():
                    kept = encode(sub)
                u, v = kept[0].detach(), kept[1].detach()
            else:
                with torch.no_grad():
                    u, v = encode(sub)
            image_cache.append(to_fp32(u))  # [b, D]
            text_cache.append(to_fp32(v))
        rng_after = RNGState.capture(device)
        if kept is None:
            _restore_buffers(model, buffers)
        sizes = [u.shape[0] for u in image_cache]
        u_loc, v_loc = torch.cat(image_cache), torch.cat(text_cache)  # [n, D]
        del image_cache, text_cache, u, v

        # ---- gather + embedding gradients
        uv_all = all_gather_no_grad(torch.stack([u_loc, v_loc], dim=1), world)  # [N, 2, D]
        u_all, v_all = uv_all[:, 0], uv_all[:, 1]  # [N, D]
        offset = world.rank * u_loc.shape[0]
        grads = self.embedding_gradients()(u_loc, v_loc, u_all, v_all, logit_scale.detach(), offset, targets, world)
        del uv_all, u_all, v_all

        # ---- pass 2: back-propagate the cached gradients (kept graph first, then replayed forwards)
        # DDP averages the ranks' gradients; each holds an additive share of ∂L/∂θ, so scale by W.
        scale = float(world.world_size)
        g_image = (grads.grad_image * scale).split(sizes)
        g_text = (grads.grad_text * scale).split(sizes)
        g_logit_scale = grads.grad_logit_scale * scale
        order = ([last] if kept is not None else []) + [
            k for k in range(last + 1) if kept is None or k != last
        ]
        for i, k in enumerate(order):
            if kept is not None and k == last:
                u, v = kept
                kept = None
            else:
                if self.replay_rng:
                    rng_states[k].restore()
                with torch.enable_grad():
                    u, v = encode(sub_batches[k])
            synced = i == len(order) - 1  # the one backward DDP's reducer reduces
            with torch.enable_grad():
                surrogate = (to_fp32(u) * g_image[k]).sum() + (to_fp32(v) * g_text[k]).sum()
                if synced and logit_scale.requires_grad:  # on the synced backward: DDP waits for every param
                    surrogate = surrogate + logit_scale * g_logit_scale.to(logit_scale.dtype)
            with nullcontext() if synced or no_sync is None else no_sync():
                backward(surrogate)
            del u, v, surrogate
        if self.replay_rng:
            rng_after.restore()  # the stream continues as after one pass, whatever pass 2 drew

        # ---- the loss: sum of the ranks' shares (the gradients were reduced by DDP on the last backward)
        loss = grads.loss_share.detach().clone()
        if world.distributed:
            torch.distributed.all_reduce(loss, group=world.group)
        return DGAResult(loss, len(sub_batches), grads)


@torch.no_grad()
def _restore_buffers(model: nn.Module, saved: Sequence[torch.Tensor]) -> None:
    for b, s in zip(model.buffers(), saved):
        b.copy_(s)
