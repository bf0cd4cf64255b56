"""wandb, offline (``WANDB_MODE=offline``): a run writes its files, with the resolved config, the metrics, the
evaluation tables and the checkpoint metadata, and is finished (exit code 0) when the job ends."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from test_configs import write_smoke_data, zerovl_train

_BLOCK, _HEADER = 32768, 7  # wandb's transaction log uses LevelDB's log format: 32 KiB blocks, 7-byte headers


def _chunks(data: bytes) -> list[bytes]:
    """The records of a ``run-<id>.wandb`` file (header ``:W&B`` + magic + version, then LevelDB records)."""
    assert data[:4] == b":W&B", "not a wandb transaction log"
    out, pos, pending = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:  # FULL
            out.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            out.append(pending + chunk)
    return out


def read_wandb_run(run_dir: Path) -> dict[str, Any]:
    """What an offline run recorded: run info, config, history keys, summary, exit code."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": set(), "summary": {}, "exit_code": None, "run": None}
    for chunk in _chunks(log_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out["run"] = {
                "id": r.run_id,
                "group": r.run_group,
                "name": r.display_name,
                "job_type": r.job_type,
                "tags": list(r.tags),
                "project": r.project,
            }
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            out["history"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "summary":
            out["summary"].update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update}
            )
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def wandb_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_smoke_data(tmp_path_factory.mktemp("cache"))


def test_offline_run_records_config_metrics_tables_and_checkpoints(tmp_path: Path, cache: Path) -> None:
    run_dir = tmp_path / "run"
    zerovl_train(
        [
            "experiment=smoke",
            "logger=wandb",
            "callbacks=[retrieval,model_checkpoint]",
            "trainer.enable_checkpointing=true",
            "callbacks.retrieval.num_examples=2",
            "tags=[smoke,wandb_test]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        cache=cache,
    )
    (run,) = wandb_runs(run_dir)
    rec = read_wandb_run(run)
    # the run: offline, named after the task and the overrides, grouped, tagged
    assert rec["run"]["project"] == "zerovl-lightning" and rec["run"]["job_type"] == "smoke"
    assert rec["run"]["name"].startswith("smoke[") and "experiment=smoke" in rec["run"]["name"]
    assert rec["run"]["group"].startswith("smoke_") and rec["run"]["tags"] == ["smoke", "wandb_test"]
    # the resolved config (no interpolations left)
    cfg = rec["config"]
    assert cfg["model"]["model_name"] == "zerovl-tiny" and cfg["seed"] == 42
    assert cfg["paths"]["output_dir"] == str(run_dir)
    assert "${" not in json.dumps(cfg)
    # metrics, held-out retrieval and the example tables of the evaluation callback
    assert {"train/loss", "train/lr", "train/temperature", "mixup/alpha", "val/tuxpaint/rsum"} <= rec[
        "history"
    ]
    assert any(k.startswith("examples/tuxpaint/") for k in rec["history"]), sorted(rec["history"])
    # checkpoint metadata, pointing at real files
    summary = rec["summary"]
    assert summary["checkpoint/global_step"] == 6
    assert Path(summary["checkpoint/last_path"]).is_file()
    assert Path(summary["checkpoint/dir"]) == run_dir / "checkpoints"
    assert rec["exit_code"] == 0  # finished by the job, not by the interpreter's exit
