"""The package's module import graph has no cycle, and only ``deployprune`` is installed.

Every ``.py`` file of the installed packages is parsed (``deployprune/`` plus the folders that
pyproject maps into it: ``models/`` as ``deployprune.zoo``, ``converters/`` as
``deployprune.converters``); every ``import``/``from ... import`` counts, at module level and inside
functions alike (a deferred import that closes a loop is still a loop, only a later one), and so do
imports under ``if TYPE_CHECKING:`` (they never run, but they are the same dependency: the issue
counted ``pruning/granularity.py`` <-> ``pruner.py``, a TYPE_CHECKING loop). Relative imports are
resolved against the importing module's package.

An edge points at the module named: ``from pkg import name`` is an edge to ``pkg.name`` when that
is a module, else to ``pkg`` (its ``__init__``). The implicit import of parent packages is not an
edge (every submodule would otherwise form a loop with a package ``__init__`` that imports it).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli below 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
ROOT = "deployprune"


def _setuptools_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dirs() -> dict[str, Path]:
    """Installed package name -> source folder, as pyproject declares them."""
    cfg = _setuptools_config()
    mapping = cfg.get("package-dir", {})
    out = {}
    for pkg in cfg["packages"]:
        # the folder of the longest mapped prefix, then the rest of the dotted name below it
        prefix = max((p for p in mapping if pkg == p or pkg.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            out[pkg] = REPO / Path(*pkg.split("."))
        else:
            rest = pkg[len(prefix):].lstrip(".")
            out[pkg] = REPO / mapping[prefix] / Path(*rest.split(".") if rest else ())
    return out


def _modules() -> dict[str, Path]:
    """Module name -> file for every ``.py`` file of the installed packages."""
    mods: dict[str, Path] = {}
    for pkg, folder in _package_dirs().items():
        if not (folder / "__init__.py").is_file():
            continue  # a data-only folder (schemas, samples)
        mods[pkg] = folder / "__init__.py"
        for f in sorted(folder.glob("*.py")):
            if f.name != "__init__.py":
                mods[f"{pkg}.{f.stem}"] = f
    return mods


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions, methods, ``if``/``try`` blocks)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    def ours(name: str) -> str | None:
        # the longest known module that ``name`` is or lies inside (``pkg.mod.attr`` -> ``pkg.mod``)
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in known:
                return cand
        return None

    found: set[str | None] = set()
    if isinstance(node, ast.Import):
        found = {ours(alias.name) for alias in node.names}
    else:
        if node.level:
            package = module if is_package else module.rpartition(".")[0]
            parts = package.split(".")
            if node.level - 1 >= len(parts):
                raise AssertionError(f"{module}: relative import beyond the top-level package")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            found.add(sub if sub in known else ours(source))
    return {t for t in found if t is not None and t != module}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _import_nodes(tree):
            edges |= _targets(name, is_package, node, known)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (``a -> b -> ... -> a``) per strongly connected component with a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:  # Tarjan; the graph is small, recursion depth is the module count
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for comp in components:
        members = set(comp)
        start = comp[0]
        # shortest path back to start inside the component (breadth first)
        prev: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        end = None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def test_only_deployprune_is_installed() -> None:
    cfg = _setuptools_config()
    assert "find" not in cfg.get("packages", {}), "packages are listed explicitly (mapped folders)"
    assert all(p == ROOT or p.startswith(ROOT + ".") for p in cfg["packages"])
    assert cfg["package-dir"] == {"deployprune.zoo": "models", "deployprune.converters": "converters"}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """A new sub-package folder must be added to pyproject's explicit list, or it is not installed."""
    listed = {folder.resolve() for folder in _package_dirs().values()}
    for top in (REPO / ROOT, REPO / "models", REPO / "converters"):
        for init in top.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                assert init.parent.resolve() in listed, f"{init.parent.relative_to(REPO)} is not in pyproject packages"


def test_old_top_level_names_do_not_resolve_to_this_project(tmp_path: Path) -> None:
    """Run from a folder outside the repository: ``models`` and ``converters`` are not ours."""
    import subprocess

    code = ("import importlib.util as u, deployprune.zoo, deployprune.converters\n"
            "for n in ('models', 'converters'):\n"
            "    s = u.find_spec(n)\n"
            "    print(n, s.origin if s else None)\n"
            "print(deployprune.zoo.__name__, deployprune.converters.__name__)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    repo = str(REPO)
    for line in proc.stdout.splitlines()[:2]:
        name, origin = line.split(" ", 1)
        assert origin == "None" or not origin.startswith(repo), f"import {name} resolves to {origin}"
    assert proc.stdout.splitlines()[2] == "deployprune.zoo deployprune.converters"


def test_graph_sees_the_mapped_packages_and_deferred_imports() -> None:
    graph = import_graph()
    assert "deployprune.zoo.lenet" in graph and "deployprune.converters.onnx" in graph
    assert "deployprune.converters" in graph["deployprune.api"]  # a function-level `from . import converters`


def test_find_cycles_reports_a_loop() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    if cycles:
        pytest.fail("import cycles: " + "; ".join(" -> ".join(c) for c in cycles))
