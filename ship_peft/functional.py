# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The math of one SHIP block (``docs/method.md`` §2-§4), as plain functions of tensors and a backbone seam.

Nothing here holds state: :class:`~ship_peft.layer.ShipBlock` calls these with one block of the host and the
tensors of the running call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone
from .backbones.base import NO_INPUTS, BlockInputs
from .stochastic_depth import BranchScales

#: eps of the cosine similarities (attribute prompts and matching loss), as the reference's ``F.cosine_similarity``.
COSINE_EPS = 1e-8

#: No stochastic depth: both branches added as they are.
NO_DROPS = BranchScales()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a [B, n, D]`` with every row of ``b [.., m, D]`` -> ``[B, n, m]``.

    Zero vectors give 0, never NaN.
    """
    eps = max(COSINE_EPS, torch.finfo(a.dtype).tiny)  # 1e-8 is 0 in float16
    return F.normalize(a, dim=-1, eps=eps) @ F.normalize(b, dim=-1, eps=eps).transpose(-1, -2)


def gather_top_tokens(tokens: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows of ``tokens [B, N, D]`` with the highest ``scores [B, N]``, best first -> ``[B, k, D]``."""
    index = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def prompt_matching_loss(
    prompt_tokens: torch.Tensor, image_tokens: torch.Tensor, chosen_scores: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """docs/method.md §4: mean over batch and prompts of ``min_t (1 - cos(prompt, image_token_t))``.

    ``chosen_scores`` ``[B, T]`` are the ranking scores of ``image_tokens``: a token scored ``-inf`` is padding (a
    sample with fewer valid tokens than ``T``) and takes no part.
    """
    cost = 1.0 - cosine(prompt_tokens, image_tokens)
    if chosen_scores is not None:
        cost = cost.masked_fill(chosen_scores.isinf()[:, None, :], float("inf"))
    return cost.amin(dim=-1).mean()


def leading(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """The first ``length`` entries of ``tensor`` along ``dim``; the tensor itself when that is all of it, so that
    autograd records no slice (whose backward writes the gradient into a zero-filled copy)."""
    return tensor if tensor.shape[dim] == length else tensor.narrow(dim, 0, length)


def drop_path(branch: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
    """Stochastic depth with drawn masks (:mod:`ship_peft.stochastic_depth`): each row of the residual ``branch``
    times its scale ``[n]``, 0 (dropped) or ``1 / (1 - rate)`` (kept); None: the branch as it is."""
    if scales is None:
        return branch
    return branch * scales.to(branch.dtype).view(-1, *(1,) * (branch.ndim - 1))


def summary_scores(
    summary_query: torch.Tensor, key: torch.Tensor, scaling: float, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pre-softmax attention scores of the image summary's query ``[B, H, 1, d]`` over the image keys ``[B, H, N, d]``,
    averaged over heads -> ``[B, N]``; padding tokens (``valid`` False) score ``-inf``, so they are never ranked.

    Only the summary's row is computed, never the ``N x N`` matrix.
    """
    scores = (summary_query @ key.transpose(-1, -2)).mul(scaling).mean(dim=1).squeeze(1)
    return scores if valid is None else scores.masked_fill(~valid, float("-inf"))


def summary_query(
    backbone: Backbone, block: nn.Module, image_tokens: torch.Tensor, image_query: torch.Tensor, inputs: BlockInputs,
    summary: str,
) -> torch.Tensor:
    """The query of the image summary that ranks the image tokens (``docs/method.md`` §2, §7), ``[B, H, 1, d]``:
    the CLS token's (``"cls"``, the paper), or that of the mean of the valid image tokens entering the block, taken
    through the block's LN1 and query projection like a token without position (``"mean"``)."""
    if summary == "cls":
        return leading(image_query, 1, 2)
    mean = summary_features(image_tokens, inputs.valid, summary)[:, None]
    return backbone.query(block, backbone.norm1(block, mean))


def summary_features(image_tokens: torch.Tensor, valid: Optional[torch.Tensor], summary: str) -> torch.Tensor:
    """The image summary of ``image_tokens`` ``[B, N, D]`` -> ``[B, D]``: the CLS token, or the mean of the valid
    tokens (calibration reads it from every block's output)."""
    if summary == "cls":
        return image_tokens[:, 0]
    if valid is None:
        return image_tokens.mean(dim=1)
    weights = valid.to(image_tokens.dtype)[..., None]
    return (image_tokens * weights).sum(dim=1) / weights.sum(dim=1)


def residual_update(
    backbone: Backbone, block: nn.Module, tokens: torch.Tensor, attended: torch.Tensor, drops: BranchScales = NO_DROPS
) -> torch.Tensor:
    """The rest of a pre-norm block after attention: ``y = x + branch_attn(a)``, ``out = y + branch_mlp(y)``, with
    SHIP's stochastic depth ``drops`` (each row's scale of each branch)."""
    tokens = tokens + drop_path(backbone.attention_branch(block, attended), drops.attention)
    return tokens + drop_path(backbone.mlp_branch(block, tokens), drops.mlp)


def block_forward(
    backbone: Backbone,
    block: nn.Module,
    tokens: torch.Tensor,
    static_key: Optional[torch.Tensor] = None,
    static_value: Optional[torch.Tensor] = None,
    *,
    num_image_tokens: int,
    decoupled: bool,
    prompt_weight: float,
    prompt_attention: bool,
    need_scores: bool,
    keep: int,
    drops: BranchScales = NO_DROPS,
    inputs: BlockInputs = NO_INPUTS,
    summary: str = "cls",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One pre-norm block on ``[image ; prompt]`` tokens with SHIP's attention (``docs/method.md`` §3) and
    stochastic depth ``drops`` (§6: each sample's scale of each branch). ``static_key`` / ``static_value`` are the
    shared path's prompt keys and values attended by the image queries: ``[1, H, P, d]`` for every sample, or
    ``[B, H, P, d]``, each sample's history group's (stochastic depth). ``inputs`` is what the host handed the
    block (rotary positions, padding); ``summary`` the image summary that ranks the image tokens.

    Returns the outputs of the first ``keep`` tokens (the others are not needed) and, if ``need_scores``, the image
    summary's pre-softmax scores over the image keys.
    """
    normed = backbone.norm1(block, tokens)
    static = None if static_key is None else (static_key, static_value)
    attended, scores = attention(
        backbone, block, tokens, normed, num_image_tokens, decoupled, prompt_weight, prompt_attention,
        summary if need_scores else None, static, inputs,
    )
    return residual_update(backbone, block, leading(tokens, keep, 1), leading(attended, keep, 1), drops), scores


def attention(
    backbone: Backbone,
    block: nn.Module,
    tokens: torch.Tensor,
    normed: torch.Tensor,
    num_image_tokens: int,
    decoupled: bool,
    prompt_weight: float,
    prompt_attention: bool,
    summary: Optional[str],
    static: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    inputs: BlockInputs = NO_INPUTS,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention output (before the output projection) for every token, ``[B, N+P, H*d]``, and the image summary's
    scores over the image tokens when ``summary`` is given. ``static`` holds the shared path's prompt keys and values
    ``[1 or B, H, P_static, d]``, which join the sample's own prompt keys."""
    queries_all = prompt_attention or not decoupled
    query = backbone.query(block, normed if queries_all else leading(normed, num_image_tokens, 1))
    key, value = backbone.key_value(block, normed)
    image_query, image_key = leading(query, num_image_tokens, 2), leading(key, num_image_tokens, 2)
    if inputs.rotate is not None:  # rotary positions: the image tokens' only, prompts carry none
        image_query, image_key = inputs.rotate(image_query), inputs.rotate(image_key)
        query = _joined(image_query, query[:, :, num_image_tokens:])
        key = _joined(image_key, key[:, :, num_image_tokens:])
    prompt_key = key[:, :, num_image_tokens:]
    image_value, prompt_value = leading(value, num_image_tokens, 2), value[:, :, num_image_tokens:]
    scores = None
    if summary is not None:
        image_tokens = leading(tokens, num_image_tokens, 1)
        query_of_summary = summary_query(backbone, block, image_tokens, image_query, inputs, summary)
        scores = summary_scores(query_of_summary, image_key, backbone.scaling(block), inputs.valid)
    every_key_mask = inputs.key_mask(query.dtype, key.shape[2] - num_image_tokens)

    if not decoupled:
        return backbone.attend(block, query, key, value, every_key_mask), scores

    # (1 - lambda) * image attention + lambda * prompt attention
    image_output = torch.lerp(
        backbone.attend(block, image_query, image_key, image_value, inputs.key_mask(query.dtype)),
        attend_prompts(backbone, block, image_query, prompt_key, prompt_value, static),
        prompt_weight,
    )
    if normed.shape[1] == num_image_tokens:
        return image_output, scores
    if prompt_attention:
        prompt_output = backbone.attend(block, query[:, :, num_image_tokens:], key, value, every_key_mask)
    else:
        prompt_output = normed[:, num_image_tokens:]  # prompts bypass attention: a_p = LN1(p)
    return torch.cat([image_output, prompt_output], dim=1), scores


def _joined(image: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Image and prompt queries or keys ``[B, H, n, d]`` in one tensor again (no copy when there are no prompts)."""
    return image if prompts.shape[2] == 0 else torch.cat([image, prompts], dim=2)


def attend_prompts(
    backbone: Backbone,
    block: nn.Module,
    image_query: torch.Tensor,
    prompt_key: torch.Tensor,
    prompt_value: torch.Tensor,
    static: Optional[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The image queries' softmax over the prompt keys: the sample's own and the shared path's, ``[B, N, H*d]``.

    Keys shared by the whole batch, alone, are attended by all samples at once: the batch folds into the query rows
    (a view), so no sample gets a copy of them. Otherwise they are broadcast into one key set per sample, next to the
    sample's attribute-prompt keys, as one softmax needs.
    """
    if static is None:
        return backbone.attend(block, image_query, prompt_key, prompt_value)
    static_key, static_value = static
    batch_size, num_heads, num_queries, head_dim = image_query.shape
    if prompt_key.shape[2] == 0 and static_key.shape[0] == 1:
        folded = image_query.transpose(1, 2).reshape(1, batch_size * num_queries, num_heads, head_dim)
        attended = backbone.attend(block, folded.transpose(1, 2), static_key, static_value)
        return attended.view(batch_size, num_queries, -1)
    if prompt_key.shape[2] == 0:
        return backbone.attend(block, image_query, static_key, static_value)
    key = torch.cat([static_key.expand(batch_size, -1, -1, -1), prompt_key], dim=2)
    value = torch.cat([static_value.expand(batch_size, -1, -1, -1), prompt_value], dim=2)
    return backbone.attend(block, image_query, key, value)
