"""bench/gpu_check.py cannot rot: its ``--smoke`` mode runs the same code (``zerovl-train`` in-process, the
measuring callback, the batch search, the exactness pair) on CPU with the tiny towers, and its keys are sane."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

KEYS = ("vit_b16_bf16_samples_per_sec", "dga_over_plain_accum", "dga_fp32_grad_rel_err", "dga_peak_mem_ratio_8b_over_b")


def test_gpu_check_smoke_writes_sane_figures(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    gpu_check.main(["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert (tmp_path / "out" / "gpu.md").read_text().startswith("GPU check (smoke")
    for key in KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["batch_size"] == 8 and result["batches_tried"] == [4, 8]  # both smoke batches fit
    assert result["global_batch_dga"] == 8 * result["batch_size"]
    assert result["runs"]["dga"]["optimizer_steps"] == result["runs"]["plain"]["optimizer_steps"] == 3
    assert result["runs"]["accum"]["optimizer_steps"] == 3 and result["runs"]["accum"]["batches"] == 24
    # fp32, N = 16 in 8 sub-batches: DGA and the full batch differ only in float32 summation order, so the
    # error is a few hundred ulps at most (u = 6e-8; measured ~1e-6); 1e-5 is the fp32 bound of the CUDA test.
    # A wrong DGA (a missing temperature term, a 1/K slip) is off by >= 1e-2.
    assert result["dga_fp32_grad_rel_err"] <= 1e-5
    assert result["dga_fp32_grad_cosine"] >= 1 - 1e-9
    # DGA holds one sub-batch's graph at a time: its global batch 8b costs the activations of b (measured
    # ~1.0). The plain step at 8b would hold ~8x.
    assert result["peak_mem_metric"] == "saved_activation_bytes"
    assert result["dga_peak_mem_ratio_8b_over_b"] <= 1.5
