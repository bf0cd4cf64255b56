"""Every config group option and every experiment composes (and, where it can on a CPU, instantiates).

Also home of :func:`write_smoke_data` — tiny webdataset shards in the demo layout
(``<cache>/demo/<source>/{train,heldout}``) that the run tests read via ``ZEROVL_CACHE`` — and of
:func:`zerovl_train`, which runs the console script.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from zerovl_lightning.conf import __path__ as _conf_path

import zerovl_lightning.assets  # noqa: F401  (registers the ${zerovl.*} resolvers)

CONF_DIR = Path(_conf_path[0])
SMOKE_SOURCES = ("tuxpaint", "emoji", "openclipart", "flags")  # the demo's source names
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "cross", "bar", "ring", "dot", "frame")


# --------------------------------------------------------------------------------------------- tiny data
def _image(color: str, shape: str, variant: int, size: int = 40) -> bytes:
    im = Image.new("RGB", (size, size), "white")
    d, c, m = ImageDraw.Draw(im), COLORS[color], 4 + variant % 5
    box = [m, m, size - m, size - m]
    {
        "circle": lambda: d.ellipse(box, fill=c),
        "square": lambda: d.rectangle(box, fill=c),
        "triangle": lambda: d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=c),
        "cross": lambda: (
            d.rectangle([size // 2 - 3, m, size // 2 + 3, size - m], fill=c),
            d.rectangle([m, size // 2 - 3, size - m, size // 2 + 3], fill=c),
        ),
        "bar": lambda: d.rectangle([m, size // 2 - 4, size - m, size // 2 + 4], fill=c),
        "ring": lambda: d.ellipse(box, outline=c, width=4),
        "dot": lambda: d.ellipse([16, 16, 24, 24], fill=c),
        "frame": lambda: d.rectangle(box, outline=c, width=4),
    }[shape]()
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _pairs(source_index: int, split: str, n: int) -> Iterator[tuple[int, str, bytes]]:
    """(image id, caption, png) — every (source, split) gets its own colour × shape × variant combinations."""
    offset = source_index * 7 + (0 if split == "train" else 3)
    for i in range(n):
        color = list(COLORS)[(i + offset) % len(COLORS)]
        shape = SHAPES[(i // len(COLORS) + offset) % len(SHAPES)]
        yield i, f"a {color} {shape} number {i % 5}", _image(color, shape, i)


def write_split(out: Path, source: str, source_index: int, split: str, n: int, per_shard: int) -> None:
    """``shard-%06d.tar`` files (``KEY.png|txt|json``) and ``stats.json``, laid out as the writers do."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, int | str]] = []
    writer = None
    for i, caption, png in _pairs(source_index, split, n):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            name = f"shard-{i // per_shard:06d}.tar"
            writer = wds.TarWriter(str(out / name))
            shards.append({"file": name, "num_samples": 0})
        meta = {"image_id": i, "caption_id": i, "source": source}
        writer.write({"__key__": f"{source}-{split}-{i:05d}", "png": png, "txt": caption, "json": meta})
        shards[-1]["num_samples"] = int(shards[-1]["num_samples"]) + 1
    if writer is not None:
        writer.close()
    stats = {"num_samples": n, "num_shards": len(shards), "num_images": n, "source": source, "shards": shards}
    (out / "stats.json").write_text(json.dumps(stats))


def write_smoke_data(cache: Path, n_train: int = 64, n_heldout: int = 16, per_shard: int = 32) -> Path:
    """Tiny stand-in for the demo shards under ``<cache>/demo`` (run with ``ZEROVL_CACHE=<cache>``)."""
    for k, source in enumerate(SMOKE_SOURCES):
        for split, n in (("train", n_train), ("heldout", n_heldout)):
            write_split(cache / "demo" / source / split, source, k, split, n, per_shard)
    return cache


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory) -> Path:
    return write_smoke_data(tmp_path_factory.mktemp("cache"))


