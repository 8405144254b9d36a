"""The house's import graph: no cycles, and the rooms import one way.

Every import statement of the project's own modules counts, including those inside
functions and under ``TYPE_CHECKING``: a cycle held open by a function-level import is
still a cycle a reader has to untangle. Modules are named as they install
(coordinator/ is ``shmstore.coordinator``, workers/ is ``shmstore.workers``).

The rooms, bottom to top (README, "How it works"):
library (shmstore) ← coordinator ← workers ← tools (shmstore._tools) ← command
(shmstore._cli, shmstore.__main__) ← scripts. The library may reach the coordinator
only through its declared seams (``LIBRARY_SEAMS``), and only lazily.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"shmstore": "shmstore", "coordinator": "shmstore.coordinator",
           "workers": "shmstore.workers", "scripts": "scripts"}


def test_extensions_are_built_from_setup_py():
    """Every compiled module (shmstore/_csrc/*.c: a leaf of the import graph, so that
    ``from . import _native`` is not counted as an import of the package itself) is
    built by setup.py."""
    setup = (ROOT / "setup.py").read_text()
    extensions = [m for m, path in _modules().items() if path.suffix == ".c"]
    assert set(extensions) >= {"shmstore._native", "shmstore._cwrite"}
    assert all(f'"{name}"' in setup for name in extensions), extensions


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for folder, pkg in FOLDERS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = path
    # Compiled modules (shmstore/_csrc/*.c, one PyInit_<name> each) import nothing of ours.
    for path in sorted((ROOT / "shmstore" / "_csrc").glob("*.c")):
        for init in re.findall(r"PyMODINIT_FUNC\s+PyInit_(\w+)", path.read_text()):
            mods[f"shmstore.{init}"] = path
    return mods


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        here = mod if _is_package(path) else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    src = f"{base}.{node.module}" if node.module else base
                else:
                    src = node.module or ""
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    targets.append(sub if sub in graph else src)
            for t in targets:
                # an import of a.b.c names module a.b.c (the deepest one that exists)
                while t and t not in graph:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _room(mod: str) -> str:
    for prefix, room in (("scripts", "scripts"), ("shmstore._cli", "command"),
                         ("shmstore.__main__", "command"), ("shmstore._tools", "tools"),
                         ("shmstore.workers", "workers"), ("shmstore.coordinator", "coordinator")):
        if mod == prefix or mod.startswith(prefix + "."):
            return room
    return "library"


ORDER = ["library", "coordinator", "workers", "tools", "command", "scripts"]
#: The library's only ways into the coordinator, each imported when called: its settings
#: (``serve()``), and the data-directory tools the caller's process runs itself
#: (``check()``, ``restore()``, the destination check of ``backup()``).
LIBRARY_SEAMS = {"shmstore.coordinator._config", "shmstore.coordinator._check",
                 "shmstore.coordinator._backup"}


def test_no_import_cycles():
    graph = _edges(_modules())
    assert _cycles(graph) == []


def test_rooms_import_downwards_only():
    graph = _edges(_modules())
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            a, b = ORDER.index(_room(mod)), ORDER.index(_room(dep))
            if b <= a:
                continue
            if _room(mod) == "library" and dep in LIBRARY_SEAMS:
                continue
            bad.append(f"{mod} -> {dep}")
    assert sorted(bad) == []


def test_the_checker_sees_cycles_and_nested_imports(tmp_path):
    """The graph builder itself: relative, nested and TYPE_CHECKING imports all count."""
    pkg = tmp_path / "shmstore"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_a.py").write_text("def f():\n    from ._b import g\n")
    (pkg / "_b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    from shmstore import _a\n")
    mods = {"shmstore": pkg / "__init__.py", "shmstore._a": pkg / "_a.py",
            "shmstore._b": pkg / "_b.py"}
    assert _cycles(_edges(mods)) == [["shmstore._a", "shmstore._b"]]
