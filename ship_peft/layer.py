# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""SHIP's forward pass (``docs/method.md`` §2-§4) on any supported backbone family.

:class:`ShipPrompts` holds one adapter's tensors; :class:`ShipLayer` is the PEFT tuner layer that wraps a backbone's
block sequence and runs its blocks with prompt tokens appended after the image tokens, through the family's seam
(:mod:`ship_peft.backbones`). The pre-trained weights are used as they are and never modified.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .backbones import Backbone
from .config import ShipConfig
from .constants import SHIP_PREFIX

#: PEFT's name for "no adapter" in ``adapter_names`` (mixed-adapter batches).
BASE_ADAPTER = "__base__"

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
    """docs/method.md §4: mean over batch and prompts of ``min_t (1 - cos(prompt, image_token_t))``."""
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
        #: the adapter's config (the ``peft_config`` entry itself): its hyper-parameters are read from there
        self.config = config
        # the layout the tensors below are built for
        self.prompt_layers: tuple[int, ...] = tuple(config.prompt_layers)
        self.attribute_layers: tuple[int, ...] = tuple(config.attribute_layers())

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
        """docs/method.md §2: ``beta * softmax(cos(X, prototypes)) @ prototypes + (1 - beta) * AP[k]``.

        ``top_tokens`` ``[B, A, D]`` are the previous layer's output tokens with the highest CLS scores, best first.
        """
        if top_tokens.shape[1] < self.config.num_attribute_prompts:
            raise ValueError(
                f"num_attribute_prompts={self.config.num_attribute_prompts} exceeds the {top_tokens.shape[1]} image "
                f"tokens (CLS + patches) the attribute prompts are drawn from; lower "
                f"`ShipConfig.num_attribute_prompts`."
            )
        prototypes = self.prototypes.to(top_tokens.dtype)
        pattern = _cosine(top_tokens, prototypes).softmax(dim=-1) @ prototypes
        attribute = self.attribute_prompts[self.attribute_layers.index(layer_index)].to(top_tokens.dtype)
        return self.config.attribute_mix * pattern + (1.0 - self.config.attribute_mix) * attribute

    def static_prompts(self, layer_index: int, carried: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The input-independent prompts entering layer ``layer_index`` (``docs/method.md`` §2), ``[1 or B, K+S, D]``:
        ``[SIP_g ; SSP]`` where level ``g`` starts, else ``[carried ; SSP]``.

        ``carried`` holds the previous layer's semantic-prompt outputs (its shared-prompt outputs already dropped).
        """
        level = self.level_of(layer_index)
        semantic = carried if level is None else self.semantic_prompts[level].to(dtype)[None]
        if self.shared_prompts is None:
            return semantic
        shared = self.shared_prompts.to(dtype)[None].expand(semantic.shape[0], -1, -1)
        return torch.cat([semantic, shared], dim=1)

    def attribute_tokens(
        self, layer_index: int, carried: Optional[torch.Tensor], top_tokens: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """The attribute prompts entering layer ``layer_index``, ``[B, A, D]`` (None if none): fresh at an attribute
        layer, dropped where another level starts, else the previous layer's attribute-prompt outputs ``carried``."""
        if self.level_of(layer_index) is None:
            return carried
        return self.attribute_prompts_for(layer_index, top_tokens) if layer_index in self.attribute_layers else None

    def carries_to(self, layer_index: int) -> bool:
        """Whether prompt outputs flow into layer ``layer_index`` (False where a level starts: they are dropped)."""
        return self.level_of(layer_index) is None


def leading(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """The first ``length`` entries of ``tensor`` along ``dim``; the tensor itself when that is all of it, so that
    autograd records no slice (whose backward writes the gradient into a zero-filled copy)."""
    return tensor if tensor.shape[dim] == length else tensor.narrow(dim, 0, length)


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


class StaticPath(NamedTuple):
    """The semantic and shared prompts' path through the blocks, run once for the whole batch.

    ``keys_values[i]``: their keys and values in layer ``i``, ``[1, H, K+S, d]`` each; ``last_inputs``: the tokens
    entering the last layer ``[1, K+S, D]``, when its prompt outputs are needed (the matching loss), else None.
    """

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    last_inputs: Optional[torch.Tensor]


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
        #: per adapter, PEFT's ``autocast_adapter_dtype`` (True: float16/bfloat16 blocks get float32 prompts)
        self.autocast_adapter_dtype: dict[str, bool] = {}
        # every PEFT tuner layer has these; SHIP wraps a block sequence, which has neither
        self.in_features: Optional[int] = None
        self.out_features: Optional[int] = None
        self.use_prompt_cache = False
        #: the memoised shared path of each adapter (by its ``ShipPrompts``' id): its key and value
        self._prompt_cache: dict[int, tuple[tuple, StaticPath]] = {}
        #: shared paths fixed by :func:`ship_peft.export.exportable_model` (by ``ShipPrompts`` id), used in eval
        self.frozen_static_paths: dict[int, StaticPath] = {}
        #: one adapter name per sample during a mixed-adapter call (``"__base__"``: the plain backbone), else None
        self.mixed_adapter_names: Optional[list[str]] = None
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
        if config.prompt_layers is None:
            return
        self.ship_prompts[adapter_name] = ShipPrompts(config, self.hidden_size)
        self.place_adapter(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def place_adapter(self, adapter_name: str) -> None:
        """Put adapter ``adapter_name``'s tensors on the blocks' device and dtype, as PEFT does for LoRA, except that
        float16/bfloat16 blocks get float32 prompts unless the adapter was created with
        ``autocast_adapter_dtype=False``. Adapters created on the meta device (``low_cpu_mem_usage``) stay there."""
        prompts = self.ship_prompts[adapter_name]
        if any(tensor.is_meta for tensor in prompts.parameters()):
            return
        reference = next(self.base_layer.parameters())
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        if dtype in (torch.float16, torch.bfloat16) and self.autocast_adapter_dtype.get(adapter_name, True):
            dtype = torch.float32
        prompts.to(device=reference.device, dtype=dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` and everything the layer keeps for it."""
        super().delete_adapter(adapter_name)
        self._configs.pop(adapter_name, None)
        self.autocast_adapter_dtype.pop(adapter_name, None)
        self._prompt_cache = {}

    def _prompts_for_forward(self) -> ShipPrompts:
        if len(self.active_adapters) != 1:
            raise ValueError(
                f"SHIP runs one adapter at a time, but {self.active_adapters} are active; call "
                f"`model.set_adapter(name)` with one name, or pass `adapter_names=[...]` (one per sample) in eval."
            )
        return self.prompts_of(self.active_adapters[0])

    def prompts_of(self, name: str) -> ShipPrompts:
        """Adapter ``name``'s tensors, or a clear error when it waits for calibration."""
        if name not in self.ship_prompts:
            raise RuntimeError(
                f"SHIP adapter {name!r} has no semantic levels yet (`prompt_layers` is None). Call "
                f"`ship_peft.initialize_ship_weights(model, dataloader)` on your training data first, or give "
                f"`ShipConfig(prompt_layers=[0, ...])`."
            )
        return self.ship_prompts[name]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``hidden_states`` ``[B, N, D]``: the image tokens entering the first block; returns those after the last.

        Further arguments are what the host passes to each block; SHIP takes no attention mask. During a
        mixed-adapter call (``mixed_adapter_names``, set by :class:`~ship_peft.ShipModel`) every sample runs through
        its own adapter.
        """
        if self.disable_adapters or not self.active_adapters:
            return self.backbone.run_blocks(self, hidden_states, *args, **kwargs)
        check_block_arguments(args, kwargs)
        if self.mixed_adapter_names is not None:
            return self._mixed_batch_forward(hidden_states, self.mixed_adapter_names, *args, **kwargs)
        return self._adapter_forward(self._prompts_for_forward(), hidden_states)

    def _adapter_forward(self, prompts: ShipPrompts, hidden_states: torch.Tensor) -> torch.Tensor:
        """The blocks with one adapter's prompts (the matching loss goes to ``matching_losses`` in training)."""
        want_matching = self.training and prompts.config.matching_loss_weight > 0
        static = self._static_path(prompts, hidden_states, want_matching) if self._shares_prompts(prompts) else None
        image_tokens, matching_loss = self._encode(hidden_states, prompts, static, want_matching)
        if matching_loss is not None and self.matching_losses is not None:
            self.matching_losses.append(matching_loss)
        return image_tokens

    def _mixed_batch_forward(
        self, hidden_states: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Every sample through its own adapter (``"__base__"``: the plain blocks), as PEFT's LoRA does with
        ``adapter_names``: one sub-batch per adapter; with the prompt cache, each adapter's shared path is kept."""
        output = torch.empty_like(hidden_states)
        for name in dict.fromkeys(adapter_names):
            rows = [row for row, sample_adapter in enumerate(adapter_names) if sample_adapter == name]
            index = torch.tensor(rows, device=hidden_states.device)
            group = hidden_states.index_select(0, index)
            if name == BASE_ADAPTER:
                result = self.backbone.run_blocks(self, group, *args, **kwargs)
            else:
                result = self._adapter_forward(self.prompts_of(name), group)
            output.index_copy_(0, index, result)
        return output

    def _shares_prompts(self, prompts: ShipPrompts) -> bool:
        """Whether the semantic and shared prompts take the same path for every sample, so that it runs once.

        With decoupled attention they never read the image before the last layer (they bypass attention), so their
        path is the same for all samples, unless training draws random numbers per sample on it: SHIP's stochastic
        depth or the backbone's own dropout or stochastic depth. Then each sample runs its own copy, as the method
        is written.
        """
        if not prompts.config.decoupled_attention:
            return False
        if not self.training:
            return True
        return prompts.config.drop_path_rate == 0 and not any(map(self.backbone.is_stochastic, self.blocks))

    def _static_path(self, prompts: ShipPrompts, image_tokens: torch.Tensor, want_matching: bool) -> StaticPath:
        """The semantic and shared prompts' path through the blocks, for the whole batch at once.

        In training it runs in every forward, with autograd, so the prompts' gradients sum over the batch. In eval
        with the prompt cache (:meth:`ShipModel.enable_prompt_cache`) it is memoised, and rebuilt whenever a prompt or
        backbone tensor, the dtype, the device or autocast changes (the key reads host-side counters only:
        ``data_ptr`` and ``_version``, no device value). Under ``torch.compile`` it is part of the graph instead.
        """
        if id(prompts) in self.frozen_static_paths and not self.training:
            return self.frozen_static_paths[id(prompts)]  # fixed for an exported graph (ship_peft.export)
        if not self.use_prompt_cache or self.training or torch.compiler.is_compiling():
            return self._run_static_prompts(prompts, image_tokens.dtype, want_matching)
        tensors = [*prompts.parameters(), *self.base_layer.parameters()]
        key = (
            id(prompts),
            image_tokens.dtype,
            image_tokens.device,
            torch.is_autocast_enabled(image_tokens.device.type),
            tuple((tensor.data_ptr(), tensor._version) for tensor in tensors),
        )
        cached = self._prompt_cache.get(id(prompts))
        if cached is None or cached[0] != key:
            with torch.no_grad():
                static = self._run_static_prompts(prompts, image_tokens.dtype, False)
            cached = self._prompt_cache[id(prompts)] = (key, static)
        return cached[1]

    def _run_static_prompts(self, prompts: ShipPrompts, dtype: torch.dtype, keep_last_inputs: bool) -> StaticPath:
        """Run the semantic and shared prompts through the blocks at batch size 1 (``docs/method.md`` §3: they bypass
        attention, ``a_p = LN1(p)``).

        Only the work whose result is used is done: every layer's keys and values, and the rest of a block only for
        the semantic prompts that flow on to the next layer (shared-prompt outputs are replaced by fresh ones at every
        layer, and a level's outputs are dropped where the next level starts). The last layer's prompts attend to
        every sample's tokens, so they are returned as they enter it (``keep_last_inputs``) for the per-sample pass.
        """
        keys_values, carried, tokens = [], None, None
        last = self.num_layers - 1
        for index, block in enumerate(self.blocks):
            tokens = prompts.static_prompts(index, carried, dtype)
            normed = self.backbone.norm1(block, tokens)
            keys_values.append(self.backbone.key_value(block, normed))
            if index < last and prompts.carries_to(index + 1):
                semantic = tokens.shape[1] - prompts.config.num_shared_prompts
                carried = self._residual_update(block, tokens[:, :semantic], normed[:, :semantic])
        return StaticPath(keys_values, tokens if keep_last_inputs else None)

    def _encode(
        self,
        image_tokens: torch.Tensor,
        prompts: ShipPrompts,
        static: Optional[StaticPath],
        want_matching: bool,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run every block with its prompts; returns the last block's image tokens and the matching loss.

        Each sample's tokens are ``[image ; semantic and shared prompts ; attribute prompts]``. With ``static`` (the
        shared path) the semantic and shared prompts are not among them: their keys and values per layer are given,
        shared by every sample, and they join the sample's tokens only in the last layer when the matching loss needs
        their outputs.
        """
        num_image_tokens = image_tokens.shape[1]
        last = self.num_layers - 1
        checkpoint = self.backbone.gradient_checkpointing(self) if self.training and torch.is_grad_enabled() else None
        semantic, attribute, top_tokens, scores = None, None, None, None
        for index, block in enumerate(self.blocks):
            attribute = prompts.attribute_tokens(index, attribute, top_tokens)
            tokens, static_state, num_static, keep = self._layer_inputs(
                index, prompts, image_tokens, semantic, attribute, static, want_matching
            )
            step = partial(
                self._layer_forward,
                block,
                num_image_tokens=num_image_tokens,
                prompts=prompts,
                prompt_attention=index == last and want_matching,  # prompt outputs feed only the matching loss
                need_scores=(index + 1) in prompts.attribute_layers or (index == last and want_matching),
                keep=keep,
                drop_rate=self._drop_rate(prompts, index),
            )
            tokens, scores = checkpoint(step, tokens, *static_state) if checkpoint else step(tokens, *static_state)
            block_input, image_tokens = image_tokens, leading(tokens, num_image_tokens, 1)
            replay_forward_hooks(block, block_input, image_tokens)
            end_of_static = num_image_tokens + num_static
            semantic = tokens[:, num_image_tokens : end_of_static - prompts.config.num_shared_prompts]
            attribute = tokens[:, end_of_static:] if tokens.shape[1] > end_of_static else None
            if (index + 1) in prompts.attribute_layers:
                top_tokens = gather_top_tokens(image_tokens, scores, prompts.config.num_attribute_prompts)
        if not want_matching:
            return image_tokens, None
        top_tokens = gather_top_tokens(image_tokens, scores, prompts.config.matching_top_k)
        return image_tokens, prompt_matching_loss(tokens[:, num_image_tokens:], top_tokens)

    def _layer_inputs(
        self,
        index: int,
        prompts: ShipPrompts,
        image_tokens: torch.Tensor,
        semantic: Optional[torch.Tensor],
        attribute: Optional[torch.Tensor],
        static: Optional[StaticPath],
        want_matching: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int, int]:
        """What every sample takes into layer ``index``: its tokens ``[image ; static prompts ; attribute prompts]``,
        the shared path's keys and values it attends to (empty when it carries the static prompts itself), the number
        of static prompts among its tokens, and how many of its leading tokens' outputs are needed after the layer.

        ``semantic`` / ``attribute``: the previous layer's semantic- and attribute-prompt outputs of this sample.
        """
        batch_size, num_image_tokens, _ = image_tokens.shape
        last = self.num_layers - 1
        static_state, static_tokens = (), None
        if static is None:
            static_tokens = prompts.static_prompts(index, semantic, image_tokens.dtype).expand(batch_size, -1, -1)
        elif index == last and want_matching:  # the prompts attend to each sample's tokens
            static_tokens = static.last_inputs.expand(batch_size, -1, -1)
        else:
            static_state = static.keys_values[index]
        prompt_tokens = [part for part in (static_tokens, attribute) if part is not None]
        tokens = torch.cat([image_tokens, *prompt_tokens], dim=1) if prompt_tokens else image_tokens
        num_static = 0 if static_tokens is None else static_tokens.shape[1]
        keep = tokens.shape[1]  # the per-sample path computes every output, as the method is written
        if static_state and not (index < last and prompts.carries_to(index + 1)):
            keep = num_image_tokens  # the attribute-prompt outputs are dropped after this layer
        return tokens, static_state, num_static, keep

    def _drop_rate(self, prompts: ShipPrompts, index: int) -> float:
        """Stochastic-depth rate of layer ``index`` in training: linear from 0 (first) to the configured rate (last)."""
        return prompts.config.drop_path_rate * index / max(self.num_layers - 1, 1) if self.training else 0.0

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
        static_key: Optional[torch.Tensor] = None,
        static_value: Optional[torch.Tensor] = None,
        *,
        num_image_tokens: int,
        prompts: ShipPrompts,
        prompt_attention: bool,
        need_scores: bool,
        keep: int,
        drop_rate: float = 0.0,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One pre-norm block on ``[image ; prompt]`` tokens with SHIP's attention (``docs/method.md`` §3) and
        stochastic depth ``drop_rate`` (§6). ``static_key`` / ``static_value`` ``[1, H, P, d]`` are the shared path's
        prompt keys and values, attended by every sample's image queries.

        Returns the outputs of the first ``keep`` tokens (the others are not needed) and, if ``need_scores``, the CLS
        query's pre-softmax scores over the image keys.
        """
        normed = self.backbone.norm1(block, tokens)
        static_state = None if static_key is None else (static_key, static_value)
        attended, scores = self._attention(
            block, normed, num_image_tokens, prompts, prompt_attention, need_scores, static_state
        )
        return self._residual_update(block, leading(tokens, keep, 1), leading(attended, keep, 1), drop_rate), scores

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

        ``static_state`` holds the shared path's prompt keys and values ``[1, H, P_static, d]``, which join the
        sample's own prompt keys.
        """
        backbone = self.backbone
        queries_all = prompt_attention or not prompts.config.decoupled_attention
        query = backbone.query(block, normed if queries_all else leading(normed, num_image_tokens, 1))
        key, value = backbone.key_value(block, normed)
        image_query = leading(query, num_image_tokens, 2)
        image_key, prompt_key = leading(key, num_image_tokens, 2), key[:, :, num_image_tokens:]
        image_value, prompt_value = leading(value, num_image_tokens, 2), value[:, :, num_image_tokens:]
        scores = cls_scores(image_query, image_key, backbone.scaling(block)) if need_scores else None

        if not prompts.config.decoupled_attention:
            return backbone.attend(block, query, key, value), scores

        # (1 - lambda) * image attention + lambda * prompt attention
        image_output = torch.lerp(
            backbone.attend(block, image_query, image_key, image_value),
            self._attend_prompts(block, image_query, prompt_key, prompt_value, static_state),
            prompts.config.prompt_attention_weight,
        )
        if normed.shape[1] == num_image_tokens:
            return image_output, scores
        if prompt_attention:
            prompt_output = backbone.attend(block, query[:, :, num_image_tokens:], key, value)
        else:
            prompt_output = normed[:, num_image_tokens:]  # prompts bypass attention: a_p = LN1(p)
        return torch.cat([image_output, prompt_output], dim=1), scores

    def _attend_prompts(
        self,
        block: nn.Module,
        image_query: torch.Tensor,
        prompt_key: torch.Tensor,
        prompt_value: torch.Tensor,
        static_state: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The image queries' softmax over the prompt keys: the sample's own and the shared path's, ``[B, N, H*d]``.

        Shared keys alone are attended by all samples at once: the batch folds into the query rows (a view), so no
        sample gets a copy of them. Next to per-sample attribute-prompt keys they are broadcast into one key set per
        sample, as one softmax needs.
        """
        if static_state is None:
            return self.backbone.attend(block, image_query, prompt_key, prompt_value)
        static_key, static_value = static_state
        batch_size, num_heads, num_queries, head_dim = image_query.shape
        if prompt_key.shape[2] == 0:
            folded = image_query.transpose(1, 2).reshape(1, batch_size * num_queries, num_heads, head_dim)
            attended = self.backbone.attend(block, folded.transpose(1, 2), static_key, static_value)
            return attended.view(batch_size, num_queries, -1)
        key = torch.cat([static_key.expand(batch_size, -1, -1, -1), prompt_key], dim=2)
        value = torch.cat([static_value.expand(batch_size, -1, -1, -1), prompt_value], dim=2)
        return self.backbone.attend(block, image_query, key, value)

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "SHIP's prompts are extra tokens, not weight deltas: they cannot be merged into the backbone. Keep the "
            "adapter loaded (PeftModel) for inference."
        )

    def unmerge(self) -> None:
        """Nothing to do: SHIP adapters are never merged (PEFT's layers warn likewise when not merged)."""
        warnings.warn("Already unmerged. Nothing to do.")

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """For PEFT's ``unload()``: the plain block sequence (``merge`` raises: SHIP cannot merge)."""
        if merge:
            self.merge()
        return self.base_layer

    def __repr__(self) -> str:
        return "ship." + super().__repr__()


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
