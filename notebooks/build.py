"""Run the tutorial notebooks' sources and write them as notebooks with outputs.

    python notebooks/build.py                 # every NN_*.py source -> NN_*.ipynb, executed
    python notebooks/build.py 02 04           # only those whose name starts with 02 / 04
    python notebooks/build.py --no-execute    # write them without outputs

The sources are plain Python in jupytext's percent format (``# %%`` starts a code cell,
``# %% [markdown]`` a text cell), so a linter reads them and any editor diffs them; the ``.ipynb``
files beside them are what this script makes of them. Every notebook runs on the model organisms
(``steering.organisms.build()``: cached under ``$STEERING_CACHE``, trained once otherwise),
writes only into a ``tempfile.mkdtemp()`` folder, and has a cell tagged ``claims`` that asserts
what its text says on that run's numbers. ``tests/test_notebooks.py`` runs the sources the same way.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SOURCES = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))


def read(source: Path) -> nbformat.NotebookNode:
    """The notebook a source describes, without outputs."""
    nb = jupytext.read(source)
    nb.metadata.pop("jupytext", None)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def scratch_folder(nb: nbformat.NotebookNode) -> Path | None:
    """The folder the notebook's first cell made (it prints "scratch folder: PATH")."""
    first = next(c for c in nb.cells if c.cell_type == "code")
    text = "".join(o.get("text", "") for o in first.get("outputs", []) if o.output_type == "stream")
    found = re.search(r"scratch folder: (\S+)", text)
    return Path(found.group(1)) if found and Path(found.group(1)).name.startswith("steering-nb") else None


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> float:
    """Run ``nb`` in place (cwd = notebooks/), then delete its scratch folder; returns the seconds it took.
    A failing cell (a broken API, or a claim that no longer holds) raises ``CellExecutionError``."""
    t = time.time()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    finally:
        folder = scratch_folder(nb)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return time.time() - t


def main(argv: list[str]) -> None:
    run = "--no-execute" not in argv
    wanted = [a for a in argv if not a.startswith("--")]
    for source in SOURCES:
        if wanted and not any(source.stem.startswith(w) for w in wanted):
            continue
        nb = read(source)
        if run:
            print(f"{source.stem}: running ...", flush=True)
            print(f"{source.stem}: {execute(nb):.0f} s", flush=True)
        nbformat.write(nb, source.with_suffix(".ipynb"))


if __name__ == "__main__":
    main(sys.argv[1:])
