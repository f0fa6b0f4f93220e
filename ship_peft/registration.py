# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Registers SHIP with PEFT: one of the two places where ship-peft touches PEFT.

PEFT 0.21's ``peft.utils.register_peft_method`` only accepts members of its own ``PeftType`` enum, which an
out-of-tree method cannot add to without patching PEFT. So we do exactly what that function does, with the
method's key being a member of our own ``(str, Enum)``: its value ``"SHIP"`` equals the ``"peft_type"`` written to
``adapter_config.json``, so PEFT's lookups by string find it, and it has a ``.value`` like PEFT's own members.
The same checks as ``register_peft_method`` run first (key free, prefix unused), so a clash is an error, not an
overwrite. LoRA and every other method keep working in the same process.

The only other change to PEFT is made here too, by ``safe_io.install()`` (see ``ship_peft/safe_io.py``): it wraps
``peft.peft_model.safe_save_file`` and ``peft.config.PeftConfigMixin.save_pretrained`` so that ``save_pretrained``
replaces ``adapter_model.safetensors`` and ``adapter_config.json`` atomically (temporary file, fsync,
``os.replace``), and ``peft.utils.save_and_load.safe_load_file`` so that a truncated or corrupted adapter file
raises ``safe_io.CorruptAdapterFileError`` naming the file and the fix. These wrappers act on SHIP adapters only;
every other PEFT method goes straight to PEFT's own functions. Installing them is idempotent.
"""

from __future__ import annotations

from . import safe_io
from .config import ShipConfig
from .constants import SHIP_PREFIX, ShipPeftType
from .model import ShipModel


def register() -> None:
    """Add SHIP to PEFT's config, tuner and prefix tables and install ``safe_io``'s wrappers (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    safe_io.install()
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
