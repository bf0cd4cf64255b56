"""module.feature_cache on the demo model: one training step over frozen towers, uncached vs cached.

The demo's model (EfficientNet-Lite0 + MiniLM, both towers frozen, 128 px, 32 tokens, the two projections
trainable): forward + InfoNCE + backward + AdamW step on a batch of 128, seconds per step on this machine's
threads. "uncached" runs the frozen trunks every step (what each epoch costs without the cache); "cached" answers
them from ``FeatureCache`` (every epoch after the first). Data loading is not included: on the demo it is what
bounds a cached epoch (README "What make train does").

Usage: ``python bench/bench_feature_cache.py [--repeats 5]`` → bench/results/feature_cache.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from common import RESULTS, machine


def _demo_model() -> torch.nn.Module:
    import os

    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from zerovl_lightning.conf import __path__ as conf_path

    import zerovl_lightning.assets  # noqa: F401  (the ${zerovl.asset:...} resolvers)

    cfg = OmegaConf.load(os.path.join(conf_path[0], "model", "effl0_minilm.yaml"))
    return instantiate(cfg, lock_image=True, lock_text=True).train()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "feature_cache")
    args = parser.parse_args(argv)

    from zerovl_lightning.feature_cache import FeatureCache
    from zerovl_lightning.loss import ContrastiveLoss
    from zerovl_lightning.mixup import encode_pair

    model = _demo_model()
    cache = FeatureCache.for_model(model)
    assert cache is not None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 128, 128, generator=g)
    tokens = model.tokenize([f"a drawing of thing number {i} in red and blue" for i in range(args.batch)])
    keys = [f"bench/{i}" for i in range(args.batch)]

    def step(cached: bool) -> float:
        start = time.perf_counter()
        ctx = cache.step(None) if cached else nullcontext()
        with ctx, cache.batch(keys) if cached else nullcontext():
            u, v = encode_pair(model, images, tokens)
        loss = ContrastiveLoss()(u, v, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    fill = step(True)  # the first epoch: every sample missing
    step(False)  # warm-up
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        times["uncached"].append(step(False))
        times["cached"].append(step(True))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": "s per training step, demo model (frozen EfficientNet-Lite0 + MiniLM, 128 px, 32 tokens), "
        f"batch {args.batch}, forward + loss + backward + AdamW, median of {args.repeats} interleaved repeats",
        "threads": torch.get_num_threads(),
        "first_cached_step_s": fill,
        "median_s": med,
        "times_s": times,
        "speedup": med["uncached"] / med["cached"],
        "cache_mib": cache.bytes / 2**20,
        "cache_bytes_per_sample": cache.bytes / args.batch,
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = (
        f"Training step on the demo model, batch {args.batch}, {torch.get_num_threads()} threads "
        f"(`python bench/bench_feature_cache.py`):\n\n"
        "| step | s (median) |\n|---|---:|\n"
        f"| frozen towers run (no cache) | {med['uncached']:.3f} |\n"
        f"| frozen towers from `module.feature_cache` | {med['cached']:.4f} |\n\n"
        f"Speed-up {result['speedup']:.0f}×; the cache holds {result['cache_bytes_per_sample'] / 1024:.0f} KiB "
        "per sample (image trunk's pooled features + the text transformer's hidden states).\n"
    )
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
