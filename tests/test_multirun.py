"""Hydra multirun on a CPU: jobs run one after another, each in its own folder with its own logger run, and
every job returns the experiment's optimized metric to the sweeper."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from test_configs import write_smoke_data, write_split, zerovl_train
from test_wandb import read_wandb_run

ROOT = Path(__file__).resolve().parents[1]
RETURN_RE = re.compile(r"Succeeded with return value: ([-+0-9.eE]+|nan)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_smoke_data(tmp_path_factory.mktemp("cache"))


def _returned(sweep: Path) -> list[float]:
    """Return values the jobs logged (LogJobReturnCallback in conf/hydra/default.yaml), in job order."""
    text = "".join(p.read_text() for p in sorted(sweep.glob("*/*.log")))
    return [float(v) for v in RETURN_RE.findall(text)]


def test_two_job_multirun_on_cpu(tmp_path: Path, cache: Path) -> None:
    sweep = tmp_path / "sweep"
    zerovl_train(
        ["-m", "experiment=smoke", "seed=1,2", "logger=[csv,wandb]", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        cache=cache,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    runs = []
    for job, seed in zip(jobs, (1, 2)):
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert cfg["seed"] == seed
        assert f"seed={seed}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        metrics = (job / "csv" / "metrics.csv").read_text()  # each job logs into its own folder
        assert "train/loss" in metrics and "val/tuxpaint/rsum" in metrics
        assert (job / "eval" / "zeroshot_retrieval.json").is_file()
        (wandb_dir,) = (job / "wandb").glob("offline-run-*")  # one wandb run per job, never shared
        runs.append(read_wandb_run(wandb_dir))
    assert [r["config"]["seed"] for r in runs] == [1, 2]
    assert runs[0]["run"]["id"] != runs[1]["run"]["id"]
    assert runs[0]["run"]["group"] == runs[1]["run"]["group"]  # the sweep's group
    assert "seed=1" in runs[0]["run"]["name"] and "seed=2" in runs[1]["run"]["name"]
    assert all(r["exit_code"] == 0 for r in runs)
    values = _returned(sweep)
    assert len(values) == 2  # each job returned the optimized metric (held-out RSUM, in %)
    assert all(0.0 <= v <= 600.0 for v in values)
    assert values == [r["summary"]["val/tuxpaint/rsum"] for r in runs]


def test_grid_sweep_from_hparams_search(tmp_path: Path, cache: Path) -> None:
    """hparams_search configs switch to multirun themselves; the grid comes from hydra.sweeper.params."""
    sweep = tmp_path / "grid"
    zerovl_train(
        [
            "hparams_search=temperature",
            "experiment=smoke",
            "model.temperature=0.02,0.05",  # the command line narrows the config's grid
            "trainer.max_steps=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        cache=cache,
    )
    temps = sorted(
        yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["model"]["temperature"]
        for job in sweep.iterdir()
        if (job / ".hydra").is_dir()
    )
    assert temps == [0.02, 0.05]
    assert len(_returned(sweep)) == 2


@pytest.mark.slow
def test_optuna_sweep(tmp_path: Path, cache: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    zerovl_train(
        [
            "hparams_search=zerovl_optuna",
            "experiment=smoke",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "trainer.max_steps=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        cache=cache,
    )
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    assert set(result["best_params"]) >= {"module.mixup.beta", "model.temperature", "data.sampling"}
    assert isinstance(result["best_value"], float)
    assert len([p for p in sweep.iterdir() if (p / ".hydra").is_dir()]) == 3


@pytest.mark.slow
def test_every_experiment_fast_dev_run(tmp_path: Path, cache: Path) -> None:
    """``experiment=glob(*)`` with the tiny model: each experiment's method settings run one step on a CPU."""
    sweep = tmp_path / "all"
    big = tmp_path / "big"  # one source large enough for a batch of 256 (= 2 DGA sub-batches of 128)
    write_split(big, "big", 0, "train", 512, per_shard=256)
    zerovl_train(
        [
            "-m",
            "experiment=glob(*)",
            "model=tiny",
            "trainer=cpu",
            "logger=csv",
            "callbacks=none",
            "++trainer.fast_dev_run=true",
            "data.batch_size=256",
            "data.num_workers=0",
            "~data.sources",
            f"+data.sources={{big: {{path: {big}}}}}",
            "optimized_metric=null",
            "++data.val_sets=null",  # zerovl_14m validates on ${paths.data_dir}/eval/*, absent here
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        cache=cache,
    )
    ran = sorted(
        yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())[0]
        for job in sweep.iterdir()
        if (job / ".hydra").is_dir()
    )
    experiments = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert ran == [f"experiment={e}" for e in experiments]
