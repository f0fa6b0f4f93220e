# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""SHIP's PEFT tuner layers (``docs/method.md`` §2-§5) on any supported backbone family.

* :class:`ShipPrompts` holds one adapter's tensors.
* :class:`ShipPromptBank` keeps every adapter's :class:`ShipPrompts`, next to the host's block sequence (on the
  module that holds it), with the eval memo of the shared prompt path.
* :class:`ShipBlock` wraps one block of the host's sequence, the way LoRA wraps a ``Linear``: the host's own loop
  calls it with the image tokens and gets the block's image tokens back; inside, the block runs with SHIP's prompts
  appended (:mod:`ship_peft.functional`). What flows from one block to the next belongs to the call
  (:mod:`ship_peft.call`), never to a module.

The pre-trained weights are used as they are and never modified.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .backbones import Backbone
from .backbones.base import BlockInputs
from .call import (
    BlockPass,
    GroupState,
    close_pass,
    current_call,
    open_pass,
    remember_inputs,
    remembered_inputs,
    running_pass,
)
from .compat import run_forward_hooks
from .config import ShipConfig
from .functional import (
    NO_DROPS,
    block_forward,
    cosine,
    gather_top_tokens,
    leading,
    prompt_matching_loss,
    residual_update,
)
from .prompt_cache import PromptCache
from .stochastic_depth import LayerDrops, draw_drops

#: PEFT's name for "no adapter" in ``adapter_names`` (mixed-adapter batches).
BASE_ADAPTER = "__base__"


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
        pattern = cosine(top_tokens, prototypes).softmax(dim=-1) @ prototypes
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


class ShipTunerLayer(BaseTunerLayer):
    """What SHIP's two tuner layers share with every PEFT tuner layer. SHIP's prompts are extra tokens, not weight
    deltas: they are never merged into the backbone, and the layers have no ``in_features`` / ``out_features``."""

    in_features: Optional[int] = None
    out_features: Optional[int] = None

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "SHIP's prompts are extra tokens, not weight deltas: they cannot be merged into the backbone. Keep the "
            "adapter loaded (PeftModel) for inference."
        )

    def unmerge(self) -> None:
        """Nothing to do: SHIP adapters are never merged (PEFT's layers warn likewise when not merged)."""
        warnings.warn("Already unmerged. Nothing to do.")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT's hook after loading (``low_cpu_mem_usage``): a SHIP block has no tensors of its own."""


