# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Configuration of SHIP (Semantic Hierarchical Prompt tuning) adapters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .constants import ShipPeftType


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ShipConfig.{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"ShipConfig.{name} must be >= {minimum}, got {value}.")


def _check_float(
    name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"ShipConfig.{name} must be a number, got {type(value).__name__} ({value!r}).")
    if not math.isfinite(value):
        raise ValueError(f"ShipConfig.{name} must be a finite number, got {value}.")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"ShipConfig.{name} must lie in {interval}, got {value}.")


def check_prompt_layers(prompt_layers, num_layers: Optional[int] = None) -> None:
    """Validate level starts: a non-empty, strictly increasing list of ints that starts at 0.

    With ``num_layers`` (the backbone's depth) every entry must also be a layer index of that backbone.
    """
    if not isinstance(prompt_layers, (list, tuple)) or not prompt_layers:
        raise TypeError(
            f"ShipConfig.prompt_layers must be a non-empty list of layer indices such as [0, 4, 8], or None to let "
            f"`ship_peft.initialize_ship_weights` find them; got {prompt_layers!r}."
        )
    if any(isinstance(i, bool) or not isinstance(i, int) for i in prompt_layers):
        raise TypeError(f"ShipConfig.prompt_layers must hold ints only, got {list(prompt_layers)!r}.")
    if prompt_layers[0] != 0:
        raise ValueError(
            f"ShipConfig.prompt_layers must start at 0 (the first level starts at the first layer), got "
            f"{list(prompt_layers)!r}; prepend 0."
        )
    if any(b <= a for a, b in zip(prompt_layers, prompt_layers[1:])):
        raise ValueError(
            f"ShipConfig.prompt_layers must be strictly increasing with no repeats, got {list(prompt_layers)!r}; "
            f"use {sorted(set(prompt_layers))!r}."
        )
    if num_layers is not None and prompt_layers[-1] >= num_layers:
        raise ValueError(
            f"ShipConfig.prompt_layers={list(prompt_layers)!r} names layer {prompt_layers[-1]}, but the backbone has "
            f"{num_layers} layers (indices 0..{num_layers - 1}); drop the entries >= {num_layers} (when loading an "
            f"adapter: load it onto the backbone it was trained with)."
        )


#: The values of ``ShipConfig.image_summary``.
IMAGE_SUMMARIES = ("auto", "cls", "mean")


