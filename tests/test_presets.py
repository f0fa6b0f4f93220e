# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""One definition of each method (ship_peft.presets), used by the CLI's training, and both benchmarks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

from ship_peft import ShipConfig, presets
from ship_peft.app.errors import InputError
from ship_peft.app.training import method_config


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"presets_test_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_vpt_presets_are_plain_vpt_on_any_depth():
    deep = presets.adapter_config("vpt-deep", num_layers=5, num_prompts=7)
    shallow = presets.adapter_config("vpt-shallow", num_layers=5, num_prompts=7)
    assert deep.prompt_layers == [0, 1, 2, 3, 4] and shallow.prompt_layers == [0]
    for config in (deep, shallow):
        assert (config.num_shared_prompts, config.num_attribute_layers, config.decoupled_attention) == (0, 0, False)
        assert config.matching_loss_weight == 0.0 and config.num_prompts == 7


@pytest.mark.parametrize("name, field, value", [
    ("ship-no-shared", "num_shared_prompts", 0),
    ("ship-no-attribute", "num_attribute_layers", 0),
    ("ship-no-matching", "matching_loss_weight", 0.0),
    ("ship-no-decoupled", "decoupled_attention", False),
    ("ship-no-levels", "prompt_layers", [0, 1, 2]),
])  # fmt: skip
def test_each_ablation_switches_off_one_component(name, field, value):
    ablation = presets.adapter_config(name, num_layers=3, num_prompts=4)
    ship = presets.adapter_config("ship", num_layers=3, num_prompts=4)
    assert getattr(ablation, field) == value != getattr(ship, field)
    others = {key for key in ship.to_dict() if key not in (field, "share_threshold")}
    assert {key: ablation.to_dict()[key] for key in others} == {key: ship.to_dict()[key] for key in others}


def test_lora_linear_full_and_unknown():
    lora = presets.adapter_config("lora", num_layers=4, modules_to_save=["classifier"])
    assert isinstance(lora, LoraConfig) and (lora.r, lora.lora_alpha) == (8, 16)
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and lora.modules_to_save == ["classifier"]
    assert presets.adapter_config("linear", num_layers=4) is None is presets.adapter_config("full", num_layers=4)
    with pytest.raises(ValueError, match="Unknown method preset 'vpt'"):
        presets.adapter_config("vpt", num_layers=4)


def test_training_builds_its_methods_from_the_presets():
    config = method_config("vpt-deep", {"num_prompts": 7}, num_layers=4)
    assert config.prompt_layers == [0, 1, 2, 3] and config.num_prompts == 7  # a level per layer, K prompts each
    assert (config.num_shared_prompts, config.num_attribute_layers, config.matching_loss_weight) == (0, 0, 0.0)
    assert config.decoupled_attention is False
    with pytest.raises(InputError, match="share_threshold"):  # the preset's own check, as the CLI's error
        method_config("ship", {"share_threshold": 2.0}, num_layers=4)


def test_speed_benchmark_builds_its_methods_from_the_presets():
    speed = load_benchmark("speed")
    settings = speed.BenchSettings(vit=dict(speed.MODEL_SIZES["tiny"], num_hidden_layers=3), prompt_layers=[0, 2])
    model = speed.build_model("vpt_deep", settings)
    expected = presets.adapter_config("vpt-deep", num_layers=3, num_prompts=60)  # K + S, as many tokens as SHIP
    assert model.peft_config["default"].prompt_layers == expected.prompt_layers
    assert model.peft_config["default"].num_prompts == expected.num_prompts
    lora = speed.build_model("lora", settings).peft_config["default"]
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16, {"q_proj", "v_proj"})


def test_accuracy_benchmark_builds_its_methods_from_the_presets():
    accuracy = load_benchmark("accuracy")
    args = accuracy.parse_args(["--vpt-prompts", "9", "--ship-prompts", "5", "--share-threshold", "0.9",
                                "--prototypes", "8"])
    for method in ("vpt_deep", "vpt_shallow", "ship", *accuracy.ABLATIONS):
        config = accuracy.ship_config(method, args, num_layers=4)  # the depth comes from the backbone, not 12
        name = method.replace("_", "-")
        values = {} if name.startswith("vpt") else dict(num_prompts=5, share_threshold=0.9, num_prototypes=8)
        recipe = dict(drop_path_rate=accuracy.recipe_of(method, args).drop_path_rate)  # the protocol's recipe
        expected = presets.adapter_config(name, 4, **({"num_prompts": 9} if name.startswith("vpt") else values),
                                          **recipe)
        assert isinstance(config, ShipConfig) and config.to_dict() == expected.to_dict(), method


def test_presets_are_reachable_from_the_package_as_the_readme_shows():
    import subprocess
    import sys

    code = "import ship_peft; print(ship_peft.presets.adapter_config('vpt-deep', num_layers=3, num_prompts=5).prompt_layers)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip() == "[0, 1, 2]", completed.stderr[-2000:]
