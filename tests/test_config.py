# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""ShipConfig: defaults of the reference recipe and self-validation of every field."""

import pytest
from peft import PeftConfig, get_peft_model

import ship_peft
from ship_peft import ShipConfig

from utils import tiny_vit


def test_defaults_are_the_reference_recipe():
    config = ShipConfig()
    assert (config.num_prompts, config.share_threshold, config.num_shared_prompts) == (50, 0.95, 10)
    assert (config.num_attribute_prompts, config.num_attribute_layers, config.num_prototypes) == (10, 2, 200)
    assert (config.attribute_mix, config.prompt_attention_weight) == (0.1, 0.1)
    assert (config.matching_loss_weight, config.matching_top_k) == (0.5, 10)
    assert config.decoupled_attention is True
    assert config.prompt_layers is None
    assert config.modules_to_save is None  # the model's classifiers, found by the backbone family
    assert config.peft_type == "SHIP"
    model = get_peft_model(tiny_vit(), ShipConfig(prompt_layers=[0]))
    assert model.peft_config["default"].modules_to_save == ["classifier"]


@pytest.mark.parametrize(
    "field, value, error, words",
    [
        ("num_prompts", 0, ValueError, ">= 1"),
        ("num_prompts", 2.5, TypeError, "must be an int"),
        ("num_prompts", True, TypeError, "must be an int"),
        ("num_shared_prompts", -1, ValueError, ">= 0"),
        ("num_attribute_prompts", -1, ValueError, ">= 0"),
        ("num_attribute_layers", -2, ValueError, ">= 0"),
        ("num_prototypes", 0, ValueError, ">= 1"),
        ("matching_top_k", 0, ValueError, ">= 1"),
        ("share_threshold", 0.0, ValueError, "(0.0, 1.0]"),
        ("share_threshold", 1.5, ValueError, "(0.0, 1.0]"),
        ("share_threshold", "high", TypeError, "must be a number"),
        ("attribute_mix", -0.1, ValueError, "[0.0, 1.0]"),
        ("prompt_attention_weight", 1.1, ValueError, "[0.0, 1.0]"),
        ("matching_loss_weight", -1.0, ValueError, "[0.0, inf)"),
        ("decoupled_attention", "yes", TypeError, "must be a bool"),
        ("prompt_layers", [], TypeError, "non-empty list"),
        ("prompt_layers", "0,2", TypeError, "non-empty list"),
        ("prompt_layers", [0, 2.0], TypeError, "ints only"),
        ("prompt_layers", [1, 3], ValueError, "must start at 0"),
        ("prompt_layers", [0, 4, 2], ValueError, "use [0, 2, 4]"),
        ("prompt_layers", [0, 2, 2], ValueError, "no repeats"),
    ],
)
def test_every_field_validates_itself(field, value, error, words):
    with pytest.raises(error) as info:
        ShipConfig(**{field: value})
    assert field in str(info.value)
    assert words in str(info.value)


FLOAT_FIELDS = ("share_threshold", "attribute_mix", "prompt_attention_weight", "matching_loss_weight", "drop_path_rate")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_float_fields_reject_nan_and_inf(field, value):
    with pytest.raises(ValueError, match=rf"ShipConfig.{field} must be a finite number"):
        ShipConfig(**{field: value})


def test_prompt_layers_beyond_depth_is_an_error_naming_the_depth():
    with pytest.raises(ValueError, match=r"has 4 layers .* drop the entries >= 4"):
        get_peft_model(tiny_vit(), ShipConfig(prompt_layers=[0, 2, 4]))


@pytest.mark.parametrize(
    "levels, num_attribute_layers, expected",
    [([0, 2, 5, 9, 11], 2, [9, 11]), ([0, 11], 2, [11]), ([0], 2, []), ([0, 4, 7], 1, [7]), ([0, 4, 7], 0, [])],
)
def test_attribute_layers_are_the_last_level_starts_after_zero(levels, num_attribute_layers, expected):
    config = ShipConfig(prompt_layers=levels, num_attribute_layers=num_attribute_layers)
    assert config.attribute_layers() == expected


def test_config_round_trips_through_json(tmp_path):
    config = ShipConfig(num_prompts=7, prompt_layers=[0, 3], share_threshold=0.9, decoupled_attention=False)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ship_peft.ShipConfig)
    assert (loaded.num_prompts, loaded.prompt_layers, loaded.share_threshold) == (7, [0, 3], 0.9)
    assert loaded.decoupled_attention is False


def test_target_modules_as_a_string():
    model = get_peft_model(tiny_vit(), ShipConfig(num_prompts=2, prompt_layers=[0], target_modules="vit.layers"))
    assert model.peft_config["default"].target_modules == ["vit.layers"]
    with pytest.raises(ValueError, match="matches none of the block sequences"):
        get_peft_model(tiny_vit(), ShipConfig(num_prompts=2, prompt_layers=[0], target_modules="vit"))


@pytest.mark.parametrize("value", ["CLS", "max", None])
def test_image_summary_takes_one_of_its_values(value):
    with pytest.raises(ValueError, match="ShipConfig.image_summary must be one of 'auto', 'cls', 'mean'"):
        ShipConfig(image_summary=value)
    assert ShipConfig().image_summary == "auto"
