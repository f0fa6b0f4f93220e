# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The application's errors."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (a path, a column, a split, a task, ...); the message names the problem and the fix."""
