# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The models, settings and batch of ``benchmarks/speed.py``: every method on one shared random backbone."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import torch

#: Backbone shapes. ``tiny`` is the project's offline backbone (``tiny-vit-fractal-1k``), ``vit-b16`` ViT-B/16 at 224.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=32,
        patch_size=4,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        layer_norm_eps=1e-6,
    ),
    "vit-b16": dict(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        layer_norm_eps=1e-6,
    ),
}

#: Backbone families: transformers ViT, or a DINOv3-shaped ViT (4 registers, rotary positions, layer scale) under
#: ``ship_peft.ImageClassifier``. Both take ``MODEL_SIZES``' shapes.
FAMILIES: dict[str, str] = {"vit": "ViT", "dinov3": "DINOv3-shaped ViT (4 registers, rotary positions, layer scale)"}
DINOV3_REGISTERS = 4

#: Default semantic levels per size: ``tiny`` as the project's examples, ``vit-b16`` the reference's CIFAR-100 levels.
DEFAULT_PROMPT_LAYERS = {"tiny": [0, 2, 4, 7, 9, 11], "vit-b16": [0, 2, 4, 6, 8, 11]}

METHODS: dict[str, str] = {
    "floor": "frozen backbone + head (floor)",
    "floor_grad": "frozen backbone + head, gradient to the input (deep-prompt floor)",
    "vpt_deep": "VPT-deep (K+S prompts per layer)",
    "ship": "SHIP (default)",
    "ship_cache": "SHIP + inference cache",
    "ship_ckpt": "SHIP + gradient checkpointing",
    "ship_drop": "SHIP + stochastic depth 0.1 (the recipe)",
    "lora": "LoRA r=8 (q, v) + head",
    "full": "full fine-tuning",
}
DEFAULT_METHODS = list(METHODS)

#: Methods whose training step also computes the gradient with respect to the input images.
INPUT_GRADIENT_METHODS = ("floor_grad",)


@dataclasses.dataclass
class BenchSettings:
    """Everything a measurement depends on (JSON-serialisable, so a child process gets the same)."""

    model_size: str = "tiny"
    family: str = "vit"
    vit: dict = dataclasses.field(default_factory=lambda: dict(MODEL_SIZES["tiny"]))
    num_labels: int = 100
    batch_size: int = 64
    dtype: str = "fp32"
    steps: int = 10
    warmup: int = 3
    device: str = "cpu"
    num_prompts: int = 50
    num_shared_prompts: int = 10
    prompt_layers: list = dataclasses.field(default_factory=lambda: list(DEFAULT_PROMPT_LAYERS["tiny"]))
    lr: float = 1e-3
    seed: int = 0

    @property
    def num_layers(self) -> int:
        return self.vit["num_hidden_layers"]


# --------------------------------------------------------------------------------------------------------- models


def build_model(method: str, settings: BenchSettings) -> torch.nn.Module:
    """The model of ``method`` on the shared random backbone (seeded: every method gets the same weights)."""
    from peft import get_peft_model

    import ship_peft
    from ship_peft import presets
    from ship_peft.app.training import RECIPE_SHIP_VALUES

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {sorted(METHODS)}.")
    torch.manual_seed(settings.seed)
    vit = build_backbone(settings)
    if method in ("floor", "floor_grad"):
        for name, parameter in vit.named_parameters():
            parameter.requires_grad_(name.startswith("classifier."))
        model = vit
    elif method == "full":
        model = vit.requires_grad_(True)
    elif method == "lora":
        model = get_peft_model(vit, presets.adapter_config("lora", settings.num_layers, modules_to_save=["classifier"]))
    elif method == "vpt_deep":  # as many prompt tokens per layer as SHIP carries: K + S
        vpt_prompts = settings.num_prompts + settings.num_shared_prompts
        model = get_peft_model(vit, presets.adapter_config("vpt-deep", settings.num_layers, num_prompts=vpt_prompts))
    else:  # ship, ship_cache, ship_ckpt, ship_drop
        config = presets.adapter_config(
            "ship",
            settings.num_layers,
            num_prompts=settings.num_prompts,
            num_shared_prompts=settings.num_shared_prompts,
            prompt_layers=list(settings.prompt_layers),
            drop_path_rate=RECIPE_SHIP_VALUES["drop_path_rate"] if method == "ship_drop" else 0.0,
        )
        model = get_peft_model(vit, config)
        generator = torch.Generator().manual_seed(settings.seed)
        for prompts in ship_peft.get_prompt_bank(model).ship_prompts.values():
            if prompts.prototypes is not None:  # stands in for calibration (random prototypes: speed only)
                prompts.prototypes.copy_(torch.randn(prompts.prototypes.shape, generator=generator))
        if method == "ship_cache":
            model.enable_prompt_cache()
        if method == "ship_ckpt":
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(settings.device)


def build_backbone(settings: BenchSettings) -> torch.nn.Module:
    """The random classifier of ``settings.family`` (seeded by the caller)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, ViTConfig, ViTForImageClassification

    import ship_peft

    if settings.family == "dinov3":
        config = DINOv3ViTConfig(**settings.vit, num_register_tokens=DINOV3_REGISTERS, attn_implementation="sdpa")
        return ship_peft.ImageClassifier(DINOv3ViTModel(config), settings.num_labels)
    return ViTForImageClassification(ViTConfig(**settings.vit, num_labels=settings.num_labels, attn_implementation="sdpa"))


def make_batch(settings: BenchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed + 1)
    size = settings.vit["image_size"]
    pixels = torch.randn(settings.batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, settings.num_labels, (settings.batch_size,), generator=generator)
    return pixels.to(settings.device), labels.to(settings.device)


def adapter_bytes(model: torch.nn.Module) -> int:
    """Bytes a task stores on top of the shared backbone: PEFT's adapter file, else every trainable tensor."""
    from peft import PeftModel
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        if isinstance(model, PeftModel):
            model.save_pretrained(folder)
            path = os.path.join(folder, "adapter_model.safetensors")
        else:
            path = os.path.join(folder, "model.safetensors")
            tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_file(tensors, path)
        return os.path.getsize(path)