@dataclass
class ShipConfig(PeftConfig):
    """Configuration of a SHIP adapter (Zhu et al., ICASSP 2025), see ``docs/method.md``.

    The defaults are the reference recipe's method hyper-parameters (docs/method.md §6); its training recipe (§6:
    optimiser, schedule, stochastic depth 0.1) is the ``ship-peft`` command line's default. ``prompt_layers=None``
    means the semantic levels are found by :func:`ship_peft.initialize_ship_weights` (calibration), which also fills
    the prototype bank. Switching the features off gives the ablations; ``share_threshold=1`` (one level per layer) with ``num_shared_prompts=0``,
    ``num_attribute_layers=0``, ``decoupled_attention=False`` and ``matching_loss_weight=0`` is plain VPT-deep.

    Args:
        num_prompts: K, semantic-independent prompt tokens per level.
        prompt_layers: first layer of every semantic level (sorted, starting at 0), or None until calibration.
        share_threshold: alpha in (0, 1]; a layer starts a new level when its affinity with the level's first
            layer falls below it.
        num_shared_prompts: S, semantic-shared prompt tokens re-inserted at every layer (0 switches them off).
        num_attribute_prompts: A, attribute prompt tokens per attribute level.
        num_attribute_layers: number of attribute levels (the last level starts > 0); 0 switches them off.
        num_prototypes: M, k-means prototypes of the last layer's CLS features.
        attribute_mix: beta, weight of the prototype pattern in an attribute prompt.
        decoupled_attention: image queries attend to image and prompt keys with two separate softmaxes and
            prompts bypass attention except in the last layer; False gives one joint softmax (VPT-deep).
        prompt_attention_weight: lambda, weight of the prompt softmax in decoupled attention.
        matching_loss_weight: weight of the prompt matching loss added to the loss in training (0 switches it off).
        matching_top_k: T, image tokens matched against the prompts.
        image_summary: what stands for the image where SHIP reads the CLS token (``docs/method.md`` §7): the ranking
            of image tokens for the attribute prompts and the matching loss, and calibration's features. ``"auto"``
            (the default): the class token where the backbone has one (the paper), else ``"mean"``; ``"cls"``: the
            class token; ``"mean"``: the mean of the valid image tokens (an extension of the paper, for backbones
            without a class token such as SigLIP or AIMv2).
        drop_path_rate: stochastic depth of the frozen blocks in training: the residual branches of layer ``i`` of
            ``L`` are dropped per sample with probability ``drop_path_rate * i / (L - 1)``, as in timm; no effect in
            evaluation. 0 (the default) runs the backbone as given; the training recipe (docs/method.md §6), and so
            the ``ship-peft`` command line, uses 0.1.
        target_modules: the backbone's block sequence to wrap (``vit.layers``, ``dinov2.encoder.layer``, timm's
            ``blocks``, ...); None finds it.
        modules_to_save: modules trained in full and saved with the adapter; None takes the model's classifiers
            (``classifier``; DeiT with teacher: ``cls_classifier`` and ``distillation_classifier``; timm: ``head``).
    """

    num_prompts: int = field(default=50, metadata={"help": "K: semantic-independent prompts per level."})
    prompt_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "First layer of every semantic level; None until calibration."}
    )
    share_threshold: float = field(default=0.95, metadata={"help": "alpha: layer-affinity threshold of a level."})
    num_shared_prompts: int = field(default=10, metadata={"help": "S: semantic-shared prompts."})
    num_attribute_prompts: int = field(default=10, metadata={"help": "A: attribute prompts per attribute level."})
    num_attribute_layers: int = field(default=2, metadata={"help": "Number of attribute levels."})
    num_prototypes: int = field(default=200, metadata={"help": "M: k-means prototypes."})
    attribute_mix: float = field(default=0.1, metadata={"help": "beta: prototype share of an attribute prompt."})
    decoupled_attention: bool = field(default=True, metadata={"help": "Decoupled attention on/off."})
    prompt_attention_weight: float = field(default=0.1, metadata={"help": "lambda: prompt-attention weight."})
    matching_loss_weight: float = field(default=0.5, metadata={"help": "Weight of the prompt matching loss."})
    matching_top_k: int = field(default=10, metadata={"help": "T: image tokens for prompt matching."})
    image_summary: str = field(
        default="auto",
        metadata={"help": "Image summary for token ranking and calibration: auto (CLS where there is one), cls, mean."},
    )
    drop_path_rate: float = field(
        default=0.0, metadata={"help": "Stochastic depth of the frozen blocks in training (deepest layer's rate)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "The backbone's block sequence to wrap; None finds it."}
    )
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Unused by SHIP (PEFT API)."})
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter; None takes the model's classifiers."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ShipPeftType.SHIP
        _check_int("num_prompts", self.num_prompts, 1)
        for name in ("num_shared_prompts", "num_attribute_prompts", "num_attribute_layers"):
            _check_int(name, getattr(self, name), 0)
        _check_int("num_prototypes", self.num_prototypes, 1)
        _check_int("matching_top_k", self.matching_top_k, 1)
        _check_float("share_threshold", self.share_threshold, 0.0, 1.0, low_open=True)
        for name in ("attribute_mix", "prompt_attention_weight"):
            _check_float(name, getattr(self, name), 0.0, 1.0)
        _check_float("matching_loss_weight", self.matching_loss_weight, 0.0, math.inf, high_open=True)
        _check_float("drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
        if self.image_summary not in IMAGE_SUMMARIES:
            raise ValueError(
                f"ShipConfig.image_summary must be one of {', '.join(map(repr, IMAGE_SUMMARIES))}, got "
                f"{self.image_summary!r}."
            )
        if not isinstance(self.decoupled_attention, bool):
            raise TypeError(f"ShipConfig.decoupled_attention must be a bool, got {self.decoupled_attention!r}.")
        if self.prompt_layers is not None:
            check_prompt_layers(self.prompt_layers)
            self.prompt_layers = list(self.prompt_layers)

    def attribute_layers(self) -> list[int]:
        """The layers that receive attribute prompts: the last ``num_attribute_layers`` level starts > 0."""
        if self.prompt_layers is None or self.num_attribute_prompts == 0 or self.num_attribute_layers == 0:
            return []
        return self.prompt_layers[1:][-self.num_attribute_layers :]


#: ``ShipConfig`` fields that choose modules (PEFT's conventions) rather than set the method.
MODULE_FIELDS = ("target_modules", "target_parameters", "modules_to_save")

#: ``ShipConfig`` fields that are hyper-parameters of the method, in declaration order (derived, not re-typed).
HYPERPARAMETERS: tuple[str, ...] = tuple(
    name
    for name in ShipConfig.__dataclass_fields__
    if name not in PeftConfig.__dataclass_fields__ and name not in MODULE_FIELDS
)
