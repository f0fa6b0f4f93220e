# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The backbone families SHIP runs on, resolved by module type (see ``base.py`` for the seam)."""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Optional

from torch import nn

from .aimv2 import Aimv2Backbone
from .base import Backbone, TransformersBackbone, split_heads
from .clip import CLIPBackbone
from .dinov2 import Dinov2Backbone
from .dinov3 import DINOv3Backbone
from .siglip import Siglip2Backbone, SiglipBackbone
from .vit import ViTBackbone

#: The transformers families; timm's join when a timm model is given (:func:`timm_families`).
FAMILIES: list[type[Backbone]] = [
    ViTBackbone,
    Dinov2Backbone,
    DINOv3Backbone,
    CLIPBackbone,
    SiglipBackbone,
    Siglip2Backbone,
    Aimv2Backbone,
]

#: The oldest timm whose VisionTransformer SHIP supports.
TIMM_MINIMUM = (1, 0)

#: Vision Transformers SHIP cannot run exactly, by class name, and why.
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(
        ("SwinModel", "Swinv2Model", "SwinTransformer", "SwinTransformerV2"),
        "Swin uses windowed attention, where prompt tokens have no place",
    ),
    **dict.fromkeys(
        ("BeitModel", "Data2VecVisionModel", "Beit"),
        "BEiT adds a relative position bias to attention, defined for image tokens only",
    ),
}

TIMM_NAME = "timm VisionTransformer and Eva (EVA-02, DINOv3, Perception Encoder; `pip install ship-peft[timm]`)"


def supported_families() -> str:
    """The supported families, for error messages."""
    return "; ".join(family.name for family in FAMILIES) + "; " + TIMM_NAME


@functools.cache
def timm_families() -> list[type[Backbone]]:
    """The timm families, imported now (timm is imported only for a timm model); a clear error for an old timm."""
    version = importlib.metadata.version("timm")
    if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < TIMM_MINIMUM:
        raise ImportError(
            f"SHIP supports timm >= {'.'.join(map(str, TIMM_MINIMUM))}, but timm {version} is installed: "
            f'`pip install -U "timm>={".".join(map(str, TIMM_MINIMUM))}"` (or `pip install "ship-peft[timm]"`).'
        )
    from .timm_eva import TimmEvaBackbone
    from .timm_vit import TimmViTBackbone

    return [TimmViTBackbone, TimmEvaBackbone]


def family_of(host: nn.Module) -> Optional[type[Backbone]]:
    """The family whose block sequence ``host`` holds, or None."""
    families = FAMILIES + (timm_families() if type(host).__module__.startswith("timm.") else [])
    return next((family for family in families if isinstance(host, family.host_types)), None)


def find_hosts(model: nn.Module) -> list[tuple[str, nn.Module, type[Backbone]]]:
    """Every ``(name, module, family)`` in ``model`` that holds a supported block sequence, outermost first.

    Raises a clear error for a Vision Transformer SHIP does not support, naming why.
    """
    hosts = []
    for name, module in model.named_modules():
        family = family_of(module)
        if family is None:
            reason = UNSUPPORTED.get(type(module).__name__)
            if reason:
                raise TypeError(f"SHIP does not support {type(module).__name__}: {reason}. Supported: {supported_families()}.")
            continue
        reason = family.unsupported_reason(module)
        if reason:
            raise TypeError(f"SHIP does not support this {type(module).__name__}: {reason}. Supported: {supported_families()}.")
        hosts.append((name, module, family))
    return hosts


__all__ = ["Backbone", "FAMILIES", "TransformersBackbone", "family_of", "find_hosts", "split_heads", "supported_families"]
