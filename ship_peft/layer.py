# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""SHIP's forward pass (``docs/method.md`` §2-§4) on any supported backbone family.

:class:`ShipPrompts` holds one adapter's tensors; :class:`ShipLayer` is the PEFT tuner layer that wraps a backbone's
block sequence and runs its blocks with prompt tokens appended after the image tokens, through the family's seam
(:mod:`ship_peft.backbones`). The pre-trained weights are used as they are and never modified.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .backbones import Backbone
from .config import ShipConfig
from .registration import SHIP_PREFIX

#: eps of the cosine similarities (attribute prompts and matching loss), as the reference's ``F.cosine_similarity``.
COSINE_EPS = 1e-8


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a [B, n, D]`` with every row of ``b [.., m, D]`` -> ``[B, n, m]``.

    Zero vectors give 0, never NaN.
    """
    eps = max(COSINE_EPS, torch.finfo(a.dtype).tiny)  # 1e-8 is 0 in float16
    return F.normalize(a, dim=-1, eps=eps) @ F.normalize(b, dim=-1, eps=eps).transpose(-1, -2)


def gather_top_tokens(tokens: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows of ``tokens [B, N, D]`` with the highest ``scores [B, N]``, best first -> ``[B, k, D]``."""
    index = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def prompt_matching_loss(prompt_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """SHIP_METHOD.md §5: mean over batch and prompts of ``min_t (1 - cos(prompt, image_token_t))``."""
    return (1.0 - _cosine(prompt_tokens, image_tokens)).amin(dim=-1).mean()


class ShipPrompts(nn.Module):
    """The tensors of one SHIP adapter, for a backbone of ``hidden_size`` and the levels in ``config``.

    * ``semantic_prompts[g]`` ``[K, D]``: semantic-independent prompts of level ``g`` (starting at
      ``prompt_layers[g]``);
    * ``shared_prompts`` ``[S, D]``: semantic-shared prompts, re-inserted at every layer (None when S = 0);
    * ``attribute_prompts`` ``[A_lv, A, D]``: one set per attribute layer (None without attribute layers);
    * ``prototypes`` ``[M, D]`` (buffer, saved, not trained): the k-means prototypes found by calibration.
    """

    def __init__(self, config: ShipConfig, hidden_size: int):
        super().__init__()
        self.prompt_layers: tuple[int, ...] = tuple(config.prompt_layers)
        self.attribute_layers: tuple[int, ...] = tuple(config.attribute_layers())
        self.decoupled_attention = config.decoupled_attention
        self.prompt_attention_weight = config.prompt_attention_weight
        self.attribute_mix = config.attribute_mix
        self.matching_loss_weight = config.matching_loss_weight
        self.matching_top_k = config.matching_top_k
        self.num_attribute_prompts = config.num_attribute_prompts
        self.num_shared_prompts = config.num_shared_prompts
        self.drop_path_rate = config.drop_path_rate

        self.semantic_prompts = nn.ParameterList(
            [self._xavier(config.num_prompts, hidden_size) for _ in self.prompt_layers]
        )
        self.shared_prompts = (
            self._kaiming(config.num_shared_prompts, hidden_size) if config.num_shared_prompts else None
        )
        self.attribute_prompts = (
            self._kaiming(len(self.attribute_layers), config.num_attribute_prompts, hidden_size)
            if self.attribute_layers
            else None
        )
        prototypes = torch.zeros(config.num_prototypes, hidden_size) if self.attribute_layers else None
        self.register_buffer("prototypes", prototypes, persistent=True)

    @staticmethod
    def _xavier(num_tokens: int, hidden_size: int) -> nn.Parameter:
        # The reference draws xavier-uniform on a [1, K, D] tensor (fan_in = K*D, fan_out = D).
        weight = torch.empty(1, num_tokens, hidden_size)
        nn.init.xavier_uniform_(weight)
        return nn.Parameter(weight[0])

    @staticmethod
    def _kaiming(*shape: int) -> nn.Parameter:
        weight = torch.empty(*shape)
        nn.init.kaiming_uniform_(weight, a=0)
        return nn.Parameter(weight)

    def level_of(self, layer_index: int) -> Optional[int]:
        """Index of the level that starts at ``layer_index``, or None if no level starts there."""
        return self.prompt_layers.index(layer_index) if layer_index in self.prompt_layers else None

    def attribute_prompts_for(self, layer_index: int, top_tokens: torch.Tensor) -> torch.Tensor:
        """SHIP_METHOD.md §4: ``beta * softmax(cos(X, prototypes)) @ prototypes + (1 - beta) * AP[k]``.

        ``top_tokens`` ``[B, A, D]`` are the previous layer's output tokens with the highest CLS scores, best first.
        """
        if top_tokens.shape[1] < self.num_attribute_prompts:
            raise ValueError(
                f"num_attribute_prompts={self.num_attribute_prompts} exceeds the {top_tokens.shape[1]} image tokens "
                f"(CLS + patches) the attribute prompts are drawn from; lower `ShipConfig.num_attribute_prompts`."
            )
        prototypes = self.prototypes.to(top_tokens.dtype)
        pattern = _cosine(top_tokens, prototypes).softmax(dim=-1) @ prototypes
        attribute = self.attribute_prompts[self.attribute_layers.index(layer_index)].to(top_tokens.dtype)
        return self.attribute_mix * pattern + (1.0 - self.attribute_mix) * attribute

    def layer_prompts(
        self,
        layer_index: int,
        carried: Optional[torch.Tensor],
        top_tokens: Optional[torch.Tensor],
        batch_size: int,
        dtype: torch.dtype,
        static: bool = True,
        dynamic: bool = True,
    ) -> Optional[torch.Tensor]:
        """The prompt tokens entering layer ``layer_index`` (SHIP_METHOD.md §4), ``[B, P, D]``.

        ``carried`` is the previous layer's prompt output; ``top_tokens`` its top-A image output tokens (needed only
        when this layer is an attribute layer). ``static`` selects the input-independent tokens (semantic and shared
        prompts), ``dynamic`` the attribute prompts; the prompt cache runs them separately (None if there are none).
        """
        parts = []
        level = self.level_of(layer_index)
        if level is None:
            num_shared = self.num_shared_prompts if static else 0
            if carried is not None:
                parts.append(carried[:, : carried.shape[1] - num_shared])
        else:
            if static:
                parts.append(self.semantic_prompts[level].to(dtype).expand(batch_size, -1, -1))
            if dynamic and layer_index in self.attribute_layers:
                parts.append(self.attribute_prompts_for(layer_index, top_tokens))
        if static and self.shared_prompts is not None:
            parts.append(self.shared_prompts.to(dtype).expand(batch_size, -1, -1))
        parts = [part for part in parts if part.shape[1]]
        if not parts:
            return None
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def drop_path(branch: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth (timm's ``DropPath``): zero a residual branch for a random ``rate`` share of the samples and
    scale it by ``1 / (1 - rate)`` for the others (``rate`` 0: the branch as it is)."""
    if rate == 0.0:
        return branch
    keep = 1.0 - rate
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
    return branch * mask.div_(keep)


def cls_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Pre-softmax attention scores of the CLS query over ``key``, averaged over heads: ``[B, H, N, d]`` -> ``[B, N]``.

    Only the CLS row is computed (``[B, H, 1, N]``), never the ``N x N`` matrix.
    """
    return (query[:, :, :1] @ key.transpose(-1, -2)).mul(scaling).mean(dim=1).squeeze(1)


def replay_forward_hooks(block: nn.Module, image_input: torch.Tensor, image_output: torch.Tensor) -> None:
    """Show ``block``'s forward hooks the image tokens SHIP ran through it, as if the block itself had run.

    transformers records ``output_hidden_states`` with such hooks, so its layout (image tokens only) is kept; users'
    feature hooks on a block see the same.
    """
    for hook_id, hook in list(block._forward_hooks.items()):
        if hook_id in block._forward_hooks_with_kwargs:
            hook(block, (image_input,), {}, image_output)
        else:
            hook(block, (image_input,), image_output)


class ShipLayer(nn.Module, BaseTunerLayer):
    """PEFT tuner layer that runs a backbone's block sequence with SHIP prompts.

    It replaces the block sequence in its host (``vit.layers``, ``dinov2.encoder.layer``, timm's ``blocks``, ...).
    The host iterates over it as over its blocks and finds one block: this layer, which takes the image tokens the
    host's embeddings made and returns the image tokens after the last block, so the host's final norm, pooler and
    head run as usual. With adapters disabled (``PeftModel.disable_adapter()``) it runs the plain blocks.

    During a ``PeftModel`` call, :class:`~ship_peft.ShipModel` collects the matching loss in ``matching_losses``.
    """

    adapter_layer_names = (SHIP_PREFIX,)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ShipConfig, backbone: Backbone):
        super().__init__()
        self.base_layer = base_layer
        self.backbone = backbone
        self.ship_prompts = nn.ModuleDict({})
        self._configs: dict[str, ShipConfig] = {}
        self._checked_prototypes: set[str] = set()
        self.use_prompt_cache = False
        self._prompt_cache: Optional[tuple[tuple, list[tuple[torch.Tensor, torch.Tensor]]]] = None
        self.matching_losses: Optional[list[torch.Tensor]] = None
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config)

    def __iter__(self) -> Iterator[nn.Module]:
        """The host loops over its block sequence: SHIP runs all blocks as one."""
        return iter((self,))

    @property
    def blocks(self) -> list[nn.Module]:
        """The backbone's blocks, in order."""
        return list(self.base_layer)

    @property
    def num_layers(self) -> int:
        return len(self.base_layer)

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size(self.blocks[0])

    def update_layer(self, adapter_name: str, config: ShipConfig) -> None:
        """(Re)build adapter ``adapter_name`` for ``config``; without ``prompt_layers`` it waits for calibration."""
        self._configs[adapter_name] = config
        self._checked_prototypes.discard(adapter_name)
        if config.prompt_layers is None:
            return
        self.ship_prompts[adapter_name] = ShipPrompts(config, self.hidden_size)
        device = next(self.base_layer.parameters()).device
        self._move_adapter_to_device_of_base_layer(adapter_name, device=device)  # skips meta (low_cpu_mem_usage)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _prompts_for_forward(self) -> ShipPrompts:
        if len(self.active_adapters) != 1:
            raise ValueError(
                f"SHIP runs one adapter at a time, but {self.active_adapters} are active; call "
                f"`model.set_adapter(name)` with one name."
            )
        name = self.active_adapters[0]
        if name not in self.ship_prompts:
            raise RuntimeError(
                f"SHIP adapter {name!r} has no semantic levels yet (`prompt_layers` is None). Call "
                f"`ship_peft.initialize_ship_weights(model, dataloader)` on your training data first, or give "
                f"`ShipConfig(prompt_layers=[0, ...])`."
            )
        prompts = self.ship_prompts[name]
        if prompts.prototypes is not None and name not in self._checked_prototypes:
            if not torch.any(prompts.prototypes != 0):
                raise RuntimeError(
                    f"SHIP adapter {name!r} has attribute prompts but no prototypes. Call "
                    f"`ship_peft.initialize_ship_weights(model, dataloader)` on your training data first (or set "
                    f"`num_attribute_layers=0`)."
                )
            self._checked_prototypes.add(name)
        return prompts

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``hidden_states`` ``[B, N, D]``: the image tokens entering the first block; returns those after the last.

        Further arguments are what the host passes to each block; SHIP takes no attention mask.
        """
        if self.disable_adapters or not self.active_adapters:
            return self.backbone.run_blocks(self, hidden_states, *args, **kwargs)
        check_block_arguments(args, kwargs)
        prompts = self._prompts_for_forward()
        static_states = self._static_states(prompts, hidden_states) if self._cache_applies(prompts) else None
        image_tokens, matching_loss = self._encode(hidden_states, prompts, static_states)
        if matching_loss is not None and self.matching_losses is not None:
            self.matching_losses.append(matching_loss)
        return image_tokens

    def _cache_applies(self, prompts: ShipPrompts) -> bool:
        return self.use_prompt_cache and not self.training and prompts.decoupled_attention

    def _static_states(
        self, prompts: ShipPrompts, image_tokens: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the semantic and shared prompts entering every layer (``docs/method.md``), cached.

        With decoupled attention these tokens never attend to the image (they bypass attention in every layer but
        the last, whose prompt outputs do not reach the logits), so they are the same for every input. The cache is
        rebuilt whenever a prompt or backbone tensor, the dtype, the device or autocast changes.
        """
        tensors = [*prompts.parameters(), *self.base_layer.parameters()]
        key = (
            id(prompts),
            image_tokens.dtype,
            image_tokens.device,
            torch.is_autocast_enabled(image_tokens.device.type),
            tuple((tensor.data_ptr(), tensor._version) for tensor in tensors),
        )
        if self._prompt_cache is None or self._prompt_cache[0] != key:
            with torch.no_grad():
                self._prompt_cache = (key, self._run_static_prompts(prompts, image_tokens.dtype))
        return self._prompt_cache[1]

    def _run_static_prompts(self, prompts: ShipPrompts, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        states, carried = [], None
        for index, block in enumerate(self.blocks):
            tokens = prompts.layer_prompts(index, carried, None, 1, dtype, dynamic=False)
            normed = self.backbone.norm1(block, tokens)
            states.append(self.backbone.key_value(block, normed))
            carried = self._residual_update(block, tokens, normed)  # prompts bypass attention: a_p = LN1(p)
        return states

    def _encode(
        self,
        image_tokens: torch.Tensor,
        prompts: ShipPrompts,
        static_states: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run every block with its prompts; returns the last block's image tokens and the matching loss.

        With ``static_states`` (the prompt cache, eval only) the semantic and shared prompts are not run: their keys
        and values per layer are given, and only the attribute prompts travel with the image tokens.
        """
        batch_size, num_image_tokens, _ = image_tokens.shape
        last = self.num_layers - 1
        cached = static_states is not None
        want_matching = self.training and prompts.matching_loss_weight > 0
        checkpoint = self.backbone.gradient_checkpointing(self) if self.training and torch.is_grad_enabled() else None
        carried, top_tokens, matching_loss = None, None, None
        for index, block in enumerate(self.blocks):
            prompt_tokens = prompts.layer_prompts(
                index, carried, top_tokens, batch_size, image_tokens.dtype, static=not cached
            )
            tokens = image_tokens if prompt_tokens is None else torch.cat([image_tokens, prompt_tokens], dim=1)
            need_scores = (index + 1) in prompts.attribute_layers or (index == last and want_matching)
            step = partial(
                self._layer_forward,
                block,
                num_image_tokens=num_image_tokens,
                prompts=prompts,
                prompt_attention=(index == last and not cached),
                need_scores=need_scores,
                static_state=static_states[index] if cached else None,
                drop_rate=self._drop_rate(prompts, index),
            )
            tokens, scores = checkpoint(step, tokens) if checkpoint is not None else step(tokens)
            replay_forward_hooks(block, image_tokens, tokens[:, :num_image_tokens])
            image_tokens, carried = tokens[:, :num_image_tokens], tokens[:, num_image_tokens:]
            if (index + 1) in prompts.attribute_layers:
                top_tokens = gather_top_tokens(image_tokens, scores, prompts.num_attribute_prompts)
        if want_matching:
            matching_loss = prompt_matching_loss(carried, gather_top_tokens(image_tokens, scores, prompts.matching_top_k))
        return image_tokens, matching_loss

    def _drop_rate(self, prompts: ShipPrompts, index: int) -> float:
        """Stochastic-depth rate of layer ``index`` in training: linear from 0 (first) to the configured rate (last)."""
        return prompts.drop_path_rate * index / max(self.num_layers - 1, 1) if self.training else 0.0

    def _residual_update(
        self, block: nn.Module, tokens: torch.Tensor, attended: torch.Tensor, drop_rate: float = 0.0
    ) -> torch.Tensor:
        """The rest of a pre-norm block after attention: ``y = x + branch_attn(a)``, ``out = y + branch_mlp(y)``, with
        SHIP's stochastic depth ``drop_rate`` on both residual branches."""
        tokens = tokens + drop_path(self.backbone.attention_branch(block, attended), drop_rate)
        return tokens + drop_path(self.backbone.mlp_branch(block, tokens), drop_rate)

    def _layer_forward(
        self,
        block: nn.Module,
        tokens: torch.Tensor,
        *,
        num_image_tokens: int,
        prompts: ShipPrompts,
        prompt_attention: bool,
        need_scores: bool,
        static_state: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        drop_rate: float = 0.0,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One pre-norm block on ``[image ; prompt]`` tokens with SHIP's attention (``docs/method.md`` §3) and
        stochastic depth ``drop_rate`` (§6).

        Returns the block output and, if ``need_scores``, the CLS query's pre-softmax scores over the image keys.
        """
        normed = self.backbone.norm1(block, tokens)
        attended, scores = self._attention(
            block, normed, num_image_tokens, prompts, prompt_attention, need_scores, static_state
        )
        return self._residual_update(block, tokens, attended, drop_rate), scores

    def _attention(
        self,
        block: nn.Module,
        normed: torch.Tensor,
        num_image_tokens: int,
        prompts: ShipPrompts,
        prompt_attention: bool,
        need_scores: bool,
        static_state: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention output (before the output projection) for every token, ``[B, N+P, H*d]``, and the CLS scores if
        asked.

        ``static_state`` holds cached prompt keys and values ``[1, H, P_static, d]`` that join the prompt keys.
        """
        backbone = self.backbone
        queries_all = prompt_attention or not prompts.decoupled_attention
        query = backbone.query(block, normed if queries_all else normed[:, :num_image_tokens])
        key, value = backbone.key_value(block, normed)
        image_query = query[:, :, :num_image_tokens]
        image_key, prompt_key = key[:, :, :num_image_tokens], key[:, :, num_image_tokens:]
        image_value, prompt_value = value[:, :, :num_image_tokens], value[:, :, num_image_tokens:]
        scores = cls_scores(image_query, image_key, backbone.scaling(block)) if need_scores else None
        if static_state is not None:
            batch_size = normed.shape[0]
            prompt_key = torch.cat([static_state[0].expand(batch_size, -1, -1, -1), prompt_key], dim=2)
            prompt_value = torch.cat([static_state[1].expand(batch_size, -1, -1, -1), prompt_value], dim=2)

        if not prompts.decoupled_attention:
            return backbone.attend(block, query, key, value), scores

        weight = prompts.prompt_attention_weight
        image_output = (1.0 - weight) * backbone.attend(block, image_query, image_key, image_value) + weight * (
            backbone.attend(block, image_query, prompt_key, prompt_value)
        )
        if prompt_attention:
            prompt_output = backbone.attend(block, query[:, :, num_image_tokens:], key, value)
        else:
            prompt_output = normed[:, num_image_tokens:]  # prompts bypass attention: a_p = LN1(p)
        return torch.cat([image_output, prompt_output], dim=1), scores

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "SHIP's prompts are extra tokens, not weight deltas: they cannot be merged into the backbone. Keep the "
            "adapter loaded (PeftModel) for inference."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("SHIP adapters are never merged, so there is nothing to unmerge.")

    def __repr__(self) -> str:
        return "ship." + super().__repr__()


def check_block_arguments(args: tuple, kwargs: dict) -> None:
    """Clear errors for what the host passes to its blocks that SHIP cannot honour (masks, attention maps)."""
    masks = [arg for arg in args if arg is not None] + [
        kwargs[name] for name in ("attention_mask", "attn_mask") if kwargs.get(name) is not None
    ]
    if masks or kwargs.get("is_causal"):
        raise NotImplementedError(
            "SHIP attends over all image and prompt tokens and takes no attention mask; call the model without "
            "`attention_mask`."
        )
    if kwargs.get("output_attentions"):
        raise NotImplementedError("SHIP does not return attention maps; call without `output_attentions`.")
