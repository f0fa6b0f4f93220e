# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The package and the docs cite the project's own account of the method, with section numbers that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    *ROOT.glob("ship_peft/**/*.py"), *ROOT.glob("ship_peft/**/*.md"), *ROOT.glob("docs/*.md"), ROOT / "README.md",
    *(path for path in ROOT.glob("tests/**/*.py") if path.name != "test_docs.py"),
]  # fmt: skip


def method_sections() -> set[str]:
    return set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "method.md").read_text(), flags=re.M))


def test_nothing_cites_the_spec_outside_the_repository():
    citing = [str(path.relative_to(ROOT)) for path in SOURCES if "SHIP_METHOD" in path.read_text()]
    assert citing == []


def test_every_cited_section_of_method_md_exists():
    sections = method_sections()
    assert {"1", "2", "3", "4", "5", "6"} <= sections
    cited = {
        (str(path.relative_to(ROOT)), number)
        for path in SOURCES
        for number in re.findall(r"method\.md`?\)? §(\d+)", path.read_text())
    }
    assert cited, "no citation found: the pattern is stale"
    assert [citation for citation in cited if citation[1] not in sections] == []
