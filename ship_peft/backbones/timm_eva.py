# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""timm ``Eva``: EVA-02, DINOv3 and Perception Encoder as timm builds them. Fused or split q/k/v (EVA's own q/v
biases), q/k norm, per-block rotary positions after a fixed number of prefix tokens, scale norm, SwiGLU, layer scale
(``gamma_1`` / ``gamma_2``), registers, and attention-pool heads (which pool SHIP's image tokens).

Imported only with timm, as ``timm_vit.py``.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock

from .base import BlockInputs, check_block_arguments, split_heads
from .timm_vit import TimmBackbone


def rotate_after_prefix(states: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool) -> torch.Tensor:
    """timm's rotary embedding of ``states`` ``[B, H, N, d]``: every token after the first ``num_prefix_tokens``
    (CLS, registers) rotates by ``rope``. SHIP hands it the image tokens only; prompts carry no position."""
    rotated = apply_rot_embed_cat(states[:, :, num_prefix_tokens:], rope, half=half)
    return torch.cat([states[:, :, :num_prefix_tokens], rotated], dim=2).type_as(states)


class TimmEvaBackbone(TimmBackbone):
    """timm ``Eva`` (``eva02_*``, ``vit_*_dinov3``, ``vit_pe_*``). ``N`` counts ``num_prefix_tokens`` and the patches;
    the classifier is ``head``."""

    name = "timm Eva (EVA-02, DINOv3, Perception Encoder)"
    host_types = (Eva,)

    block_types = (EvaBlock,)
    attention_types = (EvaAttention, AttentionRope)

    def block_inputs(self, block, args, kwargs):
        kwargs = dict(kwargs)
        rope = kwargs.pop("rope", None)
        check_block_arguments(args, kwargs)
        if rope is None:
            return BlockInputs()
        attention = block.attn
        half = getattr(attention, "rotate_half", False)
        rotate = partial(rotate_after_prefix, rope=rope, num_prefix_tokens=attention.num_prefix_tokens, half=half)
        return BlockInputs(rotate=rotate)

    def projection(self, block, part, normed):
        attention = block.attn
        if attention.qkv is not None:
            return self.fused_projection(block, part, normed)
        projection = (attention.q_proj, attention.k_proj, attention.v_proj)[part]
        return split_heads(projection(normed), attention.head_dim)

    def fused_bias(self, attention, part, rows):
        if getattr(attention, "q_bias", None) is not None:  # EvaAttention: q and v biases, a zero k bias
            return (attention.q_bias, attention.k_bias, attention.v_bias)[part]
        return super().fused_bias(attention, part, rows)

    def attention_branch(self, block, attended):
        attention = block.attn
        branch = attention.proj_drop(attention.proj(attention.norm(attended)))
        return block.drop_path1(branch if block.gamma_1 is None else block.gamma_1 * branch)

    def mlp_branch(self, block, tokens):
        branch = block.mlp(block.norm2(tokens))
        return block.drop_path2(branch if block.gamma_2 is None else block.gamma_2 * branch)
