"""End-to-end training throughput: ``zerovl-train`` against ``open_clip_train`` (OpenCLIP's own trainer).

Same tiny open_clip model (conf/model/tiny.yaml, registered in open_clip for its trainer with
``open_clip.add_model_config``), same webdataset shards (synthetic JPEGs written at run time), same batch,
loader workers, transform (RandomResizedCrop scale 0.9–1 + normalise), precision (fp32), AdamW, one thread per
process, on this machine. Two comparisons:

- plain step: ``zerovl-train method=plain`` vs ``open_clip_train --batch-size b``;
- gradient accumulation, K = 4 (global batch 4b): ``zerovl-train method=dga`` (exact full-batch gradient)
  vs ``open_clip_train --accum-freq 4`` (its feature-cache accumulation, also exact for InfoNCE).

Each run is its own process (start-up excluded: samples/s over the steps after a warm-up, batch end to batch
end — ours from a device-synced callback, OpenCLIP's from its per-step ``Batch (t)`` log with
``--log-every-n-steps 1``); the four kinds are interleaved over ``--repeats`` rounds and the median counts.
open_clip_train pins ``webdataset<=0.2.86``, so it runs in a peer virtualenv built from the registries
(``common.ensure_venv``: ``pip install --no-deps webdataset==0.2.86`` over this environment, which has
open_clip_torch at our version with the rest of its ``[training]`` extra).

Usage: ``python bench/bench_train.py [--repeats 3]`` (≈ 5–10 min on a loaded 2-core machine);
writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

MODEL = "zerovl-tiny"
KINDS = ("ours_plain", "open_clip_plain", "ours_dga", "open_clip_accum")


def tiny_model_cfg() -> dict[str, Any]:
    """conf/model/tiny.yaml's open_clip config (the model both trainers build)."""
    from omegaconf import OmegaConf
    from zerovl_lightning.conf import __path__ as conf_path

    return OmegaConf.to_container(OmegaConf.load(Path(conf_path[0]) / "model" / "tiny.yaml"))["model_cfg"]


# ------------------------------------------------------------------------------------------------ children


