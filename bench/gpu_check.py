"""GPU check through the real ``zerovl-train`` path: throughput, DGA cost and memory, DGA exactness.

Every figure comes from ``zerovl_lightning.train.main`` (the console script's entry) on a composed Hydra config
with overrides — a real ``lightning.Trainer``, datamodule and webdataset shards (synthetic, written at run
time) — plus a measuring callback (bench/probe.py). Nothing re-implements the step.

- ``vit_b16_bf16_samples_per_sec``: plain step, random-init open_clip ViT-B-16 (its text tower too) at 224 px,
  ``bf16-mixed``, at the largest per-step batch ``b`` of a short doubling search that fits.
- ``dga_over_plain_accum``: samples/s of DGA (K = 8 sub-batches of ``b``, global batch 8b) over plain gradient
  accumulation (``trainer.accumulate_grad_batches=8`` at batch ``b``, the same global batch). ≈ 0.75 expected
  (DGA: 2K−1 sub-batch forwards and K backwards against K and K).
- ``dga_peak_mem_ratio_8b_over_b``: peak memory of that DGA run over the plain run at ``b`` (CUDA max
  allocated; on CPU, the peak of activations held for backward). ≈ 1 means DGA's global batch 8b costs the
  activation memory of b.
- ``dga_fp32_grad_rel_err``: ‖g_DGA − g_full‖ / ‖g_full‖ over all parameters, fp32 (TF32 off), the first
  step's gradients of DGA (K = 8) and of the plain full-batch step, same weights and batch.

Usage: ``python bench/gpu_check.py`` on one GPU (≈ 3–6 min; writes bench/results/gpu.json + gpu.md, or $OUT).
``python bench/gpu_check.py --smoke --out DIR``: the same code on CPU with the tiny towers in seconds (a test).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # probe.py, common.py

from common import RESULTS, machine, probe_overrides, write_shards, zerovl_train  # noqa: E402

K = 8  # DGA sub-batches per step, and the accumulation factor it is compared with


class Setting(argparse.Namespace):
    """What differs between the GPU run and the CPU smoke run; the code path is the same."""


def setting(smoke: bool) -> Setting:
    if smoke:
        return Setting(
            model=["model=tiny"],
            trainer="cpu",
            mixed="bf16-mixed",
            batches=[4, 8],
            exact_n=16,
            workers=0,
            image=(40, 30),
            samples=256,
            steps=3,
            warmup=1,
        )
    return Setting(
        model=["model=tiny", "model.model_name=ViT-B-16", "model.model_cfg=null"],
        trainer="gpu",
        mixed="bf16-mixed",
        batches=[128, 256, 512, 1024, 2048],
        exact_n=128,
        workers=max(1, (os.cpu_count() or 2) - 2),
        image=(256, 192),
        samples=4000,
        steps=6,
        warmup=2,
    )


def run(s: Setting, work: Path, name: str, batch: int, steps: int, extra: list[str], grads: bool = False) -> dict:
    """One ``zerovl-train`` fit; the probe's figures (and gradients) of it."""
    out = work / "probe" / name
    overrides = [
        *s.model,
        f"trainer={s.trainer}",
        "data=custom",
        f"+data.sources.bench.path={work / 'shards'}",
        f"data.batch_size={batch}",
        f"data.num_workers={s.workers}",
        "data.auto_augment=false",
        "data.resampled=true",
        f"data.steps_per_epoch={steps}",
        "data.shuffle_buffer=256",
        *probe_overrides(out, steps, s.warmup if not grads else 0),
        f"+callbacks.probe.save_grads={grads}",
        f"paths.root_dir={work}",
        *extra,
    ]
    zerovl_train(overrides, work / "runs" / name)
    result = json.loads(out.with_suffix(".json").read_text())
    if grads:
        import torch

        result["grads"] = torch.load(out.with_suffix(".grads.pt"))
    return result


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def largest_batch(s: Setting, work: Path) -> tuple[int, dict, list[int]]:
    """The plain bf16 step at doubling batches until one does not fit: (largest b, its figures, batches tried)."""
    import torch

    best: tuple[int, dict] | None = None
    tried = []
    for b in s.batches:
        tried.append(b)
        try:
            res = run(s, work, f"plain_b{b}", b, s.steps, ["method=plain", f"trainer.precision={s.mixed}"])
        except Exception as exc:  # noqa: BLE001 - only an OOM ends the search; anything else is re-raised
            if not is_oom(exc):
                raise
            print(f"[gpu_check] batch {b}: out of memory", flush=True)
            break
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"[gpu_check] plain batch {b}: {res['samples_per_sec']:.1f} samples/s", flush=True)
        best = (b, res)
    if best is None:
        raise SystemExit(f"gpu_check: not even batch {s.batches[0]} fits")
    return best[0], best[1], tried


def grad_errors(got: dict, ref: dict) -> dict[str, float]:
    """Global and worst per-parameter relative error of ``got`` against ``ref`` (float64)."""
    import torch

    names = sorted(ref)
    assert sorted(got) == names, "DGA and the full-batch step must give gradients for the same parameters"
    flat_g = torch.cat([got[n].flatten() for n in names])
    flat_r = torch.cat([ref[n].flatten() for n in names])
    per = [float((got[n] - ref[n]).norm() / ref[n].norm()) for n in names if float(ref[n].norm()) > 0]
    return {
        "global": float((flat_g - flat_r).norm() / flat_r.norm()),
        "max_per_param": max(per),
        "cosine": float(torch.nn.functional.cosine_similarity(flat_g, flat_r, dim=0)),
    }


