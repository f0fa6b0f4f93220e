# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The backbone seam: what SHIP needs to know about one family of pre-norm Vision Transformers.

SHIP wraps every block of a family's *block sequence* (transformers' ``layers`` list, timm's ``blocks``) and runs
the block's parts itself, with prompt tokens appended after the image tokens. Everything before the blocks (patch embedding, CLS,
distillation and register tokens, position embedding, any pre-norm) and after them (final norm, pooler, head) stays
the host model's own code, so the ``N`` image-side tokens are whatever the host hands to its first block, with the
CLS token first. A family only says how to run the pieces of one block on any set of tokens; see
``docs/backbones.md`` for adding one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward


@dataclasses.dataclass(frozen=True)
class BlockInputs:
    """What the host hands a block besides its image tokens ``[B, N, D]``, as SHIP reads it (``docs/backbones.md``).

    Attributes:
        rotate: the rotary position embedding of the image tokens, applied to their queries and keys
            ``[B, H, N, d]`` (None: the family has none). Prompts carry no position and are never rotated.
        valid: ``[B, N]`` True for the image tokens that are not padding (None: all are), read from the host's
            attention mask (SigLIP 2's NaFlex batches). Padding is masked as a key, left out of the image summary and
            never ranked.
    """

    rotate: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    valid: Optional[torch.Tensor] = None

    def of_rows(self, rows: torch.Tensor) -> "BlockInputs":
        """The inputs of the samples ``rows`` (a mixed-adapter batch's group)."""
        return self if self.valid is None else dataclasses.replace(self, valid=self.valid.index_select(0, rows))

    def key_mask(self, dtype: torch.dtype, num_prompt_keys: int = 0) -> Optional[torch.Tensor]:
        """An additive attention mask ``[B, 1, 1, N + num_prompt_keys]`` hiding the padding image keys (prompt keys,
        appended after the image keys, are never hidden), or None when nothing is padding."""
        if self.valid is None:
            return None
        hidden = ~torch.nn.functional.pad(self.valid, (0, num_prompt_keys), value=True)
        return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(
            hidden, torch.finfo(dtype).min
        )[:, None, None]


#: A block called with its image tokens only.
NO_INPUTS = BlockInputs()


def check_block_arguments(args: tuple, kwargs: dict) -> None:
    """Clear errors for what the host passes to its blocks that SHIP cannot honour (masks, attention maps)."""
    masks = [arg for arg in args if arg is not None] + [
        kwargs[name] for name in ("attention_mask", "attn_mask") if kwargs.get(name) is not None
    ]
    # Under torch.export, transformers' hosts build an all-visible mask where eager mode passes None; an exported
    # SHIP model takes pixels only (ship_peft.export), so that mask is the host's own and masks nothing.
    if (masks and not torch.compiler.is_exporting()) or kwargs.get("is_causal"):
        raise NotImplementedError(
            "SHIP attends over all image and prompt tokens and takes no attention mask; call the model without "
            "`attention_mask`."
        )
    if kwargs.get("output_attentions"):
        raise NotImplementedError("SHIP does not return attention maps; call without `output_attentions`.")


