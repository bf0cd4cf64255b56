"""Loader throughput: ZeroVLDataModule vs OpenCLIP's ``open_clip_train.data`` webdataset pipeline.

Both read the same shards (synthetic 640×480 JPEG photos with captions, written once into
``.cache/bench-shards``) with the same number of workers, batch size, image size and tokenizer, and do the
same work per sample: decode, RandomResizedCrop(scale 0.9–1, OpenCLIP's default train transform), normalise,
tokenize. Reported: images/s after the first batch (steady state; worker start-up and shuffle-buffer fill
excluded), images/s including start-up, and images per CPU-second of the loader process and its workers — the
last one does not depend on what else runs on the machine, so it is the ratio to trust on a shared box.

OpenCLIP's pipeline pins ``webdataset<=0.2.86`` while this project uses webdataset 1.x, so its side runs as a
subprocess in its own virtual environment, ``.cache/bench-venv`` (created on the first run by
``common.ensure_venv``: ``pip install --no-deps webdataset==0.2.86`` over this environment's open_clip and torch).

Usage: ``python bench/bench_loader.py [--samples 2000] [--workers 2] [--batch-size 64] [--image-size 224]``.
Writes ``bench/results/loader.json`` and prints a markdown table plus one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = common.CACHE
SHARDS = CACHE / "bench-shards"
VENV = CACHE / "bench-venv"
RESULTS = ROOT / "bench" / "results"
SHARD_SIZE = 250
TOKENIZER = "ViT-B-32"


# ------------------------------------------------------------------------------------------------- set-up


def write_shards(n: int) -> str:
    """``n`` photo-like 640×480 JPEGs (~80 kB) in shards of 250 under .cache/bench-shards; idempotent."""
    return common.write_shards(SHARDS, n, size=(640, 480), shard_size=SHARD_SIZE)


def ensure_venv() -> Path:
    """OpenCLIP's environment: webdataset 0.2.86 over this one (open_clip_torch at our version, torch)."""
    return common.ensure_venv(VENV, ["webdataset==0.2.86"])


# ------------------------------------------------------------------------------------------------ workers


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the dataloader workers, once joined)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(loader: Any, n_expected: int) -> dict[str, Any]:
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    t_first = None
    images = images_after_first = 0
    for batch in loader:
        b = batch["image"].shape[0] if isinstance(batch, dict) else batch[0].shape[0]
        if t_first is None:
            t_first = time.perf_counter()
        else:
            images_after_first += b
        images += b
    t_end = time.perf_counter()
    # OpenCLIP's persistent workers outlive the epoch: join them so their CPU time is counted
    from torch.utils.data import DataLoader

    dl = loader if isinstance(loader, DataLoader) else None
    for stage in getattr(loader, "pipeline", []):  # webdataset's WebLoader wraps a DataLoader
        dl = stage if isinstance(stage, DataLoader) else dl
    if dl is not None and getattr(dl, "_iterator", None) is not None:
        dl._iterator._shutdown_workers()
    cpu = _cpu_seconds() - cpu0
    steady = images_after_first / (t_end - t_first) if t_first and t_end > t_first else float("nan")
    return {
        "images": images,
        "expected": n_expected,
        "seconds": t_end - t0,
        "first_batch_s": (t_first or t_end) - t0,
        "steady_img_s": steady,
        "total_img_s": images / (t_end - t0),
        "cpu_s": cpu,
        "img_per_cpu_s": images / cpu,
    }


def run_ours(a: argparse.Namespace, variant: str) -> dict[str, Any]:
    import open_clip

    from zerovl_lightning.data.datamodule import ZeroVLDataModule

    zerovl_aug = variant == "zerovl_aug"
    dm = ZeroVLDataModule(
        sources={"bench": {"path": a.pattern}},
        batch_size=a.batch_size,
        num_workers=a.workers,
        image_size=a.image_size,
        auto_augment=zerovl_aug,
        crop_scale=(0.6, 1.0) if zerovl_aug else (0.9, 1.0),
        shuffle_buffer=1000,
        tokenizer=open_clip.get_tokenizer(TOKENIZER),
        preprocess_cfg={"size": a.image_size},
    )
    return _timed(dm.train_dataloader(), a.samples)


