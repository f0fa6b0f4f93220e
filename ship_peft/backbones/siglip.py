# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""transformers SigLIP and SigLIP 2 vision towers: no class token (SHIP's image summary is then the mean of the image
tokens), CLIP's block, and SigLIP 2's NaFlex batches of patchified images with a padding mask."""

from __future__ import annotations

from typing import Optional

import torch
from transformers.models.siglip.modeling_siglip import SiglipVisionModel
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionModel

from .base import BlockInputs, check_block_arguments
from .clip import CLIPBackbone


class SiglipBackbone(CLIPBackbone):
    """``SiglipVisionModel`` (and the ``SiglipModel`` / ``SiglipForImageClassification`` around it: head on the mean
    image token). Its encoder layer is CLIP's; ``N`` counts the patches only (no class token)."""

    name = "transformers SigLIP vision"
    host_types = (SiglipVisionModel,)

    def has_class_token(self, host):
        return False


class Siglip2Backbone(SiglipBackbone):
    """``Siglip2VisionModel`` (and ``Siglip2Model`` / ``Siglip2ForImageClassification``): NaFlex batches, images
    patchified to ``[B, P, C * p * p]`` with ``pixel_attention_mask`` and ``spatial_shapes``. The host turns the
    padding mask into its blocks' attention mask; SHIP reads which image tokens are padding from it."""

    name = "transformers SigLIP 2 vision (NaFlex)"
    host_types = (Siglip2VisionModel,)
    pixel_layout = "patches"

    def image_format(self, host):
        return host.config.num_channels, None

    def block_inputs(self, block, args, kwargs):
        kwargs = dict(kwargs)
        mask = args[0] if args else kwargs.pop("attention_mask", None)
        check_block_arguments(args[1:], kwargs)
        return BlockInputs(valid=valid_keys(mask))


def valid_keys(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The keys a bidirectional padding mask ``[B, 1, N, N]`` lets every query see -> ``[B, N]`` bool (None: all).
    transformers builds it boolean (True: attend) or additive (0: attend) by attention implementation."""
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.dim() != 4:
        raise NotImplementedError(
            f"SHIP reads SigLIP 2's padding from the [B, 1, N, N] attention mask of sdpa or eager attention, got "
            f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))} (flash or flex attention); load the model with "
            f"attn_implementation='sdpa' or 'eager'."
        )
    keys = mask[:, 0, 0, :]
    return keys if keys.dtype == torch.bool else keys == 0
