"""The example notebooks run top to bottom (their code cells, in order, in one namespace; no Jupyter needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import REPO

EXAMPLES = REPO / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def code_cells(path: Path) -> list[str]:
    """The source of every code cell, in order; cells that are shell or magic commands (``!``, ``%``) are skipped."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4, f"{path.name}: not an nbformat 4 notebook"
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if source.lstrip().startswith(("%", "!")):
            continue
        cells.append(source)
    return cells


def run_notebook(path: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Execute the code cells in order in one namespace, with ``cwd`` as the working directory."""
    monkeypatch.chdir(cwd)
    namespace: dict = {"__name__": "__main__"}
    with torch.random.fork_rng():  # the notebook seeds the global generator: leave other tests' state alone
        for k, source in enumerate(code_cells(path)):
            exec(compile(source, f"<{path.name} code cell {k}>", "exec"), namespace)
    return namespace


def test_the_lecture_notebook_is_there():
    assert EXAMPLES / "lecture.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path: Path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert (
                cell.get("outputs") == [] and cell.get("execution_count") is None
            ), "clear the outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_the_shared_data(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """From an empty folder: no ``../shared`` there, so the notebook uses derive's built-in word list (a fresh install)."""
    namespace = run_notebook(path, tmp_path, monkeypatch)
    if "NAMES" in namespace:
        assert namespace["NAMES"] is None
