"""DGA on CPU: peak memory vs global batch, step time vs plain accumulation and OpenCLIP, gradient error.

A small random-init open_clip model (ViT 32 px / patch 4 + text transformer, fp32), learnable temperature.
Writes bench/results/dga.json, dga.md and dga.png. Comparisons, all on the same model, weights and data:

- memory: one optimizer step at global batch N ∈ {b, 2b, 4b, 8b}, plain full batch vs DGA with sub-batch b,
  each in a fresh subprocess; reported: peak RSS and its increase over the RSS just before the step.
- time (median of interleaved repeats): DGA vs plain gradient accumulation (K micro-batches, each its own
  contrastive loss — cheaper, not the full-batch gradient) vs OpenCLIP's own
  ``open_clip_train.train.train_one_epoch`` with ``accum_freq=K`` (one optimizer step = K micro-batches).
- gradient error vs a full-batch autograd step, temperature included, without and with dropout.
- ``--ddp-memory`` (only this part; merged into dga.json under ``ddp_memory``): peak RSS of one DGA step in each
  of 2 gloo processes, DDP-wrapped, on a model with 38 M parameters (152 MB of fp32 gradients, so a second
  copy shows). ``--src PATH`` runs the same measurement against another checkout's ``src`` (the code before
  DDP's reducer did the reduction: its own coalesced all-reduce after pass 2, inside ``no_sync``).

Usage: ``python bench/bench_dga.py [--quick] [--ddp-memory [--src PATH]]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "head_width": 64, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 1000, "width": 128, "heads": 2, "layers": 3},
}
SUB_BATCH = 32
TEMPERATURE = 0.02


# ------------------------------------------------------------------------------------------ model + data
def build_model(dropout: float = 0.0, seed: int = 0):
    from zerovl_lightning.model import build_dual_encoder

    torch.manual_seed(seed)
    model = build_dual_encoder("bench-small", MODEL_CFG, temperature=TEMPERATURE, learn_temperature=True)
    if dropout:
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                m.dropout = dropout
    return model.train()


def make_batch(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ctx = MODEL_CFG["text_cfg"]["context_length"]
    tokens = torch.randint(1, MODEL_CFG["text_cfg"]["vocab_size"] - 1, (n, ctx), generator=g)
    tokens[:, ctx // 2 :] = 0
    size = MODEL_CFG["vision_cfg"]["image_size"]
    return {"image": torch.randn(n, 3, size, size, generator=g), "text": tokens}


def encode(model, sub):
    from zerovl_lightning.mixup import encode_pair

    return encode_pair(model, sub["image"], sub["text"])


# ------------------------------------------------------------------------------------------ one step each
def step_full(model, batch) -> torch.Tensor:
    from zerovl_lightning.loss import ContrastiveLoss

    u, v = encode(model, batch)
    loss = ContrastiveLoss()(u, v, model.logit_scale.exp())
    loss.backward()
    return loss.detach()


def step_plain_accum(model, batch, k: int) -> None:
    from zerovl_lightning.dga import split_batch
    from zerovl_lightning.loss import ContrastiveLoss

    for sub in split_batch(batch, len(batch["image"]) // k):
        u, v = encode(model, sub)
        (ContrastiveLoss()(u, v, model.logit_scale.exp()) / k).backward()


def step_dga(model, batch, k: int) -> torch.Tensor:
    from zerovl_lightning.dga import DecoupledStep, split_batch

    subs = split_batch(batch, len(batch["image"]) // k)
    return DecoupledStep()(model, lambda s: encode(model, s), subs, model.logit_scale).loss


class _Loader:
    """The slice of open_clip_train's DataInfo that train_one_epoch touches."""

    def __init__(self, batch, k: int) -> None:
        n = len(batch["image"])
        self.micro = [(batch["image"][i : i + n // k], batch["text"][i : i + n // k]) for i in range(0, n, n // k)]
        self.num_batches, self.num_samples = k, n

    def __iter__(self):
        return iter(self.micro)


class _RecordingSGD(torch.optim.SGD):
    """Keeps the gradients it is asked to apply and applies nothing: OpenCLIP's step, observed."""

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.0)
        self.recorded: dict[int, torch.Tensor] = {}

    def step(self, closure=None):
        self.recorded = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None}


def openclip_step(model, batch, k: int, optimizer) -> None:
    """One optimizer step of OpenCLIP's own trainer loop with ``--accum-freq k``."""
    import logging

    from open_clip.loss import ClipLoss
    from open_clip_train.train import train_one_epoch

    logging.getLogger().setLevel(logging.WARNING)
    clip = model.clip
    clip.output_dict = True  # what OpenCLIP's trainer expects from model(images, texts)
    args = SimpleNamespace(
        device="cpu",
        precision="fp32",
        distill=False,
        accum_freq=k,
        skip_scheduler=True,
        horovod=False,
        grad_clip_norm=None,
        log_every_n_steps=10**9,
        batch_size=len(batch["image"]) // k,
        world_size=1,
        rank=0,
        local_rank=0,
        wandb=False,
    )
    data = {"train": SimpleNamespace(set_epoch=lambda e: None, dataloader=_Loader(batch, k))}
    try:
        train_one_epoch(clip, data, ClipLoss(), 0, optimizer, None, None, None, args)
    finally:
        clip.output_dict = False


# ------------------------------------------------------------------------------ memory (subprocess)
def _status_mb(field: str) -> float:
    """VmRSS / VmHWM from /proc/self/status (VmHWM is this process's own peak; ru_maxrss would include the
    parent's peak, which Linux carries across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def memory_worker(method: str, n: int) -> dict[str, float]:
    torch.set_num_threads(2)
    model = build_model()
    batch = make_batch(n)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # allocate AdamW's state up front (it is lazy), so the measured step only adds activations and gradients
    for p in model.parameters():
        if p.requires_grad:
            opt.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    if method == "plain":
        step_full(model, batch)
    else:
        step_dga(model, batch, n // SUB_BATCH)
    opt.step()
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {
        "method": method,
        "n": n,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "step_delta_mb": peak - before,
        "seconds": seconds,
    }


def _memory_row(worker_flag: str, method: str, n: int) -> dict[str, Any]:
    """One memory measurement in a fresh process (``bench_dga.py <worker_flag> METHOD N``), printed as it lands."""
    out = subprocess.run(
        [sys.executable, __file__, worker_flag, method, str(n)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"memory {method:28s} N={n:4d}: peak {row['peak_rss_mb']:.0f} MiB, step +{row['step_delta_mb']:.0f} MiB",
          flush=True)  # fmt: skip
    return row


def measure_memory(ns: list[int]) -> list[dict[str, float]]:
    return [_memory_row("--memory-worker", method, n) for n in ns for method in ("plain", "dga")]


# ------------------------------------------------------------------------- 2-process DDP memory
DDP_MODEL_CFG: dict[str, Any] = {  # big embedding + few layers: many gradient bytes, little compute
    "embed_dim": 256,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 512, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 2},
}
DDP_LOCAL, DDP_SUB = 32, 8  # per rank: K = 4 sub-batches


def ddp_memory_worker(rank: int, world: int, port: int, gradient_as_bucket_view: bool) -> dict[str, Any]:
    """Second DGA step (K = 4) of a DDP-wrapped model on this rank: peak RSS and its increase over the start."""
    import inspect

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from zerovl_lightning.dga import DecoupledStep, split_batch
    from zerovl_lightning.model import build_dual_encoder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_dual_encoder("bench-ddp", DDP_MODEL_CFG, temperature=TEMPERATURE, learn_temperature=True)
    model.train()
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=gradient_as_bucket_view)
    g = torch.Generator().manual_seed(1 + rank)
    tokens = torch.randint(1, 49407, (DDP_LOCAL, 16), generator=g)
    batch = {"image": torch.randn(DDP_LOCAL, 3, 32, 32, generator=g), "text": tokens}
    subs = split_batch(batch, DDP_SUB)

    def enc(sub):
        return model.encode_image(sub["image"]), model.encode_text(sub["text"])

    def backward(t: torch.Tensor) -> None:  # what Lightning's manual_backward does for DDP
        if ddp.require_backward_grad_sync:
            ddp.reducer._rebuild_buckets()
            ddp.reducer.prepare_for_backward([])
        t.backward()

    new_api = "no_sync" in inspect.signature(DecoupledStep.__call__).parameters

    def step() -> None:
        # bucket views stay views only if zeroed in place (the module does the same)
        model.zero_grad(set_to_none=not (new_api and gradient_as_bucket_view))
        if new_api:  # DDP's reducer reduces on the last backward
            DecoupledStep()(model, enc, subs, model.logit_scale, backward=backward, no_sync=ddp.no_sync)
        else:  # the old path, as the module ran it: no_sync for the whole step + its own coalesced all-reduce
            with ddp.no_sync():
                DecoupledStep()(model, enc, subs, model.logit_scale)

    step()  # the first step allocates gradients / touches DDP's buckets; measure the steady-state second
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_mb("VmRSS")
    start = time.process_time()
    step()
    cpu = time.process_time() - start
    peak = _status_mb("VmHWM")
    tensors = tensor_bytes_timeline(step)  # a third step under the profiler: torch's own allocations
    grad_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    dist.destroy_process_group()
    return {
        "rank": rank,
        "reduction": "ddp_reducer" if new_api else "own_coalesced_all_reduce",
        "gradient_as_bucket_view": gradient_as_bucket_view,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "step_delta_mb": peak - before,
        "grad_mb": grad_mb,
        "cpu_seconds": cpu,
        **tensors,
    }


def tensor_bytes_timeline(fn) -> dict[str, float]:
    """Tensor bytes torch allocates while ``fn`` runs, from the profiler's memory events (no allocator caching or
    arena in the figure, unlike RSS): all bytes allocated in the step, and its largest rise of live bytes
    (the peak over the lowest level reached before it; the step starts by freeing the previous gradients)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an op's own allocations are its self memory; frees outside any op are "[memory]" events
    deltas = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    live = low = rise = allocated = 0
    for _, delta in deltas:
        live += delta
        allocated += max(delta, 0)
        low = min(low, live)
        rise = max(rise, live - low)
    return {"tensor_allocated_mb": allocated / 2**20, "tensor_rise_mb": rise / 2**20}


