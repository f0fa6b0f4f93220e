# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The PEFT tuner of SHIP: finds the ViT backbone, wraps it, and adds the matching loss to the model's loss."""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Union

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .backbones import Backbone, find_hosts, supported_families
from .call import current_call, ship_call
from .config import ShipConfig, check_prompt_layers
from .constants import SHIP_PREFIX
from .backbones.base import check_block_arguments
from .layer import BASE_ADAPTER, ShipBlock, ShipPromptBank, ShipTunerLayer, prompt_banks

#: The attribute of the host module (the one holding the block sequence) that holds the adapters' tensors.
BANK_NAME = "ship"


def block_sequences(model: nn.Module) -> list[str]:
    """The names of the block sequences in ``model`` that SHIP can wrap, outermost first."""
    return [f"{name}.{family.blocks_path}".lstrip(".") for name, _, family in find_hosts(model)]


def resolve_target(model: nn.Module, target_modules: Optional[Union[list[str], str]]) -> str:
    """The one block sequence ``target_modules`` names, by PEFT's rules: a list matches a full name or a dotted
    suffix of it, a string is a regular expression matched against the full name, None takes the only one.

    A clear error, listing the sequences found, when it names none or several."""
    sequences = block_sequences(model)
    if not sequences:
        raise TypeError(
            f"SHIP does not support {type(model).__name__}: it holds no Vision Transformer of a supported family. "
            f"Supported: {supported_families()}."
        )
    if target_modules is None:
        matches = sequences
    elif isinstance(target_modules, str):
        matches = [name for name in sequences if re.fullmatch(target_modules, name) or _names(name, [target_modules])]
    else:
        matches = [name for name in sequences if _names(name, target_modules)]
    if len(matches) == 1:
        return matches[0]
    if target_modules is None:
        raise ValueError(
            f"{type(model).__name__} holds several Vision Transformers ({sequences}); choose one with "
            f"`ShipConfig(target_modules=[name])`."
        )
    problem = "matches none" if not matches else f"matches several ({matches}), but one adapter wraps one"
    raise ValueError(
        f"ShipConfig.target_modules={target_modules!r} {problem} of the block sequences SHIP can wrap in "
        f"{type(model).__name__}: {sequences}. Name one of them (a list entry matches a name or its dotted suffix, a "
        f"string is a regular expression matched against the whole name), or leave `target_modules=None`."
    )


def _names(name: str, targets: list[str]) -> bool:
    """Whether one of ``targets`` is ``name`` or a dotted suffix of it (PEFT's rule for a list)."""
    return any(name == target or name.endswith("." + target) for target in targets)


def resolve_blocks(model: nn.Module, blocks_name: str) -> tuple[nn.Module, type[Backbone]]:
    """The host module of the block sequence ``blocks_name`` and its family."""
    for name, host, family in find_hosts(model):
        if f"{name}.{family.blocks_path}".lstrip(".") == blocks_name:
            return host, family
    raise ValueError(f"{blocks_name!r} is not a block sequence SHIP can wrap; found: {block_sequences(model)}.")


def with_ship_losses(output_class: type[ModelOutput]) -> type[ModelOutput]:
    """``output_class`` with two more fields, ``classification_loss`` and ``matching_loss`` (for logging).

    A declared ``ModelOutput`` subclass, not extra keys: DDP and ``torch.utils._pytree`` rebuild outputs from their
    declared fields. Made once per class and kept in a plain dict, which ``torch.compile`` reads as a constant
    (:meth:`ShipModel._prepare_model` makes the model's declared output class up front).
    """
    if output_class not in SHIP_OUTPUT_CLASSES:
        fields = [(name, Optional[torch.Tensor], dataclasses.field(default=None)) for name in LOSS_FIELDS]
        SHIP_OUTPUT_CLASSES[output_class] = dataclasses.make_dataclass(
            f"Ship{output_class.__name__}", fields, bases=(output_class,)
        )
    return SHIP_OUTPUT_CLASSES[output_class]


