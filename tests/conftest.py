# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Fixtures of the test suite; the helpers live in ``tests/utils``."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils import SHARED


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` (authors' reference data); tests that need it skip where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED
