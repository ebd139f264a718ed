"""The package's layers: every module imports only from the layers below it (no import circles)."""

from __future__ import annotations

import ast
from pathlib import Path

import lorkd_pl

PACKAGE = Path(lorkd_pl.__file__).resolve().parent
# layer → the lorkd-pl layers it may import (besides itself); the order of the house, top to bottom
ALLOWED: dict[str, set[str]] = {
    "app": {"deploy", "evaluation", "models", "data", "experts", "registry", "checks", "io", "__init__"},
    # ``__init__``: the top package's stdlib-only helpers (the version, lazy_exports)
    "deploy": {"evaluation", "models", "data", "experts", "registry", "checks", "io", "__init__"},
    "models": {"evaluation", "data", "experts", "registry", "checks", "io", "__init__"},
    "evaluation": {"registry", "checks", "io", "__init__"},
    "data": {"registry", "checks", "io", "__init__"},
    "experts": set(),
    "io": set(),
    "registry": {"checks"},
    "checks": set(),
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


#: Import circles kept on purpose, each with its reason (every other circle fails the test below).
DELIBERATE_CIRCLES: dict[frozenset[str], str] = {
    frozenset({"lorkd_pl.experts.layers", "lorkd_pl.experts.strategies"}): (
        "the strategies take an ExpertLayer in their signatures: a type-only import (TYPE_CHECKING)"
    ),
    frozenset({"lorkd_pl.data.demo", "lorkd_pl.data.demo_tasks"}): (
        "registering the demo tasks at start-up must stay cheap: their data is generated (numpy, "
        "SimpleITK) by a lazy import only when a record is first read"
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the lorkd-pl modules it imports (every ``import``, inside functions too)."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {resolve(t) for t in targets if t.startswith("lorkd_pl")} - {name, ""}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(graph) == [frozenset({"a", "b", "c"})]


def test_no_import_circles_but_the_documented_ones() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "lorkd_pl.models.teacher.loading" in graph
    assert set(import_circles(graph)) - set(DELIBERATE_CIRCLES) == set()


def test_no_module_imports_its_own_package_namespace() -> None:
    """Inside a package, modules import each other by their own names, never through the package's
    ``__init__`` (whose public names are for users): the ``__init__`` may then import them freely."""
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == package and package != "lorkd_pl":
                wrong.append(f"{name}: from {package} import ...")
    assert wrong == []


def test_every_public_name_of_a_package_resolves() -> None:
    import importlib

    for package in ("data", "models", "deploy", "evaluation", "experts"):
        module = importlib.import_module(f"lorkd_pl.{package}")
        assert module.__all__, package
        for name in module.__all__:
            assert getattr(module, name) is not None, f"lorkd_pl.{package}.{name}"
        assert set(module.__all__) <= set(dir(module))
