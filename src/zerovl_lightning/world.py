"""What the launcher says about the world: this process's rank before any process group exists, the per-rank
batch of ``data.global_batch_size``, and the OmegaConf resolvers of ``trainer=ddp_multinode``.

Under ``srun`` neither ``RANK`` nor ``LOCAL_RANK`` is set; Lightning's own rank lookup (the one behind
``rank_zero_only``) also reads ``SLURM_PROCID`` (and LSF's ``JSM_NAMESPACE_RANK``), so it is used here.
"""

from __future__ import annotations

import os
import re
from datetime import datetime

from lightning.fabric.utilities.rank_zero import _get_rank
from omegaconf import OmegaConf


def launcher_rank() -> int:
    """Global rank as the launcher set it (torchrun, SLURM, LSF, Lightning's own launcher); 0 when alone."""
    return _get_rank() or 0


def is_global_zero() -> bool:
    return launcher_rank() == 0


def per_rank_batch(global_batch: int, world_size: int, key: str = "data.global_batch_size") -> int:
    """``global_batch / world_size``; a clear error when it does not divide (or is not positive)."""
    if global_batch < 1:
        raise ValueError(f"{key}={global_batch} must be positive")
    if global_batch % world_size:
        near = [m for m in (global_batch // world_size * world_size, -(-global_batch // world_size) * world_size) if m]
        raise ValueError(
            f"{key}={global_batch} is not divisible by the world size {world_size} (nodes × devices): "
            f"use a multiple of {world_size}, e.g. {' or '.join(map(str, dict.fromkeys(near)))}"
        )
    return global_batch // world_size


def check_sub_batch(sub_batch: int | None, per_rank: int, key: str, source: str) -> None:
    """The DGA sub-batch must divide the per-rank batch (``source`` says where that batch came from)."""
    if sub_batch is not None and (sub_batch < 1 or per_rank % sub_batch):
        divisors = [d for d in range(per_rank, 0, -1) if per_rank % d == 0][:6]
        raise ValueError(
            f"{key}={sub_batch} must divide the per-rank batch {per_rank} ({source}), e.g. "
            + ", ".join(map(str, divisors))
        )


def tasks_per_node(value: str | None = None) -> int | str:
    """Devices per node from ``SLURM_NTASKS_PER_NODE`` (``8``, ``8(x2)``, ``8(x2),8``), torchrun's
    ``LOCAL_WORLD_SIZE``, else ``"auto"``. Nodes with different task counts cannot form one DDP run."""
    raw = value if value is not None else os.environ.get("SLURM_NTASKS_PER_NODE")
    if raw:
        counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", raw)}
        if len(counts) != 1:
            raise ValueError(
                f"SLURM_NTASKS_PER_NODE={raw!r}: nodes run different numbers of tasks; DDP needs the same number "
                "of GPUs per node (sbatch --ntasks-per-node=G)"
            )
        return counts.pop()
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return int(local) if local else "auto"


def normalize_slurm_env() -> None:
    """``SLURM_NTASKS_PER_NODE=8(x2)`` (what SLURM exports for several equal nodes) → ``8``: Lightning's
    SLURMEnvironment reads it with ``int()`` and would fail; unequal nodes get :func:`tasks_per_node`'s error."""
    raw = os.environ.get("SLURM_NTASKS_PER_NODE")
    if raw and not raw.isdigit():
        os.environ["SLURM_NTASKS_PER_NODE"] = str(tasks_per_node(raw))


def run_stamp() -> str:
    """The run folder's name, the same in every task of a job: ``slurm_<job id>`` in an ``srun`` step (a
    requeued job gets the same folder, so ``ckpt_path=last`` resumes it), the torchrun run id when one is set,
    else the start time (one process; Lightning's own launcher passes the folder on to its children)."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job and step is not None:  # a task of an srun step (not just a shell inside an allocation)
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm_{job}" + (f"_{array}" if array else "") + (f".{step}" if step not in ("0", "") else "")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun_{run_id}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def external_launch_id() -> str | None:
    """An id of this launch shared by all its processes when an external launcher (srun, torchrun) started
    several of them; None otherwise (one process, or Lightning's own launcher). A requeued SLURM job or a
    restarted torchrun group gets a new id (``SLURM_RESTART_COUNT`` / ``TORCHELASTIC_RESTART_COUNT``)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        parts = [
            os.environ["SLURM_JOB_ID"],
            os.environ.get("SLURM_STEP_ID", ""),
            os.environ.get("SLURM_RESTART_COUNT", "0"),
        ]
        return "slurm-" + "-".join(parts)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and run_id and run_id != "none":
        return f"torchrun-{run_id}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return None


def register_resolvers() -> None:
    """``${zerovl.tasks_per_node:}`` and ``${zerovl.run_stamp:}`` (idempotent)."""
    if not OmegaConf.has_resolver("zerovl.tasks_per_node"):
        OmegaConf.register_new_resolver("zerovl.tasks_per_node", lambda: tasks_per_node())
    if not OmegaConf.has_resolver("zerovl.run_stamp"):
        OmegaConf.register_new_resolver("zerovl.run_stamp", run_stamp, use_cache=True)


register_resolvers()
