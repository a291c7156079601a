"""docs/architecture.md matches the code: its module map names every module of src/tunesmith and nothing else,
and every source path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tunesmith"
DOC = ROOT / "docs" / "architecture.md"


def mapped_modules(doc: str) -> set[str]:
    """``package/module.py`` (or ``module.py`` for the base layer) for every module the "Module map" block names."""
    block = doc.split("## Module map", 1)[1].split("```", 2)[1]
    top = package = None
    out = set()
    for line in block.splitlines():
        if not line.startswith("  "):
            top = package = None  # src/tunesmith/, examples/, benchmarks/, tests/: not modules
            continue
        first = line.split()[0] if line.split() else ""
        if first == "(base)":
            top = package = ""
        elif re.fullmatch(r"\w+/", first) and line.startswith("  " + first):
            top = package = first
        elif top and re.fullmatch(r"(\w+/)+", first):
            package = top + first  # a room of the package, e.g. "read/" under "data/"
        if package is None:
            continue
        out |= {package + name for name in re.findall(r"(?<![\w/.])(\w+\.py)\b", line)}
    return out


def source_modules() -> set[str]:
    return {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "__init__.py"}


def test_the_module_map_names_every_module_and_nothing_else():
    mapped, actual = mapped_modules(DOC.read_text(encoding="utf-8")), source_modules()
    assert mapped == actual, (f"in src/ but not in the module map of docs/architecture.md: {sorted(actual - mapped)}; "
                              f"in the map but not in src/: {sorted(mapped - actual)}")


def test_every_source_path_the_doc_names_exists():
    doc = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:\w+/)+\w+\.py)", doc))
    missing = sorted(p for p in named if not (SRC / p).is_file() and not (ROOT / p).is_file())
    assert named and not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_map_reader_sees_packages_and_continuation_lines():
    doc = "## Module map\n```\nsrc/tunesmith/\n  (base)   a.py (x)  b.py\n  pkg/     c.py (see d.py)\n" \
          "           e.py  sub/\n           room/  g.py\n                  h.py\n           room/deep/ i.py\n" \
          "tests/     f.py\n```\n"
    assert mapped_modules(doc) == {"a.py", "b.py", "pkg/c.py", "pkg/d.py", "pkg/e.py", "pkg/room/g.py", "pkg/room/h.py",
                                   "pkg/room/deep/i.py"}
