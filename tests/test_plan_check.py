"""One sampling plan on every rank: two gloo processes where one sees an extra shard stop in ``setup`` with
one error naming the rank, the source and the shard; identical views pass with one collective."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from shard_fixtures import write_source

from zerovl_lightning.data.datamodule import ZeroVLDataModule
from zerovl_lightning.data.plan_check import PlanMismatchError
from zerovl_lightning.model import build_tiny


def _worker(rank: int, world: int, specs: list[Any], out: str, init: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tiny = build_tiny()
    calls = []
    real = torch.distributed.all_gather_object

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    torch.distributed.all_gather_object = counted  # type: ignore[assignment]
    try:
        dm = ZeroVLDataModule(
            sources={"a": specs[rank], "b": specs[2]},
            batch_size=2,
            num_workers=1,
            shuffle_buffer=4,
            tokenizer=tiny.tokenizer,
            preprocess_cfg=tiny.preprocess_cfg,
        )
        try:
            dm.setup("fit")
            result: dict[str, Any] = {"ok": True, "steps": dm.steps_per_epoch}
        except PlanMismatchError as e:
            result = {"ok": False, "error": str(e)}
        result["collectives"] = len(calls)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.all_gather_object = real  # type: ignore[assignment]
        torch.distributed.destroy_process_group()


def _run(tmp_path: Path, specs: list[Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    (tmp_path / "out").mkdir(exist_ok=True)
    init = f"file://{tmp_path / 'init'}"
    mp.start_processes(_worker, args=(2, specs, str(tmp_path / "out"), init), nprocs=2, join=True,
                       start_method="fork")
    return [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.ddp
def test_a_rank_that_sees_an_extra_shard_stops_every_rank_naming_it(tmp_path: Path) -> None:
    write_source(tmp_path / "a", "a", 24, 6, stats=False)  # counts come from scanning, as on a live listing
    write_source(tmp_path / "b", "b", 12, 6)
    # rank 1's view of source a: the same four shards plus a fifth one (e.g. still being written elsewhere)
    shutil.copy(tmp_path / "a" / "shard-000000.tar", tmp_path / "a-extra.tar")
    shards = sorted(str(p) for p in (tmp_path / "a").glob("*.tar"))
    same = _run(tmp_path, [shards, list(shards), str(tmp_path / "b")])
    assert same[0]["ok"] and same[1]["ok"] and same[0]["steps"] == same[1]["steps"]
    assert same[0]["collectives"] == same[1]["collectives"] == 1  # the common path: one collective

    res = _run(tmp_path, [shards, [*shards, str(tmp_path / "a-extra.tar")], str(tmp_path / "b")])
    assert not res[0]["ok"] and not res[1]["ok"]
    assert res[0]["error"] == res[1]["error"]  # every rank stops, with the same message
    msg = res[0]["error"]
    assert "rank 1 sees source 'a' differently from rank 0" in msg
    assert "extra shard(s) a-extra.tar" in msg
    assert "'b'" not in msg.split("—", 1)[1].split("|")[0]  # the agreeing source is not blamed
