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


def import_graph(mods: dict[str, Path] | None = None, read=Path.read_text) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (``from . import sub`` is an
    edge to ``sub`` alone, not to the package)."""
    mods = mods or _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(read(f))):
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
    for m in mods:  # importing a.b.c from outside a.b runs a.b's __init__ first (m's own packages are running already)
        own = {".".join(m.split(".")[:i]) for i in range(1, len(m.split(".")) + 1)}
        for x in list(edges[m]):
            parts = x.split(".")
            edges[m] |= {p for p in (".".join(parts[:i]) for i in range(2, len(parts))) if p in mods and p not in own}
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


def _within(m: str, names: set[str]) -> bool:
    return any(m == n or m.startswith(n + ".") for n in names)


APP = {"steering.cli", "steering.recipe", "steering.main", "steering.organisms"}
CORE = {"steering.arch", "steering.hooks", "steering.model", "steering.record", "steering.io", "steering.kvcache",
        "steering.vectors", "steering.judge", "steering.datasets", "steering.weights.files"}
EDITS = {"steering.edits"}


def test_core_never_imports_the_application_layer():
    edges = import_graph()
    bad = {m: sorted(x for x in edges[m] if _within(x, APP)) for m in edges
           if not _within(m, APP) and m != "steering" and any(_within(x, APP) for x in edges[m])}
    assert bad == {}


def test_the_core_is_below_the_edits_and_the_edits_below_the_weights():
    edges = import_graph()

    def core(x: str) -> bool:  # steering.weights' __init__ (light: only .files) and the version are core too
        return _within(x, CORE) or x in {"steering.weights", "steering._version"}

    assert {m: sorted(x for x in edges[m] if not core(x)) for m in edges if core(m)
            if any(not core(x) for x in edges[m])} == {}
    assert {m: sorted(x for x in edges[m] if not (core(x) or _within(x, EDITS))) for m in edges if _within(m, EDITS)
            if any(not (core(x) or _within(x, EDITS)) for x in edges[m])} == {}


def test_a_package_init_that_imports_its_heavy_modules_is_a_cycle():
    # steering.weights' __init__ must stay light: the core's loader imports steering.weights.files
    mods = {"p": Path("p/__init__.py"), "p.core": Path("p/core.py"), "p.sub": Path("p/sub/__init__.py"),
            "p.sub.low": Path("p/sub/low.py"), "p.sub.high": Path("p/sub/high.py")}
    texts = {"p.core": "from .sub.low import x", "p.sub": "from .high import y", "p.sub.high": "from ..core import z",
             "p.sub.low": "", "p": ""}
    edges = import_graph(mods, read=lambda f: texts[next(m for m, g in mods.items() if g == f)])
    assert cycles(edges) == [["p.core", "p.sub", "p.sub.high"]]
    texts["p.sub"] = ""  # a light __init__: no cycle
    assert cycles(import_graph(mods, read=lambda f: texts[next(m for m, g in mods.items() if g == f)])) == []


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


def test_no_module_calls_another_objects_private_methods():
    """``obj._name(...)`` on anything but ``self``/``cls`` of a method the module does not define is
    a private reach; the edits' own protocol (``_hooks``, ``_tensors``, ``_params``) is shared
    inside ``steering/edits/`` only."""
    protocol = {"_hooks", "_tensors", "_params"}
    bad = []
    for m, f in _modules().items():
        tree = ast.parse(f.read_text())
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, owner = node.func.attr, node.func.value
            if not name.startswith("_") or name.startswith("__"):
                continue
            if (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) or name in own:
                continue
            if m.startswith("steering.edits") and name in protocol:
                continue
            bad.append(f"{m}:{node.lineno}: .{name}()")
    assert bad == []
