"""``trainer=ddp_multinode`` under SLURM, simulated: 4 ``zerovl-train`` processes with the variables ``srun``
sets for 2 nodes × 2 tasks (``SLURM_PROCID``, ``SLURM_NODEID``, ``SLURM_NTASKS_PER_NODE=2(x2)``, no ``RANK``),
gloo on CPU. One global batch size key, one run folder, single-source global batches, identical parameters on
every rank, and one resume choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_utils import free_port
from test_configs import write_smoke_data

TESTS = Path(__file__).resolve().parent


def _srun(
    args: list[str], tmp_path: Path, cache: Path, out: Path, restart: int = 0
) -> list[subprocess.CompletedProcess]:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    base.update(
        ZEROVL_CACHE=str(cache), WANDB_MODE="offline", HYDRA_FULL_ERROR="1", PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_JOB_NAME="zerovl", SLURM_NTASKS="4", SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="2(x2)", SLURM_NODELIST="localhost", SLURM_RESTART_COUNT=str(restart),
    )
    cmd = [
        str(Path(sys.executable).parent / "zerovl-train"), "experiment=smoke", "trainer=ddp_multinode",
        "trainer.accelerator=cpu", "trainer.precision=32", "+trainer.strategy.process_group_backend=gloo",
        "data.global_batch_size=32", f"paths.log_dir={tmp_path / 'logs'}",
        "+callbacks.probe._target_=multinode_probe.Probe", f"+callbacks.probe.out={out}", *args,
    ]
    procs = []
    for r in range(4):
        env = dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % 2), SLURM_NODEID=str(r // 2))
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    done = []
    for p in procs:
        stdout, _ = p.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, ""))
    failed = [r for r, p in enumerate(done) if p.returncode != 0]
    # one crashing task makes the others fail with "connection closed by peer": show every failed task's tail
    assert not failed, "\n".join(f"task {r} failed (rc {done[r].returncode}):\n{done[r].stdout[-3000:]}"
                                  for r in failed)
    return done


def _records(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.slow
@pytest.mark.ddp
def test_two_simulated_slurm_nodes_train_and_resume_as_one_run(tmp_path: Path) -> None:
    cache = write_smoke_data(tmp_path / "cache")
    first = tmp_path / "probe1"
    _srun(["trainer.max_steps=3", "callbacks=[retrieval,step_checkpoint]",
           "callbacks.step_checkpoint.every_n_train_steps=2", "trainer.enable_checkpointing=true",
           "val_at_end=false"], tmp_path, cache, first)
    rec = _records(first)
    assert [r["rank"] for r in rec] == [0, 1, 2, 3]
    assert {r["world_size"] for r in rec} == {4} and {r["num_nodes"] for r in rec} == {2}
    assert [r["node_rank"] for r in rec] == [0, 0, 1, 1]
    assert {r["batch_size"] for r in rec} == {8}  # data.global_batch_size=32 over 4 ranks
    run_dir = tmp_path / "logs" / "smoke" / "runs" / "slurm_4242"  # one folder for every task, no extra key
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    for step in range(3):  # every global batch comes from one source
        sources = {s for r in rec for s in r["sources"][step]}
        assert len(sources) == 1, (step, sources)
    params = [torch.load(first / f"params{r}.pt") for r in range(4)]
    assert all(torch.equal(params[0], p) for p in params[1:])

    saved = [torch.load(p, map_location="cpu", weights_only=False)["global_step"]
             for p in (run_dir / "checkpoints").glob("*.ckpt")]
    assert max(saved) == 2  # every 2 steps; the final step's save is model_checkpoint's, not used here
    second = tmp_path / "probe2"
    _srun(["trainer.max_steps=4", "callbacks=[retrieval,step_checkpoint]", "ckpt_path=last",
           "trainer.enable_checkpointing=true", "val_at_end=false"], tmp_path, cache, second, restart=1)  # requeued
    rec2 = _records(second)
    chosen = {r["ckpt_path"] for r in rec2}
    assert len(chosen) == 1 and next(iter(chosen)).startswith(str(run_dir / "checkpoints"))  # one resume choice
    assert all(len(r["sources"]) == 4 - max(saved) for r in rec2)  # resumed at the newest: only steps 3, 4 ran
    params2 = [torch.load(second / f"params{r}.pt") for r in range(4)]
    assert all(torch.equal(params2[0], p) for p in params2[1:])
