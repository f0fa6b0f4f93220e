# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""transformers ViT and DeiT: ``ViTModel`` / ``DeiTModel`` hold their ``layers`` (the same block layout)."""

from __future__ import annotations

from transformers.models.deit.modeling_deit import DeiTModel
from transformers.models.vit.modeling_vit import ViTModel

from .base import TransformersBackbone


class ViTBackbone(TransformersBackbone):
    """transformers ViT (``ViTModel``, ``ViTForImageClassification``) and DeiT (``DeiTModel``,
    ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``: CLS and distillation tokens)."""

    name = "transformers ViT / DeiT"
    host_types = (ViTModel, DeiTModel)
    blocks_path = "layers"
    head_names = ("classifier", "cls_classifier", "distillation_classifier")
    norm1_path = "layernorm_before"
    attention_path = "attention"
    norm2_path = "layernorm_after"
    dropout_path = "dropout"
