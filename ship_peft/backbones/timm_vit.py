# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""timm ``VisionTransformer`` (ViT, DeiT, DINOv2, CLIP, SigLIP weights): fused qkv, q/k norm, layer scale; with a
class token or pooled (``global_pool`` ``avg`` / ``map``: SHIP's image summary is then the mean token).

timm is optional (``pip install ship-peft[timm]``); this module, and so timm, is imported only when a timm model is
given. timm's own gradient checkpointing (``set_grad_checkpointing``) checkpoints each SHIP block's call as a whole,
non-reentrant by default; the recomputation reads what the forward read (``ship_peft/call.py``).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .base import Backbone, split_heads


class TimmBackbone(Backbone):
    """What timm's pre-norm blocks share: ``blocks`` below the model, ``norm1`` / ``norm2``, an ``attn`` module with
    ``head_dim``, ``scale`` and ``attn_drop``, and the classifier ``head``."""

    blocks_path = "blocks"
    head_names = ("head", "head_dist")
    #: the block and attention classes SHIP models (a family's exact types)
    block_types: ClassVar[tuple[type[nn.Module], ...]]
    attention_types: ClassVar[tuple[type[nn.Module], ...]]

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> Optional[str]:
        for block in host.blocks:
            block = getattr(block, "base_layer", block)  # a SHIP block wraps it once an adapter is added
            if type(block) not in cls.block_types or type(block.attn) not in cls.attention_types:
                found = f"{type(block).__name__} / {type(block.attn).__name__}"
                names = " / ".join(kind.__name__ for kind in cls.block_types + cls.attention_types)
                return f"its blocks are {found}, not timm's pre-norm {names}"
            if block.attn.gate is not None:
                return "its attention is gated, which SHIP does not model"
            if getattr(block.attn, "num_kv_groups", 1) > 1:
                return "its attention groups its key/value heads (grouped-query attention), which SHIP does not model"
        return None

    def has_class_token(self, host):
        return getattr(host, "cls_token", None) is not None

    def image_format(self, host):
        patch_embed = host.patch_embed
        strict = patch_embed.strict_img_size and not getattr(patch_embed, "dynamic_img_size", False)
        return patch_embed.proj.in_channels, tuple(patch_embed.img_size) if strict and patch_embed.img_size else None

    def hidden_size(self, block):
        return block.norm1.weight.shape[0]

    def norm1(self, block, tokens):
        return block.norm1(tokens)

    def scaling(self, block):
        return block.attn.scale

    def attend(self, block, query, key, value, mask=None):
        dropout = block.attn.attn_drop.p if block.training else 0.0
        output = F.scaled_dot_product_attention(query, key, value, mask, dropout_p=dropout, scale=block.attn.scale)
        return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], -1)

    def query(self, block, normed):
        return block.attn.q_norm(self.projection(block, 0, normed))

    def key_value(self, block, normed):
        return block.attn.k_norm(self.projection(block, 1, normed)), self.projection(block, 2, normed)

    def projection(self, block: nn.Module, part: int, normed: torch.Tensor) -> torch.Tensor:
        """Part ``part`` (0: query, 1: key, 2: value) of the block's attention projection, ``[B, H, n, d]``: by default
        cut from its fused ``qkv``."""
        return self.fused_projection(block, part, normed)

    def fused_projection(self, block: nn.Module, part: int, normed: torch.Tensor) -> torch.Tensor:
        """Part ``part`` of the block's fused ``qkv`` projection."""
        attention = block.attn
        size = attention.head_dim * attention.num_heads
        rows = slice(part * size, (part + 1) * size)
        projected = F.linear(normed, attention.qkv.weight[rows], self.fused_bias(attention, part, rows))
        return split_heads(projected, attention.head_dim)

    def fused_bias(self, attention: nn.Module, part: int, rows: slice) -> Optional[torch.Tensor]:
        return None if attention.qkv.bias is None else attention.qkv.bias[rows]


class TimmViTBackbone(TimmBackbone):
    """timm ``VisionTransformer`` (``timm.create_model("vit_base_patch16_224.augreg_in21k", ...)`` and the DeiT,
    DINOv2, CLIP and SigLIP models timm builds on it). ``N`` counts ``num_prefix_tokens`` (CLS, registers) and the
    patches; the classifier is ``head`` (and ``head_dist`` for distilled DeiT). Pooled models (``global_pool`` ``avg``
    or ``map``, no class token) pool SHIP's image tokens with their own head."""

    name = "timm VisionTransformer"
    host_types = (VisionTransformer,)

    block_types = (Block,)
    attention_types = (Attention,)

    def attention_branch(self, block, attended):
        attention = block.attn
        return block.drop_path1(block.ls1(attention.proj_drop(attention.proj(attention.norm(attended)))))

    def mlp_branch(self, block, tokens):
        return block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
