"""The package's shape, read from its source: no import circles (lazy imports inside functions
included), no module importing another's private names, and the library apart from its measuring
tools (``shufflemamba.bench``), which only the command line reaches into."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "shufflemamba"

# Known exceptions (none today); the tests below fail on a stale entry, so the list cannot outlive its reason.
PRIVATE_IMPORTS_PENDING: set[tuple[str, str]] = set()
LIBRARY_TO_BENCH_PENDING: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in module ``name``, at any depth, plus
    (module, attribute) for each ``alias._private`` attribute read off an imported package module."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: list[tuple[str, str | None]] = []
    aliases: dict[str, str] = {}
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from ..x import y` in a.b.c -> a.x
                parts = package[: len(package) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            if not base or not base.startswith("shufflemamba"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from package import module`
                    out.append((sub, None))
                    aliases[alias.asname or alias.name] = sub
                else:
                    out.append((base, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("shufflemamba"):
                    out.append((alias.name, None))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append((aliases[node.value.id], node.attr))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {dep for dep, _ in _imports(m) if dep in MODULES and dep != m} for m in MODULES}


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_package_root_is_imported_by_no_module_of_its_own():
    """``shufflemamba/__init__`` imports the models; a module importing it back would be a circle."""
    assert not [m for m in MODULES if m != "shufflemamba" and "shufflemamba" in _graph()[m]]


def test_no_module_imports_another_modules_private_names():
    found = {(m, dep) for m in MODULES for dep, name in _imports(m)
             if name and name.startswith("_") and not name.startswith("__") and dep != m}
    assert found - PRIVATE_IMPORTS_PENDING == set(), sorted(found - PRIVATE_IMPORTS_PENDING)
    assert PRIVATE_IMPORTS_PENDING <= found, "stale entries: " + str(sorted(PRIVATE_IMPORTS_PENDING - found))


def test_only_the_command_line_reaches_into_the_measuring_tools():
    found = {(m, dep) for m, deps in _graph().items() for dep in deps
             if dep.startswith("shufflemamba.bench") and not m.startswith("shufflemamba.bench")
             and m != "shufflemamba.cli"}
    assert found - LIBRARY_TO_BENCH_PENDING == set(), sorted(found)
    assert LIBRARY_TO_BENCH_PENDING <= found, "stale entries: " + str(sorted(LIBRARY_TO_BENCH_PENDING - found))


def test_the_library_writes_no_docs():
    """What writes docs/benchmarks.md lives in benchmarks/, not in the package."""
    hits = [m for m, path in MODULES.items() if "write_marked_section" in path.read_text()
            or "docs/benchmarks.md\"" in path.read_text()]
    assert not hits, hits
