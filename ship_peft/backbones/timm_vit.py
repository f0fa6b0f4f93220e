# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""timm ``VisionTransformer`` with a class token (ViT, DeiT, DINOv2, CLIP weights): fused qkv, q/k norm, layer scale.

timm is optional (``pip install ship-peft[timm]``); this module, and so timm, is imported only when a timm model is
given. timm's own gradient checkpointing (``set_grad_checkpointing``) checkpoints each SHIP block's call as a whole,
non-reentrant by default; the recomputation reads what the forward read (``ship_peft/call.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .base import Backbone, split_heads


class TimmViTBackbone(Backbone):
    """timm ``VisionTransformer`` (``timm.create_model("vit_base_patch16_224.augreg_in21k", ...)`` and the DeiT,
    DINOv2 and CLIP models timm builds on it). ``N`` counts ``num_prefix_tokens`` (CLS, registers) and the patches;
    the classifier is ``head`` (and ``head_dist`` for distilled DeiT)."""

    name = "timm VisionTransformer (with a class token)"
    host_types = (VisionTransformer,)
    blocks_path = "blocks"
    head_names = ("head", "head_dist")

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> Optional[str]:
        if not host.has_class_token:
            return "it has no class token (average-pooled); SHIP's attribute prompts and matching loss rank image tokens by the CLS query"
        if host.attn_pool is not None:
            return "it pools with attention (`global_pool='map'`), which reads the prompt-free tokens SHIP does not model"
        for block in host.blocks:
            block = getattr(block, "base_layer", block)  # a SHIP block wraps it once an adapter is added
            if type(block) is not Block or type(block.attn) is not Attention:
                return f"its blocks are {type(block).__name__} / {type(block.attn).__name__}, not timm's pre-norm Block / Attention"
            if block.attn.gate is not None:
                return "its attention is gated, which SHIP does not model"
        return None

    def image_format(self, host):
        patch_embed = host.patch_embed
        strict = patch_embed.strict_img_size and not getattr(patch_embed, "dynamic_img_size", False)
        return patch_embed.proj.in_channels, tuple(patch_embed.img_size) if strict and patch_embed.img_size else None

    def hidden_size(self, block):
        return block.norm1.normalized_shape[0]

    def norm1(self, block, tokens):
        return block.norm1(tokens)

    def _projection(self, block: nn.Module, part: int, normed: torch.Tensor) -> torch.Tensor:
        attention = block.attn
        rows = slice(part * attention.attn_dim, (part + 1) * attention.attn_dim)
        bias = attention.qkv.bias[rows] if attention.qkv.bias is not None else None
        return split_heads(F.linear(normed, attention.qkv.weight[rows], bias), attention.head_dim)

    def query(self, block, normed):
        return block.attn.q_norm(self._projection(block, 0, normed))

    def key_value(self, block, normed):
        return block.attn.k_norm(self._projection(block, 1, normed)), self._projection(block, 2, normed)

    def scaling(self, block):
        return block.attn.scale

    def attend(self, block, query, key, value, mask=None):
        dropout = block.attn.attn_drop.p if block.training else 0.0
        output = F.scaled_dot_product_attention(query, key, value, mask, dropout_p=dropout, scale=block.attn.scale)
        return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], -1)

    def attention_branch(self, block, attended):
        attention = block.attn
        return block.drop_path1(block.ls1(attention.proj_drop(attention.proj(attention.norm(attended)))))

    def mlp_branch(self, block, tokens):
        return block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