#: ``with_ship_losses``' classes, by the model output class they extend.
SHIP_OUTPUT_CLASSES: dict[type, type] = {}
LOSS_FIELDS = ("classification_loss", "matching_loss")


def check_labels(labels: Optional[torch.Tensor], num_labels: Optional[int]) -> None:
    """Clear error for class labels outside ``[0, num_labels)`` (-100, the ignore index, is allowed)."""
    if labels is None or num_labels is None or not torch.is_tensor(labels) or labels.is_floating_point():
        return
    valid = (labels == -100) | ((labels >= 0) & (labels < num_labels))
    assert_values(
        valid.all(),
        f"labels must lie in [0, {num_labels}) (the model has num_labels={num_labels}), or be -100 (ignored); create "
        f"the model with the dataset's number of classes (`from_pretrained(..., num_labels=...)`) or fix the labels.",
    )


def check_prototypes(bank: ShipPromptBank, names: Iterable[str]) -> None:
    """Clear error when adapter ``names`` have attribute prompts but no prototypes (calibration was skipped)."""
    for name in names:
        prompts = bank.ship_prompts[name] if name in bank.ship_prompts else None
        if prompts is not None and prompts.prototypes is not None:
            assert_values(
                torch.any(prompts.prototypes != 0),
                f"SHIP adapter {name!r} has attribute prompts but no prototypes. Call "
                f"`ship_peft.initialize_ship_weights(model, dataloader)` on your training data first (or set "
                f"`num_attribute_layers=0`).",
                error=RuntimeError,
            )


