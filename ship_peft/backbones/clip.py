# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""transformers CLIP vision tower: pre-LayerNorm before the blocks (the host's), quick-GELU MLP."""

from __future__ import annotations

from transformers.models.clip.modeling_clip import CLIPVisionModel

from .base import TransformersBackbone


class CLIPBackbone(TransformersBackbone):
    """``CLIPVisionModel`` and ``CLIPForImageClassification`` (head on the mean patch token)."""

    name = "transformers CLIP vision"
    host_types = (CLIPVisionModel,)
    blocks_path = "encoder.layers"
    head_names = ("classifier",)
    norm1_path = "layer_norm1"
    attention_path = "self_attn"
    output_name = "out_proj"
    norm2_path = "layer_norm2"
    attention_dropout_name = "dropout"
    scaling_name = "scale"
