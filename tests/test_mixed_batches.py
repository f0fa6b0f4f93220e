# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Mixed-adapter batches, the PEFT way: ``model(pixel_values, adapter_names=[...])`` runs every sample through its
own adapter (``"__base__"``: the plain backbone), each sample's logits equal to running its adapter alone."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import ship_peft
from ship_peft import ShipConfig
from test_shared_prompts import counting_static_runs

from utils import fill_prototypes, pixels, tiny_ship_model

#: adapters that differ in K, levels and feature switches (all on the tiny 4-layer ViT, 3 classes)
OTHERS = {
    "small": dict(num_prompts=2, prompt_layers=[0, 1, 2, 3], num_shared_prompts=0, num_prototypes=5),
    "joint": dict(num_prompts=4, prompt_layers=[0], decoupled_attention=False, num_prototypes=5),
    "plainish": dict(num_prompts=3, prompt_layers=[0, 2], num_attribute_layers=0, num_prototypes=5),
}
NAMES = ["small", "default", "__base__", "joint", "default", "plainish", "small"]


def multi_adapter_model():
    model = tiny_ship_model(seed=21)
    for index, (name, values) in enumerate(OTHERS.items()):
        model.add_adapter(name, ShipConfig(**values))
        fill_prototypes(model, seed=index + 1)
    with torch.no_grad():  # every classifier its own (as if trained)
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter))
    return model.double().eval()


def alone(model, name, x):
    if name == "__base__":
        with model.disable_adapter():
            return model(pixel_values=x).logits
    model.set_adapter(name)
    try:
        return model(pixel_values=x).logits
    finally:
        model.set_adapter("default")


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_each_sample_gets_its_own_adapter_and_classifier(cache):
    model = multi_adapter_model()
    if cache:
        for name in ("default", "small", "plainish"):
            model.set_adapter(name)
            model.enable_prompt_cache()
        model.set_adapter("default")
    x = pixels(len(NAMES), seed=22).double()
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            torch.testing.assert_close(mixed[row], alone(model, name, x[row : row + 1])[0], rtol=1e-10, atol=1e-10)
    # the samples really differ by adapter: the same image gives other logits under another adapter
    same = x[:1].expand(len(NAMES), -1, -1, -1)
    with torch.no_grad():
        logits = model(pixel_values=same, adapter_names=NAMES).logits
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])


def test_with_the_cache_each_adapter_s_shared_path_runs_once():
    model = multi_adapter_model()
    model.enable_prompt_cache()
    with counting_static_runs() as runs, torch.no_grad():
        x = pixels(len(NAMES), seed=23).double()
        model(pixel_values=x, adapter_names=NAMES)
        model(pixel_values=x, adapter_names=NAMES)
    layer = ship_peft.get_prompt_bank(model)
    shared = [layer.ship_prompts[name] for name in ("small", "default", "plainish")]  # decoupled attention
    assert len(runs) == 3 and all(any(run is prompts for run in runs) for prompts in shared)


def test_bad_mixed_batches_are_clear_errors():
    model = multi_adapter_model()
    x = pixels(3, seed=24).double()
    with pytest.raises(ValueError, match=r"names 2 adapters for a batch of 3 images"):
        model(pixel_values=x, adapter_names=["default", "small"])
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        model(pixel_values=x, adapter_names=["default", "nope", "small"])
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        model(pixel_values=x, adapter_names=["default"] * 3, output_hidden_states=True)
    model.add_adapter("wide", ShipConfig(num_prompts=2, prompt_layers=[0], num_attribute_layers=0))
    classifier = model.base_model.model.classifier
    classifier.modules_to_save["wide"] = torch.nn.Linear(32, 5).double()
    with pytest.raises(ValueError, match="classifiers of different sizes"):
        model(pixel_values=x, adapter_names=["default", "wide", "small"])
