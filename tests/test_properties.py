# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Property-based tests (hypothesis) over random small SHIP setups: depth, width, heads, patch and image size,
levels, prompt lengths, every feature on or off, attention implementation and batch size.

For every setup the forward runs with the right output shapes, the gradients reach exactly the trainable parameters
(the prompts and the classifier; never the frozen backbone or the prototype buffer), and save/load is an identity.
Derandomized (the same examples on every run) with a modest number of examples, so CI is deterministic and quick.
"""

import tempfile
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import ship_peft

from utils import fill_prototypes, tiny_vit

SETTINGS = settings(
    max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


@dataclass
class Setup:
    vit: dict
    ship: dict
    batch: int

    @property
    def num_tokens(self) -> int:  # CLS + patches
        return 1 + (self.vit["image_size"] // self.vit["patch_size"]) ** 2

    @property
    def depth(self) -> int:
        return self.vit["num_hidden_layers"]


@st.composite
def setups(draw, calibrated: bool = False) -> Setup:
    depth = draw(st.integers(1, 4))
    heads = draw(st.integers(1, 3))
    hidden = heads * draw(st.sampled_from([2, 4, 6]))
    patch = draw(st.integers(1, 5))
    per_side = draw(st.integers(1, 3))
    image = patch * per_side + draw(st.integers(0, patch - 1))  # a remainder the patch grid drops
    num_tokens = 1 + per_side**2
    vit = dict(
        num_hidden_layers=depth,
        num_attention_heads=heads,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        patch_size=patch,
        image_size=image,
        num_labels=draw(st.integers(2, 4)),
        attn_implementation=draw(st.sampled_from(["sdpa", "eager"])),
    )
    if calibrated:
        levels = {"prompt_layers": None, "share_threshold": draw(st.sampled_from([0.5, 0.9, 0.99, 1.0]))}
    else:
        later = draw(st.sets(st.integers(1, depth - 1))) if depth > 1 else set()
        levels = {"prompt_layers": [0, *sorted(later)]}
    ship = dict(
        **levels,
        num_prompts=draw(st.integers(1, 4)),
        num_shared_prompts=draw(st.integers(0, 3)),
        num_attribute_prompts=draw(st.integers(0, min(3, num_tokens))),
        num_attribute_layers=draw(st.integers(0, 2)),
        num_prototypes=draw(st.integers(1, 4)),
        attribute_mix=draw(st.sampled_from([0.0, 0.1, 0.9])),
        decoupled_attention=draw(st.booleans()),
        prompt_attention_weight=draw(st.sampled_from([0.1, 0.5, 1.0])),
        matching_loss_weight=draw(st.sampled_from([0.0, 0.5])),
        matching_top_k=draw(st.integers(1, num_tokens + 2)),  # T > N is allowed
    )
    return Setup(vit=vit, ship=ship, batch=draw(st.integers(1, 3)))


def build(setup: Setup, seed: int = 0):
    model = get_peft_model(tiny_vit(seed, **setup.vit), ship_peft.ShipConfig(**setup.ship))
    fill_prototypes(model, seed)
    return model


def inputs(setup: Setup, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    size = setup.vit["image_size"]
    pixel_values = torch.randn(setup.batch, 3, size, size, generator=generator)
    labels = torch.randint(setup.vit["num_labels"], (setup.batch,), generator=generator)
    return pixel_values, labels


def expected_trainable(model) -> set[str]:
    return {
        name
        for name, _ in model.named_parameters()
        if ".ship_prompts.default." in name or ".classifier.modules_to_save.default." in name
    }


@settings(SETTINGS, max_examples=100)
@given(setup=setups())
def test_forward_shapes_and_gradients_reach_exactly_the_trainable_parameters(setup):
    model = build(setup).train()
    pixel_values, labels = inputs(setup)
    outputs = model(pixel_values=pixel_values, labels=labels, output_hidden_states=True)

    assert outputs.logits.shape == (setup.batch, setup.vit["num_labels"])
    assert len(outputs.hidden_states) == setup.depth + 1
    for hidden in outputs.hidden_states:  # image tokens only: the prompts never leak into the outputs
        assert hidden.shape == (setup.batch, setup.num_tokens, setup.vit["hidden_size"])
    assert torch.isfinite(outputs.loss)
    if setup.ship["matching_loss_weight"] > 0:
        assert outputs.matching_loss is not None and 0.0 <= outputs.matching_loss.item() <= 2.0
        torch.testing.assert_close(
            outputs.loss, outputs.classification_loss + setup.ship["matching_loss_weight"] * outputs.matching_loss
        )
    else:
        assert outputs.get("matching_loss") is None

    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == expected_trainable(model)
    outputs.loss.backward()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None, f"no gradient reaches {name}"
            assert torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, f"frozen {name} got a gradient"
    prompts = ship_peft.get_prompt_bank(model).ship_prompts["default"]
    assert "prototypes" not in dict(prompts.named_parameters())
    assert ("prototypes" in dict(prompts.named_buffers())) == bool(model.peft_config["default"].attribute_layers())
    # the gradients are real, not zeros: the classifier and the prompts of every level are used
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert head.weight.grad.abs().sum() > 0
    if setup.vit["hidden_size"] > 2:  # a LayerNorm over 2 features maps every vector to +-1: no gradient
        for level, parameter in enumerate(prompts.semantic_prompts):
            assert parameter.grad.abs().sum() > 0, f"level {level} prompts get a zero gradient"
        if prompts.attribute_prompts is not None and setup.ship["attribute_mix"] < 1:
            assert prompts.attribute_prompts.grad.abs().sum() > 0


@SETTINGS
@given(setup=setups())
def test_save_then_load_is_an_identity(setup):
    model = build(setup, seed=2).eval()
    pixel_values, _ = inputs(setup, seed=3)
    expected = model(pixel_values=pixel_values).logits
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        saved = load_file(f"{directory}/adapter_model.safetensors")
        loaded = PeftModel.from_pretrained(tiny_vit(99, **setup.vit), directory).eval()  # other initial weights
        with tempfile.TemporaryDirectory() as again:
            loaded.save_pretrained(again)
            resaved = load_file(f"{again}/adapter_model.safetensors")

    # the backbone was rebuilt from another seed: copy it so that only the adapter is compared
    base_keys = [name for name in state if name not in {n for n in state if "ship_prompts" in n or "classifier" in n}]
    loaded.load_state_dict({name: state[name] for name in base_keys}, strict=False)
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    for name, tensor in state.items():
        if "original_module" not in name:  # the untouched copy of the head belongs to the base model
            assert torch.equal(loaded_state[name], tensor), name
    assert resaved.keys() == saved.keys()
    for name in saved:
        assert torch.equal(resaved[name], saved[name]), name
    ignored = {"inference_mode", "auto_mapping"}  # set by loading for inference / by PEFT when saving
    loaded_config, config = loaded.peft_config["default"].to_dict(), model.peft_config["default"].to_dict()
    assert {k: v for k, v in loaded_config.items() if k not in ignored} == {
        k: v for k, v in config.items() if k not in ignored
    }
    assert torch.equal(loaded(pixel_values=pixel_values).logits, expected)


@settings(SETTINGS, max_examples=25)
@given(setup=setups(calibrated=True))
def test_calibration_finds_valid_levels_and_the_forward_runs(setup):
    model = get_peft_model(tiny_vit(4, **setup.vit), ship_peft.ShipConfig(**setup.ship))
    pixel_values, labels = inputs(Setup(setup.vit, setup.ship, batch=setup.ship["num_prototypes"] + 2), seed=5)
    result = ship_peft.initialize_ship_weights(model, [pixel_values], show_progress=False)
    levels = result.prompt_layers
    assert levels[0] == 0 and levels == sorted(set(levels)) and levels[-1] < setup.depth
    assert model.peft_config["default"].prompt_layers == levels
    if setup.ship["share_threshold"] == 1.0:
        assert levels == list(range(setup.depth))  # every layer its own level (cosine <= 1 up to rounding)
    assert result.affinity.shape == (setup.depth, setup.depth)
    prompts = ship_peft.get_prompt_bank(model).ship_prompts["default"]
    assert len(prompts.semantic_prompts) == len(levels)
    if model.peft_config["default"].attribute_layers():
        assert result.prototypes.shape == (setup.ship["num_prototypes"], setup.vit["hidden_size"])
        torch.testing.assert_close(prompts.prototypes, result.prototypes.float())
    model.train()
    outputs = model(pixel_values=pixel_values[: setup.batch], labels=labels[: setup.batch])
    assert outputs.logits.shape == (setup.batch, setup.vit["num_labels"]) and torch.isfinite(outputs.loss)


@settings(SETTINGS, max_examples=25)
@given(setup=setups(), extra=st.integers(1, 3))
def test_more_attribute_prompts_than_image_tokens_is_a_clear_error(setup, extra):
    ship = {**setup.ship, "num_attribute_prompts": setup.num_tokens + extra, "num_attribute_layers": 2}
    model = build(Setup(setup.vit, ship, setup.batch))
    if not model.peft_config["default"].attribute_layers():
        return  # one level: no attribute prompts, any A is fine
    with pytest.raises(ValueError, match="num_attribute_prompts"):
        model(pixel_values=inputs(setup)[0])
