# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Names SHIP shares with PEFT. This module imports nothing of ship-peft's, so every other module may import it."""

from __future__ import annotations

import enum


class ShipPeftType(str, enum.Enum):
    """PEFT type of ship-peft's methods (written as ``"peft_type": "SHIP"`` in ``adapter_config.json``)."""

    SHIP = "SHIP"


#: Attribute name of SHIP's parameters on the wrapped backbone; PEFT matches it as a substring of state-dict keys.
SHIP_PREFIX = "ship_prompts"
