"""The notebooks in notebooks/ execute top to bottom (nbclient, the project's kernel) and are committed without
outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from test_configs import write_smoke_data, zerovl_train

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "dga_explained", "results")


def execute(name: str, timeout: int = 900) -> nbformat.NotebookNode:
    """Run a notebook in a fresh kernel with notebooks/ as working directory; raises on the first failing cell."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebooks_are_committed_without_outputs() -> None:
    """Outputs stay out of git (strip them before committing: `make strip-notebooks`)."""
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}.ipynb cell {i} has outputs"


def test_quickstart() -> None:
    out = stdout(execute("quickstart"))
    assert "DualEncoder" in out and "RSUM" in out


def test_dga_explained() -> None:
    out = stdout(execute("dga_explained"))
    assert "with RNG replay" in out and "reference loss" in out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished smoke run (CSV logs, eval JSON, .hydra/) for the results notebook to read."""
    cache = write_smoke_data(tmp_path / "cache")
    run = tmp_path / "run"
    zerovl_train(["experiment=smoke", f"hydra.run.dir={run}"], cwd=tmp_path, cache=cache)
    return run


def test_results(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEROVL_RUN_DIR", str(run_dir))
    out = stdout(execute("results"))
    assert f"{run_dir}: 1 run(s)" in out
    assert "zeroshot_retrieval" in out and "tuxpaint" in out