def run_ours(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``zerovl-train`` in this process (the console script's entry) with the measuring callback."""
    k = a.k if a.kind == "ours_dga" else 1
    global_batch = a.batch_size * k
    steps = a.samples // global_batch
    out = work / "probe"
    method = ["method=dga", f"method.sub_batch_size={a.batch_size}"] if k > 1 else ["method=plain"]
    common.zerovl_train(
        [
            "model=tiny",
            "trainer=cpu",
            "trainer.precision=32-true",
            *method,
            "data=custom",
            f"+data.sources.bench.path={a.shards}",
            f"data.batch_size={global_batch}",
            f"data.num_workers={a.workers}",
            "data.auto_augment=false",
            "data.crop_scale=[0.9,1.0]",
            "module.optimizer.lr=1e-3",
            *common.probe_overrides(out, steps, a.warmup // k if k > 1 else a.warmup, track_memory=False),
            f"paths.root_dir={work}",
        ],
        work / "run",
    )
    res = json.loads(out.with_suffix(".json").read_text())
    return {"samples_per_sec": res["samples_per_sec"], "steps": res["optimizer_steps"], "fit_s": res["fit_seconds"]}


def run_open_clip(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``open_clip_train.main.main`` (its CLI) on the same shards; samples/s from its per-step log."""
    import open_clip
    from open_clip_train.main import main as open_clip_train

    k = a.k if a.kind == "open_clip_accum" else 1
    (work / "cfg").mkdir(parents=True, exist_ok=True)
    (work / "cfg" / f"{MODEL}.json").write_text(json.dumps(json.loads(a.model_cfg)))
    open_clip.add_model_config(work / "cfg")
    # fmt: off
    open_clip_train([
        "--model", MODEL, "--train-data", a.pattern, "--dataset-type", "webdataset",
        "--train-num-samples", str(a.samples), "--batch-size", str(a.batch_size), "--accum-freq", str(k),
        "--workers", str(a.workers), "--epochs", "1", "--precision", "fp32", "--lr", "1e-3", "--wd", "1e-3",
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--warmup", "1", "--seed", "42",
        "--logs", str(work / "logs"), "--name", "run", "--log-every-n-steps", "1", "--report-to", "",
        "--save-frequency", "0", "--zeroshot-frequency", "0",
    ])
    # fmt: on
    log = (work / "logs" / "run" / "out.log").read_text()
    per_step = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)]
    warm = a.warmup // k if k > 1 else a.warmup
    timed = per_step[warm:]
    samples = len(timed) * a.batch_size * k
    seconds = sum(a.batch_size * k / s for s in timed)
    return {"samples_per_sec": samples / seconds, "steps": len(per_step)}


# -------------------------------------------------------------------------------------------------- driver


def child(kind: str, a: argparse.Namespace, python: str, model_cfg: str) -> dict[str, Any]:
    cmd = [python, __file__, "--child", kind, "--pattern", a.pattern, "--shards", str(a.shards)]
    cmd += ["--samples", str(a.samples), "--batch-size", str(a.batch_size), "--workers", str(a.workers)]
    cmd += ["--k", str(a.k), "--warmup", str(a.warmup), "--model-cfg", model_cfg]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(common.ROOT))
    if out.returncode:
        raise SystemExit(f"bench_train: {kind} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - start
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2560, help="samples per run (one epoch)")
    p.add_argument("--batch-size", type=int, default=64, help="per step (plain) / per sub-batch (K = 4)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=8, help="batches (of --batch-size) left out of the timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=common.RESULTS / "train_throughput.json")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--pattern", help=argparse.SUPPRESS)
    p.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-cfg", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.kind = a.child
        with tempfile.TemporaryDirectory(prefix=f"bench-train-{a.child}-") as tmp:
            run = run_open_clip if a.child.startswith("open_clip") else run_ours
            print(json.dumps(run(a, Path(tmp))))
        return

    import open_clip

    a.shards = common.CACHE / "bench-train-shards"
    a.pattern = common.write_shards(a.shards, a.samples, size=(64, 48), shard_size=256)
    peer = str(common.ensure_venv(common.CACHE / "bench-train-venv", ["webdataset==0.2.86"]))
    model_cfg = json.dumps(tiny_model_cfg())
    load_before = common.machine()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for r in range(a.repeats):
        for kind in KINDS:
            res = child(kind, a, peer if kind.startswith("open_clip") else sys.executable, model_cfg)
            runs[kind].append(res)
            print(f"[bench_train] round {r} {kind:16s} {res['samples_per_sec']:.1f} samples/s", flush=True)
    med = {k: statistics.median(x["samples_per_sec"] for x in v) for k, v in runs.items()}
    result = {
        "ours_over_open_clip_train": med["ours_plain"] / med["open_clip_plain"],
        "dga_over_open_clip_accum_freq": med["ours_dga"] / med["open_clip_accum"],
        "median_samples_per_sec": med,
        "config": {
            "model": f"{MODEL} (conf/model/tiny.yaml), fp32, CPU, 1 thread per process",
            "samples_per_run": a.samples,
            "batch_size": a.batch_size,
            "k": a.k,
            "workers": a.workers,
            "warmup_batches": a.warmup,
            "images": "64x48 JPEG -> RandomResizedCrop(32, scale 0.9-1)",
            "open_clip_torch": open_clip.__version__,
            "open_clip_train_venv": "webdataset 0.2.86 from PyPI over this environment (open_clip_torch, torch)",
        },
        "runs": runs,
        "machine_before": load_before,
        "machine_after": common.machine(),
        "command": "python bench/bench_train.py " + " ".join(sys.argv[1:]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ours_over_open_clip_train", "dga_over_open_clip_accum_freq")}))


if __name__ == "__main__":
    main()
