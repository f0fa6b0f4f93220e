# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""A linear classifier on a bare vision backbone, for the backbones transformers has no image-classification class
for (DINOv3, AIMv2, SigLIP 2's vision tower, ...)::

    backbone = AutoModel.from_pretrained("facebook/dinov3-vits16-pretrain-lvd1689m")
    model = get_peft_model(ship_peft.ImageClassifier(backbone, num_labels=10), ShipConfig(...))

SHIP trains the head with the prompts and saves it with the adapter (``modules_to_save=["classifier"]``); to load,
wrap the same backbone again and call ``PeftModel.from_pretrained`` on it.
"""

# No `from __future__ import annotations`: SHIP reads the declared output class of `forward` (its losses join it).

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput


class ImageClassifier(nn.Module):
    """``backbone`` (a transformers vision model that returns ``last_hidden_state``) with a linear ``classifier`` on
    its pooled feature: the model's own ``pooler_output`` where it has one (DINOv3: the normed CLS token; SigLIP and
    AIMv2 with their attention-pooling head), else the mean of its output tokens.

    Args:
        backbone: the bare vision model; its ``config`` becomes this model's (labels included), as PEFT reads it.
        num_labels: the number of classes.
        label_names: optional class names, recorded in the config as ``id2label`` / ``label2id``.
    """

    #: where the backbone lies, under transformers' name for it (PEFT and transformers read it)
    base_model_prefix = "backbone"
    #: the loss is a batch mean that takes no item count: the ``Trainer`` then averages it over accumulation steps and
    #: processes itself (as for transformers' timm wrapper)
    accepts_loss_kwargs = False

    def __init__(self, backbone: nn.Module, num_labels: int, label_names: Optional[list[str]] = None):
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"ImageClassifier needs num_labels >= 1 (an int), got {num_labels!r}.")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(
                f"label_names has {len(label_names)} names for num_labels={num_labels}; give one per class."
            )
        self.backbone = backbone
        self.config = backbone.config
        self.config.num_labels = num_labels
        if label_names is not None:
            self.config.id2label = dict(enumerate(label_names))
            self.config.label2id = {name: index for index, name in enumerate(label_names)}
        reference = next(backbone.parameters())
        self.classifier = nn.Linear(self.config.hidden_size, num_labels, device=reference.device, dtype=reference.dtype)
        #: the backbone's name, which PEFT records as the adapter's base model
        self.name_or_path: str = getattr(backbone, "name_or_path", "")

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (transformers' models have it; pipelines read it)."""
        return self.classifier.weight.device

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """The backbone's gradient checkpointing (transformers' ``gradient_checkpointing_enable``)."""
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.backbone.gradient_checkpointing_disable()

    def forward(
        self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> ImageClassifierOutput:
        """``pixel_values`` as the backbone takes them (further keyword arguments go to it); ``labels`` ``[B]``
        give the cross-entropy ``loss``."""
        outputs = self.backbone(pixel_values=pixel_values, **kwargs)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            pooled = outputs.last_hidden_state.mean(dim=1)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
