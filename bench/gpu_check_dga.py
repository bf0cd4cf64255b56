"""GPU check of DGA: ViT-B/16 (random init), sub-batch 256, global batch 4096 on one GPU, bf16.

Reports samples/s and peak CUDA memory of a DGA step (and of plain gradient accumulation at the same K, for
the ratio), the agreement of the bf16 DGA gradients with an fp32 (TF32 off) DGA reference at the same
weights and batch, and — to show the GPU path is exact, not only close — fp32 DGA vs a full-batch fp32
autograd step at a batch small enough to fit (``--exact-n``, default 256 = 2 sub-batches of 128).

Usage (one GPU, ~2–4 minutes):  ``python bench/gpu_check_dga.py``
Smoke run of the same code on CPU: ``python bench/gpu_check_dga.py --smoke``
Writes ``$OUT/gpu_check_dga.json`` (or bench/results/) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from zerovl_lightning.dga import DecoupledStep, split_batch
from zerovl_lightning.loss import ContrastiveLoss
from zerovl_lightning.mixup import encode_pair
from zerovl_lightning.model import TINY_MODEL_CFG, build_dual_encoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _batch(
    n: int, image_size: int, context: int, vocab: int, device: torch.device
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab - 1, (n, context), generator=g)
    tokens[:, context // 2 :] = 0
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    return {"image": images.to(device), "text": tokens.to(device)}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    names = [n for n in ref if "logit_scale" not in n]
    rel = [float((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in names]
    flat_g = torch.cat([got[n].flatten() for n in names]).double()
    flat_r = torch.cat([ref[n].flatten() for n in names]).double()
    ls = next(n for n in ref if "logit_scale" in n)
    return {
        "max_rel_err": max(rel),
        "median_rel_err": statistics.median(rel),
        "global_rel_err": float((flat_g - flat_r).norm() / flat_r.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(flat_g, flat_r, dim=0)),
        "logit_scale_rel_err": float((got[ls] - ref[ls]).abs() / ref[ls].abs()),
    }


def dga_step(model, batch, sub: int, bf16: bool, device: torch.device):
    def encode(s):
        with _autocast(device, bf16):
            return encode_pair(model, s["image"], s["text"])

    return DecoupledStep()(model, encode, split_batch(batch, sub), model.logit_scale)


def accum_step(model, batch, sub: int, bf16: bool, device: torch.device) -> None:
    subs = split_batch(batch, sub)
    for s in subs:
        with _autocast(device, bf16):
            u, v = encode_pair(model, s["image"], s["text"])
        (ContrastiveLoss()(u, v, model.logit_scale.exp()) / len(subs)).backward()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory GiB) over ``repeats`` calls after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on CPU, small batches (code path check)"
    )
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--sub-batch", type=int, default=256)
    parser.add_argument("--exact-n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.smoke:
        device = torch.device("cpu")
        model = build_dual_encoder("zerovl-tiny", TINY_MODEL_CFG, temperature=0.02, learn_temperature=True)
        args.global_batch, args.sub_batch, args.exact_n, args.repeats = 64, 16, 32, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU code-path check")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
        torch.backends.cudnn.allow_tf32 = False
        model = build_dual_encoder("ViT-B-16", temperature=0.02, learn_temperature=True)
    model = model.to(device).train()
    image_size, context = model.image_size, model.context_length
    vocab = int(getattr(model.clip, "vocab_size", 49408))
    n, b = args.global_batch, args.sub_batch
    batch = _batch(n, image_size, context, vocab, device)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": model.model_name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "global_batch": n,
        "sub_batch": b,
        "k": n // b,
    }
    print(json.dumps(out), flush=True)

    # 1. bf16 DGA and bf16 plain accumulation: throughput and peak memory
    def bf16_dga():
        model.zero_grad(set_to_none=True)
        out["bf16_loss"] = float(dga_step(model, batch, b, True, device).loss)

    def bf16_accum():
        model.zero_grad(set_to_none=True)
        accum_step(model, batch, b, True, device)

    t_accum, mem_accum = timed(bf16_accum, device, args.repeats)
    t_dga, mem_dga = timed(bf16_dga, device, args.repeats)
    g_bf16 = _grads(model)
    out.update(
        dga_bf16_s=t_dga,
        dga_bf16_samples_per_s=n / t_dga,
        dga_bf16_peak_gib=mem_dga,
        accum_bf16_s=t_accum,
        accum_bf16_samples_per_s=n / t_accum,
        accum_bf16_peak_gib=mem_accum,
        dga_over_accum=t_dga / t_accum,
    )
    print(json.dumps({k: out[k] for k in ("dga_bf16_samples_per_s", "dga_bf16_peak_gib", "dga_over_accum")}))

    # 2. fp32 DGA reference at the same weights and batch; bf16 agreement
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    out["fp32_loss"] = float(dga_step(model, batch, b, False, device).loss)
    _sync(device)
    out["dga_fp32_s"] = time.perf_counter() - start
    g_fp32 = _grads(model)
    out["bf16_vs_fp32"] = _compare(g_bf16, g_fp32)
    print(json.dumps({"bf16_vs_fp32": out["bf16_vs_fp32"]}), flush=True)
    del g_bf16, g_fp32

    # 3. exactness on this device: fp32 DGA (2 sub-batches) vs a full-batch fp32 autograd step
    small = {k: v[: args.exact_n] for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    dga_step(model, small, args.exact_n // 2, False, device)
    g_dga = _grads(model)
    model.zero_grad(set_to_none=True)
    u, v = encode_pair(model, small["image"], small["text"])
    ContrastiveLoss()(u, v, model.logit_scale.exp()).backward()
    del u, v
    out["exact_fp32_dga_vs_full"] = _compare(g_dga, _grads(model))
    out["exact_n"] = args.exact_n
    print(json.dumps({"exact_fp32_dga_vs_full": out["exact_fp32_dga_vs_full"]}), flush=True)

    folder = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    folder.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_dga_smoke.json" if args.smoke else "gpu_check_dga.json"
    (folder / name).write_text(json.dumps(out, indent=2) + "\n")
    agree, exact = out["bf16_vs_fp32"], out["exact_fp32_dga_vs_full"]
    print(
        "\n| device | model | N / b | DGA bf16 samples/s | peak GiB | DGA/accum time | bf16 vs fp32 grad "
        "(global rel err, cosine, τ) | fp32 DGA vs full batch (max rel err, τ) |\n"
        "|---|---|---|---:|---:|---:|---|---|\n"
        f"| {out['device']} | {out['model']} | {n} / {b} | {out['dga_bf16_samples_per_s']:.0f} | "
        f"{out['dga_bf16_peak_gib']:.1f} | {out['dga_over_accum']:.3f} | {agree['global_rel_err']:.2e}, "
        f"{agree['cosine']:.6f}, {agree['logit_scale_rel_err']:.2e} | {exact['max_rel_err']:.2e}, "
        f"{exact['logit_scale_rel_err']:.2e} |"
    )


if __name__ == "__main__":
    main()
