# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Registers SHIP with PEFT: one of the two places where ship-peft touches PEFT.

PEFT 0.21's ``peft.utils.register_peft_method`` only accepts members of its own ``PeftType`` enum, which an
out-of-tree method cannot add to without patching PEFT. So we do exactly what that function does, with the
method's key being a member of our own ``(str, Enum)``: its value ``"SHIP"`` equals the ``"peft_type"`` written to
``adapter_config.json``, so PEFT's lookups by string find it, and it has a ``.value`` like PEFT's own members.
The same checks as ``register_peft_method`` run first (key free, prefix unused), so a clash is an error, not an
overwrite. LoRA and every other method keep working in the same process.

Nothing of PEFT, transformers, timm or safetensors is replaced: atomic saves and the clear error for a damaged
adapter file are explicit helpers (``ship_peft.safe_io.save_adapter`` / ``load_adapter``), used where ship-peft
owns the write (the command line).
"""

from __future__ import annotations

from .config import ShipConfig
from .constants import SHIP_PREFIX, ShipPeftType
from .model import ShipModel


def register() -> None:
    """Add SHIP to PEFT's config, tuner and prefix tables (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    key = ShipPeftType.SHIP
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(key) is ShipConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(key) is ShipModel:
        return
    if key in PEFT_TYPE_TO_CONFIG_MAPPING or key in PEFT_TYPE_TO_TUNER_MAPPING:
        raise KeyError(f"PEFT already has a method called {key.value!r}; ship_peft cannot register SHIP.")
    if SHIP_PREFIX in PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise KeyError(f"PEFT already uses the parameter prefix {SHIP_PREFIX!r}; ship_peft cannot register SHIP.")
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = ShipConfig
    PEFT_TYPE_TO_TUNER_MAPPING[key] = ShipModel
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = SHIP_PREFIX
