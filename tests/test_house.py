# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The package's structure: no import cycle among its modules; the constants module imports nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ship_peft"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The ship_peft modules ``path`` imports, anywhere in it (inside functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {candidate for candidate in candidates if candidate in MODULES}
    return found - {name}


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}
GRAPH = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_constants_import_nothing_of_ours():
    assert GRAPH["ship_peft.constants"] == set()


def test_no_import_cycle_among_the_library_modules():
    # a package's __init__ importing its submodules is not a cycle; everything else must form a DAG
    graph = {name: {d for d in deps if not name.startswith(d + ".") and d != "ship_peft"} for name, deps in GRAPH.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node, path):
        if node in done:
            return
        if node in visiting:
            cycles.append(path[path.index(node):] + [node])
            return
        visiting.add(node)
        for dependency in sorted(graph.get(node, ())):
            visit(dependency, path + [node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert cycles == []
