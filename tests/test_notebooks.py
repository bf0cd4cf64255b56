"""The notebooks in notebooks/ execute top to bottom (nbclient, the project's kernel) and are committed
without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_configs import write_smoke_data, zerovl_train

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "dga_explained", "results")


def execute(name: str, timeout: int = 900) -> nbformat.NotebookNode:
    """Run a notebook in a fresh kernel (cwd notebooks/); raises on the first failing cell.

    One intra-op thread per kernel: test workers already share the cores, and oversubscribed OpenMP threads
    make small models ~10x slower.
    """
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
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
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{name}.ipynb cell {i} has outputs"
                )


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


def strip(path: Path) -> bool:
    """Remove outputs, execution counts and run metadata in place; True if the file changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after)
    return after != before


if __name__ == "__main__":  # `make strip-notebooks`: python tests/test_notebooks.py --strip
    import sys

    if sys.argv[1:] != ["--strip"]:
        sys.exit("usage: python tests/test_notebooks.py --strip")
    for p in sorted(NOTEBOOKS.glob("*.ipynb")):
        print(f"{'stripped' if strip(p) else 'clean   '} {p.relative_to(NOTEBOOKS.parent)}")