class ShipPromptBank(nn.Module, ShipTunerLayer):
    """Every SHIP adapter's tensors for one block sequence, registered as ``ship`` on the module that holds the
    sequence (``vit.ship``, timm's ``model.ship``), outside the blocks: the blocks read them during the forward.

    Per adapter, declared to PEFT as LoRA declares its own: ``ship_prompts`` (the :class:`ShipPrompts`; absent until
    calibration when ``prompt_layers`` is None), ``ship_config`` (the ``peft_config`` entry) and
    ``autocast_adapter_dtype``. It also keeps the eval memo of the shared prompt path (``prompt_cache``).
    """

    adapter_layer_names = ("ship_prompts",)
    other_param_names = ("ship_config", "autocast_adapter_dtype")

    def __init__(
        self, blocks: nn.ModuleList, backbone: Backbone, adapter_name: str, config: ShipConfig, class_token: bool = True
    ):
        super().__init__()
        self.backbone = backbone
        #: whether the host's first image token is a class token (the image summary ``"auto"`` then reads it)
        self.class_token = class_token
        #: the host's block sequence (a reference, not a child: the host owns it)
        self.block_sequence: tuple[nn.ModuleList] = (blocks,)
        self.ship_prompts = nn.ModuleDict({})
        self.ship_config: dict[str, ShipConfig] = {}
        #: per adapter, PEFT's ``autocast_adapter_dtype`` (True: float16/bfloat16 blocks get float32 prompts)
        self.autocast_adapter_dtype: dict[str, bool] = {}
        self.prompt_cache = PromptCache()
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config)

    @property
    def num_layers(self) -> int:
        return len(self.block_sequence[0])

    def base_blocks(self) -> list[nn.Module]:
        """The host's own blocks, in order."""
        return [getattr(block, "base_layer", block) for block in self.block_sequence[0]]

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size(self.base_blocks()[0])

    def update_layer(self, adapter_name: str, config: ShipConfig) -> None:
        """(Re)build adapter ``adapter_name`` for ``config``; without ``prompt_layers`` it waits for calibration."""
        self.summary_of(config)  # a clear error for a CLS summary without a class token
        self.ship_config[adapter_name] = config
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
        reference = next(self.base_blocks()[0].parameters())
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        if dtype in (torch.float16, torch.bfloat16) and self.autocast_adapter_dtype.get(adapter_name, True):
            dtype = torch.float32
        prompts.to(device=reference.device, dtype=dtype)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        if adapter_name in self.ship_prompts:
            self.place_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.prompt_cache.forget(adapter_name)

    def prompts_of(self, name: str) -> ShipPrompts:
        """Adapter ``name``'s tensors, or a clear error when it waits for calibration."""
        if name not in self.ship_prompts:
            raise RuntimeError(
                f"SHIP adapter {name!r} has no semantic levels yet (`prompt_layers` is None). Call "
                f"`ship_peft.initialize_ship_weights(model, dataloader)` on your training data first, or give "
                f"`ShipConfig(prompt_layers=[0, ...])`."
            )
        return self.ship_prompts[name]

    def shares_prompts(self, prompts: ShipPrompts, training: bool) -> bool:
        """Whether the semantic and shared prompts take the same path for every sample, so that it runs once.

        With decoupled attention they never read the image before the last layer (they bypass attention), so their
        path is the same for all samples, up to SHIP's stochastic depth: that runs the path once per history group
        (:mod:`ship_peft.stochastic_depth`). Random numbers the backbone's own modules draw per sample on the path
        (its dropout or stochastic depth, in training) cannot be grouped: then each sample runs its own copy, as the
        method is written.
        """
        if not prompts.config.decoupled_attention:
            return False
        return not training or not any(map(self.backbone.is_stochastic, self.base_blocks()))

    def start_group(self, name: str, rows: Optional[torch.Tensor], image_tokens: torch.Tensor) -> GroupState:
        """The state of adapter ``name``'s samples at the start of a pass, with its memoised shared path if any."""
        if name == BASE_ADAPTER:
            return GroupState(name, rows)
        prompts = self.prompts_of(name)
        group = GroupState(name, rows, prompts, shared=self.shares_prompts(prompts, self.training))
        group.want_matching = self.training and prompts.config.matching_loss_weight > 0
        if self.training and prompts.config.drop_path_rate > 0:
            batch_size = image_tokens.shape[0] if rows is None else rows.shape[0]
            group.drops = draw_drops(self.drop_rates(prompts), batch_size, prompts.prompt_layers, image_tokens.device)
        if group.shared and not self.training:
            cache = self.prompt_cache
            if cache.enabled and not torch.compiler.is_compiling():
                tensors = [*prompts.parameters(), *(p for block in self.base_blocks() for p in block.parameters())]
                group.cache_key = cache.key(tensors, image_tokens)
            group.cached_path = cache.lookup(name, group.cache_key)
            if group.cached_path is None and group.cache_key is not None:
                group.collected_path = []
        return group

    def summary_of(self, config: ShipConfig) -> str:
        """The image summary adapter ``config`` ranks image tokens by (``docs/method.md`` §7): ``"cls"`` or
        ``"mean"`` (``"auto"``: the class token where the backbone has one, else the mean)."""
        if config.image_summary == "auto":
            return "cls" if self.class_token else "mean"
        if config.image_summary == "cls" and not self.class_token:
            raise ValueError(
                "ShipConfig(image_summary='cls') needs a class token, but this backbone has none (it pools its image "
                "tokens); use image_summary='mean' or 'auto'."
            )
        return config.image_summary

    def drop_rates(self, prompts: ShipPrompts) -> list[float]:
        """SHIP's stochastic depth per layer: ``drop_path_rate * i / (L - 1)`` for layer ``i`` (docs/method.md §6)."""
        last = max(self.num_layers - 1, 1)
        return [prompts.config.drop_path_rate * index / last for index in range(self.num_layers)]

    def finish_group(self, group: GroupState) -> None:
        """At the end of a pass: memoise the shared path the group collected."""
        if group.collected_path is not None:
            self.prompt_cache.store(group.adapter_name, group.cache_key, group.collected_path)


