"""Small torch.distributed helpers for the contrastive loss and DGA (no-ops without a process group).

All gathers concatenate along dim 0 in rank order, so global index = rank offset + local index. Per-rank
sizes must be equal (DDP batches are), which keeps the rank offset ``rank * n`` and avoids an extra size
exchange.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


@dataclass(frozen=True)
class WorldInfo:
    """Rank and world size of a process group (``rank=0, world_size=1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_info(group: dist.ProcessGroup | None = None) -> WorldInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return WorldInfo()
    return WorldInfo(dist.get_rank(group), dist.get_world_size(group), group)


def all_gather_with_grad(x: torch.Tensor, world: WorldInfo) -> torch.Tensor:
    """[n, ...] → [W·n, ...]; backward sums every rank's gradient of the gathered tensor into the local slice.

    This is what makes the *local* loss of each rank, averaged by DDP, give the full-batch gradient (§5).
    """
    if not world.distributed:
        return x
    return torch.cat(dist_nn.all_gather(x, group=world.group), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, world: WorldInfo) -> torch.Tensor:
    """[n, ...] → [W·n, ...] without a graph (DGA pass-1 caches, log-sum-exp rows)."""
    if not world.distributed:
        return x
    out = torch.empty((world.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=world.group)
    return out


@torch.no_grad()
def all_reduce_coalesced_(
    tensors: Iterable[torch.Tensor], world: WorldInfo, bucket_bytes: int = 25 * 2**20
) -> int:
    """Sum ``tensors`` in place across ranks, flattened into buckets of one dtype/device (like DDP's reducer).

    Returns the number of collectives issued (one per bucket). Every rank must pass the same tensors in the
    same order — true for gradients of the same model after the same graph.
    """
    if not world.distributed:
        return 0
    buckets: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key not in buckets or sizes[key] + nbytes > bucket_bytes:
            buckets.setdefault(key, []).append([])
            sizes[key] = 0
        buckets[key][-1].append(t)
        sizes[key] += nbytes
    flat_and_parts = []
    for groups in buckets.values():
        for parts in groups:
            if not parts:
                continue
            flat = torch.cat([p.reshape(-1) for p in parts])
            work = dist.all_reduce(flat, group=world.group, async_op=True)
            flat_and_parts.append((flat, parts, work))
    for flat, parts, work in flat_and_parts:
        work.wait()
        offset = 0
        for p in parts:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return len(flat_and_parts)
