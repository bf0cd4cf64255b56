"""Run a function in a few CPU processes joined by gloo and collect what each returns (for DDP tests).

Usage::

    from ddp_utils import run_ddp

    def _work(rank: int, world_size: int, n: int) -> dict:  # module level, so spawn can pickle it
        ...  # torch.distributed is initialised (gloo) here
        return {"grad": tensor}

    results = run_ddp(_work, world_size=2, args=(8,))  # [result of rank 0, result of rank 1]

Results travel through ``torch.save`` files, so tensors and plain containers are fine. Each worker uses one
thread (tests share two cores). A worker exception fails the call with the worker's traceback. The torchrun
environment variables are set, so a ``lightning.Trainer(devices=world_size, strategy=DDPStrategy(...))`` built
inside ``fn`` joins the existing group (pass ``use_distributed_sampler=False`` and give each rank its data).
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free TCP port for a process group's store, *below* the ephemeral range.

    The port is free now but bound only seconds later, when the launched ranks have imported torch. A port the
    kernel hands out (``bind(("", 0))``) could meanwhile go to another test's gloo pair listener or outbound
    connection (the kernel draws those from the ephemeral range), so two groups would meet on one store. Ports
    below that range are only ever taken by an explicit bind.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()  # not the global RNG: tests seed it, and two workers would draw the same ports
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port below the ephemeral range ({low})")


def _worker(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: Sequence[Any], out_dir: str
) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # what torchrun would export: Lightning (LightningEnvironment) then joins this group instead of launching
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ddp(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = ()) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes → list of results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(
            _worker, args=(world_size, free_port(), fn, tuple(args), out_dir), nprocs=world_size, join=True
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
