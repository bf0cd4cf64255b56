"""What several benchmarks share: synthetic webdataset shards, the peer virtualenv, running ``zerovl-train``
in-process, and the machine description that goes into every results file."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Benchmark shards and peer virtualenvs (rebuilt on demand): $ZEROVL_BENCH_CACHE, else .cache/ of the checkout.
CACHE = Path(os.environ.get("ZEROVL_BENCH_CACHE") or ROOT / ".cache")


def write_shards(folder: Path, n: int, size: tuple[int, int] = (640, 480), shard_size: int = 250) -> str:
    """``n`` photo-like JPEGs of ``size`` (smooth colour fields + sensor-like noise) with captions, in shards of
    ``shard_size`` plus ``stats.json`` (the layout ``zerovl-data`` writes); idempotent. Returns the brace pattern."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder = Path(folder)
    width, height = size
    marker = folder / f"done-{n}-{width}x{height}-{shard_size}"
    num_shards = (n + shard_size - 1) // shard_size
    pattern = str(folder / f"shard-{{000000..{num_shards - 1:06d}}}.tar")
    if marker.exists():
        return pattern
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    words = "red green blue dog cat tree house car sky river mountain city beach flower bird street".split()
    shards = []
    for s in range(num_shards):
        name = f"shard-{s:06d}.tar"
        count = min(shard_size, n - s * shard_size)
        with wds.TarWriter(str(folder / name)) as tw:
            for i in range(s * shard_size, s * shard_size + count):
                small = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
                img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
                shift = tuple(rng.integers(0, min(width, height), 2))
                img = (img + np.roll(noise, shift, axis=(0, 1))).clip(0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                caption = "a photo of " + " ".join(rng.choice(words, size=8))
                tw.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption})
        shards.append({"file": name, "num_samples": count})
    stats = {"num_samples": n, "num_shards": num_shards, "num_images": n, "shards": shards}
    (folder / "stats.json").write_text(json.dumps(stats))
    marker.touch()
    return pattern


def ensure_venv(venv: Path, requirements: Sequence[str]) -> Path:
    """A peer virtualenv (for a competitor's pinned packages) that sees this environment's packages.

    A ``.pth`` file puts this interpreter's site-packages *after* the venv's own, so the peer runs the same
    torch build (a fair comparison, and no multi-GB download) while ``requirements`` installed from the
    registries with pip take precedence (e.g. open_clip_train's ``webdataset<=0.2.86``). Rebuilt only when
    ``requirements`` change. Returns the venv's python.
    """
    venv = Path(venv)
    py = venv / "bin" / "python"
    want = " ".join(requirements)
    marker = venv / "zerovl-bench-requirements.txt"
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    print(f"[bench] creating {venv} ({want}); first run only", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # every site-packages folder this interpreter sees (a venv sharing another's packages lists both)
    parent = [p for p in sys.path if p.endswith("site-packages")]
    (Path(purelib) / "zerovl_parent_env.pth").write_text("\n".join(parent) + "\n")
    # --no-deps: everything else the peer needs is already visible through the .pth; resolving dependencies
    # would reinstall torch (a machine constraint like torch<=2.14.1 excludes a local build 2.14.1+cu130)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *requirements], check=True)
    marker.write_text(want)
    return py


def compose_train(overrides: Sequence[str], run_dir: Path) -> Any:
    """Compose conf/train.yaml exactly as ``zerovl-train <overrides>`` does, with this run's folder as Hydra's
    output dir (``${hydra:...}`` interpolations resolve as in a real run)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(run_dir)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zerovl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig().set_config(cfg)
    return cfg


def probe_overrides(out: Path, steps: int, warmup: int, track_memory: bool = True) -> list[str]:
    """The overrides every benchmark fit shares: ``steps`` optimizer steps, nothing but the measuring callback
    (``bench/probe.py``, results in ``out``.json), no checkpoints, loggers or progress output.
    ``track_memory=False``: no CPU saved-tensor hooks (throughput runs; CUDA peak memory is tracked anyway)."""
    return [
        f"trainer.max_steps={steps}",
        "++trainer.enable_checkpointing=false",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "callbacks=none",
        "logger=none",
        "+callbacks.probe._target_=probe.Probe",
        f"+callbacks.probe.out={out}",
        f"+callbacks.probe.warmup_steps={warmup}",
        f"+callbacks.probe.track_memory={str(track_memory).lower()}",
    ]


def zerovl_train(overrides: Sequence[str], run_dir: Path) -> None:
    """Run ``zerovl-train <overrides>`` in this process: the console script's own entry
    (``zerovl_lightning.train.main``, Hydra's config passthrough) on the composed config."""
    from hydra.core.hydra_config import HydraConfig

    from zerovl_lightning import train

    try:
        train.main(compose_train(overrides, run_dir))
    finally:
        HydraConfig.instance().cfg = None  # as after a real run: no Hydra state leaks into the caller


def machine() -> dict[str, Any]:
    """Where a figure was measured: CPU count, load, Python/torch versions, GPU."""
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": list(os.getloadavg()),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
