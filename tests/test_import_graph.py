"""No import cycle inside the tunesmith package.

The rule: module A depends on module B when importing A runs an import of B, that is an import
statement at module level (at the top, in a class body, under a module-level ``if`` or ``try``).
Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so A depends on those packages
too, unless A lies inside them. An import inside a function body is allowed to close a loop: it runs
when the function is first called, long after every module has finished loading, and is the way to
defer one (as for torch, to keep ``--help`` fast). Imports under ``if TYPE_CHECKING:`` never run.

A cycle in this graph means that whichever module is imported first hands a half-initialised module to
the other, so that an import order that works today breaks when an unrelated module changes order.
The graph is read with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_at_load(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """The dotted names that module-level import statements of ``module`` name (relative ones resolved)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return  # runs when called, not when the module loads
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)  # a submodule, when one is named
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def load_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module → the package's modules that loading it loads first (the named module and its packages)."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for target in imported_at_load(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py"):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in modules and dep != name and not name.startswith(dep + "."):
                    deps.add(dep)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop ``[a, b, …, a]`` per strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_loop(graph, group) for group in groups]


def _loop(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no loop through {start}")  # a strongly connected group always has one


def test_tunesmith_has_no_import_cycle():
    graph = load_graph(SRC)
    assert len(graph) > 50 and "tunesmith.config" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycle(s) at module level (defer one import into the function that needs it, or " \
        "move the shared code to a module both can import):\n" + "\n".join(" → ".join(c) for c in cycles)


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_a_cycle_is_named_and_deferred_imports_do_not_count(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "import pkg.c\nclass K:\n    from pkg.a import x\n",  # a class body runs at load
        "c.py": "def f():\n    from pkg import a\n",  # deferred: no edge
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\nimport pkg.a\n",
        "e.py": "from . import d\n",
    })
    graph = load_graph(pkg)
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.a"} and graph["pkg.e"] == {"pkg.d"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_a_package_init_on_the_way_closes_a_cycle(tmp_path):
    """``from pkg.sub.x import y`` runs ``pkg/sub/__init__.py`` first, and that imports the importer back."""
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.sub.x import y\n",
        "sub/__init__.py": "from pkg.sub.x import y\nfrom pkg.a import z\n",
        "sub/x.py": "from pkg.sub import w\n",  # inside pkg.sub: its own package is already loading
    })
    graph = load_graph(pkg)
    assert graph["pkg.sub.x"] == set()
    assert find_cycles(graph) == [["pkg.a", "pkg.sub", "pkg.a"]]