class ShipBlock(nn.Module, ShipTunerLayer):
    """One block of the host's sequence with SHIP's prompts (``docs/method.md`` §2-§4), as LoRA's ``Linear`` wraps a
    ``Linear``: ``base_layer`` is the host's block, and the host's loop calls this module in its place.

    Its forward takes the image tokens entering block ``layer_index`` and returns those leaving it. The prompt tokens
    travel beside them, in the call's :class:`~ship_peft.call.BlockPass`: the first block opens it, each block reads
    and advances it, the last block closes it and hands the matching loss to the call. With adapters disabled it is
    the host's block, called as the host calls it.
    """

    other_param_names = ("ship_config",)

    def __init__(
        self, base_layer: nn.Module, bank: ShipPromptBank, layer_index: int, adapter_name: str, config: ShipConfig
    ):
        super().__init__()
        self.base_layer = base_layer
        #: the adapters' tensors (a reference, not a child: they are registered on the host)
        self.prompt_bank: tuple[ShipPromptBank] = (bank,)
        self.layer_index = layer_index
        self.ship_config: dict[str, ShipConfig] = {}
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config)

    @property
    def bank(self) -> ShipPromptBank:
        return self.prompt_bank[0]

    def update_layer(self, adapter_name: str, config: ShipConfig) -> None:
        self.ship_config[adapter_name] = config
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``hidden_states`` ``[B, N, D]``: the image tokens entering this block; returns those leaving it.

        Further arguments are what the host passes to its blocks; SHIP takes no attention mask.
        """
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        inputs = self.bank.backbone.block_inputs(self.base_layer, args, kwargs)
        recording = self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        remembered = remembered_inputs(hidden_states) if recording else None
        if remembered is not None:  # the host's checkpointing recomputes this call in backward
            return self._run_groups(remembered, hidden_states, args, kwargs, inputs)
        block_pass = self._open_pass(hidden_states) if self.layer_index == 0 else self._running_pass()
        if recording:
            remember_inputs(hidden_states, block_pass)
        output = self._run_groups(block_pass, hidden_states, args, kwargs, inputs)
        if self.layer_index == self.bank.num_layers - 1:
            self._close_pass(block_pass)
        run_forward_hooks(self.base_layer, hidden_states, output)  # transformers' output_hidden_states
        return output

    def _open_pass(self, image_tokens: torch.Tensor) -> BlockPass:
        """The first block starts the pass: one group for the active adapter, or one per adapter of a mixed batch
        (``adapter_names`` of the call, as LoRA takes them)."""
        call = current_call()
        names = None if call is None else call.adapter_names
        if names is None:
            groups = [self.bank.start_group(self._single_active_adapter(), None, image_tokens)]
            groups[0].recorded_scores = None if call is None else call.summary_scores
        else:
            groups = [
                self.bank.start_group(name, self._rows_of(names, name, image_tokens.device), image_tokens)
                for name in dict.fromkeys(names)
            ]
        block_pass = BlockPass(groups)
        open_pass(block_pass)
        return block_pass

    @staticmethod
    def _rows_of(names: list[str], name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor([row for row, sample_name in enumerate(names) if sample_name == name], device=device)

    def _single_active_adapter(self) -> str:
        if len(self.active_adapters) != 1:
            raise ValueError(
                f"SHIP runs one adapter at a time, but {self.active_adapters} are active; call "
                f"`model.set_adapter(name)` with one name, or pass `adapter_names=[...]` (one per sample) in eval."
            )
        return self.active_adapters[0]

    def _running_pass(self) -> BlockPass:
        block_pass = running_pass()
        if block_pass is None:
            raise RuntimeError(
                f"SHIP block {self.layer_index} was called without the blocks before it: SHIP's prompts flow from the "
                f"first block on, so run the model, or its blocks in order from the first. If this happens in "
                f"backward, a reentrant gradient checkpoint recomputed the block: it cannot carry SHIP's prompts, so "
                f"checkpoint with `use_reentrant=False` (the default of transformers 5 and timm 1.0)."
            )
        return block_pass

    def _close_pass(self, block_pass: BlockPass) -> None:
        """The last block ends the pass: memoise collected shared paths, hand the matching loss to the call."""
        call = current_call()
        for group in block_pass.groups:
            self.bank.finish_group(group)
            if group.matching_loss is not None and call is not None:
                call.matching_loss = group.matching_loss
        close_pass()

    def _run_groups(
        self, block_pass: BlockPass, hidden_states: torch.Tensor, args: tuple, kwargs: dict, inputs: BlockInputs
    ) -> torch.Tensor:
        """Every group of the pass through this block: one sub-batch per adapter of a mixed batch."""
        groups = block_pass.groups
        if len(groups) == 1 and groups[0].rows is None:
            return self._group_forward(groups[0], hidden_states, args, kwargs, inputs)
        output = torch.empty_like(hidden_states)
        for group in groups:
            rows = group.rows
            result = self._group_forward(group, hidden_states.index_select(0, rows), args, kwargs, inputs.of_rows(rows))
            output.index_copy_(0, rows, result)
        return output

    def _group_forward(
        self, group: GroupState, image_tokens: torch.Tensor, args: tuple, kwargs: dict, inputs: BlockInputs
    ) -> torch.Tensor:
        if group.prompts is None:
            return self.base_layer(image_tokens, *args, **kwargs)
        return self._prompted_forward(group, image_tokens, inputs)

    def _prompted_forward(self, group: GroupState, image_tokens: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """This block on ``[image ; static prompts ; attribute prompts]`` for one group; advances the group's state.

        On the shared path the static (semantic and shared) prompts are not among each sample's tokens: their keys
        and values, computed once for the group, are attended by every sample, and they join the samples' tokens
        only in the last layer when the matching loss reads their outputs.
        """
        prompts, config, index = group.prompts, group.prompts.config, self.layer_index
        last = index == self.bank.num_layers - 1
        batch_size, num_image_tokens, _ = image_tokens.shape
        prompt_attention = last and group.want_matching  # prompt outputs feed only the matching loss
        attribute = prompts.attribute_tokens(index, group.attribute, group.top_tokens)
        drops = None if group.drops is None else group.drops[index]
        recording = group.recorded_scores is not None  # ship_peft.explain reads every layer's scores
        if group.shared:
            static_tokens, static_key_value = self._advance_shared_path(group, image_tokens, prompt_attention, drops)
        else:
            static_key_value = ()
            static_tokens = prompts.static_prompts(index, group.semantic, image_tokens.dtype)
            static_tokens = static_tokens.expand(batch_size, -1, -1)
        prompt_tokens = [part for part in (static_tokens, attribute) if part is not None]
        tokens = torch.cat([image_tokens, *prompt_tokens], dim=1) if prompt_tokens else image_tokens
        num_static = 0 if static_tokens is None else static_tokens.shape[1]
        keep = tokens.shape[1]  # the per-sample path computes every output, as the method is written
        if static_key_value and (last or not prompts.carries_to(index + 1)):
            keep = num_image_tokens  # the attribute-prompt outputs are dropped after this layer
        step = partial(
            block_forward,
            self.bank.backbone,
            self.base_layer,
            num_image_tokens=num_image_tokens,
            decoupled=config.decoupled_attention,
            prompt_weight=config.prompt_attention_weight,
            prompt_attention=prompt_attention,
            need_scores=(index + 1) in prompts.attribute_layers or prompt_attention or recording,
            keep=keep,
            drops=NO_DROPS if drops is None else drops.samples,
            inputs=inputs,
            summary=self.bank.summary_of(config),
        )
        checkpoint = self._checkpoint_function()
        tokens, scores = checkpoint(step, tokens, *static_key_value) if checkpoint else step(tokens, *static_key_value)
        image_output = leading(tokens, num_image_tokens, 1)
        if recording:
            group.recorded_scores[index] = scores
        end_of_static = num_image_tokens + num_static
        group.semantic = tokens[:, num_image_tokens : end_of_static - config.num_shared_prompts]
        group.attribute = tokens[:, end_of_static:] if tokens.shape[1] > end_of_static else None
        if (index + 1) in prompts.attribute_layers:
            group.top_tokens = gather_top_tokens(image_output, scores, config.num_attribute_prompts)
        if prompt_attention:
            top_tokens = gather_top_tokens(image_output, scores, config.matching_top_k)
            chosen = None if inputs.valid is None else scores.topk(top_tokens.shape[1], dim=-1).values
            group.matching_loss = prompt_matching_loss(tokens[:, num_image_tokens:], top_tokens, chosen)
        return image_output

    def _advance_shared_path(
        self, group: GroupState, image_tokens: torch.Tensor, prompt_attention: bool, drops: Optional[LayerDrops]
    ) -> tuple[Optional[torch.Tensor], tuple[torch.Tensor, ...]]:
        """The shared path's step through this block, at batch size 1, or once per history group under SHIP's
        stochastic depth ``drops`` (``docs/method.md`` §3 and §5: the prompts bypass attention, ``a_p = LN1(p)``).

        Returns the static prompts to append to every sample's tokens (only where their outputs are read: the last
        layer with the matching loss), else their keys and values for the samples to attend to (``[1, ...]`` for
        all, or each sample's group's). Only work whose result is used is done: the rest of the block runs only for
        the semantic prompts that flow on to the next layer (shared-prompt outputs are replaced by fresh ones at
        every layer, and a level's outputs are dropped where the next level starts).
        """
        index, prompts = self.layer_index, group.prompts
        if group.cached_path is not None:
            return None, group.cached_path[index]
        members = None if drops is None else drops.members
        tokens = prompts.static_prompts(index, group.carried, image_tokens.dtype)  # [groups, K + S, D]
        if prompt_attention:
            return _of_samples(tokens, members).expand(image_tokens.shape[0], -1, -1), ()
        backbone, block = self.bank.backbone, self.base_layer
        normed = backbone.norm1(block, tokens)
        key_value = backbone.key_value(block, normed)
        if group.collected_path is not None:
            group.collected_path.append(key_value)
        if index < self.bank.num_layers - 1 and prompts.carries_to(index + 1):
            semantic = tokens.shape[1] - prompts.config.num_shared_prompts
            group.carried = self._carry(tokens[:, :semantic], normed[:, :semantic], drops)
        return None, tuple(_of_samples(tensor, members) for tensor in key_value)

    def _carry(self, tokens: torch.Tensor, normed: torch.Tensor, drops: Optional[LayerDrops]) -> torch.Tensor:
        """The semantic prompts' outputs of the shared path, per group leaving this block: a group splits where its
        samples dropped different branches here."""
        if drops is None:
            return residual_update(self.bank.backbone, self.base_layer, tokens, normed)
        if drops.parents is not None:
            tokens, normed = tokens.index_select(0, drops.parents), normed.index_select(0, drops.parents)
        return residual_update(self.bank.backbone, self.base_layer, tokens, normed, drops.groups)

    def _checkpoint_function(self):
        """The host's checkpoint function for this block in a training forward with gradients, else None."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        return self.bank.backbone.checkpoint_function(self.base_layer)

    def __repr__(self) -> str:
        return "ship." + super().__repr__()


def _of_samples(tensor: torch.Tensor, members: Optional[torch.Tensor]) -> torch.Tensor:
    """The shared path's ``tensor`` for the samples: as it is when one group holds them all (``members`` None), else
    each sample's group's row."""
    return tensor if members is None else tensor.index_select(0, members)


def prompt_banks(model: nn.Module) -> list[ShipPromptBank]:
    return [module for module in model.modules() if isinstance(module, ShipPromptBank)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s SHIP blocks as the plain host blocks inside (PEFT's ``enable_adapters`` of each layer)."""
    layers = [module for module in model.modules() if isinstance(module, ShipTunerLayer)]
    were_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_disabled in zip(layers, were_disabled):
            layer.enable_adapters(not was_disabled)
