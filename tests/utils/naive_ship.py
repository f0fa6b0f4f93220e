# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""A deliberately naive SHIP forward pass (docs/method.md §2-§4), the test oracle of ``test_forward_naive.py``.

It is written from the method text alone and imports nothing from ``ship_peft``: it only reads the weights of a plain
transformers ``ViTForImageClassification`` (embeddings, every layer's two LayerNorms, q/k/v/o projections and MLP,
the final LayerNorm and the classifier) and takes the prompt tensors as plain tensors. Everything is spelled out:
a python loop over the layers, a python loop over the heads, attention as ``softmax(q k^T / sqrt(d)) v`` with matmul,
``torch.topk`` (descending) for every top-k choice and ``F.cosine_similarity`` for every cosine. It is slow on
purpose; use it on tiny models only.

It assumes no dropout (the backbone's dropout probabilities are 0, as in the tiny test models) and exact GELU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: eps of every cosine similarity (docs/method.md §2 and §4).
COSINE_EPS = 1e-8


@dataclass
class NaivePrompts:
    """The tensors of one SHIP adapter, as plain tensors.

    ``semantic_prompts[g]`` ``[K, D]`` (SIP of level g); ``shared_prompts`` ``[S, D]`` or None (SSP);
    ``attribute_prompts`` ``[A_lv, A, D]`` or None (AP); ``prototypes`` ``[M, D]`` or None.
    """

    semantic_prompts: list[Tensor]
    shared_prompts: Optional[Tensor]
    attribute_prompts: Optional[Tensor]
    prototypes: Optional[Tensor]


@dataclass
class NaiveHyperParameters:
    """SHIP's hyper-parameters (names as in docs/method.md)."""

    prompt_layers: list[int]
    num_attribute_layers: int = 2  # A_lv
    prompt_attention_weight: float = 0.1  # lambda
    attribute_mix: float = 0.1  # beta
    matching_top_k: int = 10  # T
    decoupled_attention: bool = True
    matching_loss_weight: float = 0.5


@dataclass
class TopKChoice:
    """One top-k choice of image tokens by CLS score, kept so that tests can check it is not a near-tie.

    ``sorted_scores`` ``[B, N]`` are all N scores in descending order; ``order_matters`` is True when the order of the
    chosen tokens matters (attribute prompts), False when only the chosen set matters (matching loss).
    """

    purpose: str
    sorted_scores: Tensor
    k: int
    order_matters: bool

    def margin(self) -> float:
        """Smallest score gap that decides the choice (inf when every token is chosen and order does not matter)."""
        num_tokens = self.sorted_scores.shape[-1]
        gaps = self.sorted_scores[:, :-1] - self.sorted_scores[:, 1:]  # gap r: between rank r and rank r+1
        if self.order_matters:
            deciding = gaps[:, : min(self.k, num_tokens - 1)]  # ranks 0..k-1 among themselves and rank k-1 vs k
        elif self.k < num_tokens:
            deciding = gaps[:, self.k - 1 : self.k]  # only the boundary between chosen and not chosen
        else:
            return math.inf
        return deciding.min().item() if deciding.numel() else math.inf


@dataclass
class NaiveOutput:
    """Logits, cross-entropy, matching loss (None in eval mode), total loss, and every top-k choice made."""

    logits: Tensor
    classification_loss: Optional[Tensor]
    matching_loss: Optional[Tensor]
    loss: Optional[Tensor]
    choices: list[TopKChoice] = field(default_factory=list)


def attribute_layer_indices(prompt_layers: list[int], num_attribute_layers: int) -> list[int]:
    """The last ``num_attribute_layers`` level starts that are > 0 (docs/method.md §2)."""
    starts_after_zero = [layer for layer in prompt_layers if layer > 0]
    if num_attribute_layers == 0:
        return []
    return starts_after_zero[-num_attribute_layers:]


# --------------------------------------------------------------------------------------------------------------------
# Building blocks, written out from the weights
# --------------------------------------------------------------------------------------------------------------------


def linear(x: Tensor, module: torch.nn.Linear) -> Tensor:
    """``x W^T + b``."""
    out = x @ module.weight.transpose(0, 1)
    return out + module.bias if module.bias is not None else out


def layer_norm(x: Tensor, module: torch.nn.Module) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * gamma + beta`` over the last dimension (biased variance); for an RMSNorm
    module (AIMv2: ``variance_epsilon``, no bias), ``x / sqrt(mean(x^2) + eps) * gamma``."""
    if hasattr(module, "variance_epsilon"):  # in float32 for any input, as AIMv2's RMSNorm computes it
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + module.variance_epsilon)
        return module.weight * normed.to(x.dtype)
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def mlp(layer, x: Tensor) -> Tensor:
    """``fc2(GELU(fc1(x)))`` with the exact (erf) GELU."""
    return linear(F.gelu(linear(x, layer.mlp.fc1)), layer.mlp.fc2)


@dataclass
class BlockParts:
    """The weights of one pre-norm block ``x + ls1 * o(attn(ln1(x))) ; x + ls2 * mlp(ln2(x))``, read by a family's
    test: ``q``, ``k``, ``v``, ``o`` are Linear modules, ``mlp`` a function written out from the weights, ``ls1`` /
    ``ls2`` layer-scale vectors or None."""

    ln1: torch.nn.LayerNorm
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    ln2: torch.nn.LayerNorm
    mlp: "callable"
    ls1: Optional[Tensor] = None
    ls2: Optional[Tensor] = None
    attention_norm: Optional[torch.nn.Module] = None  # a norm of the attention output before ``o`` (EVA-02)


def vit_parts(layer) -> BlockParts:
    """A transformers ViT layer's parts."""
    a = layer.attention
    return BlockParts(
        layer.layernorm_before, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.layernorm_after, lambda x: mlp(layer, x)
    )


def embed(vit, pixel_values: Tensor) -> Tensor:
    """ViT embeddings: patch projection (a strided convolution), CLS first, plus position embeddings, ``[B, N, D]``."""
    projection = vit.embeddings.patch_embeddings.projection
    patches = F.conv2d(pixel_values, projection.weight, projection.bias, stride=projection.stride)
    patches = patches.flatten(2).transpose(1, 2)  # [B, num_patches, D]
    cls = vit.embeddings.cls_token.expand(pixel_values.shape[0], -1, -1)
    return torch.cat([cls, patches], dim=1) + vit.embeddings.position_embeddings


def softmax_attention(query: Tensor, key: Tensor, value: Tensor, visible: Optional[Tensor] = None) -> Tensor:
    """One head: ``softmax(q k^T / sqrt(d)) v`` for ``q [B, n, d]``, ``k, v [B, m, d]`` -> ``[B, n, d]``, over the
    keys ``visible`` ``[B, m]`` lets every query see (None: all)."""
    scores = query @ key.transpose(1, 2) / math.sqrt(query.shape[-1])
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ value


@dataclass
class ImageLayout:
    """What a family's image tokens need beyond a ViT's: ``rotate`` (the host's rotary embedding of one head's image
    queries and keys ``[B, N, d]``; prompts carry no position), ``valid`` (``[B, N]``, False for padding) and the
    image ``summary`` that ranks the tokens: the CLS token, or the mean of the valid image tokens entering the layer,
    through LN1 and the query projection (docs/method.md §7)."""

    rotate: Optional[Callable[[Tensor], Tensor]] = None
    valid: Optional[Tensor] = None
    summary: str = "cls"

    def mean(self, tokens: Tensor) -> Tensor:
        """The mean of the valid rows of ``tokens [B, N, D]`` -> ``[B, 1, D]``."""
        weights = torch.ones(tokens.shape[:2], dtype=tokens.dtype) if self.valid is None else self.valid.to(tokens.dtype)
        return (tokens * weights[..., None]).sum(dim=1, keepdim=True) / weights.sum(dim=1)[:, None, None]


def top_tokens(tokens: Tensor, scores: Tensor, k: int) -> Tensor:
    """The ``k`` rows of ``tokens [B, N, D]`` with the highest ``scores [B, N]``, best first (torch.topk)."""
    index = torch.topk(scores, min(k, scores.shape[-1]), dim=-1, largest=True, sorted=True).indices
    rows = [tokens[b, index[b]] for b in range(tokens.shape[0])]
    return torch.stack(rows)


def record_choice(choices: list[TopKChoice], purpose: str, scores: Tensor, k: int, order_matters: bool) -> None:
    sorted_scores = torch.sort(scores.detach(), dim=-1, descending=True).values
    choices.append(TopKChoice(purpose, sorted_scores, k, order_matters))


# --------------------------------------------------------------------------------------------------------------------
# SHIP
# --------------------------------------------------------------------------------------------------------------------


def ship_layer(
    parts: BlockParts,
    image_tokens: Tensor,
    prompt_tokens: Tensor,
    num_heads: int,
    lam: float,
    decoupled: bool,
    is_last: bool,
    layout: ImageLayout = ImageLayout(),
) -> tuple[Tensor, Tensor]:
    """One pre-norm ViT layer on ``[x ; P]`` with SHIP's attention (docs/method.md §3), for image tokens laid out as
    ``layout`` says.

    Returns the layer output ``[B, N + P, D]`` and the image summary's pre-softmax scores over the ``N`` image keys,
    averaged over heads, ``[B, N]`` (padding: ``-inf``).
    """
    num_image = image_tokens.shape[1]
    tokens = torch.cat([image_tokens, prompt_tokens], dim=1)
    h = layer_norm(tokens, parts.ln1)
    h_v, h_p = h[:, :num_image], h[:, num_image:]
    hidden = h.shape[-1]
    head_dim = hidden // num_heads

    q, k, v = linear(h, parts.q), linear(h, parts.k), linear(h, parts.v)
    summary_q = linear(layer_norm(layout.mean(image_tokens), parts.ln1), parts.q) if layout.summary == "mean" else None
    valid = layout.valid
    visible = None if valid is None else torch.cat([valid, torch.ones_like(prompt_tokens[..., 0], dtype=torch.bool)], 1)
    image_outputs, prompt_outputs, cls_scores = [], [], []
    for head in range(num_heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        q_v, k_v, v_v = q[:, :num_image, cols], k[:, :num_image, cols], v[:, :num_image, cols]
        q_p, k_p, v_p = q[:, num_image:, cols], k[:, num_image:, cols], v[:, num_image:, cols]
        if layout.rotate is not None:
            q_v, k_v = layout.rotate(q_v), layout.rotate(k_v)
        k_all, v_all = torch.cat([k_v, k_p], dim=1), v[:, :, cols]
        q_summary = q_v[:, :1] if summary_q is None else summary_q[:, :, cols]
        cls_scores.append(q_summary @ k_v.transpose(1, 2) / math.sqrt(head_dim))  # [B, 1, N]
        if decoupled:
            image_outputs.append(
                (1 - lam) * softmax_attention(q_v, k_v, v_v, valid) + lam * softmax_attention(q_v, k_p, v_p)
            )
            if is_last:
                prompt_outputs.append(softmax_attention(q_p, k_all, v_all, visible))
        else:
            image_outputs.append(softmax_attention(q_v, k_all, v_all, visible))
            prompt_outputs.append(softmax_attention(q_p, k_all, v_all, visible))

    a_v = torch.cat(image_outputs, dim=-1)
    if decoupled and not is_last:
        a_p = h_p  # prompts bypass attention: not even W_v is applied
    else:
        a_p = torch.cat(prompt_outputs, dim=-1)
    attended = torch.cat([a_v, a_p], dim=1)
    if parts.attention_norm is not None:
        attended = layer_norm(attended, parts.attention_norm)
    branch = linear(attended, parts.o)
    y = tokens + (branch if parts.ls1 is None else branch * parts.ls1)
    branch = parts.mlp(layer_norm(y, parts.ln2))
    out = y + (branch if parts.ls2 is None else branch * parts.ls2)
    scores = torch.stack(cls_scores, dim=0).mean(dim=0).squeeze(1)  # mean over heads -> [B, N]
    return out, scores if valid is None else scores.masked_fill(~valid, float("-inf"))


def attribute_prompts(top: Tensor, prototypes: Tensor, parameter: Tensor, beta: float) -> Tensor:
    """``beta * softmax_M(cos(X, prototypes)) @ prototypes + (1 - beta) * AP[k]`` for ``X = top [B, A, D]``."""
    cos = F.cosine_similarity(top.unsqueeze(2), prototypes[None, None], dim=-1, eps=COSINE_EPS)  # [B, A, M]
    weights = torch.softmax(cos, dim=-1)
    pattern = weights @ prototypes  # [B, A, D]
    return beta * pattern + (1 - beta) * parameter


def matching_loss(prompt_outputs: Tensor, top_image: Tensor) -> Tensor:
    """``mean_{b, p} min_t (1 - cos(Z_p, V_t))`` (docs/method.md §4)."""
    cos = F.cosine_similarity(prompt_outputs.unsqueeze(2), top_image.unsqueeze(1), dim=-1, eps=COSINE_EPS)
    return (1 - cos).min(dim=-1).values.mean()


def prompts_entering(
    layer_index: int,
    level_starts: list[int],
    attribute_layers: list[int],
    prompts: NaivePrompts,
    previous_prompt_output: Optional[Tensor],
    attribute_tokens: Optional[Tensor],
    batch_size: int,
) -> Tensor:
    """The prompt tokens ``P`` entering layer ``layer_index`` (docs/method.md §2)."""
    num_shared = 0 if prompts.shared_prompts is None else prompts.shared_prompts.shape[0]
    if layer_index in level_starts:  # a level starts (always the case at layer 0): fresh SIP (+ AP)
        level = level_starts.index(layer_index)
        parts = [prompts.semantic_prompts[level].expand(batch_size, -1, -1)]
        if layer_index in attribute_layers:
            parts.append(attribute_tokens)
    else:  # the level flows on: drop the previous layer's last S tokens (its shared prompts)
        kept = previous_prompt_output.shape[1] - num_shared
        parts = [previous_prompt_output[:, :kept]]
    if prompts.shared_prompts is not None:
        parts.append(prompts.shared_prompts.expand(batch_size, -1, -1))
    return torch.cat(parts, dim=1)


def naive_ship_encoder(
    x: Tensor, parts: list[BlockParts], num_heads: int, prompts: NaivePrompts, hyper: NaiveHyperParameters,
    training: bool, choices: list[TopKChoice], layout: ImageLayout = ImageLayout(),
) -> tuple[Tensor, Optional[Tensor]]:
    """SHIP through the blocks ``parts`` from the image tokens ``x``: the last block's image tokens and, in training,
    the matching loss (docs/method.md §2-§4)."""
    assert hyper.prompt_layers[0] == 0
    attribute_layers = (
        attribute_layer_indices(hyper.prompt_layers, hyper.num_attribute_layers)
        if prompts.attribute_prompts is not None
        else []
    )
    if prompts.attribute_prompts is not None:
        assert prompts.attribute_prompts.shape[0] == len(attribute_layers)
    last = len(parts) - 1
    batch_size = x.shape[0]
    prompt_output, attribute_tokens, scores = None, None, None
    for i in range(len(parts)):
        if i in attribute_layers:  # from layer i-1's output and CLS scores, before any replacement
            num_attribute = prompts.attribute_prompts.shape[1]
            record_choice(choices, f"attribute prompts of layer {i}", scores, num_attribute, order_matters=True)
            top = top_tokens(x, scores, num_attribute)
            attribute_tokens = attribute_prompts(
                top, prompts.prototypes, prompts.attribute_prompts[attribute_layers.index(i)], hyper.attribute_mix
            )
        p = prompts_entering(
            i, hyper.prompt_layers, attribute_layers, prompts, prompt_output, attribute_tokens, batch_size
        )
        out, scores = ship_layer(
            parts[i],
            x,
            p,
            num_heads=num_heads,
            lam=hyper.prompt_attention_weight,
            decoupled=hyper.decoupled_attention,
            is_last=(i == last),
            layout=layout,
        )
        x, prompt_output = out[:, : x.shape[1]], out[:, x.shape[1] :]
    pml = None
    if training:
        record_choice(choices, "matching loss", scores, hyper.matching_top_k, order_matters=False)
        pml = matching_loss(prompt_output, top_tokens(x, scores, hyper.matching_top_k))
    return x, pml


def naive_output(
    logits: Tensor, labels: Optional[Tensor], pml: Optional[Tensor], hyper: NaiveHyperParameters, choices
) -> NaiveOutput:
    classification_loss = F.cross_entropy(logits, labels) if labels is not None else None
    loss = None
    if classification_loss is not None:
        loss = classification_loss + (hyper.matching_loss_weight * pml if pml is not None else 0.0)
    return NaiveOutput(logits, classification_loss, pml, loss, choices)


def naive_ship_forward(
    model,
    prompts: NaivePrompts,
    hyper: NaiveHyperParameters,
    pixel_values: Tensor,
    labels: Optional[Tensor] = None,
    training: bool = True,
) -> NaiveOutput:
    """SHIP on a plain ``ViTForImageClassification`` ``model`` (only its weights are read).

    In training mode the matching loss is computed and ``loss = CE + matching_loss_weight * matching_loss``; in eval
    mode ``matching_loss`` is None and ``loss`` is the cross-entropy. ``loss`` is None without labels.
    """
    vit, config = model.vit, model.config
    assert config.hidden_act == "gelu", "the naive oracle implements the exact GELU only"
    assert config.hidden_dropout_prob == 0 and config.attention_probs_dropout_prob == 0, "no dropout in the oracle"
    choices: list[TopKChoice] = []
    parts = [vit_parts(layer) for layer in vit.layers]
    x, pml = naive_ship_encoder(embed(vit, pixel_values), parts, config.num_attention_heads, prompts, hyper, training, choices)
    logits = linear(layer_norm(x, vit.layernorm)[:, 0], model.classifier)
    return naive_output(logits, labels, pml, hyper, choices)


def naive_ship_on_host(
    model, blocks, parts: list[BlockParts], num_heads: int, prompts: NaivePrompts, hyper: NaiveHyperParameters,
    pixel_values: Tensor, labels: Optional[Tensor] = None, training: bool = True,
    layout_of: Callable[[tuple, dict], ImageLayout] = lambda args, kwargs: ImageLayout(), **inputs: Tensor,
) -> NaiveOutput:
    """SHIP on any plain model whose blocks are ``blocks``: the model's own embeddings and head run, and a forward
    hook on the last block replaces its output with the naive SHIP encoder's (computed from the first block's
    input; ``layout_of`` reads the image layout from the other arguments the host gave it).
    ``model(pixel_values, **inputs)`` must return an output with ``logits`` or the logits."""
    choices: list[TopKChoice] = []
    captured: dict = {}

    def take_input(module, args, kwargs):
        captured.setdefault("x", args[0])
        captured.setdefault("layout", layout_of(args[1:], kwargs))

    def replace_output(module, args, output):
        x, captured["pml"] = naive_ship_encoder(
            captured["x"], parts, num_heads, prompts, hyper, training, choices, captured["layout"]
        )
        return x

    handles = [
        blocks[0].register_forward_pre_hook(take_input, with_kwargs=True),
        blocks[-1].register_forward_hook(replace_output),
    ]
    try:
        output = model(pixel_values, **inputs)
    finally:
        for handle in handles:
            handle.remove()
    logits = output if torch.is_tensor(output) else output.logits
    return naive_output(logits, labels, captured["pml"], hyper, choices)
