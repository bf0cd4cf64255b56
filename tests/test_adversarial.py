"""Adversarial runs of the real console scripts (``zerovl-train``, ``zerovl-eval``, ``zerovl-export``) as a
demanding user would make them: bad configs, bad shards and stats built at run time, corrupt checkpoints,
kill -9 and resume, a full disk (a 1 MiB tmpfs, root only), a diverging run.

Every case asserts one of two outcomes and nothing lost:

- **clear**: exit status 1, the last line of stderr is ``error: <Kind>: <message>`` naming the file or key,
  no traceback anywhere in the output (``HYDRA_FULL_ERROR=1`` brings the traceback back);
- **counted**: exit status 0, the bad input skipped and counted in the printed bad-sample summary.

Each case is a subprocess of a few CPU seconds (imports), so one runs in ``make test``; the rest are
``slow`` (``make test-slow``). :func:`classify` is the yardstick: clear / counted / silent / traceback.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shard_fixtures import BAD_EXPECTED, write_bad_source, write_source

BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
ENV.pop("HYDRA_FULL_ERROR", None)


def cli(name: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """Run a console script of this venv; returns (exit status, stdout + stderr, last stderr line)."""
    r = subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout
    )
    err_lines = [line for line in r.stderr.splitlines() if line.strip()]
    return r.returncode, r.stdout + r.stderr, err_lines[-1] if err_lines else ""


def classify(rc: int, output: str, last: str) -> str:
    if "Traceback (most recent call last)" in output:
        return "traceback"
    if rc == 1 and last.startswith("error: "):
        return "clear"
    if rc == 0 and "bad samples skipped" in output:
        return "counted"
    return "silent"


def assert_clear(result, *needles: str) -> None:
    rc, output, last = result
    assert classify(rc, output, last) == "clear", output[-3000:]
    for needle in needles:
        assert needle in last, last


def train_args(out: Path, sources: dict[str, str], *extra: str, steps: int = 6) -> list[str]:
    srcs = ",".join(f"{name}:{{path:'{path}'}}" for name, path in sources.items())
    return [
        "model=tiny", "data=custom", "trainer=cpu", "callbacks=default", "logger=csv",
        f"hydra.run.dir={out}", f"paths.root_dir={out}", f"paths.log_dir={out}/logs",
        f"++data.sources={{{srcs}}}", "data.batch_size=8", "data.num_workers=0", "data.image_size=32",
        "data.shuffle_buffer=16", f"trainer.max_steps={steps}", "trainer.max_epochs=1000",
        "trainer.log_every_n_steps=1", "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "++trainer.plugins=[{_target_:zerovl_lightning.checkpointing.AtomicCheckpointIO}]",
        "callbacks.step_checkpoint.every_n_train_steps=2", *extra,
    ]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adv_shards")
    write_source(root / "a", "a", 40, 10)
    write_source(root / "b", "b", 24, 8)
    return {"a": str(root / "a"), "b": str(root / "b")}


def _csv_steps(out: Path) -> list[int]:
    with open(out / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


# ------------------------------------------------------------------------------------------- make test
def test_config_error_is_one_line(sources, tmp_path):
    args = train_args(tmp_path / "run", sources, "trainer.max_steps=0")
    assert_clear(cli("zerovl-train", *args), "ConfigError: trainer.max_steps=0 must be positive")


# ------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_hydra_full_error_shows_everything(sources, tmp_path):
    args = train_args(tmp_path / "run", sources, "trainer.max_steps=0")
    rc, output, _ = cli("zerovl-train", *args, env={"HYDRA_FULL_ERROR": "1"})
    assert rc == 1 and "Traceback (most recent call last)" in output and "trainer.max_steps=0" in output


@pytest.mark.slow
def test_eval_on_a_garbage_file_is_one_line(tmp_path):
    garbage = tmp_path / "model.ckpt"
    garbage.write_text("12\n" * 100)
    assert_clear(cli("zerovl-eval", f"ckpt_path={garbage}", f"hydra.run.dir={tmp_path}/eval"),
                 f"CheckpointError: {garbage}: not a complete torch zip archive")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["module.optimizer.lr=fast"], "module.optimizer.lr='fast' must be a number"),
        (["data.batch_size=0"], "data.batch_size=0 must be positive"),
        (["module.sub_batch_size=3"], "module.sub_batch_size=3 must be a positive divisor"),
        (["ckpt_path=/nonexistent/x.ckpt"], "ckpt_path=/nonexistent/x.ckpt does not exist"),
        (["++data.sources.c.path=/nonexistent/shards"], "data.sources.c.path='/nonexistent/shards'"),
        (["data.sampling=random"], "data.sampling='random' is unknown"),
    ],
)
def test_bad_configs(sources, tmp_path, extra, needle):
    assert_clear(cli("zerovl-train", *train_args(tmp_path / "run", sources, *extra)), needle)


@pytest.fixture(scope="module")
def trained(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adv_run")
    rc, output, _ = cli("zerovl-train", *train_args(out, sources))
    assert rc == 0, output[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "empty", "truncated"])
@pytest.mark.parametrize("command", ["zerovl-eval", "zerovl-export"])
def test_eval_and_export_on_bad_checkpoints(trained, tmp_path, kind, command):
    path = tmp_path / "model.ckpt"
    good = (trained / "checkpoints" / "last.ckpt").read_bytes()
    if kind != "missing":
        path.write_bytes(b"" if kind == "empty" else good[: len(good) // 3])
    args = [f"ckpt_path={path}", f"hydra.run.dir={tmp_path}/eval"] if command == "zerovl-eval" else [
        str(path), str(tmp_path / "export")]
    assert_clear(cli(command, *args), f"CheckpointError: {path}")


@pytest.mark.slow
def test_bad_shards_are_counted_and_summarised(sources, tmp_path):
    write_bad_source(tmp_path / "bad")
    rc, output, last = cli("zerovl-train", *train_args(
        tmp_path / "run", {"a": sources["a"], "bad": str(tmp_path / "bad")}, "trainer.max_steps=-1",
        "trainer.max_epochs=1", "data.batch_size=4", "data.weights=uniform"))
    assert classify(rc, output, last) == "counted", output[-3000:]
    want = ", ".join(f"{k}={n}" for k, n in sorted(BAD_EXPECTED.items()))
    assert f"bad: {want}" in output


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["double", "half", "missing_shard", "malformed"])
def test_stats_that_contradict_the_shards(sources, tmp_path, edit):
    d = tmp_path / "s"
    write_source(d, "s", 20, 10)
    p = d / "stats.json"
    st = json.loads(p.read_text())
    if edit == "malformed":
        p.write_text("{")
    elif edit == "missing_shard":
        (d / "shard-000001.tar").unlink()
    else:
        f = 2 if edit == "double" else 0.5
        st["num_samples"] = int(st["num_samples"] * f)
        for x in st["shards"]:
            x["num_samples"] = int(x["num_samples"] * f)
        p.write_text(json.dumps(st))
    assert_clear(cli("zerovl-train", *train_args(tmp_path / "run", {"s": str(d)})), f"DataError: {p}")


@pytest.mark.slow
def test_diverging_run_fails(sources, tmp_path):
    out = tmp_path / "run"
    result = cli("zerovl-train", *train_args(out, sources, "module.optimizer.lr=1e6",
                                            "callbacks.non_finite_guard.max_consecutive_skips=3", steps=24))
    assert_clear(result, "NonFiniteError: ")


@pytest.mark.slow
def test_changed_batch_size_refuses_to_resume(trained, sources, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    assert_clear(cli("zerovl-train", *train_args(out, sources, "ckpt_path=last", "data.batch_size=4")),
                 "data.batch_size: 8 in the checkpoint, 4 now")


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_nothing_torn(sources, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        result = cli("zerovl-train", *train_args(tmp_path / "run", sources,
                                                 f"callbacks.model_checkpoint.dirpath={mnt}",
                                                 f"callbacks.step_checkpoint.dirpath={mnt}"))
        assert_clear(result, "DiskError: ", "the disk is full")
        assert "MiB free for checkpoints" in result[1]  # warned before the first save
        assert not [p for p in mnt.iterdir() if p.name.startswith(".")]  # no temp file left
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_kill_9_and_resume_keeps_every_step_once(sources, tmp_path):
    out = tmp_path / "run"
    args = train_args(out, sources, steps=12)
    proc = subprocess.Popen([str(BIN / "zerovl-train"), *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not (out / "checkpoints" / "step_000006.ckpt").exists():
            time.sleep(0.2)
        assert proc.poll() is None, "finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rc, output, _ = cli("zerovl-train", *args, "ckpt_path=last")
    assert rc == 0, output[-3000:]
    assert "Resuming from" in output and "(global step" in output
    assert _csv_steps(out) == list(range(12))
