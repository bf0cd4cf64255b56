"""Small torch.distributed helpers for the contrastive loss and DGA (no-ops without a process group).

Gradient reduction is not here: DDP's reducer does it, for the plain and the DGA step alike.

All gathers concatenate along dim 0 in rank order, so global index = rank offset + local index. Per-rank
sizes must be equal (DDP batches are), which keeps the rank offset ``rank * n`` and avoids an extra size
exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order: a collective under a process group, ``[obj]`` without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
