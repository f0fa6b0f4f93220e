# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The shared prompt path (``docs/method.md`` §3): the semantic and shared prompts run once per batch, in training as
in inference, and give the same logits, losses and gradients as every sample carrying its own copy."""

from __future__ import annotations

import contextlib
from functools import partial
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import Dinov2ForImageClassification

import ship_peft
from ship_peft.layer import ShipBlock, ShipPromptBank
from ship_peft.stochastic_depth import plan_drops

from test_backbones import dinov2_config, plain_model, ship_on
from utils import pixels, tiny_ship_model

LABELS = torch.tensor([0, 1, 2, 1, 0])

CONFIGS = {
    "default": {},
    "no-shared-prompts": {"num_shared_prompts": 0},
    "no-attribute-layers": {"num_attribute_layers": 0},
    "a-level-per-layer": {"prompt_layers": [0, 1, 2, 3]},
    "attribute-level-is-last-layer": {"prompt_layers": [0, 3], "num_attribute_layers": 1},
    "one-level": {"prompt_layers": [0], "num_shared_prompts": 2},
    "no-matching-loss": {"matching_loss_weight": 0.0},
}


@contextlib.contextmanager
def per_sample_path():
    """Every sample carries its own copy of the semantic and shared prompts (the method as written)."""
    with mock.patch.object(ShipPromptBank, "shares_prompts", lambda self, prompts, training: False):
        yield


@contextlib.contextmanager
def counting_static_runs():
    """Counts the runs of the shared path: its first step (``ShipBlock._advance_shared_path`` in block 0) when it is
    computed, not read from the cache; each run records the adapter's prompts."""
    runs = []
    original = ShipBlock._advance_shared_path

    def counting(block, group, *args):
        if block.layer_index == 0 and group.cached_path is None:
            runs.append(group.prompts)
        return original(block, group, *args)

    with mock.patch.object(ShipBlock, "_advance_shared_path", counting):
        yield runs


def train_step(model, x, labels=LABELS, autocast: bool = False) -> dict[str, torch.Tensor]:
    """One training forward and backward: the outputs and every trainable parameter's gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = model(pixel_values=x, labels=labels[: len(x)])
    outputs.loss.backward()
    result = {name: outputs[name].detach().float() for name in ("logits", "loss", "matching_loss") if name in outputs}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            result[f"grad {name}"] = parameter.grad.float()
    return result


def assert_same(shared: dict, per_sample: dict, **tolerance) -> None:
    assert shared.keys() == per_sample.keys()
    for name in shared:
        torch.testing.assert_close(shared[name], per_sample[name], msg=lambda m, n=name: f"{n}: {m}", **tolerance)


def step_with_recorded_loss(model, x) -> dict[str, torch.Tensor]:
    """One training step of any SHIP model on ``x`` (a stand-in loss on the logits, plus the matching loss)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the host's own training-time randomness (DINOv3's positions) draws alike on both paths
    with ship_peft.record_matching_loss() as call:
        outputs = model(pixel_values=x)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    loss = logits.square().mean() + call.matching_loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return {"logits": logits.detach(), "loss": loss.detach(), **grads}


def both_paths(model, step) -> tuple[dict, dict]:
    with counting_static_runs() as runs:
        shared = step(model)
    assert runs, "the shared path did not run"
    with per_sample_path():
        per_sample = step(model)
    return shared, per_sample


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_training_equals_the_per_sample_path_in_float64(config):
    model = tiny_ship_model(seed=3, **config).double()
    x = pixels(5, seed=4).double()
    shared, per_sample = both_paths(model, lambda m: train_step(m, x))
    assert any(name.startswith("grad") and "semantic_prompts" in name for name in shared)
    assert_same(shared, per_sample, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_training_with_gradient_checkpointing_equals_the_per_sample_path(reentrant):
    model = tiny_ship_model(seed=5).double()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    x = pixels(5, seed=6).double()
    shared, per_sample = both_paths(model, lambda m: train_step(m, x))
    assert_same(shared, per_sample, rtol=1e-12, atol=1e-12)
    model.activation_checkpointing_disable()
    assert_same(train_step(model, x), per_sample, rtol=1e-12, atol=1e-12)


def test_training_under_bf16_autocast_equals_the_per_sample_path():
    model = tiny_ship_model(seed=7)
    x = pixels(5, seed=8)
    shared, per_sample = both_paths(model, lambda m: train_step(m, x, autocast=True))
    assert_same(shared, per_sample, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_eval_equals_the_per_sample_path(cache):
    model = tiny_ship_model(seed=9).double().eval()
    if cache:
        model.enable_prompt_cache()
    x = pixels(5, seed=10).double()
    shared, per_sample = both_paths(model, lambda m: {"logits": m(pixel_values=x).logits})
    assert_same(shared, per_sample, rtol=1e-12, atol=1e-12)


def mlp_token_counts(model) -> list[tuple[int, int]]:
    """``(batch, tokens)`` of every call of every block's MLP during one training step."""
    calls = []
    layer = ship_peft.get_prompt_bank(model)
    handles = [
        block.mlp.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape[:2])))
        for block in layer.base_blocks()
    ]
    try:
        train_step(model, pixels(5, seed=1))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def test_samples_carry_no_copy_of_the_static_prompts_before_the_last_layer():
    # tiny ViT: N = 17 image tokens, 4 layers; K = 3, S = 10, A = 4 at layer 2 and 3 ([0, 2, 3]).
    model = tiny_ship_model(seed=1)
    calls = mlp_token_counts(model)
    per_sample = [tokens for batch, tokens in calls if batch == 5]
    static = [tokens for batch, tokens in calls if batch == 1]
    # Per sample: image tokens only until the attribute level (layer 2; the level ends there, so its attribute
    # outputs are not needed), then the last layer with all K + S + A prompts for the matching loss.
    assert per_sample == [17, 17, 17, 17 + 3 + 10 + 4]
    # Once for the batch: the semantic prompts that flow on from layer 0 to 1 (the shared ones are replaced).
    assert static == [3]
    with per_sample_path():
        assert [tokens for _, tokens in mlp_token_counts(model)] == [17 + 13, 17 + 13, 17 + 13 + 4, 17 + 13 + 4]


