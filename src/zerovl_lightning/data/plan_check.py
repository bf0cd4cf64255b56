"""Every rank must derive the same sampling plan: compare its inputs across ranks once, in ``setup``.

Each rank lists and counts its shards on its own (``shards.SourceInfo``). A listing that differs on one node (a
shard still being written, a lagging NFS view) would either hang the run in the loss all-gather (different
``steps_per_epoch``) or silently mix sources inside a global batch (different quotas). One ``all_gather_object``
of a small digest per rank finds it; only on a mismatch are the differing sources' shard lists exchanged, to
name the rank and the shards in the error (raised on every rank, so none is left waiting).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from .shards import SourceInfo


class PlanMismatchError(RuntimeError):
    """Ranks derived different sampling plans."""


def plan_inputs(infos: Sequence[SourceInfo], settings: dict[str, Any]) -> dict[str, Any]:
    """What the plan is a function of: per source the shard names and counts, plus the sampler settings.

    Shards are compared by file name, so the same data mounted at different paths on different nodes agrees.
    """
    return {
        "sources": {
            i.name: [[os.path.basename(u), int(n)] for u, n in zip(i.urls, i.shard_sizes or [])] for i in infos
        },
        "num_samples": {i.name: int(i.num_samples) for i in infos},
        "settings": settings,
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_same_plan(inputs: dict[str, Any], all_gather: Callable[[Any], list[Any]]) -> None:
    """Raise :class:`PlanMismatchError` on every rank when any rank's ``inputs`` differ from rank 0's.

    ``all_gather`` is ``all_gather_object`` over the ranks (``[obj]`` without a process group). The common
    path costs one collective of one digest per source and rank.
    """
    mine = {
        "sources": {name: _digest(shards) for name, shards in inputs["sources"].items()},
        "rest": _digest({k: v for k, v in inputs.items() if k != "sources"}),
    }
    digests = all_gather(mine)
    if all(d == digests[0] for d in digests):
        return
    differing = sorted(
        {name for d in digests[1:] for name, h in d["sources"].items() if digests[0]["sources"].get(name) != h}
        | {name for d in digests[1:] for name in digests[0]["sources"] if name not in d["sources"]}
    )
    rest = {k: v for k, v in inputs.items() if k != "sources"}
    lists = all_gather({name: inputs["sources"].get(name) for name in differing} | {"_rest": rest})
    problems: list[str] = []
    ref = lists[0]
    for rank, other in enumerate(lists[1:], start=1):
        for name in differing:
            a, b = dict(map(tuple, ref.get(name) or [])), dict(map(tuple, other.get(name) or []))
            if a == b:
                continue
            only_here = sorted(set(b) - set(a))
            missing = sorted(set(a) - set(b))
            counts = sorted(s for s in set(a) & set(b) if a[s] != b[s])
            parts = []
            if only_here:
                parts.append(f"extra shard(s) {', '.join(only_here[:5])}" + (" …" if len(only_here) > 5 else ""))
            if missing:
                parts.append(f"missing shard(s) {', '.join(missing[:5])}" + (" …" if len(missing) > 5 else ""))
            if counts:
                parts.append("different sample counts in " + ", ".join(f"{s} ({a[s]} vs {b[s]})" for s in counts[:5]))
            problems.append(f"rank {rank} sees source {name!r} differently from rank 0: " + "; ".join(parts))
        rest_a, rest_b = ref["_rest"], other["_rest"]
        if rest_a != rest_b:
            keys = sorted(k for k in set(rest_a) | set(rest_b) if rest_a.get(k) != rest_b.get(k))
            problems.append(f"rank {rank} differs from rank 0 in {', '.join(keys)}: {rest_b} vs {rest_a}")
    raise PlanMismatchError(
        "ranks derived different sampling plans (a shard still being written, a lagging NFS view?) — "
        + " | ".join(problems)
        + ". Make every node see the same shards (or pin them with a brace pattern / stats.json) and restart."
    )