def measure_ddp_memory(src: str | None) -> list[dict[str, Any]]:
    """Both ranks in fresh processes per variant (the PYTHONPATH of ``src`` selects the code under test)."""
    import os
    import socket

    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for gav in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--ddp-memory-worker", str(r), str(port), str(int(gav))],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=env,
            )
            for r in range(2)
        ]
        for p in procs:
            out, _ = p.communicate()
            if p.returncode:
                raise RuntimeError(f"ddp memory worker failed ({p.returncode})")
            row = json.loads(out.strip().splitlines()[-1])
            row["src"] = src or "this checkout"
            rows.append(row)
            print(
                f"ddp memory {row['reduction']} bucket_view={gav} rank {row['rank']}: peak "
                f"{row['peak_rss_mb']:.0f} MiB, step +{row['step_delta_mb']:.0f} MiB "
                f"(gradients {row['grad_mb']:.0f} MiB)",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------------------------------ time
def measure_time(ks: list[int], repeats: int) -> list[dict[str, float]]:
    """Median wall and CPU seconds per optimizer step; one thread, so CPU time measures the work done even
    when other processes share the cores (wall time then mostly measures the neighbours)."""
    torch.set_num_threads(1)
    rows = []
    for k in ks:
        model = build_model()
        batch = make_batch(k * SUB_BATCH)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def run(method: str, model=model, batch=batch, k=k, opt=opt) -> tuple[float, float]:
            start, cpu_start = time.perf_counter(), time.process_time()
            if method == "openclip":
                openclip_step(model, batch, k, opt)  # zero_grad + K micro-batches + the same AdamW step inside
            elif method == "plain_accum":
                opt.zero_grad(set_to_none=True)
                step_plain_accum(model, batch, k)
                opt.step()
            else:
                opt.zero_grad(set_to_none=True)
                step_dga(model, batch, k)
                opt.step()
            return time.perf_counter() - start, time.process_time() - cpu_start

        times: dict[str, list[tuple[float, float]]] = {"plain_accum": [], "dga": [], "openclip": []}
        for method in times:  # warm-up
            run(method)
        for r in range(repeats):  # interleaved, rotating order: shared-CPU noise hits every method alike
            order = list(times)[r % 3 :] + list(times)[: r % 3]
            for method in order:
                times[method].append(run(method))
        wall = {m: statistics.median(w for w, _ in t) for m, t in times.items()}
        cpu = {m: statistics.median(c for _, c in t) for m, t in times.items()}
        rows.append(
            {
                "k": k,
                "n": k * SUB_BATCH,
                **{f"{m}_s": v for m, v in cpu.items()},
                **{f"{m}_wall_s": v for m, v in wall.items()},
                "dga_over_plain_accum": cpu["dga"] / cpu["plain_accum"],
                "dga_over_openclip": cpu["dga"] / cpu["openclip"],
                "wall_dga_over_plain_accum": wall["dga"] / wall["plain_accum"],
                "wall_dga_over_openclip": wall["dga"] / wall["openclip"],
            }
        )
        print(
            f"time K={k} (CPU s): "
            + ", ".join(f"{m} {v:.3f}s" for m, v in cpu.items())
            + f"; DGA/accum {rows[-1]['dga_over_plain_accum']:.3f}"
            + f", DGA/OpenCLIP {rows[-1]['dga_over_openclip']:.3f}"
            + f" (wall: {rows[-1]['wall_dga_over_plain_accum']:.3f}"
            + f", {rows[-1]['wall_dga_over_openclip']:.3f})",
            flush=True,
        )
    return rows


# ------------------------------------------------------------------------------------------ gradient error
def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    towers = [float((got[n] - g).norm() / g.norm()) for n, g in ref.items() if "logit_scale" not in n]
    ls = [n for n in ref if "logit_scale" in n][0]
    return {
        "max_rel_err_params": max(towers),
        "rel_err_logit_scale": float((got[ls] - ref[ls]).abs() / ref[ls].abs()),
    }


def measure_grad_error(k: int) -> list[dict[str, Any]]:
    from zerovl_lightning.dga import split_batch

    rows = []
    for dropout in (0.0, 0.1):
        base = build_model(dropout)
        batch = make_batch(k * SUB_BATCH)
        subs = split_batch(batch, SUB_BATCH)

        def fresh(base=base):
            return copy.deepcopy(base)

        # reference: autograd through the K sub-batch forwards from one RNG state (= the full-batch step when
        # the model is deterministic; with dropout, the forward DGA must reproduce)
        ref_model = fresh()
        torch.manual_seed(7)
        embs = [encode(ref_model, s) for s in subs]
        from zerovl_lightning.loss import ContrastiveLoss

        u, v = torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs])
        ContrastiveLoss()(u, v, ref_model.logit_scale.exp()).backward()
        ref = _grads(ref_model)

        m = fresh()
        torch.manual_seed(7)
        step_dga(m, batch, k)
        rows.append({"method": "dga", "dropout": dropout, **_errors(_grads(m), ref)})

        m = fresh()
        torch.manual_seed(7)
        step_plain_accum(m, batch, k)
        rows.append({"method": "plain_accum", "dropout": dropout, **_errors(_grads(m), ref)})

        m = fresh()
        opt = _RecordingSGD(m.parameters())
        torch.manual_seed(7)
        openclip_step(m, batch, k, opt)
        got = {n: opt.recorded[id(p)] for n, p in m.named_parameters() if id(p) in opt.recorded}
        rows.append({"method": "openclip_accum_freq", "dropout": dropout, **_errors(got, ref)})
        for r in rows[-3:]:
            print(
                f"grad error K={k} dropout={dropout}: {r['method']:20s} "
                f"params {r['max_rel_err_params']:.2e}, "
                f"logit_scale {r['rel_err_logit_scale']:.2e}",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------------------ locked towers, checkpointing
LOCKS: dict[str, dict[str, Any]] = {
    "locked_image": {"lock_image": True},
    "locked_text": {"lock_text": True},
    "image_last_block": {"lock_image": True, "lock_image_unlocked_groups": 2},  # last block + head trainable
    "text_last_layer": {"lock_text": True, "lock_text_unlocked_layers": 2},
}


def build_variant(lock: dict[str, Any] | None = None, grad_checkpointing: bool = False, seed: int = 0):
    from zerovl_lightning.model import build_dual_encoder

    torch.manual_seed(seed)
    model = build_dual_encoder(
        "bench-small",
        MODEL_CFG,
        temperature=TEMPERATURE,
        learn_temperature=True,
        grad_checkpointing=grad_checkpointing,
        **(lock or {}),
    )
    return model.train()


def step_dga_cached(model, batch, k: int, cache) -> torch.Tensor:
    from zerovl_lightning.dga import DecoupledStep, split_batch

    subs = split_batch(batch, len(batch["image"]) // k)
    return DecoupledStep()(model, lambda s: encode(model, s), subs, model.logit_scale, tower_cache=cache).loss


def measure_locked(k: int, repeats: int) -> dict[str, Any]:
    """CPU seconds per optimizer step at K sub-batches, interleaved: plain accumulation, DGA replaying the
    locked part (ours), DGA recomputing it (every other two-pass cache) — for each lock of LOCKS."""
    from zerovl_lightning.locked_cache import LockedTowerCache

    torch.set_num_threads(1)
    out: dict[str, Any] = {"k": k, "n": k * SUB_BATCH, "cases": []}
    batch = make_batch(k * SUB_BATCH)
    for name, lock in LOCKS.items():
        model = build_variant(lock)
        cache = LockedTowerCache.for_model(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

        def run(method: str, model=model, cache=cache, opt=opt) -> float:
            cpu_start = time.process_time()
            opt.zero_grad(set_to_none=True)
            if method == "plain_accum":
                step_plain_accum(model, batch, k)
            else:
                step_dga_cached(model, batch, k, cache if method == "dga" else None)
            opt.step()
            return time.process_time() - cpu_start

        times: dict[str, list[float]] = {"plain_accum": [], "dga": [], "dga_recompute": []}
        for method in times:  # warm-up
            run(method)
        for r in range(repeats):  # interleaved, rotating order
            for method in list(times)[r % 3 :] + list(times)[: r % 3]:
                times[method].append(run(method))
        cpu = {m: statistics.median(t) for m, t in times.items()}
        row = {
            "case": name,
            "lock": lock,
            "cached": cache.describe(),
            "cache_bytes_per_sample": _cache_bytes_per_sample(model, cache, batch),
            **{f"{m}_s": v for m, v in cpu.items()},
            "dga_over_plain_accum": cpu["dga"] / cpu["plain_accum"],
            "recompute_over_plain_accum": cpu["dga_recompute"] / cpu["plain_accum"],
        }
        out["cases"].append(row)
        out[f"{name}_dga_over_plain_accum_k{k}"] = row["dga_over_plain_accum"]
        out[f"{name}_recompute_over_plain_accum_k{k}"] = row["recompute_over_plain_accum"]
        print(
            f"locked {name} K={k} (CPU s): plain accum {cpu['plain_accum']:.3f}, DGA {cpu['dga']:.3f} "
            f"({row['dga_over_plain_accum']:.3f}x), DGA recomputing {cpu['dga_recompute']:.3f} "
            f"({row['recompute_over_plain_accum']:.3f}x); cache {row['cache_bytes_per_sample']} B/sample",
            flush=True,
        )
    return out


def _cache_bytes_per_sample(model, cache, batch) -> int:
    """Bytes the locked-part cache holds per sample (one recorded sub-batch of 2)."""
    sub = {k: v[:2] for k, v in batch.items()}
    cache.begin(1)
    with torch.no_grad(), cache.record(0):
        encode(model, sub)
    per_sample = cache.bytes // 2
    cache.clear()
    return int(per_sample)


def locked_memory_worker(method: str, n: int) -> dict[str, Any]:
    """Peak RSS of one step (fresh process): ``{plain|dga}[_locked_image][_recompute][_ckpt]``."""
    from zerovl_lightning.locked_cache import LockedTowerCache

    torch.set_num_threads(2)
    model = build_variant(LOCKS["locked_image"] if "locked_image" in method else None, "ckpt" in method)
    batch = make_batch(n)
    before = _status_mb("VmRSS")
    if method.startswith("plain"):
        step_full(model, batch)
    else:
        cache = None if "recompute" in method else LockedTowerCache.for_model(model)
        step_dga_cached(model, batch, n // SUB_BATCH, cache)
    peak = _status_mb("VmHWM")
    return {"method": method, "n": n, "peak_rss_mb": peak, "step_delta_mb": peak - before}


def measure_locked_memory(n: int) -> list[dict[str, Any]]:
    methods = ("plain", "plain_ckpt", "dga", "dga_ckpt", "dga_locked_image", "dga_locked_image_recompute")
    return [_memory_row("--locked-memory-worker", method, n) for method in methods]


def _merge_results(update: dict[str, Any]) -> None:
    """Merge keys into bench/results/dga.json, keeping every other key."""
    path = RESULTS / "dga.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(res.get(key), dict):
            res[key] = {**res[key], **value}
        else:
            res[key] = value
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")


def run_locked_time(repeats: int) -> None:
    """The locked-tower step-time figures, merged into dga.json as soon as they are measured."""
    t0 = time.perf_counter()
    locked = measure_locked(8, repeats)
    locked["measured"] = (
        f"python bench/bench_dga.py --locked: CPU time (time.process_time, 1 thread) per optimizer step, "
        f"median of {repeats} interleaved repeats after a warm-up; model {MODEL_CFG}, sub-batch {SUB_BATCH}; "
        f"torch {torch.__version__}"
    )
    locked["bench_seconds"] = time.perf_counter() - t0
    _merge_results({"locked": locked, **{k: v for k, v in locked.items() if k.endswith("_k8")}})


def run_locked_memory() -> None:
    """Peak memory with a locked image tower and with gradient checkpointing (N = 8 sub-batches)."""
    memory = measure_locked_memory(8 * SUB_BATCH)
    mem = {r["method"]: r["step_delta_mb"] for r in memory}
    _merge_results(
        {
            "locked": {
                "memory": memory,
                "memory_measured": "peak RSS (VmHWM) of one step in a fresh process, 2 threads, N = 256",
            },
            "grad_checkpointing_step_delta_mb": {m: mem[m] for m in ("plain", "plain_ckpt", "dga", "dga_ckpt")},
        }
    )


# ------------------------------------------------------------------------------------------ report
def ddp_memory_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The 2-process DGA step before (own coalesced all-reduce, commit 33ada6a) and after (DDP's reducer)."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["reduction"], r["gradient_as_bucket_view"]), []).append(r)

    def mean(key: str, rs: list[dict[str, Any]]) -> float:
        return statistics.mean(r.get(key, float("nan")) for r in rs)

    grad = rows[0]["grad_mb"]
    lines = [
        f"**2-process DDP DGA step, before/after DDP's reducer** (K = 4, gradients {grad:.0f} MiB per rank; "
        "mean of the 2 ranks; `python bench/bench_dga.py --ddp-memory [--src <checkout of 33ada6a>/src]`):",
        "",
        "| reduction | bucket view | peak RSS (MiB) | step RSS Δ (MiB) | tensor bytes allocated in the step (MiB) "
        "| largest rise of live tensor bytes (MiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (reduction, gav), rs in sorted(groups.items()):
        lines.append(
            f"| {reduction} | {gav} | {mean('peak_rss_mb', rs):.0f} | {mean('step_delta_mb', rs):.0f} | "
            f"{mean('tensor_allocated_mb', rs):.0f} | {mean('tensor_rise_mb', rs):.0f} |"
        )
    lines += [
        "",
        "Tensor bytes come from the profiler's memory events: what torch allocates in the measured (second) "
        "step, without the allocator's cache. The old path allocates a flat copy of every gradient per step "
        "for its coalesced all-reduce: DDP's reducer removes exactly one gradient size from the bytes "
        "allocated per step, and the largest rise of live bytes drops most with `gradient_as_bucket_view` "
        "(the gradients are the buckets, zeroed in place). Peak RSS goes the other way, and is not the "
        "measure of the copy: the old path ran the whole step inside `no_sync`, so the bucket buffers DDP "
        "allocates when it wraps the model were never written and their pages never became resident; DDP's "
        "reducer writes them (without bucket views DDP holds gradients and buckets: two copies by design). "
        "Freed memory stays in the allocator's arena, so RSS also keeps the old path's freed flat copy. "
        "Use `gradient_as_bucket_view=True`.",
    ]
    return lines


def write_report(res: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dga.json").write_text(json.dumps(res, indent=2) + "\n")
    mem = {(r["method"], r["n"]): r for r in res["memory"]}
    ns = sorted({r["n"] for r in res["memory"]})
    b = res["config"]["sub_batch"]
    lines = [
        f"Small open_clip model ({res['config']['params_m']:.1f} M params, ViT 32 px / patch 4 + text, "
        f"fp32, CPU; threads: {res['config']['threads']}), sub-batch b = {b}, learnable τ.",
        "",
        "**Peak memory of one optimizer step** (fresh process each; peak RSS, and its increase over the RSS "
        "before the step):",
        "",
        "| global batch N | plain peak (MiB) | DGA peak (MiB) | plain step Δ (MiB) | DGA step Δ (MiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        p, d = mem[("plain", n)], mem[("dga", n)]
        lines.append(
            f"| {n} ({n // b}b) | {p['peak_rss_mb']:.0f} | {d['peak_rss_mb']:.0f} | "
            f"{p['step_delta_mb']:.0f} | {d['step_delta_mb']:.0f} |"
        )
    d1, d8 = mem[("dga", ns[0])], mem[("dga", ns[-1])]
    lines += [
        "",
        f"DGA peak at N = {ns[-1] // b}b / at N = b: **{d8['peak_rss_mb'] / d1['peak_rss_mb']:.3f}×** "
        "(goal ≤ 1.25); "
        f"step increase {d8['step_delta_mb'] / max(d1['step_delta_mb'], 1e-9):.2f}×.",
        "",
        "**Step time**: median CPU seconds per optimizer step, one thread, interleaved repeats, AdamW step "
        "included (CPU time, because the benchmark machine is shared; wall-clock ratios are in dga.json):",
        "",
        "| K | N | plain accumulation (CPU s) | DGA (CPU s) | OpenCLIP `accum_freq=K` (CPU s) "
        "| DGA / plain accum "
        "| DGA / OpenCLIP |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["time"]:
        lines.append(
            f"| {r['k']} | {r['n']} | {r['plain_accum_s']:.3f} | {r['dga_s']:.3f} | {r['openclip_s']:.3f} | "
            f"**{r['dga_over_plain_accum']:.3f}** | **{r['dga_over_openclip']:.3f}** |"
        )
    lines += [
        "",
        "Goals: DGA / plain accumulation ≤ 1.40 (DGA: 2K − 1 sub-batch forwards + K backwards, ≈ 4/3 of "
        "plain accumulation's K forwards + K backwards); "
        "DGA / OpenCLIP ≤ 1.0 at K = 8.",
        "",
        f"**Gradient error vs the full-batch step** (K = {res['config']['grad_k']}, relative L2 error; worst "
        "tower parameter, and the temperature):",
        "",
        "| method | dropout | worst parameter | logit scale (τ) |",
        "|---|---:|---:|---:|",
    ]
    for r in res["grad_error"]:
        lines.append(
            f"| {r['method']} | {r['dropout']} | {r['max_rel_err_params']:.2e} | {r['rel_err_logit_scale']:.2e} |"
        )
    lines += [
        "",
        "Plain accumulation optimises a different loss (negatives only inside each micro-batch). OpenCLIP's "
        "`--accum-freq` gets the tower gradients right without dropout, but adds the temperature gradient "
        "once "
        "per micro-batch (K× too large) and does not replay dropout.",
    ]
    if res.get("ddp_memory"):
        lines += ["", *ddp_memory_lines(res["ddp_memory"])]
    (RESULTS / "dga.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method, style in (("plain", "o-"), ("dga", "s-")):
        ax1.plot(ns, [mem[(method, n)]["peak_rss_mb"] for n in ns], style, label=f"{method} peak RSS")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("global batch N")
    ax1.set_ylabel("MiB")
    ax1.set_title(f"peak memory, sub-batch b = {b}")
    ax1.legend()
    ks = [r["k"] for r in res["time"]]
    width = 0.27
    for i, (key, label) in enumerate((("plain_accum_s", "plain accum"), ("dga_s", "DGA"), ("openclip_s", "OpenCLIP"))):
        ax2.bar([j + (i - 1) * width for j in range(len(ks))], [r[key] for r in res["time"]], width, label=label)
    ax2.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
    ax2.set_ylabel("CPU s / optimizer step (1 thread)")
    ax2.set_title("step time")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "dga.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (smoke run)")
    parser.add_argument("--memory-worker", nargs=2, metavar=("METHOD", "N"))
    parser.add_argument("--report-only", action="store_true", help="rewrite dga.md/png from dga.json")
    parser.add_argument("--locked", action="store_true", help="only the locked-tower / checkpointing figures")
    parser.add_argument("--locked-memory", action="store_true", help="only the locked / checkpointing memory")
    parser.add_argument("--locked-memory-worker", nargs=2, metavar=("METHOD", "N"))
    parser.add_argument("--ddp-memory", action="store_true", help="only the 2-process DDP memory part")
    parser.add_argument("--src", help="with --ddp-memory: measure the code in this src folder instead")
    parser.add_argument("--ddp-memory-worker", nargs=3, type=int, metavar=("RANK", "PORT", "BUCKET_VIEW"))
    args = parser.parse_args()
    if args.ddp_memory_worker:
        rank, port, gav = args.ddp_memory_worker
        print(json.dumps(ddp_memory_worker(rank, 2, port, bool(gav))))
        return
    if args.ddp_memory:
        path = RESULTS / "dga.json"
        res = json.loads(path.read_text())
        rows = [r for r in res.get("ddp_memory", []) if r["src"] != (args.src or "this checkout")]
        res["ddp_memory"] = rows + measure_ddp_memory(args.src)
        write_report(res)
        return
    if args.locked_memory_worker:
        print(json.dumps(locked_memory_worker(args.locked_memory_worker[0], int(args.locked_memory_worker[1]))))
        return
    if args.locked or args.locked_memory:
        if not args.locked_memory:
            run_locked_time(repeats=2 if args.quick else 3)
        run_locked_memory()
        return
    if args.report_only:
        write_report(json.loads((RESULTS / "dga.json").read_text()))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker[0], int(args.memory_worker[1]))))
        return
    torch.set_num_threads(2)
    ns = [SUB_BATCH * m for m in ((1, 8) if args.quick else (1, 2, 4, 8))]
    ks = [2, 8] if args.quick else [2, 4, 8]
    res: dict[str, Any] = {
        "config": {
            "model_cfg": MODEL_CFG,
            "sub_batch": SUB_BATCH,
            "temperature": TEMPERATURE,
            "threads": "2 (memory, gradient error), 1 (time)",
            "params_m": sum(p.numel() for p in build_model().parameters()) / 1e6,
            "grad_k": 8,
            "torch": torch.__version__,
        },
    }
    t0 = time.perf_counter()
    res["grad_error"] = measure_grad_error(8)
    res["memory"] = measure_memory(ns)
    res["time"] = measure_time(ks, repeats=2 if args.quick else 4)
    res["config"]["bench_seconds"] = time.perf_counter() - t0
    write_report(res)
    run_locked_time(repeats=2 if args.quick else 3)  # merges its keys into the dga.json just written
    run_locked_memory()
    print((RESULTS / "dga.md").read_text())


if __name__ == "__main__":
    main()
