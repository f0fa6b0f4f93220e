# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Stochastic depth of the frozen blocks (docs/method.md §6, ``ShipConfig.drop_path_rate``)."""

from __future__ import annotations

import pytest
import torch

import ship_peft
from ship_peft import functional as ship_layer
from ship_peft.app.cli import build_parser, _resolve, OFFLINE_PRESET
from ship_peft.app.training import SHIP_HYPERPARAMETERS
from ship_peft.stochastic_depth import BranchScales, draw_drops

from utils import pixels, tiny_ship_model

LABELS = torch.tensor([0, 1, 2, 0])


def test_each_branch_is_dropped_per_sample_with_its_rate_and_kept_ones_keep_the_expectation():
    torch.manual_seed(0)
    drops = draw_drops([0.0, 0.3], 20000, [0], "cpu")
    assert drops[0].samples == BranchScales()  # rate 0: nothing dropped, the branches added as they are
    attention, mlp = drops[1].samples.attention, drops[1].samples.mlp
    for scales in (attention, mlp):
        assert scales.dtype == torch.float32  # every device holds it (MPS has no float64)
        assert scales.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
        assert (scales == 0).double().mean().item() == pytest.approx(0.3, abs=0.015)
    both = ((attention == 0) & (mlp == 0)).double().mean().item()
    assert both == pytest.approx(0.09, abs=0.01)  # the two branches are drawn separately
    branch = torch.randn(1, 5, 3).expand(4, 5, 3)
    scaled = ship_layer.drop_path(branch, torch.tensor([0.0, 2.0, 0.0, 2.0], dtype=torch.float64))
    assert scaled.dtype == branch.dtype and torch.equal(scaled[0], torch.zeros(5, 3))
    torch.testing.assert_close(scaled[1], branch[1] * 2)
    assert ship_layer.drop_path(branch, None) is branch


def test_layer_rates_grow_linearly_with_depth_in_training_only(monkeypatch):
    rates = []
    real = ship_peft.layer.draw_drops
    monkeypatch.setattr(ship_peft.layer, "draw_drops", lambda r, *args: rates.append(list(r)) or real(r, *args))
    model = tiny_ship_model(drop_path_rate=0.3).train()
    model(pixel_values=pixels(), labels=LABELS)
    assert rates == [pytest.approx([0.0, 0.1, 0.2, 0.3])]  # 4 layers: linspace(0, 0.3, 4), as timm; one draw
    rates.clear()
    model.eval()(pixel_values=pixels())
    assert rates == []


def test_evaluation_ignores_drop_path():
    logits = [tiny_ship_model(seed=1, drop_path_rate=rate).eval()(pixel_values=pixels()).logits for rate in (0, 0.5)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_a_dropped_block_passes_its_input_through():
    model = tiny_ship_model(seed=2, drop_path_rate=1 - 1e-12).train()  # the last layer is dropped for every sample
    states = model(pixel_values=pixels(), output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[-1], states[-2], rtol=0, atol=0)
    assert not torch.equal(states[1], states[0])  # the first layer never drops
    torch.manual_seed(0)
    without = tiny_ship_model(seed=2).train()(pixel_values=pixels(), output_hidden_states=True).hidden_states
    assert not torch.equal(without[-1], without[-2])


def test_gradient_checkpointing_replays_the_same_drops():
    grads = []
    for checkpointing in (False, True):
        model = tiny_ship_model(seed=4, drop_path_rate=0.5).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)
        model(pixel_values=pixels(8), labels=torch.arange(8) % 3).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_out_of_range_rate_is_rejected(value):
    with pytest.raises(ValueError, match=r"drop_path_rate must lie in \[0.0, 1.0\)"):
        ship_peft.ShipConfig(drop_path_rate=value)


def test_the_library_default_is_off_and_the_command_line_follows_the_recipe():
    assert ship_peft.ShipConfig().drop_path_rate == 0.0
    parser = build_parser()
    for argv in (["train", "--model", "some/vit"], ["vtab1k", "--task", "dtd", "--data-root", "x"]):
        assert _resolve(parser.parse_args(argv), SHIP_HYPERPARAMETERS, {})["drop_path_rate"] == 0.1
    given = parser.parse_args(["train", "--drop-path-rate", "0.2"])
    assert _resolve(given, SHIP_HYPERPARAMETERS, OFFLINE_PRESET)["drop_path_rate"] == 0.2
