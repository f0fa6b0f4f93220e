# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Helpers of the test suite: tiny models (``models``), the naive oracle (``naive_ship``), the reference fixtures
(``reference_fixture``) and the multi-process harness (``distributed_train``, run by ``torchrun``)."""

from .models import (
    SHARED,
    base_state_dict,
    fill_prototypes,
    pixels,
    tensors_with_history,
    tiny_ship_model,
    tiny_vit,
    tiny_vit_config,
)

__all__ = [
    "SHARED",
    "base_state_dict",
    "fill_prototypes",
    "pixels",
    "tensors_with_history",
    "tiny_ship_model",
    "tiny_vit",
    "tiny_vit_config",
]
