#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Write the parity fixtures ``tests/fixtures/ship_reference_{a,c}.json`` from the authors' outputs.

    python scripts/make_reference_fixture.py [path/to/reference-outputs]     # default: ../shared/reference-outputs

What a fixture holds and how it is derived: ``tests/utils/reference_fixture.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from utils.reference_fixture import CASES, DEFAULT_SOURCE, FIXTURE_DIR, build_fixture, fixture_path  # noqa: E402


def dumps(value, indent: int = 0) -> str:
    """JSON with one line per innermost list of numbers and per dict inside a list (floats as Python's exact
    round-trip ``repr``)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(key)}: {dumps(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(item, (list, dict)) for item in value):
        lines = [json.dumps(item) if isinstance(item, dict) else dumps(item, indent + 1) for item in value]
        return "[\n" + ",\n".join(inner + line for line in lines) + "\n" + pad + "]"
    return json.dumps(value)


def main(argv: list[str]) -> None:
    source = Path(argv[1]) if len(argv) > 1 else DEFAULT_SOURCE
    FIXTURE_DIR.mkdir(exist_ok=True)
    for case in CASES:
        fixture = build_fixture(source, case)
        path = fixture_path(case)
        path.write_text(dumps(fixture) + "\n")
        if json.loads(path.read_text()) != fixture:
            raise RuntimeError(f"{path} does not read back as written")
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv)