def zerovl_train(
    args: list[str],
    cwd: Path,
    cache: Path,
    timeout: float = 600,
    exe: str | os.PathLike | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run the ``zerovl-train`` console script as a user would (wandb offline, demo cache at ``cache``)."""
    env = {
        **os.environ,
        "ZEROVL_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "1",
        "PYTHONWARNINGS": "ignore",
        # one intra-op thread per process: test workers already share the cores, and oversubscribed OpenMP
        # threads make the tiny model ~10x slower
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    env.pop("PROJECT_ROOT", None)
    exe = exe or Path(sys.executable).parent / "zerovl-train"
    proc = subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, (
            f"zerovl-train {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


# --------------------------------------------------------------------------------------------- composition
def options(group: str) -> list[str]:
    """The options of a config group: the YAML files in conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = (
    "model",
    "module",
    "method",
    "data",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "experiment",
    "hparams_search",
    "loss",
)
GROUP_OPTIONS = [(g, o) for g in GROUPS if (CONF_DIR / g).is_dir() for o in options(g)]


def compose_train(overrides: list[str], tmp_path: Path | None = None, hydra: bool = True) -> DictConfig:
    """Compose conf/train.yaml as ``zerovl-train`` would (paths redirected into ``tmp_path``)."""
    extra = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out"] if tmp_path else []
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zerovl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides + extra, return_hydra_config=hydra)
    if hydra:
        HydraConfig().set_config(cfg)  # ${hydra:...} interpolations resolve as in a real run
    return cfg


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group: str, option: str, tmp_path: Path) -> None:
    if option.endswith("_optuna"):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install hydra-optuna-sweeper")
    cfg = compose_train([f"{group}={option}"], tmp_path)
    assert cfg.hydra.runtime.choices[group] == option
    if group == "method":  # `# @package module`: options of the training step, merged into the module
        assert "_target_" in cfg.module
    elif group == "loss":  # `# @package _global_`: the module's loss and the model keys it needs
        assert cfg.module.loss == option
    elif group not in ("experiment", "hparams_search", "paths", "callbacks", "logger"):
        node = cfg[group]
        assert "_target_" in node, f"conf/{group}/{option}.yaml has no _target_"
    if group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            assert "_target_" in node, f"conf/{group}/{option}.yaml: entry {name} has no _target_"


def test_wheel_ships_every_config() -> None:
    """The configs are a package (``zerovl_lightning.conf``): everything Hydra composes comes from there."""
    assert (CONF_DIR / "train.yaml").is_file()
    for group in ("model", "trainer", "logger", "experiment", "hparams_search"):
        assert options(group), group


# ----------------------------------------------------------------------------------- experiment x method
# What each method means for the training step: (decoupled gradient accumulation, coin-flipping mixup).
METHODS = {"plain": (False, False), "mixup": (False, True), "dga": (True, False), "zerovl": (True, True)}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_x_method_runs_what_the_method_says(experiment: str, method: str, tmp_path: Path) -> None:
    """``method=`` owns its keys in every experiment: the module built from the composed config has sub-batches
    iff the method is dga/zerovl (at the experiment's method.sub_batch_size) and mixup iff mixup/zerovl."""
    from zerovl_lightning.module import ZeroVLModule

    dga, mixup = METHODS[method]
    cfg = compose_train([f"experiment={experiment}", f"method={method}", "model=tiny"], tmp_path)
    assert set(METHODS) == set(options("method"))
    module = instantiate(cfg.module)  # the real module on the tiny towers (the paper's need GPUs)
    assert isinstance(module, ZeroVLModule)
    assert module.automatic_optimization is (not dga)
    assert module.sub_batch_size == (cfg.method.sub_batch_size if dga else None)
    if dga:
        assert cfg.data.batch_size % module.sub_batch_size == 0
    assert module.mixup.enabled is mixup