def test_attribute_outputs_flow_on_within_their_level():
    model = tiny_ship_model(seed=1, prompt_layers=[0, 1], num_attribute_layers=1, matching_loss_weight=0.0)
    per_sample = [tokens for batch, tokens in mlp_token_counts(model) if batch == 5]
    # layer 1 starts the attribute level (A = 4), whose outputs flow into layers 2 and 3; the last layer's prompt
    # outputs feed nothing without the matching loss.
    assert per_sample == [17, 17 + 4, 17 + 4, 17]


# Stochastic depth masks for 5 samples in 4 layers, [layer, branch (attention, MLP), sample]: True keeps the branch.
KEEP_ALL = np.ones((4, 2, 5), dtype=bool)
SPLIT_AT_FIRST_LAYER = KEEP_ALL.copy()
SPLIT_AT_FIRST_LAYER[0, 0, 1] = SPLIT_AT_FIRST_LAYER[0, 1, 3] = False
OWN_GROUPS = KEEP_ALL.copy()  # after layer 1 every sample has a history of its own
OWN_GROUPS[0, 0, [1, 3]] = OWN_GROUPS[0, 1, [2, 3]] = OWN_GROUPS[1, 0, 4] = False
ALL_DROP_ONE_BRANCH = KEEP_ALL.copy()
ALL_DROP_ONE_BRANCH[1, 1] = False
MASKS = {
    "never-splits": KEEP_ALL,
    "splits-at-the-first-layer": SPLIT_AT_FIRST_LAYER,
    "every-sample-its-own-group": OWN_GROUPS,
    "all-drop-one-branch": ALL_DROP_ONE_BRANCH,
    "drawn-at-rate-0.5": np.random.default_rng(0).random((4, 2, 5)) >= 0.5,
}
DROP_CONFIGS = {
    name: CONFIGS[name] for name in ("default", "no-shared-prompts", "a-level-per-layer", "no-matching-loss")
} | {"one-long-level": {"prompt_layers": [0, 3]}, "no-attribute-layers": {"prompt_layers": [0, 3], "num_attribute_layers": 0}}


@contextlib.contextmanager
def given_drops(keep: np.ndarray):
    """SHIP's stochastic depth with the masks ``keep`` instead of drawn ones (rates as configured)."""
    with mock.patch.object(
        ship_peft.layer, "draw_drops", lambda rates, batch, starts, device: plan_drops(keep, rates, starts, device)
    ):
        yield


