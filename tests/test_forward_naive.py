# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The package's SHIP forward pass, losses and gradients against a naive re-implementation of docs/method.md §2-§4
(``tests/utils/naive_ship.py``), in float64, over many configurations; plus: only prompts and classifier are trained."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import ViTForImageClassification

import ship_peft

from utils import base_state_dict, pixels, tiny_ship_model
from utils.naive_ship import NaiveHyperParameters, NaivePrompts, naive_ship_forward

LABELS = torch.tensor([0, 1, 2, 1])

#: float64 tolerance of sdpa (math kernel in float64) against the naive code.
TIGHT = dict(rtol=1e-10, atol=1e-12)
#: transformers' eager attention computes its softmax in float32 (``softmax(..., dtype=torch.float32)``), so an eager
#: backbone in float64 agrees with the naive float64 code to float32 precision only.
EAGER = dict(rtol=1e-5, atol=1e-7)
#: the smallest CLS-score gap that decides a top-k choice (both implementations must pick the same tokens).
MIN_SCORE_MARGIN = 1e-4


def sharpen_backbone(backbone: torch.nn.Module, seed: int) -> None:
    """Redraw the frozen backbone with O(1) weights, so that attention is far from uniform and CLS scores are spread
    out (the tiny models' 0.02-std init gives near-uniform attention, where some mistakes would hardly show)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if ship_peft.constants.SHIP_PREFIX in name:
                continue
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if "layernorm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * noise)
            elif parameter.dim() == 2 or "projection" in name:  # linear / patch-projection weights
                fan_in = parameter[0].numel()
                parameter.copy_(noise * 1.5 / math.sqrt(fan_in))
            else:  # cls token, position embeddings
                parameter.copy_(noise)


def classifier_of(model) -> torch.nn.Linear:
    """The trained copy of the classifier (PEFT ``modules_to_save``)."""
    return model.base_model.model.classifier.modules_to_save["default"]


def build(seed: int = 0, depth: int = 4, attn: str = "sdpa", **config):
    """A float64 SHIP model with a sharpened backbone, and a plain float64 ViT holding the same weights."""
    model = tiny_ship_model(
        seed=seed, vit_overrides={"num_hidden_layers": depth, "attn_implementation": attn}, **config
    )
    sharpen_backbone(model.get_base_model().vit, seed)
    with torch.no_grad():  # a classifier with O(1) logits
        classifier = classifier_of(model)
        generator = torch.Generator().manual_seed(2000 + seed)
        weight = torch.randn(classifier.weight.shape, generator=generator)
        classifier.weight.copy_(weight / math.sqrt(classifier.in_features))
    model.double()
    backbone = model.get_base_model().vit
    plain = ViTForImageClassification(backbone.config).double().eval()
    plain.vit.load_state_dict(base_state_dict(backbone))
    plain.classifier.load_state_dict(classifier_of(model).state_dict())
    plain.requires_grad_(False)
    plain.classifier.requires_grad_(True)
    return model, plain


def naive_prompts(model) -> NaivePrompts:
    """Leaf copies of the model's prompt tensors (and a copy of its prototypes)."""
    prompts = ship_peft.get_prompt_bank(model).ship_prompts["default"]

    def leaf(tensor):
        return None if tensor is None else tensor.detach().clone().requires_grad_(True)

    return NaivePrompts(
        semantic_prompts=[leaf(p) for p in prompts.semantic_prompts],
        shared_prompts=leaf(prompts.shared_prompts),
        attribute_prompts=leaf(prompts.attribute_prompts),
        prototypes=None if prompts.prototypes is None else prompts.prototypes.detach().clone(),
    )


def hyper_parameters(model) -> NaiveHyperParameters:
    config = model.peft_config["default"]
    return NaiveHyperParameters(
        prompt_layers=list(config.prompt_layers),
        num_attribute_layers=config.num_attribute_layers if config.num_attribute_prompts else 0,
        prompt_attention_weight=config.prompt_attention_weight,
        attribute_mix=config.attribute_mix,
        matching_top_k=config.matching_top_k,
        decoupled_attention=config.decoupled_attention,
        matching_loss_weight=config.matching_loss_weight,
    )


def package_tensors(model) -> dict[str, torch.Tensor]:
    """The package's trainable tensors by name: prompts and classifier."""
    prompts = ship_peft.get_prompt_bank(model).ship_prompts["default"]
    classifier = classifier_of(model)
    tensors = {f"semantic_prompts.{g}": p for g, p in enumerate(prompts.semantic_prompts)}
    tensors.update(
        shared_prompts=prompts.shared_prompts,
        attribute_prompts=prompts.attribute_prompts,
        classifier_weight=classifier.weight,
        classifier_bias=classifier.bias,
    )
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def naive_tensors(naive: NaivePrompts, plain) -> dict[str, torch.Tensor]:
    """The naive oracle's trainable tensors, under the names of :func:`package_tensors`."""
    tensors = {f"semantic_prompts.{g}": p for g, p in enumerate(naive.semantic_prompts)}
    tensors.update(
        shared_prompts=naive.shared_prompts,
        attribute_prompts=naive.attribute_prompts,
        classifier_weight=plain.classifier.weight,
        classifier_bias=plain.classifier.bias,
    )
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def assert_no_near_ties(naive_output) -> None:
    for choice in naive_output.choices:
        assert choice.margin() > MIN_SCORE_MARGIN, (
            f"near-tie in the top-{choice.k} choice for {choice.purpose} (margin {choice.margin():.3g}); "
            f"use another seed"
        )