def split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, n, H*d]`` -> ``[B, H, n, d]`` (the layout of every attention function)."""
    return states.view(*states.shape[:2], -1, head_dim).transpose(1, 2)


class Backbone:
    """One family of pre-norm ViT blocks ``x + ls1(attn(norm1(x))) ; x + ls2(mlp(norm2(x)))``.

    Class attributes:
        name: the family as users know it, for messages and the docs.
        host_types: the module types that hold the block sequence (matched with ``isinstance``).
        blocks_path: where the block sequence lies below its host (``"layers"``, ``"encoder.layer"``, ...).
        head_names: the model's classifiers, trained in full and saved with the adapter (``modules_to_save``).
        pixel_layout: how the model takes its images.

    Every method takes the block module it works on, so a family holds no state.
    """

    name: ClassVar[str]
    host_types: ClassVar[tuple[type[nn.Module], ...]]
    blocks_path: ClassVar[str]
    head_names: ClassVar[tuple[str, ...]]
    #: ``"images"``: pixel_values ``[B, C, H, W]``; ``"patches"``: patchified ``[B, P, C * p * p]`` (NaFlex)
    pixel_layout: ClassVar[str] = "images"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> Optional[str]:
        """Why this host of the family cannot run SHIP exactly (None: it can)."""
        return None

    def has_class_token(self, host: nn.Module) -> bool:
        """Whether the host's first image token is a class token (SHIP's default image summary, ``docs/method.md``)."""
        return True

    def block_inputs(self, block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> BlockInputs:
        """What SHIP uses of the arguments the host passes to ``block`` after the image tokens (rotary positions, a
        padding mask); a clear error for any it cannot honour. By default the block takes none."""
        check_block_arguments(args, kwargs)
        return NO_INPUTS

    def is_stochastic(self, block: nn.Module) -> bool:
        """Whether ``block`` draws random numbers in training (dropout or stochastic depth with a rate above 0).

        Then the prompts' path through it differs between samples and is not shared across the batch. Any dropout
        module of the block counts, even one on the attention probabilities (which prompts bypass): a safe default.
        """
        return any(_random_rate(module) > 0 for module in block.modules())

    def checkpoint_function(self, block: nn.Module) -> Optional[Callable]:
        """The function that checkpoints SHIP's work in ``block`` when the host asked for gradient checkpointing,
        else None (also where the host checkpoints its block calls itself, as timm does: SHIP's block is then
        recomputed as a whole)."""
        return None

    def image_format(self, host: nn.Module) -> tuple[int, Optional[tuple[int, int]]]:
        """Input checks: the channels the host takes and its image size (None: any size)."""
        raise NotImplementedError

    def hidden_size(self, block: nn.Module) -> int:
        raise NotImplementedError

    def norm1(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The LayerNorm before attention."""
        raise NotImplementedError

    def query(self, block: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, H, n, d]`` (with any query norm)."""
        raise NotImplementedError

    def key_value(self, block: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (with any key norm) and values, each ``[B, H, n, d]``."""
        raise NotImplementedError

    def scaling(self, block: nn.Module) -> float:
        """The softmax temperature of the attention scores (``d ** -0.5``)."""
        raise NotImplementedError

    def attend(
        self,
        block: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``softmax(q k^T * scaling + mask) v`` with the block's attention dropout in training; returns
        ``[B, n, H*d]``. ``mask`` is additive, broadcast to ``[B, H, n, m]`` (None: every key)."""
        raise NotImplementedError

    def attention_branch(self, block: nn.Module, attended: torch.Tensor) -> torch.Tensor:
        """The residual branch from the attention output ``[B, n, H*d]``: output projection, layer scale, dropout and
        the block's own stochastic depth."""
        raise NotImplementedError

    def mlp_branch(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The residual branch of the MLP: LN2, MLP, layer scale, dropout and the block's own stochastic depth."""
        raise NotImplementedError


class TransformersBackbone(Backbone):
    """A transformers family with split q/k/v projections and ``GradientCheckpointingLayer`` blocks.

    A family names its block's parts (dotted paths below the block); ``layer_scale*`` and ``drop_path`` may be None.
    Attention goes through transformers' attention function of the model's ``attn_implementation``.
    """

    norm1_path: ClassVar[str]
    attention_path: ClassVar[str]
    query_name: ClassVar[str] = "q_proj"
    key_name: ClassVar[str] = "k_proj"
    value_name: ClassVar[str] = "v_proj"
    output_name: ClassVar[str] = "o_proj"
    norm2_path: ClassVar[str]
    mlp_path: ClassVar[str] = "mlp"
    layer_scale1_path: ClassVar[Optional[str]] = None
    layer_scale2_path: ClassVar[Optional[str]] = None
    dropout_path: ClassVar[Optional[str]] = None
    drop_path_path: ClassVar[Optional[str]] = None
    #: the attention module's dropout probability and scaling attributes
    attention_dropout_name: ClassVar[str] = "attention_dropout"
    scaling_name: ClassVar[str] = "scaling"

    def _part(self, block: nn.Module, path: Optional[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        return block.get_submodule(path) if path else _identity

    def checkpoint_function(self, block: nn.Module) -> Optional[Callable]:
        # transformers' blocks checkpoint themselves (GradientCheckpointingLayer); SHIP runs the block's parts in its
        # place, so it applies the function `gradient_checkpointing_enable` gave the block, with the call's tensors
        # as explicit arguments (reentrant checkpointing then works too).
        return block._gradient_checkpointing_func if getattr(block, "gradient_checkpointing", False) else None

    def hidden_size(self, block: nn.Module) -> int:
        return block.get_submodule(self.norm1_path).weight.shape[0]

    def image_format(self, host):
        size = host.config.image_size
        return host.config.num_channels, tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    def norm1(self, block, tokens):
        return block.get_submodule(self.norm1_path)(tokens)

    def query(self, block, normed):
        attention = block.get_submodule(self.attention_path)
        return split_heads(getattr(attention, self.query_name)(normed), attention.head_dim)

    def key_value(self, block, normed):
        attention = block.get_submodule(self.attention_path)
        head_dim = attention.head_dim
        key = split_heads(getattr(attention, self.key_name)(normed), head_dim)
        return key, split_heads(getattr(attention, self.value_name)(normed), head_dim)

    def scaling(self, block):
        return getattr(block.get_submodule(self.attention_path), self.scaling_name)

    def attend(self, block, query, key, value, mask=None):
        attention = block.get_submodule(self.attention_path)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
        dropout = getattr(attention, self.attention_dropout_name) if block.training else 0.0
        output, _ = interface(attention, query, key, value, mask, dropout=dropout, scaling=self.scaling(block))
        return output.reshape(*output.shape[:2], -1)

    def attention_branch(self, block, attended):
        branch = getattr(block.get_submodule(self.attention_path), self.output_name)(attended)
        branch = self._part(block, self.layer_scale1_path)(branch)
        return self._part(block, self.drop_path_path)(self._part(block, self.dropout_path)(branch))

    def mlp_branch(self, block, tokens):
        branch = block.get_submodule(self.mlp_path)(block.get_submodule(self.norm2_path)(tokens))
        branch = self._part(block, self.layer_scale2_path)(branch)
        return self._part(block, self.drop_path_path)(self._part(block, self.dropout_path)(branch))


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _random_rate(module: nn.Module) -> float:
    """The rate of a dropout module (``p``) or a stochastic-depth module (``drop_prob``: timm, transformers), else 0."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p
    return getattr(module, "drop_prob", 0.0) or 0.0
