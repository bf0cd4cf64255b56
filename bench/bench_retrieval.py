"""Retrieval benchmark: 5,000 images × 25,000 captions (512-d unit vectors), ours vs a full-matrix reference.

Each method runs in its own subprocess so its peak resident memory is its own: the peak RSS (VmHWM, reset just
before the method starts) minus the RSS at that moment is the method's extra memory. Both get the same data
(a seeded generator): images are random unit vectors, each caption is its image plus isotropic Gaussian noise
of norm ≈ ``noise`` (8: RSUM ≈ 300, COCO-like), normalised, so the rank comparison means something.

- ours: :class:`zerovl_lightning.eval.retrieval.RetrievalMetric` (update + compute; chunks of 1,024 queries).
- reference: the full 5,000 × 25,000 similarity matrix, ``argsort`` of every row in both directions and the
  position of the first match (what OpenCLIP's ``get_clip_metrics`` does, extended to several captions).

    python bench/bench_retrieval.py            # writes bench/results/retrieval.{json,md}
    python bench/bench_retrieval.py --images 1000 --captions-per-image 5   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_BYTES = 2 * 2**30


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM (Linux ≥ 4.0: write 5 to clear_refs), so the peak we read is the method's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_data(n_images: int, per_image: int, dim: int, noise: float, seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    caption_image = torch.arange(n_images).repeat_interleave(per_image)
    text = F.normalize(
        image[caption_image] + (noise / dim**0.5) * torch.randn(len(caption_image), dim, generator=g), dim=-1
    )
    return image, text, caption_image


def reference_ranks(image, text, caption_image):
    """Full similarity matrix + argsort per row, both directions (the peers' way)."""
    import torch

    sims = image @ text.T  # [Ni, Nt]
    order = torch.argsort(sims, dim=1, descending=True)
    i2t = (caption_image[order] == torch.arange(len(image))[:, None]).float().argmax(1)
    del order
    order_t = torch.argsort(sims.T, dim=1, descending=True)
    t2i = (order_t == caption_image[:, None]).float().argmax(1)
    return i2t, t2i


def ours_ranks(image, text, caption_image, chunk_size: int):
    import torch

    from zerovl_lightning.eval.retrieval import RetrievalMetric

    metric = RetrievalMetric(chunk_size=chunk_size)
    ids = torch.arange(len(image))
    metric.update(image, ids, text, torch.arange(len(text)), caption_image)
    ranks, _, _ = metric.compute_ranks()
    return ranks.i2t, ranks.t2i


def worker(args: argparse.Namespace) -> None:
    import torch

    from zerovl_lightning.eval.retrieval import summarize

    method = ours_ranks if args.worker == "ours" else reference_ranks
    kwargs = {"chunk_size": args.chunk_size} if args.worker == "ours" else {}
    # warm-up on a small problem: pages in the library code the method uses, so it is not counted below
    method(*make_data(64, args.captions_per_image, args.dim, args.noise, seed=1), **kwargs)
    image, text, caption_image = make_data(args.images, args.captions_per_image, args.dim, args.noise)
    baseline_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    i2t, t2i = method(image, text, caption_image, **kwargs)
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"i2t": i2t, "t2i": t2i}, args.out + ".ranks.pt")

    class R:  # summarize() reads only these attributes
        pass

    r = R()
    r.i2t, r.t2i, r.image_ids, r.caption_ids = i2t, t2i, torch.arange(len(image)), torch.arange(len(text))
    result = {
        "method": args.worker,
        "seconds": seconds,
        "peak_rss_bytes": peak_kb * 1024,
        "extra_peak_bytes": (peak_kb - baseline_kb) * 1024,
        "baseline_rss_bytes": baseline_kb * 1024,
        "peak_measure": "VmHWM reset before the method" if reset else "ru_maxrss (process lifetime)",
        "metrics": summarize(r),  # type: ignore[arg-type]
        "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result))


def run_method(method: str, args: argparse.Namespace, tmp: str) -> dict:
    out = os.path.join(tmp, f"{method}.json")
    sizes = {"--images": args.images, "--captions-per-image": args.captions_per_image, "--dim": args.dim,
             "--noise": args.noise, "--chunk-size": args.chunk_size}  # fmt: skip
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--out",
        out,
        *[str(x) for kv in sizes.items() for x in kv],
    ]
    subprocess.run(cmd, check=True)
    return json.loads(Path(out).read_text())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=8.0, help="norm of the caption noise (image norm 1)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--worker", choices=["ours", "reference"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(RESULTS), help="folder for retrieval.json / retrieval.md")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run_method(m, args, tmp) for m in ("ours", "reference")}
        a = torch.load(os.path.join(tmp, "ours.json.ranks.pt"))
        b = torch.load(os.path.join(tmp, "reference.json.ranks.pt"))
    ranks_equal = bool(torch.equal(a["i2t"], b["i2t"]) and torch.equal(a["t2i"], b["t2i"]))
    metrics_equal = results["ours"]["metrics"] == results["reference"]["metrics"]
    ours = results["ours"]
    summary = {
        "setup": {
            "images": args.images, "captions": args.images * args.captions_per_image, "dim": args.dim,
            "noise": args.noise, "chunk_size": args.chunk_size, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": ours["threads"],
        },
        "results": results,
        "ranks_equal": ranks_equal,
        "metrics_equal": metrics_equal,
        "goal": {"peak_rss_below": GOAL_BYTES, "met": ours["peak_rss_bytes"] < GOAL_BYTES and ranks_equal},
    }  # fmt: skip
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(summary, indent=2) + "\n")
    ref = results["reference"]
    m = ours["metrics"]
    n_captions = args.images * args.captions_per_image
    md = [
        f"**Retrieval benchmark: {args.images:,} images × {n_captions:,} captions, "
        f"{args.dim}-d (CPU, {ours['threads']} threads)**",
        "",
        "| method | time (s) | peak RSS | extra peak over inputs |",
        "|---|---:|---:|---:|",
        f"| ours (RetrievalMetric, chunk {args.chunk_size}) | {ours['seconds']:.1f} "
        f"| {gib(ours['peak_rss_bytes'])} | {gib(ours['extra_peak_bytes'])} |",
        f"| reference (full matrix + argsort) | {ref['seconds']:.1f} | {gib(ref['peak_rss_bytes'])} "
        f"| {gib(ref['extra_peak_bytes'])} |",
        "",
        f"Identical ranks in both directions: **{ranks_equal}**; identical metrics: **{metrics_equal}** "
        f"(i→t R@1 {100 * m['i2t_r1']:.2f}, t→i R@1 {100 * m['t2i_r1']:.2f}, RSUM {m['rsum']:.2f}).",
        f"Goal (ours < 2 GiB peak at equal results): **{'met' if summary['goal']['met'] else 'NOT met'}**.",
        "",
        f"Peak = {ours['peak_measure']}, per method in its own subprocess after a warm-up run; baseline "
        f"RSS (interpreter, torch, inputs) {gib(ours['baseline_rss_bytes'])}.",
    ]  # fmt: skip
    (out / "retrieval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
