"""The package's layers import downwards only.

The order is core <- runtimes <- applications, with the Lightning glue on top of core and
runtimes. Read from the source (no import side effects), so a violation anywhere, even inside a
function, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Each layer, with the first-party packages it may import (itself included).
ALLOWED: dict[str, tuple[str, ...]] = {
    "asyncmomentum.core": ("asyncmomentum.core",),
    "asyncmomentum.runtimes": ("asyncmomentum.core", "asyncmomentum.runtimes"),
    "asyncmomentum.applications": ("asyncmomentum",),
    "lightning_callbacks": (
        "asyncmomentum.core",
        "asyncmomentum.runtimes",
        "lightning_callbacks",
    ),
}

#: Third-party packages the core may use: it is a library for any torch user.
CORE_THIRD_PARTY = ("torch", "numpy", "torchmetrics")
FIRST_PARTY = ("asyncmomentum", "lightning_callbacks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports, with its line (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # ``from asyncmomentum import runtimes`` imports a subpackage by name.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _layer(module: str) -> str | None:
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _sources() -> list[Path]:
    return sorted(
        p
        for top in FIRST_PARTY
        for p in (ROOT / top).rglob("*.py")
        if _layer(_module_name(p)) is not None
    )


def test_every_module_belongs_to_a_layer() -> None:
    top_level = {p.name for p in (ROOT / "asyncmomentum").glob("*.py")}
    assert top_level == {"__init__.py", "__main__.py"}, (
        "modules directly under asyncmomentum/ belong in core/, runtimes/ or applications/"
    )
    assert len(_sources()) > 20


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_only(path: Path) -> None:
    layer = _layer(_module_name(path))
    assert layer is not None
    wrong = []
    for line, module in _imports(path):
        if _within(module, FIRST_PARTY):
            if module == "asyncmomentum":
                continue  # its names are checked one by one below
            if _layer(module) is None:
                # A name the package root re-exports (core objects, ``__version__``); the core
                # itself must not go through the root, which imports the core.
                if layer == "asyncmomentum.core":
                    wrong.append(f"line {line}: {module} (through the package root)")
                continue
            if not _within(module, ALLOWED[layer]):
                wrong.append(f"line {line}: {module}")
        elif layer == "asyncmomentum.core":
            top = module.split(".")[0]
            if top not in CORE_THIRD_PARTY and not _is_stdlib(top):
                wrong.append(f"line {line}: {module} (the core uses torch and numpy only)")
    assert not wrong, f"{path.relative_to(ROOT)} imports upwards: {wrong}"


def test_the_package_root_reexports_the_core_only() -> None:
    imported = [m for _, m in _imports(ROOT / "asyncmomentum" / "__init__.py")]
    first_party = [m for m in imported if _within(m, FIRST_PARTY)]
    assert first_party
    assert all(_within(m, ("asyncmomentum.core",)) for m in first_party), first_party


def _is_stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names or name == "__future__"


# -- no cycles, between files or between folders ---------------------------------------------------


def _resolve(module: str) -> str | None:
    """The first-party module or package an imported name lives in (``None``: third party)."""
    if not _within(module, FIRST_PARTY):
        return None
    while module:
        path = ROOT / module.replace(".", "/")
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            return module
        module = module.rpartition(".")[0]  # ``from package import name``: a name, not a module
    return None


def _is_module(module: str) -> bool:
    path = ROOT / module.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imported_modules(path: Path) -> set[str]:
    """The first-party modules ``path`` imports: ``from package import module`` names the module."""
    by_line: dict[int, list[str]] = {}
    for line, module in _imports(path):
        by_line.setdefault(line, []).append(module)
    found = set()
    for modules in by_line.values():
        # _imports lists ``from X import a, b`` as X, X.a, X.b: the submodules where they are.
        named = [m for m in modules[1:] if _is_module(m)]
        for module in named or modules[:1]:
            resolved = _resolve(module)
            if resolved is not None:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    """Every first-party module (a package's ``__init__`` as its own node) and what it imports.

    Every import counts, inside functions and under ``TYPE_CHECKING`` included.
    """
    graph: dict[str, set[str]] = {}
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            name = _module_name(path)
            graph[name] = _imported_modules(path) - {name}
    return graph


def folder_graphs(graph: dict[str, set[str]]) -> dict[str, dict[str, set[str]]]:
    """For every package, the graph of its children (files and sub-folders) that imports induce.

    An import from ``a`` to ``b`` is an edge between the two children of their closest common
    package that hold them; a package's ``__init__`` is a child of its own (``__init__``).
    """
    levels: dict[str, dict[str, set[str]]] = {}

    def path_of(module: str) -> list[str]:
        parts = module.split(".")
        is_package = (ROOT / module.replace(".", "/")).is_dir()
        return [*parts, "__init__"] if is_package else parts

    for source, targets in graph.items():
        for target in targets:
            a, b = path_of(source), path_of(target)
            common = 0
            while common < min(len(a), len(b)) and a[common] == b[common]:
                common += 1
            if common == len(a) or common == len(b):
                continue  # one contains the other: no edge between siblings
            level = ".".join(a[:common]) or "<root>"
            levels.setdefault(level, {}).setdefault(a[common], set()).add(b[common])
    return levels


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    edges = {"pkg.x.one": {"pkg.y.two"}, "pkg.y.two": {"pkg.x.three"}, "pkg.x.three": set()}
    folders = folder_graphs(edges)
    assert folders["pkg"] == {"x": {"y"}, "y": {"x"}}
    assert find_cycle(folders["pkg"]) == ["x", "y", "x"]


def test_no_import_cycle_between_files() -> None:
    graph = import_graph()
    assert graph["asyncmomentum.core.optimizer"] >= {"asyncmomentum.core.tracker"}
    cycle = find_cycle(graph)
    assert cycle is None, f"files import each other in a cycle: {' -> '.join(cycle or [])}"


def test_no_import_cycle_between_folders() -> None:
    for level, children in folder_graphs(import_graph()).items():
        cycle = find_cycle(children)
        assert cycle is None, f"inside {level}, these import each other: {' -> '.join(cycle)}"
