"""The package's layering: each part imports only from the parts below it in the data flow.

docs/architecture.md draws the layers; this test keeps the code to them. Imports inside functions
count too (the lazy ones are still dependencies), and the gateway's own root module (its version)
is open to all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"

# part -> the parts it may import (besides itself and the root module)
ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "settings": {"model"},
    "routing": {"model"},
    "routefile": {"model", "routing"},
    "source": {"model", "settings", "routing"},
    "sink": {"model", "settings"},
    "spool": {"model", "sink", "ops"},
    "ops": {"model"},
    "pipeline": {"model", "routing", "source", "ops"},
    "workers": {"model", "settings"},
    "app": {"model", "settings", "routing", "routefile", "source", "sink", "spool", "ops", "pipeline"},
    "explain": {"model", "routing"},
    "cli": {"model", "settings", "routing", "routefile", "ops", "app", "workers", "explain", "spool"},
    "__main__": {"cli"},
}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _gateway_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "gateway" and len(parts) > 1:
                found.add(parts[1])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_from_the_layers_below_it(path: Path) -> None:
    part = _part(path)
    assert part in ALLOWED, f"{part}: a new part of the package needs its place in ALLOWED and the docs"
    wrong = _gateway_imports(path) - ALLOWED[part] - {part}
    assert wrong == set(), f"gateway/{path.relative_to(PACKAGE)} imports {sorted(wrong)} from above its layer"


def test_the_spool_store_and_its_tools_import_only_the_model() -> None:
    # the spooled sink may use the sink; what keeps the records on disk depends on nothing but the model
    for path in sorted((PACKAGE / "spool").glob("*.py")):
        if path.stem in {"__init__", "schema", "check", "store", "inspect"}:
            assert _gateway_imports(path) - {"model", "spool"} == set(), path.name


def test_no_private_name_is_imported_across_modules() -> None:
    crossing = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
                crossing += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}"
                             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []


def test_the_model_and_the_routing_core_do_no_io_imports() -> None:
    io_modules = {"socket", "selectors", "subprocess", "boto3", "botocore", "paho", "urllib", "http"}
    for path in [PACKAGE / "model.py", *sorted((PACKAGE / "routing").glob("*.py"))]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported & io_modules == set(), path.name


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def test_there_is_no_import_cycle_between_modules() -> None:
    names = {_module_name(p): p for p in MODULES}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            targets |= {m for m in modules if m in names and m != name}
        graph[name] = targets
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, name, target]))
            if target not in state:
                visit(target, [*trail, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
