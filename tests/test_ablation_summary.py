"""bench/ablation.py (the summariser of `make ablate`) on hand-made job folders laid out as the multirun writes them."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _summariser():
    spec = importlib.util.spec_from_file_location("ablation_summary", ROOT / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(sweep: Path, num: int, arm: str, seed: int, rsums: dict[str, float], steps: int = 120) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / "eval").mkdir()
    cfg = {
        "seed": seed,
        "ablation": {"arm": arm, "batch_size": 32, "dga_batch_size": 128},
        "trainer": {"max_steps": steps},
        "model": {"image_size": 64, "model_name": "m"},
        "module": {"optimizer": {"lr": 3e-3}},
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = [
        {
            "task": "zeroshot_retrieval",
            "dataset": name,
            "step": steps,
            "metrics": {"rsum": r, "i2t_r1": r / 600, "t2i_r1": r / 600},
        }
        for name, r in rsums.items()
    ]
    (job / "eval" / "zeroshot_retrieval.json").write_text(json.dumps(records))


def test_summary_means_standard_errors_and_difference(tmp_path: Path) -> None:
    ab = _summariser()
    sweep = tmp_path / "sweep"
    _job(sweep, 0, "baseline", 1, {"a": 100.0, "b": 200.0})  # mean 150
    _job(sweep, 1, "zerovl", 1, {"a": 160.0, "b": 240.0})  # mean 200
    _job(sweep, 2, "baseline", 2, {"a": 110.0, "b": 210.0})  # mean 160
    _job(sweep, 3, "zerovl", 2, {"a": 180.0, "b": 260.0})  # mean 220
    (sweep / "4").mkdir()  # an unfinished job is skipped
    assert ab.main([str(sweep), "--out", str(tmp_path / "out" / "ablation"), "--wall-s", "60"]) == 0
    out = json.loads((tmp_path / "out" / "ablation.json").read_text())
    base, zero = out["arms"]["baseline"], out["arms"]["zerovl"]
    assert [r["seed"] for r in base["seeds"]] == [1, 2]
    assert base["seeds"][0]["sets"]["a"]["i2t_r1"] == pytest.approx(100 / 6, abs=1e-12)  # in %
    assert (base["mean_rsum"], base["se_rsum"]) == pytest.approx((155.0, 5.0), abs=1e-12)
    assert (zero["mean_rsum"], zero["se_rsum"]) == pytest.approx((210.0, 10.0), abs=1e-12)
    assert out["zerovl_minus_baseline_mean_rsum"] == pytest.approx(55.0, abs=1e-12)
    assert out["zerovl_minus_baseline_se"] == pytest.approx(math.hypot(5, 10), abs=1e-12)
    assert out["zerovl_above_baseline_by_2se"] is True
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "| zerovl | 2 | 210.0 ± 10.0 |" in md and "1.0 min" in md
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 0


def test_jobs_with_different_settings_are_refused(tmp_path: Path) -> None:
    ab = _summariser()
    _job(tmp_path, 0, "baseline", 1, {"a": 1.0}, steps=120)
    _job(tmp_path, 1, "zerovl", 1, {"a": 1.0}, steps=8)
    with pytest.raises(SystemExit, match="different settings"):
        ab.summarise(tmp_path)


def _multirun(sweep: Path, task: list[str]) -> None:
    """The multirun.yaml Hydra writes at the top of a sweep, reduced to the overrides the summariser reads."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"hydra": [], "task": task}}}))


def test_partial_sweep_is_refused_unless_allowed(tmp_path: Path) -> None:
    """A stopped sweep (2 of the 2 × 2 jobs finished) is not summarised as if it were whole."""
    ab = _summariser()
    sweep = tmp_path / "sweep"
    _multirun(sweep, ["experiment=ablation", "seed=1,2", "+ablation_arm=baseline,zerovl"])
    _job(sweep, 0, "baseline", 1, {"a": 100.0})
    _job(sweep, 1, "zerovl", 1, {"a": 120.0})
    (sweep / "2").mkdir()  # started, killed before its evaluation
    with pytest.raises(SystemExit, match="2 of the 4 jobs in multirun.yaml finished"):
        ab.summarise(sweep)
    out = tmp_path / "out" / "ablation"
    assert ab.main([str(sweep), "--out", str(out), "--allow-partial"]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["jobs"] == {"finished": 2, "expected": 4}
    assert "**Partial sweep: 2 of 4 jobs finished.**" in out.with_suffix(".md").read_text()


def test_whole_sweep_has_no_partial_note(tmp_path: Path) -> None:
    ab = _summariser()
    _multirun(tmp_path, ["experiment=ablation", "seed=1", "+ablation_arm=baseline,zerovl"])
    _job(tmp_path, 0, "baseline", 1, {"a": 100.0})
    _job(tmp_path, 1, "zerovl", 1, {"a": 120.0})
    summary = ab.summarise(tmp_path)
    assert summary["jobs"] == {"finished": 2, "expected": 2}
    assert "Partial" not in ab.markdown(summary)
