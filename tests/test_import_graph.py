"""Imports inside the tunesmith package run one way: no cycle, no import from a lower layer up to a higher one.

The rule: module A depends on module B when A holds an import of B anywhere, at module level or inside a
function (a deferred import runs too, only later: it keeps ``--help`` fast, it does not make a loop
harmless). Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so A depends on those
packages too, unless A lies inside them. Imports under ``if TYPE_CHECKING:`` never run and do not count.

The layer order is the one docs/architecture.md states in its "Layers" block: a module may import its
own layer and the layers below. The graph is read with ``ast``; nothing is imported.
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


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """The dotted names that the import statements of ``module`` name, in functions too (relative ones resolved)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
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
    """Module → the package's modules it imports (the named module and the packages on the way)."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for target in imported_names(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py"):
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
    assert not cycles, "import cycle(s), counting imports inside functions (move the shared code down to a " \
        "module both can import):\n" + "\n".join(" → ".join(c) for c in cycles)


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_a_cycle_is_named_and_deferred_imports_count(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "import pkg.c\nclass K:\n    from pkg.a import x\n",  # a class body runs at load
        "c.py": "def f():\n    import json\n",
        "f.py": "def g():\n    from pkg import h\n",  # deferred: an edge all the same
        "h.py": "from pkg import f\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\nimport pkg.a\n",
        "e.py": "from . import d\n",
    })
    graph = load_graph(pkg)
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.a"} and graph["pkg.e"] == {"pkg.d"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.f", "pkg.h", "pkg.f"]]


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


DOC = SRC.parents[1] / "docs" / "architecture.md"


def stated_layers(doc: str) -> dict[str, int]:
    """Top-level module or package name → its layer number, from the doc's ``## Layers`` code block."""
    block = doc.split("## Layers", 1)[1].split("```", 2)[1]
    layers = {}
    for line in block.strip().splitlines():
        number, _, names = line.partition(" ")
        for name in names.split("#")[0].split(":", 1)[-1].split():
            layers[name] = int(number)
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int:
    return layers[module.split(".")[1]]


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a, layers)}) → {b} (layer {layer_of(b, layers)})"
                  for a, deps in graph.items() if a != "tunesmith"
                  for b in deps if b != "tunesmith" and layer_of(b, layers) > layer_of(a, layers))


def test_every_package_has_a_stated_layer():
    layers = stated_layers(DOC.read_text(encoding="utf-8"))
    tops = {name.split(".")[1] for name in module_names(SRC) if name != "tunesmith"}
    assert tops == set(layers), f"missing from the Layers block of docs/architecture.md: {sorted(tops - set(layers))}; " \
        f"named there but not in src/: {sorted(set(layers) - tops)}"


def test_imports_run_from_higher_layers_to_lower_ones_only():
    layers = stated_layers(DOC.read_text(encoding="utf-8"))
    up = upward_imports(load_graph(SRC), layers)
    assert not up, "import(s) from a lower layer up to a higher one (docs/architecture.md, Layers):\n" + "\n".join(up)


def test_an_upward_import_is_found(tmp_path):
    pkg = _package(tmp_path, {"__init__.py": "", "low.py": "def f():\n    from pkg import high\n", "high.py": "import pkg.low\n"})
    layers = stated_layers("## Layers\n```\n1 base: low\n2 top: high\n```\n")
    assert upward_imports(load_graph(pkg), layers) == ["pkg.low (layer 1) → pkg.high (layer 2)"]


def test_no_module_passes_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"modules over 500 lines (split them by concern): {long}"


# --- rooms: the folders of serve/ and data/ -----------------------------------------------------------------

def stated_rooms(doc: str) -> dict[str, dict[str, int]]:
    """package → room (a folder, or a module directly in the package) → its rank, from the ``## Rooms`` block."""
    block = doc.split("## Rooms", 1)[1].split("```", 2)[1]
    rooms: dict[str, dict[str, int]] = {}
    for line in block.strip().splitlines():
        package, number, *names = line.split("#")[0].split()
        for name in names:
            rooms.setdefault(package, {})[name] = int(number)
    return rooms