def check(smoke: bool, out_dir: Path, work: Path) -> dict[str, Any]:
    import torch

    s = setting(smoke)
    start = time.perf_counter()
    write_shards(work / "shards", s.samples, size=s.image, shard_size=max(50, s.samples // 16))
    b, plain, tried = largest_batch(s, work)
    mixed = [f"trainer.precision={s.mixed}"]
    accum = run(s, work, "accum", b, s.steps * K, ["method=plain", f"++trainer.accumulate_grad_batches={K}", *mixed])
    accum_steps_note = "accumulate_grad_batches=8: steps*8 batches, steps optimizer steps"
    dga = run(s, work, "dga", K * b, s.steps, ["method=dga", f"method.sub_batch_size={b}", *mixed])
    print(f"[gpu_check] accum {accum['samples_per_sec']:.1f}, DGA {dga['samples_per_sec']:.1f} samples/s", flush=True)

    # fp32 exactness: the first step's gradients, DGA (K sub-batches) vs the plain full-batch step
    if torch.cuda.is_available() and not smoke:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    n = s.exact_n
    fp32 = ["trainer.precision=32-true"]
    ref = run(s, work, "exact_full", n, 1, ["method=plain", *fp32], grads=True)
    got = run(s, work, "exact_dga", n, 1, ["method=dga", f"method.sub_batch_size={n // K}", *fp32], grads=True)
    err = grad_errors(got["grads"], ref["grads"])

    result: dict[str, Any] = {
        "mode": "smoke (CPU, tiny towers)" if smoke else "gpu",
        "model": "zerovl-tiny" if smoke else "ViT-B-16 (open_clip, random init, 224 px)",
        "vit_b16_bf16_samples_per_sec": plain["samples_per_sec"],
        "dga_over_plain_accum": dga["samples_per_sec"] / accum["samples_per_sec"],
        "dga_fp32_grad_rel_err": err["global"],
        "dga_fp32_grad_max_param_rel_err": err["max_per_param"],
        "dga_fp32_grad_cosine": err["cosine"],
        "dga_peak_mem_ratio_8b_over_b": dga["peak_mem_bytes"] / plain["peak_mem_bytes"],
        "peak_mem_metric": plain["peak_mem_metric"],
        "batch_size": b,
        "batches_tried": tried,
        "k": K,
        "global_batch_dga": K * b,
        "exact_n": n,
        "exact_sub_batch": n // K,
        "precision": s.mixed,
        "runs": {
            "plain": plain,
            "accum": {**accum, "note": accum_steps_note},
            "dga": dga,
            "exact_full": {k: v for k, v in ref.items() if k != "grads"},
            "exact_dga": {k: v for k, v in got.items() if k != "grads"},
        },
        "dga_samples_per_sec": dga["samples_per_sec"],
        "accum_samples_per_sec": accum["samples_per_sec"],
        "plain_peak_mem_gib": plain["peak_mem_bytes"] / 2**30,
        "dga_peak_mem_gib": dga["peak_mem_bytes"] / 2**30,
        "wall_s": time.perf_counter() - start,
        "machine": machine(),
        "command": "python bench/gpu_check.py" + (" --smoke" if smoke else ""),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "gpu.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    return (
        f"GPU check ({r['mode']}; {m.get('gpu', 'no GPU')}, torch {m['torch']}, CUDA {m['cuda']}), "
        f"through `zerovl-train`: {r['model']}, {r['precision']}.\n\n"
        "| figure | value |\n|---|---:|\n"
        f"| plain step samples/s (batch {r['batch_size']}, largest of {r['batches_tried']} that fits) | "
        f"{r['vit_b16_bf16_samples_per_sec']:.1f} |\n"
        f"| DGA / plain accumulation samples/s (K = {r['k']}, global batch {r['global_batch_dga']}) | "
        f"{r['dga_over_plain_accum']:.3f} |\n"
        f"| peak memory DGA at {r['global_batch_dga']} / plain at {r['batch_size']} ({r['peak_mem_metric']}) | "
        f"{r['dga_peak_mem_ratio_8b_over_b']:.3f} |\n"
        f"| fp32 DGA vs full-batch gradient, relative error (N = {r['exact_n']}, K = {r['k']}) | "
        f"{r['dga_fp32_grad_rel_err']:.2e} |\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny towers, a few steps (the code path check)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for gpu.json/gpu.md (default: $OUT or bench/results; with --smoke: a temporary folder)",
    )
    parser.add_argument("--work", type=Path, default=None, help="shards and run folders (default: temporary)")
    args = parser.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --smoke for the CPU code-path check")
    with tempfile.TemporaryDirectory(prefix="zerovl-gpu-check-") as tmp:
        out = args.out or (Path(tmp) / "out" if args.smoke else Path(os.environ.get("OUT") or RESULTS))
        result = check(args.smoke, out, args.work or Path(tmp))
    assert all(math.isfinite(v) for v in result.values() if isinstance(v, float))
    return result


if __name__ == "__main__":
    main()
