# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""What SHIP looks at in an image (``docs/method.md`` §2, §4): where the image summary (the CLS token, or the mean
token, §7) attends in the last layer, which image tokens built the attribute prompts of each attribute layer, and
which the matching loss compares the prompts with. ``ship-peft explain`` draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .call import ship_call
from .model import get_prompt_bank


@dataclass
class Explanation:
    """One forward of a SHIP model, explained. Token indices count the image tokens the host hands its first block
    (class and register tokens first, then the patches in raster order).

    Attributes:
        logits: ``[B, C]`` the model's logits (``predicted`` = their argmax).
        summary_scores: per layer, the image summary's pre-softmax scores over the image tokens, averaged over
            heads, ``[B, N]``: what SHIP ranks the image tokens by.
        attention: ``[B, N]`` the softmax of the last layer's scores: where the summary attends.
        attribute_tokens: per attribute layer, the ``A`` image tokens (best first, ``[B, A]``) whose outputs of the
            layer before built its attribute prompts.
        matching_tokens: ``[B, T]`` the image tokens the matching loss compares the prompts with (the last layer's
            top ``T``; chosen as in training).
    """

    logits: torch.Tensor
    summary_scores: dict[int, torch.Tensor]
    attention: torch.Tensor
    attribute_tokens: dict[int, torch.Tensor]
    matching_tokens: torch.Tensor

    @property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)


@torch.no_grad()
def explain(model: nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Explanation:
    """Run ``model`` (a SHIP ``PeftModel``, one active adapter; call ``model.eval()`` first for inference) on
    ``pixel_values`` (and the model's other image ``inputs``, SigLIP 2's) and explain what it looked at."""
    bank = get_prompt_bank(model)
    config = bank.ship_config[bank.active_adapters[0]]
    with ship_call(summary_scores={}) as call:
        output = model(pixel_values, **inputs)
    scores = call.summary_scores
    if len(scores) != bank.num_layers:
        raise RuntimeError("explain needs a SHIP model with its adapter enabled (not inside `disable_adapter()`).")
    last = scores[bank.num_layers - 1]
    attribute_tokens = {
        layer: _top(scores[layer - 1], config.num_attribute_prompts) for layer in config.attribute_layers()
    }
    logits = output if torch.is_tensor(output) else output.logits
    return Explanation(logits, scores, last.softmax(dim=-1), attribute_tokens, _top(last, config.matching_top_k))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best-scored tokens, best first, as SHIP picks them (``torch.topk``)."""
    return scores.topk(min(k, scores.shape[-1]), dim=-1).indices
