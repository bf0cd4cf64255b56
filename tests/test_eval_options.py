"""``zerovl-eval`` options: every key set on the command line reaches the evaluation it configures.

The evaluators are configured by training's own files (conf/callbacks/{retrieval,zeroshot,linear_probe}.yaml,
composed by conf/eval.yaml): batch sizes, retrieval sets, retrieval options (ks, chunk size, ties), the
classification and linear-probe switches, and ``tasks``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from test_eval_callbacks import write_shards

from zerovl_lightning.config_checks import ConfigError
from zerovl_lightning.eval.classification_callbacks import LinearProbeCallback, ZeroShotCallback
from zerovl_lightning.evaluate import build_evaluators, build_retrieval, run
from zerovl_lightning.export import export_open_clip
from zerovl_lightning.model import build_tiny


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalsets")
    write_shards(root / "toy" / "heldout")  # 12 images, 24 captions
    write_shards(root / "other" / "heldout", n_images=5)
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export")
    export_open_clip(build_tiny(), folder)
    return folder


def eval_cfg(*overrides: str):
    with initialize_config_module("zerovl_lightning.conf", version_base="1.3"):
        return compose("eval", overrides=["progress=false", "output=/tmp/unused/eval_results.json", *overrides])


def test_batch_size_and_workers_reach_every_evaluator(root):
    cfg = eval_cfg("batch_size=7", "num_workers=0", f"data.val_sets={{toy: {root / 'toy' / 'heldout'}}}")
    module, _, loaders = build_retrieval(cfg, build_tiny(), Path("/tmp/unused"))
    assert [loader.batch_size for loader in loaders] == [7]
    zeroshot, probe = build_evaluators(cfg)
    assert isinstance(zeroshot, ZeroShotCallback) and isinstance(probe, LinearProbeCallback)
    assert zeroshot.batch_size == probe.batch_size == 7 and not zeroshot.progress
    # one evaluator alone, under training's key
    cfg = eval_cfg("batch_size=7", "data.val_batch_size=3", "callbacks.zeroshot.batch_size=5",
                   f"data.val_sets={{toy: {root / 'toy' / 'heldout'}}}")  # fmt: skip
    _, _, loaders = build_retrieval(cfg, build_tiny(), Path("/tmp/unused"))
    assert {loader.batch_size for loader in loaders} == {3}
    zeroshot, probe = build_evaluators(cfg)
    assert (zeroshot.batch_size, probe.batch_size) == (5, 7)


def test_retrieval_sets_and_options_reach_the_validation(root):
    cfg = eval_cfg(f"data.val_sets={root / '*' / 'heldout'}", "module.retrieval.ks=[1,3]",
                   "module.retrieval.chunk_size=5", "module.retrieval.ties=optimistic",
                   "callbacks.retrieval.curve_max_k=7")  # fmt: skip
    module, reporter, loaders = build_retrieval(cfg, build_tiny(), Path("/tmp/unused"))
    assert [loader.dataset.name for loader in loaders] == ["other", "toy"]  # named after their folders
    v = module.retrieval
    assert (v.ks, v.chunk_size, v.ties) == ((1, 3), 5, "optimistic")
    assert reporter.curve_max_k == 7
    cfg = eval_cfg(f"data.val_sets={{mine: {root / 'other' / 'heldout'}}}")
    _, _, loaders = build_retrieval(cfg, build_tiny(), Path("/tmp/unused"))
    assert [loader.dataset.name for loader in loaders] == ["mine"] and len(loaders[0].dataset) == 5


def test_classification_and_probe_switches(root):
    cfg = eval_cfg("callbacks.zeroshot.sets=[digits]", "callbacks.zeroshot.test_limit=30",
                   "callbacks.zeroshot.image_size=16", "callbacks.linear_probe.sets=[digits]",
                   "callbacks.linear_probe.train_limit=40", "callbacks.linear_probe.weight_decays=[0.5]",
                   "callbacks.linear_probe.max_iter=20", "callbacks.linear_probe.val_fraction=0.25")  # fmt: skip
    zeroshot, probe = build_evaluators(cfg)
    assert (list(zeroshot.sets), zeroshot.test_limit, zeroshot.image_size) == (["digits"], 30, 16)
    assert (list(probe.sets), probe.train_limit, probe.weight_decays) == (["digits"], 40, (0.5,))
    assert (probe.max_iter, probe.val_fraction) == (20, 0.25)
    # tasks picks evaluators; an empty set list switches one off
    assert [type(e) for e in build_evaluators(eval_cfg("tasks=[linear_probe]"))] == [LinearProbeCallback]
    assert build_evaluators(eval_cfg("callbacks.zeroshot.sets=[]", "tasks=[zeroshot]")) == []
    assert build_retrieval(eval_cfg("tasks=[zeroshot]"), build_tiny(), Path("/tmp/unused")) is None
    with pytest.raises(ConfigError, match=r"tasks=\['retrieval', 'probe'\]: unknown \['probe'\]"):
        build_evaluators(eval_cfg("tasks=[retrieval,probe]"))


def test_options_change_the_results_as_they_should(root, export, tmp_path):
    """End to end through ``run``: chunking never changes the numbers, ks chooses the recall keys, the test
    limit the number of samples."""
    common = [f"export_dir={export}", "tasks=[retrieval,zeroshot]",
              f"data.val_sets={{toy: {root / 'toy' / 'heldout'}}}", "callbacks.zeroshot.sets=[digits]"]  # fmt: skip
    a = run(eval_cfg(*common, "module.retrieval.ks=[1,2]", "module.retrieval.chunk_size=3", "batch_size=5",
                     "callbacks.zeroshot.test_limit=20", f"output={tmp_path / 'a' / 'r.json'}"))  # fmt: skip
    b = run(eval_cfg(*common, "module.retrieval.ks=[1,2]", "callbacks.zeroshot.test_limit=40",
                     f"output={tmp_path / 'b' / 'r.json'}"))  # fmt: skip
    (ra, za), (rb, zb) = [{r["task"]: r["metrics"] for r in x}.values() for x in (a, b)]
    assert {"i2t_r1", "i2t_r2", "t2i_r2"} <= set(ra) and "i2t_r5" not in ra
    assert ra == rb  # chunk size and batch size: same numbers exactly
    assert ra["num_captions"] == 24 and ra["num_images"] == 12
    assert za["num_samples"] == 20 and zb["num_samples"] == 40
    assert json.loads((tmp_path / "a" / "eval" / "zeroshot_retrieval.json").read_text())[0]["metrics"] == ra


@pytest.mark.slow
def test_console_script_options(root, export, tmp_path):
    """The installed ``zerovl-eval``: options on its command line reach the evaluation."""
    out = tmp_path / "results.json"
    cmd = [str(Path(sys.executable).parent / "zerovl-eval"), f"export_dir={export}", "tasks=[retrieval]",
           f"data.val_sets={{toy: {root / 'toy' / 'heldout'}}}", "module.retrieval.ks=[1,3]",
           "module.retrieval.chunk_size=4", "batch_size=5", "progress=false", f"output={out}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads(out.read_text())
    assert record["dataset"] == "toy" and "i2t_r3" in record["metrics"] and "i2t_r5" not in record["metrics"]
    assert "| toy | 0 |" in proc.stdout