# --------------------------------------------------------------------------------------------- instantiation
def _tiny_overrides(cache: Path) -> list[str]:
    """Run any experiment on CPU with the tiny model and the smoke shards (the paper's model needs GPUs)."""
    return ["model=tiny", "trainer=cpu", "logger=csv", f"data.sources.smoke.path={cache}/demo/tuxpaint/train"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_instantiates(
    experiment: str, smoke_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zerovl_lightning.train import build

    monkeypatch.setenv("ZEROVL_CACHE", str(smoke_cache))
    cfg = compose_train([f"experiment={experiment}", "model=tiny", "trainer=cpu", "logger=csv"], tmp_path)
    if not cfg.data.sources:  # the paper experiments read your shards
        cfg.data.sources = {"smoke": {"path": f"{smoke_cache}/demo/tuxpaint/train"}}
    module, datamodule, trainer = build(cfg)
    assert module.model.model_name == "zerovl-tiny"
    assert datamodule.batch_size == cfg.data.batch_size
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_cpu_instantiable_options(smoke_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loggers, trainers and callbacks build on a CPU (GPU trainers with the accelerator switched to CPU)."""
    monkeypatch.setenv("ZEROVL_CACHE", str(smoke_cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for option in options("logger"):
        cfg = compose_train([f"logger={option}"], tmp_path)
        for node in (cfg.logger or {}).values():
            instantiate(node)
    for option in options("callbacks"):
        cfg = compose_train([f"callbacks={option}"], tmp_path)
        for node in (cfg.callbacks or {}).values():
            assert callable(instantiate(node, _partial_=True))
    for option in options("trainer"):
        cfg = compose_train([f"trainer={option}"], tmp_path)
        trainer_cfg = cfg.trainer
        if trainer_cfg.accelerator != "cpu":
            trainer_cfg.accelerator, trainer_cfg.devices, trainer_cfg.precision = "cpu", 1, "32-true"
        trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == trainer_cfg.max_epochs


def test_gpu_trainers_say_what_they_run(tmp_path: Path) -> None:
    expect = {
        "gpu": ("bf16-mixed", 1),
        "bf16": ("bf16-mixed", 1),
        "ddp": ("bf16-mixed", -1),
        "ddp_fp16_v100": ("16-mixed", 8),
        "ddp_sim": ("32-true", 2),
    }
    for option, (precision, devices) in expect.items():
        cfg = compose_train([f"trainer={option}"], tmp_path)
        assert (cfg.trainer.precision, cfg.trainer.devices) == (precision, devices), option
    assert compose_train(["trainer=ddp_sim"], tmp_path).trainer.strategy.process_group_backend == "gloo"


def test_multinode_trainer_reads_the_launcher_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "NNODES", "GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = compose_train(["trainer=ddp_multinode"], tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (1, "auto")
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    cfg = compose_train(["trainer=ddp_multinode"], tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (4, 8)
    monkeypatch.delenv("SLURM_NNODES")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # torchrun --nnodes 2 --nproc-per-node 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cfg = compose_train(["trainer=ddp_multinode"], tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)
    monkeypatch.setenv("NNODES", "3")
    assert compose_train(["trainer=ddp_multinode"], tmp_path).trainer.num_nodes == 3


def test_wandb_logger_is_offline_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_train(["logger=wandb"], tmp_path)
    assert cfg.logger.wandb.offline is True
    assert cfg.logger.wandb.save_dir == f"{tmp_path}/out"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert compose_train(["logger=wandb"], tmp_path).logger.wandb.offline is False


def test_optional_local_config_is_picked_up(tmp_path: Path) -> None:
    """``optional local: default``: a machine-local file in any search-path folder overrides the defaults."""
    user = tmp_path / "myconf"
    (user / "local").mkdir(parents=True)
    (user / "local" / "default.yaml").write_text("# @package _global_\nseed: 1234\ntags: [mine]\n")
    (user / "experiment").mkdir()
    (user / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny\n"
        "task_name: mine\ntrainer:\n  max_steps: 3\n"
    )
    cfg = compose_train([f"hydra.searchpath=[file://{user}]", "experiment=my_exp"], tmp_path)
    assert (cfg.seed, list(cfg.tags), cfg.task_name) == (1234, ["mine"], "mine")
    assert cfg.trainer.max_steps == 3 and cfg.model.model_name == "zerovl-tiny"


# --------------------------------------------------------------------------------------------- clear errors
def test_unknown_group_option_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_train(["experiment=zerovl_15m"], tmp_path)
    msg = str(err.value)
    assert "experiment/zerovl_15m" in msg
    assert "zerovl_14m" in msg and "baseline" in msg  # Hydra lists the available options


def test_unknown_key_says_how_to_add_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["trainer.max_stepz=3"], tmp_path)
    assert "max_stepz" in str(err.value) and "+trainer.max_stepz" in str(err.value)


@pytest.mark.parametrize("experiment", ["zerovl_14m", "zerovl_dga_16k", "baseline"])
def test_paper_experiments_take_your_sources(experiment: str, tmp_path: Path) -> None:
    """The paper experiments read your shards: without sources, the check before any work says what to set."""
    from zerovl_lightning.config_checks import ConfigError, validate_config

    cfg = compose_train([f"experiment={experiment}", "model=tiny", "trainer=cpu", "logger=csv"], tmp_path)
    assert cfg.data.sources == {}
    with pytest.raises(ConfigError, match="data.sources"):
        validate_config(cfg)
    path = "/data/cc3m/"
    for how in ([f"+data.sources.cc3m.path={path}"], [f"++data.sources={{cc3m: {path}}}"]):
        cfg = compose_train([f"experiment={experiment}", *how], tmp_path)
        assert OmegaConf.to_container(cfg.data.sources) in ({"cc3m": {"path": path}}, {"cc3m": path}), how


def test_temperature_is_positive_everywhere(tmp_path: Path) -> None:
    for option in options("model"):
        cfg = compose_train([f"model={option}"], tmp_path, hydra=False)
        lo, hi = cfg.model.temperature_range
        assert 0 < lo <= cfg.model.temperature <= hi, option