def assert_values(condition: torch.Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless the boolean tensor ``condition`` holds, without making the host wait.

    On CPU, where there is nothing to wait for, it is checked at once. On an accelerator, and while ``torch.compile``
    traces, it is an asynchronous device assert (``torch._assert_async``): the step is not held up, and a failure
    surfaces, with ``message``, at the next synchronisation.
    """
    if condition.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(condition):
            raise error(message)
    else:
        torch._assert_async(condition, message)


def get_prompt_bank(model: nn.Module) -> ShipPromptBank:
    """The :class:`ShipPromptBank` (every adapter's tensors) of a PEFT model with SHIP, or of the model inside it."""
    for bank in prompt_banks(model):
        return bank
    raise TypeError(
        f"{type(model).__name__} has no SHIP adapter; create one with `peft.get_peft_model(model, ShipConfig())`."
    )


def check_adapter_complete(
    model_state: dict[str, torch.Tensor], adapter_state: dict[str, torch.Tensor], adapter_name: str
) -> None:
    """Clear error when a saved adapter lacks tensors the adapter has (they would silently keep their random init)."""
    owned = (f"{SHIP_PREFIX}.{adapter_name}.", f"modules_to_save.{adapter_name}.")
    missing = sorted(key for key in model_state if any(part in key for part in owned) and key not in adapter_state)
    if missing:
        raise ValueError(
            f"This SHIP adapter file is incomplete: it lacks {len(missing)} tensor(s) of adapter {adapter_name!r}:\n  "
            + "\n  ".join(missing)
            + "\nThey would keep their random initialisation. Save the adapter again (`model.save_pretrained(...)`) "
            "or download a complete copy."
        )


def check_adapter_shapes(model_state: dict[str, torch.Tensor], adapter_state: dict[str, torch.Tensor], config) -> None:
    """Clear error when a saved adapter does not fit the backbone it is loaded onto (width or number of labels)."""
    mismatched = [
        f"{key}: saved {tuple(tensor.shape)}, model {tuple(model_state[key].shape)}"
        for key, tensor in adapter_state.items()
        if key in model_state and model_state[key].shape != tensor.shape
    ]
    if mismatched:
        base = getattr(config, "base_model_name_or_path", None) or "the backbone it was trained with"
        raise ValueError(
            "This SHIP adapter does not fit the model it is loaded onto (another hidden size or number of labels):\n  "
            + "\n  ".join(mismatched)
            + f"\nLoad it onto {base}, created with the same `num_labels` as the adapter's classifier."
        )


class ShipModel(BaseTuner):
    """Creates a SHIP model (Semantic Hierarchical Prompt tuning, Zhu et al., ICASSP 2025) from a Vision Transformer.

    Use it through PEFT: ``peft.get_peft_model(vit, ShipConfig(...))`` after ``import ship_peft``. Every block of the
    backbone's sequence is wrapped in a :class:`~ship_peft.layer.ShipBlock`, and the adapters' tensors are kept in a
    :class:`~ship_peft.layer.ShipPromptBank` beside the sequence. In training mode, when ``labels`` are passed,
    ``matching_loss_weight * matching_loss`` is added to ``outputs.loss``; the output also carries ``matching_loss``
    and ``classification_loss`` for logging. Models that return logits only (timm) give the matching loss through
    :func:`ship_peft.record_matching_loss`.
    """

    prefix: str = SHIP_PREFIX
    tuner_layer_cls = ShipTunerLayer
    _matching_loss_hook: Optional[torch.utils.hooks.RemovableHandle] = None

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return peft_config  # the backbone is found from the model itself in `_prepare_model`

    def _prepare_model(self, peft_config: ShipConfig, model: nn.Module) -> None:
        blocks_name = resolve_target(model, peft_config.target_modules)
        peft_config.target_modules = [blocks_name]
        if peft_config.modules_to_save is None:
            peft_config.modules_to_save = classifier_names(model, blocks_name) or None
        if peft_config.prompt_layers is not None:
            check_prompt_layers(peft_config.prompt_layers, num_layers=len(model.get_submodule(blocks_name)))
        if self._matching_loss_hook is None:  # one hook for the model's life: none is registered per call
            self._matching_loss_hook = model.register_forward_hook(self._add_matching_loss)
        output_class = getattr(type(model).forward, "__annotations__", {}).get("return")
        if isinstance(output_class, type) and issubclass(output_class, ModelOutput):
            with_ship_losses(output_class)  # made now, outside any torch.compile trace

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's injection, matching the blocks by the config: SHIP's tensors sit beside the block sequence, not in
        the blocks a ``state_dict`` would name, so ``inject_adapter_in_model(state_dict=...)`` uses the config too."""
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)

    @staticmethod
    def _check_target_module_exists(peft_config: ShipConfig, key: str) -> bool:
        """SHIP wraps every block of the sequence that ``_prepare_model`` resolved ``target_modules`` to."""
        sequence, _, index = key.rpartition(".")
        return index.isdigit() and sequence in peft_config.target_modules

    def _create_and_replace(
        self,
        peft_config: ShipConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        bank = self._bank_for(parent, current_key.rpartition(".")[0], adapter_name, peft_config)
        if isinstance(target, ShipBlock):
            target.update_layer(adapter_name, peft_config)
            return
        self._replace_module(parent, target_name, ShipBlock(target, bank, int(target_name), adapter_name, peft_config), target)

    def _bank_for(self, blocks: nn.ModuleList, blocks_name: str, adapter_name: str, config: ShipConfig) -> ShipPromptBank:
        """The prompt bank beside ``blocks`` (made with the first adapter), holding ``adapter_name``."""
        host, family = resolve_blocks(self.model, blocks_name)
        bank = getattr(host, BANK_NAME, None)
        if bank is None:
            backbone = family()
            bank = ShipPromptBank(blocks, backbone, adapter_name, config, backbone.has_class_token(host))
            host.add_module(BANK_NAME, bank)
            rename_unsplit_module(self.model, type(blocks[0]).__name__, ShipBlock.__name__)
            return getattr(host, BANK_NAME)
        if not isinstance(bank, ShipPromptBank):
            raise TypeError(f"{type(host).__name__} already has an attribute {BANK_NAME!r}, where SHIP keeps its prompts.")
        if adapter_name not in bank.ship_config:
            bank.update_layer(adapter_name, config)
        return bank

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if self.prefix not in name:
                parameter.requires_grad = False

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        """The plain base model, as PEFT's ``unload()`` gives it for LoRA: the host's blocks back in their sequence,
        no prompt bank, the trained classifier in place of its ``ModulesToSaveWrapper``, no ``peft_config``."""
        if merge:
            get_prompt_bank(self.model).merge()  # raises: prompts are tokens, not weight deltas
        for bank in prompt_banks(self.model):
            rename_unsplit_module(self.model, ShipBlock.__name__, type(bank.base_blocks()[0]).__name__)
        wrapped = [(name, module) for name, module in self.model.named_modules() if isinstance(module, UNLOADED)]
        for name, module in wrapped:
            parent_name, _, child_name = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            if isinstance(module, ShipPromptBank):
                delattr(parent, child_name)
            elif isinstance(module, ShipBlock):
                setattr(parent, child_name, module.base_layer)
            else:
                plain = module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
                setattr(parent, child_name, plain)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        if self._matching_loss_hook is not None:
            self._matching_loss_hook.remove()
            self._matching_loss_hook = None
        return self.model

    def enable_prompt_cache(self) -> None:
        """Memoise the semantic and shared prompts' path for inference (``docs/method.md`` §5).

        With decoupled attention these prompts follow the same path for every input, so every forward already runs
        it once for the whole batch; with the cache, eval-mode forwards also reuse it from one call to the next. It
        is rebuilt after an optimizer step, ``load_state_dict``, an in-place edit, a dtype, device or autocast change;
        after edits through ``tensor.data`` (which PyTorch does not track) call :meth:`refresh_prompt_cache`. Logits
        are those of the uncached path up to float rounding. Training runs the shared path afresh in every step
        (its gradients are needed). Needs ``decoupled_attention=True``.
        """
        for name in self.active_adapters:
            if not self.peft_config[name].decoupled_attention:
                raise ValueError(
                    f"The prompt cache needs decoupled attention; adapter {name!r} has decoupled_attention=False, so "
                    f"its prompts attend to the image and differ for every input."
                )
        get_prompt_bank(self.model).prompt_cache.enabled = True

    def refresh_prompt_cache(self) -> None:
        """Drop the memoised prompt paths: the next eval forward runs them afresh. Needed only after editing weights
        through ``tensor.data``, which PyTorch does not record; every other change is noticed by itself."""
        get_prompt_bank(self.model).prompt_cache.refresh()

    def disable_prompt_cache(self) -> None:
        """Run the shared prompt path afresh in every eval forward too (the default) and free the cache."""
        cache = get_prompt_bank(self.model).prompt_cache
        cache.enabled = False
        cache.refresh()

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # ``...vit.ship.ship_prompts.<adapter>.shared_prompts`` -> ``...vit.ship.ship_prompts.shared_prompts``
        return key.replace(f"{SHIP_PREFIX}.{adapter_name}.", f"{SHIP_PREFIX}.", 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        model_state = model.state_dict()
        check_adapter_complete(model_state, state_dict, adapter_name)
        check_adapter_shapes(model_state, state_dict, config)
        return state_dict

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's ``autocast_adapter_dtype``: float32 prompts on a float16/bfloat16 backbone (True, the default), or
        prompts in the backbone's dtype (False); kept for prompts built later by calibration."""
        for bank in prompt_banks(self.model):
            bank.autocast_adapter_dtype[adapter_name] = autocast_adapter_dtype
            if adapter_name in bank.ship_prompts:
                bank.place_adapter(adapter_name)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """For one ``PeftModel`` call: check the inputs, and open the call's state (``ship_peft/call.py``): the
        per-sample ``adapter_names``, and the matching loss the blocks hand back (``docs/method.md`` §4)."""
        check_block_arguments((), {"attention_mask": kwargs.get("attention_mask")})  # the host may drop it silently
        bank = get_prompt_bank(self.model)
        adapter_names = kwargs.get("adapter_names")
        blocks_name = self.peft_config[self.active_adapters[0]].target_modules[0]
        host = self.model.get_submodule(blocks_name.removesuffix(bank.backbone.blocks_path).rstrip("."))
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        if adapter_names is not None:
            adapter_names = list(adapter_names)
            self._check_mixed_batch(adapter_names, pixel_values, kwargs)
        if not bank.disable_adapters:
            check_prototypes(bank, bank.active_adapters if adapter_names is None else set(adapter_names))
            if torch.is_tensor(pixel_values):
                check_pixel_values(bank.backbone, host, pixel_values, bool(kwargs.get("interpolate_pos_encoding")))
        check_labels(kwargs.get("labels"), getattr(getattr(self.model, "config", None), "num_labels", None))
        num_items_in_batch = kwargs.get("num_items_in_batch")
        # When the Trainer passes `num_items_in_batch`, the cross-entropy is a sum over this batch divided by the items
        # of the whole (accumulated, multi-process) batch; the matching loss is put on the same footing.
        share = 1.0 if num_items_in_batch is None or not torch.is_tensor(pixel_values) else (
            pixel_values.shape[0] / num_items_in_batch
        )
        handles = [] if adapter_names is None else self._route_mixed_batch(adapter_names)
        try:
            with ship_call(
                adapter_names=adapter_names,
                adds_to_output=True,
                has_labels=kwargs.get("labels") is not None,
                loss_share=share,
            ):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_mixed_batch(self, adapter_names: list[str], pixel_values: Any, kwargs: dict[str, Any]) -> None:
        """Clear errors for a mixed-adapter call SHIP cannot run exactly."""
        if self.model.training:
            raise ValueError(
                "Mixed-adapter batches (`adapter_names=...`) are for inference; call `model.eval()` first, and train "
                "each adapter on its own batches (`model.set_adapter(name)`)."
            )
        if kwargs.get("output_hidden_states"):
            raise NotImplementedError(
                "`output_hidden_states` is not available for mixed-adapter batches; run each adapter in its own call."
            )
        if kwargs.get("pixel_attention_mask") is not None:
            raise NotImplementedError(
                "Mixed-adapter batches of padded images (SigLIP 2's NaFlex) are not supported; run each adapter in its "
                "own call."
            )
        if torch.is_tensor(pixel_values) and len(adapter_names) != pixel_values.shape[0]:
            raise ValueError(
                f"adapter_names names {len(adapter_names)} adapters for a batch of {pixel_values.shape[0]} images; "
                f"give one name per image."
            )
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapters {unknown}; this model has {sorted(self.peft_config)} "
                f"(and {BASE_ADAPTER!r} for the plain backbone)."
            )
        sizes = {name: head_size(self.model, name) for name in dict.fromkeys(adapter_names)}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"The adapters of this batch have classifiers of different sizes ({sizes}), so their logits cannot "
                f"share one tensor; run adapters with different numbers of labels in separate calls."
            )

    def _route_mixed_batch(self, adapter_names: list[str]) -> list[torch.utils.hooks.RemovableHandle]:
        """Send each sample's logits through its own trained classifier (``modules_to_save``), with PEFT's own
        mixed-batch forward, as LoRA does: pre-hooks for this call only, removed when it ends. (The blocks read the
        names from the call's state.)"""

        def pass_adapter_names(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "adapter_names": adapter_names}

        return [
            module.register_forward_pre_hook(pass_adapter_names, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, AuxiliaryTrainingWrapper)
        ]

    def _add_matching_loss(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Forward hook on the task model, registered once (``_prepare_model``): during a ``PeftModel`` call, add
        ``matching_loss_weight * matching_loss`` to the model's loss and expose both losses."""
        call = current_call()
        if call is None or not call.adds_to_output or call.matching_loss is None:
            return output  # the inner model called directly, or no matching loss (eval, weight 0)
        matching_loss = call.matching_loss
        weighted = self.peft_config[self.active_adapters[0]].matching_loss_weight * matching_loss * call.loss_share
        if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...) when labels were given
            return (output[0] + weighted, *output[1:]) if call.has_labels else output
        if getattr(output, "loss", None) is None:
            return output  # e.g. timm models, which return logits: see ship_peft.record_matching_loss
        values = dict(output, classification_loss=output.loss, matching_loss=matching_loss)
        values["loss"] = output.loss + weighted
        return with_ship_losses(type(output))(**values)


