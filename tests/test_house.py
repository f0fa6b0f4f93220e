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


def test_the_library_never_imports_the_application():
    # `python -m ship_peft` (ship_peft/__main__.py) is the command line's entry point, not part of the library
    library = {name: deps for name, deps in GRAPH.items() if not name.startswith(("ship_peft.app", "ship_peft.__main__"))}
    assert {name: sorted(d for d in deps if d.startswith("ship_peft.app")) for name, deps in library.items()} == {
        name: [] for name in library
    }


def test_the_library_works_without_the_application_s_dependencies():
    """With matplotlib unavailable, SHIP imports, registers and runs; the command line says what to install."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        sys.modules["matplotlib"] = None  # as if not installed
        import torch
        from peft import get_peft_model
        from transformers import ViTConfig, ViTForImageClassification
        import ship_peft
        vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=3))
        model = get_peft_model(vit, ship_peft.ShipConfig(num_prompts=2, prompt_layers=[0], num_attribute_layers=0))
        assert model(pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (2, 3)
        assert not [name for name in sys.modules if name.startswith("ship_peft.app")]
        try:
            import ship_peft.app.cli
        except ImportError as error:
            assert 'pip install "ship-peft[cli]"' in str(error), error
        else:
            raise AssertionError("the command line imported without matplotlib")
        print("ok")
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-2000:]


def test_tests_hold_tests_and_fixtures_only():
    """Helpers live in tests/utils, scripts in scripts/; conftest holds fixtures and nothing imports from it."""
    tests = Path(__file__).resolve().parent
    assert sorted(path.name for path in tests.glob("*.py") if not path.name.startswith("test_")) == ["conftest.py"]
    importing = [path.name for path in tests.rglob("*.py") if "from conftest" + " import" in path.read_text()]
    assert importing == []
    assert (tests.parent / "scripts" / "make_reference_fixture.py").is_file()
