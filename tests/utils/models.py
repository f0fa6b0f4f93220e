# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Tiny randomly initialised ViTs (no download) and SHIP models built on them, for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification

import ship_peft

#: ``../shared`` beside the repository (the authors' reference data; absent for users)
SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def tiny_vit_config(**overrides) -> ViTConfig:
    """A 4-layer, 32-wide ViT on 16x16 images with 4x4 patches (N = 17 tokens)."""
    values = dict(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        layer_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    values.update(overrides)
    return ViTConfig(**values)


def tiny_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(**overrides)).eval()


def fill_prototypes(model, seed: int = 0) -> None:
    """Give every SHIP adapter of ``model`` random prototypes (stands in for calibration)."""
    generator = torch.Generator().manual_seed(seed)
    layer = ship_peft.get_prompt_bank(model)
    for prompts in layer.ship_prompts.values():
        if prompts.prototypes is not None:
            prompts.prototypes.copy_(torch.randn(prompts.prototypes.shape, generator=generator))


def tiny_ship_model(seed: int = 0, vit_overrides: dict | None = None, **config):
    """A SHIP PEFT model on a tiny ViT, with ``prompt_layers`` given and random prototypes."""
    values = dict(num_prompts=3, prompt_layers=[0, 2, 3], num_prototypes=5, num_attribute_prompts=4)
    values.update(config)
    model = get_peft_model(tiny_vit(seed, **(vit_overrides or {})), ship_peft.ShipConfig(**values))
    fill_prototypes(model, seed)
    return model


def base_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as if SHIP were not there: adapter tensors dropped, wrapped blocks under their names."""
    return {
        key.replace("base_layer.", ""): tensor
        for key, tensor in module.state_dict().items()
        if ship_peft.constants.SHIP_PREFIX not in key
    }


def pixels(batch: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tensors_with_history() -> list[torch.Tensor]:
    """Every live tensor that holds an autograd graph (after a garbage collection)."""
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # some objects warn when isinstance looks at them
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.grad_fn is not None]
