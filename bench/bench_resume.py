"""Resume cost: time from process start to the first batch of a resumed epoch, early vs late in the epoch.

A synthetic corpus of 200 shards × 100 samples (32×32 JPEGs, written at run time into a temp folder) is one
``resampled=true`` source, the large-corpus setting where an epoch is the whole corpus. Each measurement is a
fresh Python process that imports the package, builds ``ZeroVLDataModule`` (2 workers, batch 32), restores a
sampling state at 10 % or 90 % of the epoch (the state a checkpoint holds there: each worker lane's position)
and takes the first batch from ``train_dataloader()`` — the batch the first resumed training step gets. Both
sides are measured interleaved (early, late, early, late, …) with the seek (``SlotStream.seek``) and, for
comparison, with the old replay of every consumed sample (``SlotStream.skip``). Reported: median wall seconds, the
wall seconds of the resume itself (``load_state_dict`` → first batch) and median CPU seconds (the process and
its dataloader workers, ``RUSAGE_CHILDREN``) — CPU time is the figure to trust on a shared machine.
Goal: late / early ≤ 1.5 with the seek.

Usage: ``python bench/bench_resume.py [--repeats 3]``; writes ``bench/results/resume.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARDS, PER_SHARD, BATCH, WORKERS = 200, 100, 32, 2

CHILD = r"""
import sys, time
t0 = float(sys.argv[1])
from zerovl_lightning.data.datamodule import ZeroVLDataModule
from zerovl_lightning.data.shards import SlotStream
from zerovl_lightning.model import build_tiny
root, fraction, how = sys.argv[2], float(sys.argv[3]), sys.argv[4]
if how == "replay":
    SlotStream.seek = SlotStream.skip
tiny = build_tiny()
dm = ZeroVLDataModule(sources={"synth": root}, batch_size=BATCH, num_workers=WORKERS, resampled=True,
                      shuffle_buffer=1000, seed=0, tokenizer=tiny.tokenizer, preprocess_cfg=tiny.preprocess_cfg)
dm.setup("fit")
steps = dm.steps_per_epoch
step = int(fraction * steps)
W, B = WORKERS, BATCH
positions = {lane: {"synth": len(range(lane, step, W)) * B} for lane in range(W)}
state = {"version": 1, "fingerprint": dm._fingerprint(), "epoch": 0, "step": step,
         "ranks": [{"epoch": 0, "step": step, "positions": positions, "bad_counts": {}}]}
t1 = time.time()
dm.load_state_dict(state)
batch = next(iter(dm.train_dataloader()))
assert batch["image"].shape[0] == B
print(f"{time.time() - t0:.4f} {step} {steps} {time.time() - t1:.4f}")
""".replace("BATCH", str(BATCH)).replace("WORKERS", str(WORKERS))


def write_corpus(root: Path) -> None:
    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True)
    stats = []
    for s in range(SHARDS):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as tw:
            for i in range(PER_SHARD):
                k = s * PER_SHARD + i
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (k % 251, (7 * k) % 253, (13 * k) % 255)).save(buf, format="JPEG")
                tw.write({"__key__": f"synth-{k:07d}", "jpg": buf.getvalue(), "txt": f"synthetic sample {k}"})
        stats.append({"file": name, "num_samples": PER_SHARD})
    (root / "stats.json").write_text(json.dumps({"num_samples": SHARDS * PER_SHARD, "shards": stats}))


def measure(root: Path, fraction: float, how: str) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, f"{t0:.6f}", str(root), str(fraction), how],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": float(out[0]),
        "cpu_s": cpu,
        "step": int(out[1]),
        "steps_per_epoch": int(out[2]),
        "resume_wall_s": float(out[3]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        write_corpus(root)
        for _ in range(args.repeats):
            for how in ("seek", "replay"):
                for fraction in (0.1, 0.9):
                    runs.setdefault(f"{how}@{fraction}", []).append(measure(root, fraction, how))
    metrics = ("wall_s", "cpu_s", "resume_wall_s")
    med = {k: {m: statistics.median(r[m] for r in v) for m in metrics} for k, v in runs.items()}
    result = {
        "what": "process start → first batch of the resumed epoch, resampled source of 200 shards × 100 samples",
        "how": f"fresh process per run, interleaved, median of {args.repeats}; cpu = process + workers "
        "(RUSAGE_CHILDREN); batch 32, 2 workers, shuffle buffer 1000",
        "steps_per_epoch": runs["seek@0.1"][0]["steps_per_epoch"],
        "early_step": runs["seek@0.1"][0]["step"],
        "late_step": runs["seek@0.9"][0]["step"],
        "early_s": med["seek@0.1"]["wall_s"],
        "late_s": med["seek@0.9"]["wall_s"],
        "early_cpu_s": med["seek@0.1"]["cpu_s"],
        "late_cpu_s": med["seek@0.9"]["cpu_s"],
        "late_over_early": med["seek@0.9"]["cpu_s"] / med["seek@0.1"]["cpu_s"],
        "late_over_early_wall": med["seek@0.9"]["wall_s"] / med["seek@0.1"]["wall_s"],
        "early_resume_wall_s": med["seek@0.1"]["resume_wall_s"],
        "late_resume_wall_s": med["seek@0.9"]["resume_wall_s"],
        "replay_early_resume_wall_s": med["replay@0.1"]["resume_wall_s"],
        "replay_late_resume_wall_s": med["replay@0.9"]["resume_wall_s"],
        "replay_early_cpu_s": med["replay@0.1"]["cpu_s"],
        "replay_late_cpu_s": med["replay@0.9"]["cpu_s"],
        "replay_late_over_early": med["replay@0.9"]["cpu_s"] / med["replay@0.1"]["cpu_s"],
        "runs": runs,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "command": f"python bench/bench_resume.py --repeats {args.repeats}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resume.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