def rename_unsplit_module(model: nn.Module, old: str, new: str) -> None:
    """Name ``new`` instead of ``old`` in the ``_no_split_modules`` that transformers keeps on each of ``model``'s
    ``PreTrainedModel`` instances: Accelerate's and the Trainer's FSDP route wrap the classes named there, and a SHIP
    block must be sharded as one unit with the host block it runs (it reads that block's weights in its own call)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if isinstance(names, (set, list)) and old in names:
            module._no_split_modules = type(names)(new if name == old else name for name in names)


#: What ``unload()`` takes out of the model: SHIP's modules and PEFT's trained-classifier wrappers.
UNLOADED = (ShipPromptBank, ShipBlock, AuxiliaryTrainingWrapper)


def head_size(model: nn.Module, adapter_name: str) -> Optional[int]:
    """The number of logits adapter ``adapter_name``'s classifier gives (``"__base__"``: the base model's head)."""
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            heads = module.modules_to_save
            head = heads[adapter_name] if adapter_name in heads else module.original_module
            return getattr(head, "out_features", None)
    return None


def check_pixel_values(backbone: Backbone, host: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> None:
    """Clear errors for images the backbone cannot take: wrong rank, channels, size, or non-finite values."""
    processor = "prepare images with the backbone's image processor (`AutoImageProcessor.from_pretrained(...)`)"
    if backbone.pixel_layout == "patches":
        if pixel_values.ndim != 3:
            raise ValueError(
                f"pixel_values must be patchified images [batch, patches, channels * patch * patch], got shape "
                f"{tuple(pixel_values.shape)}; {processor}, which also gives `pixel_attention_mask` and "
                f"`spatial_shapes`."
            )
    elif pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must be a [batch, channels, height, width] tensor, got shape {tuple(pixel_values.shape)}; "
            f"{processor}."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no image (batch size 0); pass at least one image per call.")
    if backbone.pixel_layout == "images":
        check_image_format(backbone, host, pixel_values, interpolate)
    assert_values(
        torch.isfinite(pixel_values).all(),
        "pixel_values contain NaN or inf; check how the images are loaded and normalised (e.g. a zero std).",
    )


def check_image_format(backbone: Backbone, host: nn.Module, pixel_values: torch.Tensor, interpolate: bool) -> None:
    """Clear errors for ``[B, C, H, W]`` images of the wrong channels or size."""
    channels, height, width = pixel_values.shape[1:]
    expected_channels, expected_size = backbone.image_format(host)
    if channels != expected_channels:
        raise ValueError(
            f"The images have {channels} channels but the backbone expects {expected_channels}; convert them "
            f"(e.g. `image.convert('RGB')`) before the image processor."
        )
    if expected_size is not None and not interpolate and (height, width) != expected_size:
        raise ValueError(
            f"The images are {height}x{width} but the backbone takes {expected_size[0]}x{expected_size[1]}; resize "
            f"them with the backbone's image processor, or pass `interpolate_pos_encoding=True` to run at this size."
        )


def classifier_names(model: nn.Module, blocks_name: str) -> list[str]:
    """The full names of ``model``'s classifiers: the head names of the family of ``blocks_name``, on the task model
    (transformers' ``classifier``) or on the module that holds the blocks (timm's ``head``)."""
    host, family = resolve_blocks(model, blocks_name)
    host_name = blocks_name.removesuffix(family.blocks_path).rstrip(".")
    names = []
    for head in family.head_names:
        if isinstance(getattr(model, head, None), nn.Module):
            names.append(head)
        elif isinstance(getattr(host, head, None), nn.Module):
            names.append(f"{host_name}.{head}".lstrip("."))
    return names
