"""The package's layers: every module imports only from the layers below it (no import circles)."""

from __future__ import annotations

import ast
from pathlib import Path

import lorkd_pl

PACKAGE = Path(lorkd_pl.__file__).resolve().parent
# layer → the lorkd-pl layers it may import (besides itself); the order of the house, top to bottom
ALLOWED: dict[str, set[str]] = {
    "app": {"deploy", "evaluation", "models", "data", "experts", "registry", "io", "__init__"},
    "deploy": {"evaluation", "models", "data", "experts", "registry", "io"},
    "models": {"evaluation", "data", "experts", "registry", "io"},
    "evaluation": {"registry", "io"},
    "data": {"registry", "io"},
    "experts": set(),
    "io": set(),
    "registry": set(),
    "__init__": set(),
}


def imported_layers(path: Path) -> set[str]:
    """The lorkd-pl layers a module imports (at module level or inside functions)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "lorkd_pl":  # a layer, or a name of __init__
            names = [f"lorkd_pl.{a.name}" if a.name in ALLOWED else "lorkd_pl" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names = ["lorkd_pl.<relative import: write it absolute>"]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lorkd_pl":
                layers.add(parts[1] if len(parts) > 1 else "__init__")
    return layers


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE).parts
    return (
        relative[0].removesuffix(".py") if len(relative) > 1 or relative[0] != "__init__.py" else "__init__"
    )


def test_every_module_imports_only_layers_below_it() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30 and set(map(layer_of, modules)) == set(ALLOWED)
    wrong = {
        str(path.relative_to(PACKAGE)): sorted(
            imported_layers(path) - ALLOWED[layer_of(path)] - {layer_of(path)}
        )
        for path in modules
    }
    assert {k: v for k, v in wrong.items() if v} == {}


def test_every_package_says_what_lives_there_and_what_it_may_import() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "May import" in doc, init
