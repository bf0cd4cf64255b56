"""A non-editable install (wheel → fresh virtual environment): the configs ship inside the package, and
``zerovl-train`` works from any folder, including with a user's own config folder on Hydra's search path.

The fresh environment reuses the project environment's third-party packages (torch & co.) through a ``.pth``
file added *after* the install: nothing is downloaded, and the editable install of the tree stays hidden.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from test_configs import write_smoke_data, zerovl_train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("packaging")


def _run(cmd: list[str | Path], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what is installed may be imported
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the tree stays clean), plus a planted local config."""
    work = tmp_path_factory.mktemp("build")
    src = work / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    shutil.copytree(ROOT / "conf", src / "conf", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    # a developer's git-ignored machine-local override must never end up in a wheel
    (src / "conf" / "local" / "default.yaml").write_text("# @package _global_\nseed: 7\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            work / "dist",
            src,
        ],
        cwd=work,
    )
    (whl,) = (work / "dist").glob("zerovl_lightning-*.whl")
    return whl


@pytest.fixture(scope="module")
def env(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable); dependencies visible from the project venv."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        cwd=venv.parent,
    )
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv.parent
        ).stdout.strip()
    )
    (site / "zz_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_ships_every_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(
        str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml") if p.parts[-2] != "local"
    )
    assert shipped, "no configs found"
    missing = [p for p in shipped if f"zerovl_lightning/conf/{p}" not in names]
    assert not missing, f"configs missing from the wheel: {missing}"
    assert "zerovl_lightning/conf/__init__.py" in names
    assert not [n for n in names if n.startswith("zerovl_lightning/conf/local/")], (
        "machine-local config shipped"
    )
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "zerovl-train = zerovl_lightning.train:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_is_the_wheel(env: Path, tmp_path: Path) -> None:
    out = _run(
        [
            env / "bin" / "python",
            "-c",
            "import zerovl_lightning as z, zerovl_lightning.conf as c; print(z.__file__, *c.__path__)",
        ],
        cwd=tmp_path,
    ).stdout.split()
    assert all(p.startswith(str(env)) for p in out), out


def test_help_from_any_folder(env: Path, tmp_path: Path) -> None:
    out = _run([env / "bin" / "zerovl-train", "--help"], cwd=tmp_path).stdout
    assert "zerovl-lightning: ZeroVL" in out and "zerovl-train examples" in out
    for group in ("experiment:", "model:", "trainer:", "logger:", "hparams_search:"):
        assert group in out, group
    assert "zerovl_14m" in out and "ddp_fp16_v100" in out
    assert not (tmp_path / "logs").exists()  # --help composes, never runs


def test_tiny_run_with_a_user_config_folder(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another folder: a user experiment on Hydra's search path extends a packaged one, and trains."""
    monkeypatch.delenv("PYTHONPATH", raising=False)  # only the installed wheel may be imported
    cache = write_smoke_data(tmp_path / "cache")
    user = tmp_path / "my_configs"
    (user / "experiment").mkdir(parents=True)
    (user / "experiment" / "my_smoke.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - smoke  # the packaged experiment/smoke.yaml\n  - _self_\n"
        "task_name: my_smoke\ntrainer:\n  max_steps: 2\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    zerovl_train(
        [f"hydra.searchpath=[file://{user}]", "experiment=my_smoke"],
        cwd=elsewhere,
        cache=cache,
        exe=env / "bin" / "zerovl-train",
    )
    (run,) = (
        elsewhere / "logs" / "my_smoke" / "runs"
    ).iterdir()  # logs/ under the folder it was started from
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/tuxpaint/rsum" in metrics
    assert (run / ".hydra" / "config.yaml").read_text().count("task_name: my_smoke") == 1


def test_every_package_folder_ships_in_the_wheel() -> None:
    """pyproject lists its packages by hand (conf/ is mapped in): a new sub-package must be listed too."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert found <= listed, f"add to pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