def room_of(module: str, package: str) -> str | None:
    """The room of ``tunesmith.<package>.<room>[.…]``; None for a module outside the package or the package itself."""
    prefix = f"tunesmith.{package}."
    return module[len(prefix):].split(".")[0] if module.startswith(prefix) else None


def downward_only(graph: dict[str, set[str]], rooms: dict[str, dict[str, int]]) -> list[str]:
    out = []
    for package, ranks in rooms.items():
        for a, deps in graph.items():
            ra = room_of(a, package)
            for b in deps:
                rb = room_of(b, package)
                if ra is not None and rb is not None and ranks[rb] > ranks[ra]:
                    out.append(f"{a} (room {ra}, {ranks[ra]}) → {b} (room {rb}, {ranks[rb]})")
    return sorted(out)


def test_every_room_of_serve_and_data_is_ranked():
    rooms = stated_rooms(DOC.read_text(encoding="utf-8"))
    assert set(rooms) == {"serve", "data"}
    for package, ranks in rooms.items():
        actual = {p.stem for p in (SRC / package).iterdir()
                  if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
        assert actual == set(ranks), f"{package}/: rooms not in the Rooms block of docs/architecture.md: " \
            f"{sorted(actual - set(ranks))}; named there but absent: {sorted(set(ranks) - actual)}"


def test_rooms_import_downward_only():
    up = downward_only(load_graph(SRC), stated_rooms(DOC.read_text(encoding="utf-8")))
    assert not up, "import(s) from a lower room up to a higher one (docs/architecture.md, Rooms):\n" + "\n".join(up)


def test_an_upward_room_import_is_found(tmp_path):
    pkg = _package(tmp_path, {"__init__.py": "", "serve/__init__.py": "", "serve/low/__init__.py": "",
                              "serve/low/a.py": "def f():\n    from pkg.serve.high import b\n",
                              "serve/high/__init__.py": "", "serve/high/b.py": "from pkg.serve.low import a\n"})
    graph = {k.replace("pkg.", "tunesmith.", 1): {d.replace("pkg.", "tunesmith.", 1) for d in v}
             for k, v in load_graph(pkg).items()}
    rooms = stated_rooms("## Rooms\n```\nserve 1 low\nserve 2 high\n```\n")
    assert downward_only(graph, rooms) == ["tunesmith.serve.low.a (room low, 1) → tunesmith.serve.high (room high, 2)",
                                           "tunesmith.serve.low.a (room low, 1) → tunesmith.serve.high.b (room high, 2)"]


def test_serve_and_data_are_rooms_that_say_what_they_hold():
    """At most 8 modules directly in serve/ and data/; every folder below them says in its ``__init__`` docstring
    what lives there and what it may import."""
    for package in ("serve", "data"):
        loose = [p.name for p in (SRC / package).glob("*.py") if p.name != "__init__.py"]
        assert len(loose) <= 8, f"{package}/ holds {len(loose)} modules directly: {sorted(loose)}"
        for init in (SRC / package).rglob("__init__.py"):
            doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
            assert doc and len(doc) > 80, f"{init.relative_to(SRC)}: say what lives here and what it may import"


def test_a_request_plan_is_built_in_one_pass():
    """``serve.plan.requests`` builds every plan; the helpers it calls never import it back, the routes take only
    the plan (and the request fields and bodies) from the plan room, and the engines nothing."""
    graph = load_graph(SRC)
    plan = {m for m in graph if m.startswith("tunesmith.serve.plan.")}
    assert "tunesmith.serve.plan.requests" in plan
    back = sorted(m for m in plan - {"tunesmith.serve.plan.requests"} if "tunesmith.serve.plan.requests" in graph[m])
    assert not back, f"plan helpers that call back into the plan: {back}"
    allowed = {"tunesmith.serve.plan", "tunesmith.serve.plan.requests", "tunesmith.serve.plan.fields",
               "tunesmith.serve.plan.schemas"}
    for m, deps in graph.items():
        if m.startswith(("tunesmith.serve.api.", "tunesmith.serve.engines.")):
            pieces = sorted(d for d in deps if d.startswith("tunesmith.serve.plan") and
                            (m.startswith("tunesmith.serve.engines.") or d not in allowed))
            assert not pieces, f"{m} rebuilds part of a plan from {pieces}; take the plan from serve.plan.requests"
