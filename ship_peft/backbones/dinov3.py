# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""transformers DINOv3 ViT: registers, layer scale, gated MLP, and rotary positions on the patch tokens."""

from __future__ import annotations

from functools import partial

import torch
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTBackbone, DINOv3ViTModel, rotate_half

from .base import BlockInputs, check_block_arguments
from .dinov2 import Dinov2Backbone


def rotate_patches(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DINOv3's rotary embedding of ``states`` ``[B, H, N, d]``: the last ``len(cos)`` tokens (the patches) rotate,
    the ones before them (CLS, registers) do not. SHIP hands it the image tokens only, so prompts, which follow them
    and carry no position, are never counted as patches."""
    prefix = states.shape[-2] - cos.shape[-2]
    patches = states[..., prefix:, :]
    return torch.cat([states[..., :prefix, :], patches * cos + rotate_half(patches) * sin], dim=-2)


class DINOv3Backbone(Dinov2Backbone):
    """``DINOv3ViTModel`` and ``DINOv3ViTBackbone`` (no classification class: see :class:`ship_peft.ImageClassifier`).
    Its block names its parts as DINOv2's; ``N`` counts the CLS token, the registers and the patches, and any image
    size the patch divides runs. Rotary positions (with the training-time augmentation the host draws) rotate the
    patches' queries and keys."""

    name = "transformers DINOv3 ViT"
    host_types = (DINOv3ViTModel, DINOv3ViTBackbone)
    blocks_path = "model.layer"
    attention_dropout_name = "dropout"

    def block_inputs(self, block, args, kwargs):
        kwargs = dict(kwargs)
        cos, sin = kwargs.pop("position_embeddings")
        check_block_arguments(args, kwargs)
        return BlockInputs(rotate=partial(rotate_patches, cos=cos, sin=sin))