def run_openclip(a: argparse.Namespace) -> dict[str, Any]:
    import open_clip
    import webdataset
    from open_clip_train.data import get_wds_dataset

    assert webdataset.__version__ == "0.2.86", webdataset.__version__
    args = argparse.Namespace(
        train_data=a.pattern,
        val_data=None,
        train_num_samples=a.samples,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=a.batch_size,
        workers=a.workers,
        world_size=1,
    )
    preprocess = open_clip.image_transform(a.image_size, is_train=True)  # RRC(scale 0.9–1), RGB, normalise
    tokenizer = open_clip.get_tokenizer(TOKENIZER)
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    return _timed(info.dataloader, a.samples)


# -------------------------------------------------------------------------------------------------- driver


def child(kind: str, python: str, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [python, __file__, "--child", kind, "--pattern", a.pattern, "--samples", str(a.samples)]
    cmd += ["--workers", str(a.workers), "--batch-size", str(a.batch_size), "--image-size", str(a.image_size)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=str(ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per loader; the median counts")
    p.add_argument("--out", default=str(RESULTS / "loader.json"))
    p.add_argument("--child", choices=["ours", "zerovl_aug", "openclip"], help=argparse.SUPPRESS)
    p.add_argument("--pattern", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        res = run_openclip(a) if a.child == "openclip" else run_ours(a, a.child)
        print(json.dumps(res))
        return

    a.pattern = write_shards(a.samples)
    oc_python = str(ensure_venv())
    kinds = {"ours": sys.executable, "openclip": oc_python, "zerovl_aug": sys.executable}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for r in range(a.repeats):
        for kind, python in kinds.items():
            if r > 0 and kind == "zerovl_aug":
                continue  # a context row: one run keeps the benchmark to a few minutes
            res = child(kind, python, a)
            runs[kind].append(res)
            steady, eff = res["steady_img_s"], res["img_per_cpu_s"]
            print(
                f"[bench] {kind:10s} run {r}: {steady:.1f} img/s steady, {eff:.1f} images per CPU-second",
                flush=True,
            )

    def med(kind: str, field: str) -> float:
        return statistics.median(x[field] for x in runs[kind])

    ratio = med("ours", "steady_img_s") / med("openclip", "steady_img_s")
    ratio_total = med("ours", "total_img_s") / med("openclip", "total_img_s")
    ratio_cpu = med("ours", "img_per_cpu_s") / med("openclip", "img_per_cpu_s")
    result = {
        "config": {
            "samples": a.samples,
            "image": "640x480 JPEG q90 (~80 kB)",
            "workers": a.workers,
            "batch_size": a.batch_size,
            "image_size": a.image_size,
            "tokenizer": TOKENIZER,
            "transform": "RandomResizedCrop(scale 0.9-1, bicubic) + normalize (OpenCLIP's train default)",
            "cpu_count": os.cpu_count(),
            "load_avg_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "runs": runs,
        "median_steady_img_s": {k: med(k, "steady_img_s") for k in runs},
        "median_total_img_s": {k: med(k, "total_img_s") for k in runs},
        "median_img_per_cpu_s": {k: med(k, "img_per_cpu_s") for k in runs},
        "ratio_steady": ratio,
        "ratio_with_startup": ratio_total,
        "ratio_per_cpu_second": ratio_cpu,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    labels = {
        "openclip": "OpenCLIP `open_clip_train.data` (webdataset 0.2.86)",
        "ours": "ZeroVLDataModule (debias sampling, same transform)",
        "zerovl_aug": "ZeroVLDataModule + ZeroVL aug (scale 0.6–1, AutoAugment)",
    }
    lines = [
        "| loader | images/s (steady) | images/s (incl. start-up) | images per CPU-second |",
        "|---|---:|---:|---:|",
    ]
    for kind in ("openclip", "ours", "zerovl_aug"):
        s, t, c = med(kind, "steady_img_s"), med(kind, "total_img_s"), med(kind, "img_per_cpu_s")
        lines.append(f"| {labels[kind]} | {s:.1f} | {t:.1f} | {c:.1f} |")
    print("\n".join(lines))
    print(
        f"\nLoader throughput ({a.samples} × 640×480 JPEG → {a.image_size}px, {a.workers} workers, batch "
        f"{a.batch_size}, {os.cpu_count()} CPUs): ZeroVLDataModule / OpenCLIP = **{ratio:.2f}×** images/s "
        f"steady ({ratio_total:.2f}× with start-up), **{ratio_cpu:.2f}×** images per CPU-second; "
        f"results in {out.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
