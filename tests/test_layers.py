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