@pytest.mark.parametrize("keep", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("config", DROP_CONFIGS.values(), ids=DROP_CONFIGS.keys())
def test_stochastic_depth_shares_the_prompts_per_history_and_equals_the_per_sample_path(config, keep):
    """Sample b gets exactly what the per-sample path gives it for the same masks: logits, losses and every
    gradient, in float64."""
    model = tiny_ship_model(seed=17, drop_path_rate=0.2, **config).double()
    x = pixels(5, seed=18).double()
    with given_drops(keep):
        shared, per_sample = both_paths(model, lambda m: train_step(m, x))
    assert_same(shared, per_sample, rtol=1e-12, atol=1e-12)
    if keep is not KEEP_ALL:  # the masks act: the equality above is not that of two runs without drops
        with given_drops(KEEP_ALL):
            assert not torch.equal(train_step(model, x)["logits"], shared["logits"])


def static_batches(model, keep: np.ndarray) -> list[int]:
    """The rows of the static prompts entering each layer in one training step (one per history group)."""
    batches = []
    original = ship_peft.layer.ShipPrompts.static_prompts

    def recording(prompts, *args):
        tokens = original(prompts, *args)
        batches.append(tokens.shape[0])
        return tokens

    with given_drops(keep), mock.patch.object(ship_peft.layer.ShipPrompts, "static_prompts", recording):
        train_step(model, pixels(5, seed=1))
    return batches


def test_the_shared_path_runs_once_per_history_group_and_a_new_level_joins_them_again():
    long_level = tiny_ship_model(seed=19, drop_path_rate=0.1, prompt_layers=[0, 3])
    assert static_batches(long_level, KEEP_ALL) == [1, 1, 1, 1]
    assert static_batches(long_level, SPLIT_AT_FIRST_LAYER) == [1, 3, 3, 1]  # layer 3 starts a level: fresh prompts
    assert static_batches(long_level, OWN_GROUPS) == [1, 4, 5, 1]
    assert static_batches(long_level, ALL_DROP_ONE_BRANCH) == [1, 1, 1, 1]  # the same history for all
    two_levels = tiny_ship_model(seed=19, drop_path_rate=0.1, prompt_layers=[0, 2])
    assert static_batches(two_levels, OWN_GROUPS) == [1, 4, 1, 1]  # layer 2 starts a level
    split_in_second_level = OWN_GROUPS.copy()
    split_in_second_level[2, 1, 0] = False
    assert static_batches(two_levels, split_in_second_level) == [1, 4, 1, 2]


def test_a_sample_s_prompts_are_dropped_with_its_image_tokens():
    """Where every sample drops both branches of layer 1, the prompts leave layer 1 as they entered it."""
    model = tiny_ship_model(seed=23, drop_path_rate=0.1, prompt_layers=[0])
    keep = KEEP_ALL.copy()
    keep[1] = False
    carried = []
    original = ship_peft.layer.ShipPrompts.static_prompts

    def recording(prompts, layer_index, semantic, dtype):
        carried.append(semantic)
        return original(prompts, layer_index, semantic, dtype)

    with given_drops(keep), mock.patch.object(ship_peft.layer.ShipPrompts, "static_prompts", recording):
        train_step(model, pixels(5, seed=1))
    torch.testing.assert_close(carried[2], carried[1], rtol=0, atol=0)
    assert not torch.equal(carried[3], carried[2])  # layer 2 keeps its branches


def test_stochastic_depth_draws_its_masks_once_and_checkpointing_replays_them():
    model = tiny_ship_model(seed=21, drop_path_rate=0.5).double()
    x = pixels(5, seed=22).double()
    torch.manual_seed(0)
    plain = train_step(model, x)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    assert_same(train_step(model, x), plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: tiny_ship_model(seed=11, vit_overrides={"hidden_dropout_prob": 0.2}, drop_path_rate=0.3),
        lambda: ship_on(Dinov2ForImageClassification(dinov2_config(drop_path_rate=0.2)), drop_path_rate=0.3),
    ],
    ids=["backbone-hidden-dropout", "backbone-stochastic-depth"],
)
def test_the_backbone_s_own_randomness_falls_back_to_per_sample_prompts(make_model):
    """The backbone's dropout and stochastic-depth modules draw their own masks inside the host's code, which SHIP
    cannot group by: each sample then carries its own prompts, as the method is written (docs/method.md §5)."""
    model = make_model()
    x = pixels(5, seed=12)
    with counting_static_runs() as runs:
        torch.manual_seed(0)
        fallback = step_with_recorded_loss(model, x)
    assert not runs
    with per_sample_path():
        torch.manual_seed(0)
        assert_same(fallback, step_with_recorded_loss(model, x), rtol=0, atol=0)
    with counting_static_runs() as runs:
        model.eval()(pixel_values=x)  # no randomness in eval: shared
    assert runs


def test_attention_probability_dropout_keeps_the_shared_path():
    model = tiny_ship_model(seed=13, vit_overrides={"attention_probs_dropout_prob": 0.1})  # prompts bypass it
    with counting_static_runs() as runs:
        train_step(model, pixels(5, seed=14))
    assert runs


def test_joint_softmax_runs_per_sample():
    model = tiny_ship_model(seed=15, decoupled_attention=False)
    with counting_static_runs() as runs:
        train_step(model, pixels(5, seed=16))
        model.eval()(pixel_values=pixels(5, seed=16))
    assert not runs


@pytest.mark.parametrize("name", ["deit_teacher", "dinov2_swiglu", "dinov2_registers", "dinov3", "clip"])
def test_every_transformers_family_shares_the_static_prompts(name):
    """The shared path sits on the backbone seam: each family's training equals its per-sample path in float64."""
    model = ship_on(plain_model(name, seed=3)).double()
    x = pixels(5, seed=4).double()
    step = partial(step_with_recorded_loss, x=x)
    shared, per_sample = both_paths(model, step)
    assert_same(shared, per_sample, rtol=1e-12, atol=1e-12)
