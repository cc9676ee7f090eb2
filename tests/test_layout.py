"""The package's layout: no import cycle among its modules (function-local imports included), no
module reaching into another's private names, and no file of the product pointing outside the repo."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "steering"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.with_suffix("").relative_to(ROOT).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph(mods: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (``from . import sub`` is an
    edge to ``sub`` alone, not to the package)."""
    mods = mods or _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names]
                found = subs if all(s in mods for s in subs) else [target, *subs]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {x for x in found if x in mods and x != m}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_core_never_imports_the_application_layer():
    app = {"steering.cli", "steering.recipe", "steering.main", "steering.organisms"}
    core = {"steering.arch", "steering.hooks", "steering.model", "steering.record", "steering.io", "steering.weights",
            "steering.kvcache", "steering.vectors", "steering.edits"}
    edges = import_graph()
    bad = {m: sorted(edges[m] & app) for m in core if edges[m] & app}
    assert bad == {}


def test_no_module_imports_another_modules_private_names():
    mods = _modules()
    bad = []
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                bad += [f"{m}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"
                        and f"{m.rpartition('.')[0]}.{a.name}" not in mods and f"{m}.{a.name}" not in mods]
    assert bad == []


@pytest.mark.parametrize("where", ["steering", "experiments", "tests", "notebooks", "README.md", "pyproject.toml"])
def test_nothing_points_outside_the_repository(where):
    pattern = re.compile(r"\bMETHODS\b|STYLE\.md|\.\./shared|/work/shared")
    path = ROOT / where
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.suffix in (".py", ".md", ".ipynb", ".toml", ".yaml")]
    hits = []
    for f in files:
        if f == Path(__file__).resolve():
            continue
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{i}")
    assert hits == []