def grads(loss, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = list(tensors)
    values = torch.autograd.grad(loss, [tensors[n] for n in names], retain_graph=True, allow_unused=True)
    return dict(zip(names, values))


def assert_grads_close(package: dict, naive: dict, tolerance: dict, what: str) -> None:
    assert package.keys() == naive.keys()
    for name in package:
        assert naive[name] is not None and package[name] is not None, f"no gradient of {what} for {name}"
        assert naive[name].abs().max() > 0, f"the naive {what} gives {name} a zero gradient (weak test case)"
        torch.testing.assert_close(package[name], naive[name], **tolerance, msg=lambda m: f"{what} / {name}: {m}")


# Configurations: (seed, depth, attn, ShipConfig overrides). tiny_ship_model's defaults are K=3, prompt_layers
# [0, 2, 3], M=5, A=4 (and ShipConfig's S=10, A_lv=2, lambda=beta=0.1, T=10, matching weight 0.5); N = 17 tokens.
CASES = {
    "default_levels_0_2_3": (0, 4, "sdpa", {}),
    "one_level_0": (0, 4, "sdpa", dict(prompt_layers=[0], num_prompts=5)),
    "levels_0_2": (0, 4, "sdpa", dict(prompt_layers=[0, 2], num_prompts=2)),
    "vpt_like_levels_0_1_2_3": (0, 4, "sdpa", dict(prompt_layers=[0, 1, 2, 3], num_prompts=2, num_shared_prompts=3)),
    "levels_0_3_one_attribute_level": (0, 4, "sdpa", dict(prompt_layers=[0, 3], num_prompts=4)),
    "no_shared_prompts": (0, 4, "sdpa", dict(prompt_layers=[0, 1, 3], num_shared_prompts=0)),
    "no_attribute_layers": (0, 4, "sdpa", dict(prompt_layers=[0, 1, 2, 3], num_attribute_layers=0)),
    "one_attribute_layer": (0, 4, "sdpa", dict(prompt_layers=[0, 1, 2, 3], num_attribute_layers=1)),
    "one_attribute_prompt": (0, 4, "sdpa", dict(num_attribute_prompts=1, num_prompts=6)),
    "attribute_prompts_all_tokens": (0, 4, "sdpa", dict(prompt_layers=[0, 2], num_attribute_prompts=17)),
    "not_decoupled": (0, 4, "sdpa", dict(decoupled_attention=False)),
    "no_matching_loss": (0, 4, "sdpa", dict(matching_loss_weight=0.0)),
    "matching_top_k_over_n": (0, 4, "sdpa", dict(matching_top_k=30)),
    "matching_top_1": (0, 4, "sdpa", dict(matching_top_k=1, num_shared_prompts=2)),
    "other_weights": (
        0,
        4,
        "sdpa",
        dict(prompt_attention_weight=0.3, attribute_mix=0.7, matching_loss_weight=2.0, num_prototypes=9),
    ),
    "depth_6": (1, 6, "sdpa", dict(prompt_layers=[0, 2, 3, 5], num_prompts=3, num_attribute_layers=3)),
    "depth_6_long_levels": (2, 6, "sdpa", dict(prompt_layers=[0, 4], num_prompts=7, num_shared_prompts=5)),
    "eager": (0, 4, "eager", {}),
    "eager_not_decoupled": (0, 4, "eager", dict(decoupled_attention=False, prompt_layers=[0, 1, 3])),
    "eager_depth_6": (1, 6, "eager", dict(prompt_layers=[0, 2, 5], matching_top_k=5)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_training_forward_losses_and_gradients_match_naive(case):
    seed, depth, attn, config = CASES[case]
    model, plain = build(seed, depth, attn, **config)
    tolerance = EAGER if attn == "eager" else TIGHT
    hyper = hyper_parameters(model)
    naive = naive_prompts(model)
    x = pixels(seed=seed).double()

    model.train()
    outputs = model(pixel_values=x, labels=LABELS)
    expected = naive_ship_forward(plain, naive, hyper, x, LABELS, training=True)
    assert_no_near_ties(expected)

    torch.testing.assert_close(outputs.logits, expected.logits, **tolerance)
    torch.testing.assert_close(outputs.loss, expected.loss, **tolerance)
    package, oracle = package_tensors(model), naive_tensors(naive, plain)
    assert_grads_close(grads(outputs.loss, package), grads(expected.loss, oracle), tolerance, "loss")
    if hyper.matching_loss_weight > 0:
        torch.testing.assert_close(outputs.classification_loss, expected.classification_loss, **tolerance)
        torch.testing.assert_close(outputs.matching_loss, expected.matching_loss, **tolerance)
        # The matching loss alone: it reaches every prompt, but not the classifier.
        prompt_names = [name for name in package if not name.startswith("classifier")]
        assert_grads_close(
            grads(outputs.matching_loss, {n: package[n] for n in prompt_names}),
            grads(expected.matching_loss, {n: oracle[n] for n in prompt_names}),
            tolerance,
            "matching loss",
        )
    else:
        assert outputs.get("matching_loss") is None
        torch.testing.assert_close(outputs.loss, expected.classification_loss, **tolerance)


EVAL_CASES = [
    ("default_levels_0_2_3", False),
    ("not_decoupled", False),
    ("depth_6", False),
    ("one_level_0", False),
    ("eager", False),
    # the inference prompt cache (docs/method.md §5, opt-in) must give the same logits
    ("default_levels_0_2_3", True),
    ("depth_6", True),
    ("no_shared_prompts", True),
    ("eager", True),
]


@pytest.mark.parametrize(
    "case, prompt_cache", EVAL_CASES, ids=[f"{case}{'-cached' if cache else ''}" for case, cache in EVAL_CASES]
)
def test_eval_logits_match_naive_without_matching_loss(case, prompt_cache):
    seed, depth, attn, config = CASES[case]
    model, plain = build(seed, depth, attn, **config)
    tolerance = EAGER if attn == "eager" else TIGHT
    x = pixels(seed=seed).double()
    model.eval()
    if prompt_cache:
        model.enable_prompt_cache()
    with torch.no_grad():
        outputs = model(pixel_values=x, labels=LABELS)
        expected = naive_ship_forward(plain, naive_prompts(model), hyper_parameters(model), x, LABELS, training=False)
        if prompt_cache:  # the second call reads the cache built by the first
            torch.testing.assert_close(model(pixel_values=x).logits, expected.logits, **tolerance)
    assert_no_near_ties(expected)
    assert expected.matching_loss is None
    assert outputs.get("matching_loss") is None and outputs.get("classification_loss") is None
    torch.testing.assert_close(outputs.logits, expected.logits, **tolerance)
    torch.testing.assert_close(outputs.loss, expected.classification_loss, **tolerance)


def test_naive_oracle_with_zero_prompt_weight_is_the_plain_backbone():
    """Self-check of the oracle against transformers: with decoupled attention and lambda = 0 the prompts cannot reach
    the image tokens, so SHIP's logits are the plain ViT's (the package's too)."""
    model, plain = build(0, 4, "sdpa", prompt_attention_weight=0.0)
    x = pixels().double()
    with torch.no_grad():
        reference = plain(pixel_values=x).logits
        expected = naive_ship_forward(plain, naive_prompts(model), hyper_parameters(model), x, training=False)
        package = model.eval()(pixel_values=x).logits
    torch.testing.assert_close(expected.logits, reference, **TIGHT)
    torch.testing.assert_close(package, reference, **TIGHT)
    # ... and lambda > 0 does change them, so the comparisons above are not vacuous.
    model, plain = build(0, 4, "sdpa")
    with torch.no_grad():
        changed = naive_ship_forward(plain, naive_prompts(model), hyper_parameters(model), x, training=False).logits
    assert (changed - plain(pixel_values=x).logits).abs().max() > 1e-3


#: the parameters a SHIP model with levels [0, 2, 3] (tiny_ship_model's default) trains.
TRAINABLE = {
    "base_model.model.vit.ship.ship_prompts.default.semantic_prompts.0",
    "base_model.model.vit.ship.ship_prompts.default.semantic_prompts.1",
    "base_model.model.vit.ship.ship_prompts.default.semantic_prompts.2",
    "base_model.model.vit.ship.ship_prompts.default.shared_prompts",
    "base_model.model.vit.ship.ship_prompts.default.attribute_prompts",
    "base_model.model.classifier.modules_to_save.default.weight",
    "base_model.model.classifier.modules_to_save.default.bias",
}


def test_gradients_reach_exactly_the_prompts_and_the_classifier():
    model = tiny_ship_model()  # levels [0, 2, 3]: three SIP sets, SSP, two attribute levels
    model.train()
    model(pixel_values=pixels(), labels=LABELS).loss.backward()
    expected = TRAINABLE
    parameters = dict(model.named_parameters())
    assert expected <= parameters.keys()
    for name, parameter in parameters.items():
        if name in expected:
            assert parameter.requires_grad, name
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().max() > 0, name
        else:
            assert not parameter.requires_grad, name
            assert parameter.grad is None, name
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    assert "base_model.model.vit.ship.ship_prompts.default.prototypes" in dict(model.named_buffers())


def test_adamw_steps_change_only_prompts_and_classifier():
    model = tiny_ship_model(seed=3)
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trained = TRAINABLE
    # Every parameter goes to the optimizer, with weight decay: a frozen tensor changes if it ever gets a gradient.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        model(pixel_values=pixels(seed=step), labels=LABELS).loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        if name in trained:
            assert not torch.equal(before[name], after[name]), f"{name} was not trained"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed but is frozen"
    assert trained <= before.keys()
