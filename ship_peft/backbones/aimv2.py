# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""transformers AIMv2 vision encoder: RMSNorm, SwiGLU, no class token (SHIP's image summary is the mean token)."""

from __future__ import annotations

from transformers.models.aimv2.modeling_aimv2 import Aimv2VisionModel

from .base import TransformersBackbone


class Aimv2Backbone(TransformersBackbone):
    """``Aimv2VisionModel`` (and the ``Aimv2Model`` around it; no classification class: see
    :class:`ship_peft.ImageClassifier`). ``N`` counts the patches only."""

    name = "transformers AIMv2 vision"
    host_types = (Aimv2VisionModel,)
    blocks_path = "encoder.layers"
    head_names = ("classifier",)
    norm1_path = "rms_norm1"
    attention_path = "attention"
    output_name = "out_proj"
    norm2_path = "rms_norm2"
    mlp_path = "ffn"
    attention_dropout_name = "dropout"
    scaling_name = "scale"

    def has_class_token(self, host):
        return False

    def image_format(self, host):
        channels, size = super().image_format(host)
        return channels, None if host.config.is_native else size  # native models interpolate their positions
