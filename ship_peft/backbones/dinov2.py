# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""transformers DINOv2, with and without registers: layer scale, stochastic depth, MLP or SwiGLU."""

from __future__ import annotations

from transformers.models.dinov2.modeling_dinov2 import Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersModel

from .base import TransformersBackbone


class Dinov2Backbone(TransformersBackbone):
    """``Dinov2Model`` / ``Dinov2ForImageClassification`` (head on CLS and mean patch token) and the
    ``Dinov2WithRegisters`` classes (register tokens after CLS, counted in ``N``)."""

    name = "transformers DINOv2 (with or without registers)"
    host_types = (Dinov2Model, Dinov2WithRegistersModel)
    blocks_path = "encoder.layer"
    head_names = ("classifier",)
    norm1_path = "norm1"
    attention_path = "attention"
    norm2_path = "norm2"
    layer_scale1_path = "layer_scale1"
    layer_scale2_path = "layer_scale2"
    drop_path_path = "drop_path"

    def image_format(self, host):
        return host.config.num_channels, None  # DINOv2 interpolates its position embeddings to any size
