"""The tutorial notebooks run top to bottom on the model organisms, and show what their text says.

Their sources are plain Python (``notebooks/NN_*.py``, jupytext's percent format); each test
executes a source with nbclient in notebooks/ as ``notebooks/build.py`` does. A broken API, a
cell error, or a claim of the text that no longer holds fails here: the last cells of every
notebook (tagged ``claims``) assert its claims on that run's numbers. Cells tagged ``image`` must
display a PNG and cells tagged ``number`` must print a number. About 15-25 s per notebook on 2
cores once the organisms are cached.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import pytest

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["01_refusal_direction", "02_safety_arithmetic", "03_safeinfer", "04_task_vectors"]


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NB_DIR / "build.py")
    mod = importlib.util.module_from_spec(spec)
    old, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in notebooks/
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = old
    return mod


build = _build_module()


def texts(cell: nbformat.NotebookNode) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream" and o.name == "stdout":
            out.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            out.append(o.data.get("text/markdown", "") or o.data.get("text/plain", ""))
    return "\n".join(out)


def tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def test_every_source_has_its_notebook_with_outputs():
    """The committed .ipynb files are their sources, run (same cells, same code, outputs kept)."""
    assert [s.stem for s in build.SOURCES] == NOTEBOOKS
    for source in build.SOURCES:
        made = build.read(source)
        saved = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
        assert [(c.cell_type, c.source) for c in made.cells] == [(c.cell_type, c.source) for c in saved.cells], source.name
        assert all(c.outputs for c in saved.cells if c.cell_type == "code"), f"{source.stem}: saved without outputs"
        assert tagged(made, "claims"), f"{source.stem}: no cell tagged 'claims'"


@pytest.mark.parametrize("name", NOTEBOOKS)
@pytest.mark.usefixtures("organisms_llama")  # builds the organisms once if the cache is empty
def test_notebook_runs_its_claims_hold_and_it_shows_its_results(name):
    nb = build.read(NB_DIR / f"{name}.py")
    build.execute(nb)  # raises on any failing cell, a claim included
    (claims,) = tagged(nb, "claims")
    assert re.search(r"all \d+ claims of the text hold", texts(claims))
    images = tagged(nb, "image")
    assert images, f"{name}: no cell tagged 'image'"
    for cell in images:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"{name}: no picture from\n{cell.source[:200]}"
    numbers = tagged(nb, "number")
    assert numbers, f"{name}: no cell tagged 'number'"
    for cell in numbers:
        assert re.search(r"\d", texts(cell)), f"{name}: no number from\n{cell.source[:200]}"
