# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""What PEFT's own test suite expects of every method, checked for SHIP next to LoRA on the same model."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

import ship_peft
from ship_peft import ShipConfig

from utils import pixels, tiny_ship_model, tiny_vit

SHIP = dict(num_prompts=3, prompt_layers=[0, 2], num_prototypes=5, num_attribute_prompts=4)


def ship(model=None, **kwargs):
    return get_peft_model(model if model is not None else tiny_vit(), ShipConfig(**SHIP), **kwargs)


def lora(model=None, **kwargs):
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    return get_peft_model(model if model is not None else tiny_vit(), config, **kwargs)


def adapter_dtypes(model, marker: str) -> set[torch.dtype]:
    return {parameter.dtype for name, parameter in model.named_parameters() if marker in name}


def test_input_embeddings_pass_through(tmp_path):
    for method in (ship, lora):
        model = method()
        assert model.get_input_embeddings() is model.get_base_model().vit.embeddings.patch_embeddings
        model.save_pretrained(tmp_path / method.__name__, save_embedding_layers=True)
        prepare_model_for_kbit_training(method(), use_gradient_checkpointing=False)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_as_lora(autocast, dtype):
    expected = torch.float32 if autocast else dtype
    assert adapter_dtypes(lora(tiny_vit().to(dtype), autocast_adapter_dtype=autocast), "lora_") == {expected}
    model = ship(tiny_vit().to(dtype), autocast_adapter_dtype=autocast)
    assert adapter_dtypes(model, "ship_prompts") == {expected}
    assert ship_peft.get_prompt_bank(model).ship_prompts["default"].prototypes.dtype == expected


def test_float64_backbone_gets_float64_prompts_as_lora():
    assert adapter_dtypes(lora(tiny_vit().double()), "lora_") == {torch.float64}
    assert adapter_dtypes(ship(tiny_vit().double()), "ship_prompts") == {torch.float64}


def test_prompts_built_by_calibration_keep_the_adapter_dtype():
    model = get_peft_model(
        tiny_vit().to(torch.bfloat16), ShipConfig(num_prompts=3, num_prototypes=4), autocast_adapter_dtype=False
    )
    data = [{"pixel_values": pixels(8, seed=1).to(torch.bfloat16)}]
    ship_peft.initialize_ship_weights(model, data, show_progress=False)
    assert adapter_dtypes(model, "ship_prompts") == {torch.bfloat16}


def test_delete_adapter_leaves_nothing_behind():
    model = tiny_ship_model()
    model.add_adapter("other", ShipConfig(**SHIP))
    layer = ship_peft.get_prompt_bank(model)
    model.set_adapter("other")
    layer.ship_prompts["other"].prototypes.normal_()  # stands in for calibration
    model(pixel_values=pixels())
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in layer.ship_prompts and "other" not in layer.ship_config
    assert "other" not in layer.autocast_adapter_dtype
    with pytest.raises(ValueError, match="No SHIP adapter named 'other'"):
        ship_peft.initialize_ship_weights(model, [{"pixel_values": pixels(8)}], adapter_name="other", show_progress=False)


def test_unload_returns_the_plain_base_model_as_lora():
    for method in (ship, lora):
        model = method()
        classifier = model.get_base_model().classifier.modules_to_save["default"]
        with torch.no_grad():
            classifier.weight.add_(1.0)  # the trained head is what unload keeps
        base = model.unload()
        assert type(base.classifier) is torch.nn.Linear and base.classifier is classifier
        assert not hasattr(base, "peft_config")
        assert not any("ship_prompts" in name or "lora_" in name for name, _ in base.named_parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # "Already found a `peft_config` attribute" would raise
            method(base)
    plain = ship().unload()
    torch.testing.assert_close(plain.eval()(pixel_values=pixels()).logits, tiny_vit().eval()(pixel_values=pixels()).logits)


def test_peft_s_status_reports_read_ship_s_layers_as_lora_s():
    model = ship()
    names = {status.name for status in model.get_layer_status()}
    assert {f"model.vit.layers.{i}" for i in range(4)} | {"model.vit.ship"} <= names
    status = model.get_model_status()
    assert status.available_adapters == ["default"] and status.requires_grad == {"default": True}
    assert status.peft_types == {"default": "SHIP"} and status.devices == {"default": ["cpu"]}


def test_unmerge_of_a_never_merged_model_warns_as_lora():
    for method in (ship, lora):
        with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
            method().unmerge_adapter()


def test_mixed_adapter_batches_in_training_are_a_clear_error():
    model = tiny_ship_model().train()
    with pytest.raises(ValueError, match=r"Mixed-adapter batches .* are for inference; call `model.eval\(\)`"):
        model(pixel_values=pixels(), adapter_names=["default"] * 4)


def test_the_adapter_config_is_the_one_source_of_its_hyper_parameters():
    model = tiny_ship_model(seed=2).eval()
    config = model.peft_config["default"]
    assert ship_peft.get_prompt_bank(model).ship_prompts["default"].config is config
    config.prompt_attention_weight = 0.0  # the prompts then leave the image tokens untouched
    with model.disable_adapter():
        plain = model(pixel_values=pixels()).logits
    torch.testing.assert_close(model(pixel_values=pixels()).logits, plain, rtol=1e-5, atol=1e-5)
    config.matching_loss_weight = 0.0
    outputs = model.train()(pixel_values=pixels(), labels=torch.tensor([0, 1, 2, 1]))
    assert "matching_loss" not in outputs
