# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""``ship_peft.explain`` and ``ship-peft explain``: what SHIP looked at is what the forward selected."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForImageClassification

import ship_peft
from ship_peft.app.cli import main
from ship_peft.app.data import digits_dataset
from ship_peft.app.plots import TokenGrid
from ship_peft.assets import bundled_backbone_path

from test_backbones import plain_model, ship_on
from utils import pixels, tiny_ship_model


@contextlib.contextmanager
def forward_selections():
    """The token indices every ``gather_top_tokens`` call of the forward picked, in order."""
    picked = []
    real = ship_peft.layer.gather_top_tokens

    def recording(tokens, scores, k):
        picked.append(scores.topk(min(k, scores.shape[-1]), dim=-1).indices)
        return real(tokens, scores, k)

    with mock.patch.object(ship_peft.layer, "gather_top_tokens", recording):
        yield picked


@pytest.mark.parametrize("name", ["vit", "siglip"])  # the CLS token, and the mean token without one
def test_explain_gives_the_tokens_the_forward_picked(name):
    model = ship_on(plain_model(name), prompt_layers=[0, 2, 3]).eval()
    x = pixels(seed=5)
    with forward_selections() as picked:
        explanation = ship_peft.explain(model, x)
    assert list(explanation.attribute_tokens) == [2, 3]
    for chosen, (layer, tokens) in zip(picked, explanation.attribute_tokens.items()):
        torch.testing.assert_close(tokens, chosen, rtol=0, atol=0)
    torch.testing.assert_close(explanation.logits, model(pixel_values=x).logits)
    torch.testing.assert_close(explanation.attention.sum(dim=-1), torch.ones(4))
    assert sorted(explanation.summary_scores) == [0, 1, 2, 3]
    model.train()  # in training the last layer's pick feeds the matching loss: explain shows that pick
    with forward_selections() as picked:
        explanation = ship_peft.explain(model, x)
    torch.testing.assert_close(explanation.matching_tokens, picked[-1], rtol=0, atol=0)


def test_explain_records_nothing_outside_it():
    model = tiny_ship_model(seed=2).eval()
    with mock.patch("ship_peft.layer.block_forward", wraps=ship_peft.layer.block_forward) as block:
        model(pixel_values=pixels())
    assert [call.kwargs["need_scores"] for call in block.call_args_list] == [False, True, True, False]
    with pytest.raises(RuntimeError, match="adapter enabled"):
        with model.disable_adapter():
            ship_peft.explain(model, pixels())


def test_the_command_draws_the_tokens_the_forward_picked(tmp_path, capsys):
    """On the offline default's backbone: every cell drawn is a patch the forward picked, and nothing else."""
    base = AutoModelForImageClassification.from_pretrained(
        bundled_backbone_path(), num_labels=10, ignore_mismatched_sizes=True, dtype=torch.float32
    )
    model = get_peft_model(base, ship_peft.ShipConfig(num_prompts=2, prompt_layers=[0, 4, 8], num_prototypes=4))
    prototypes = ship_peft.get_prompt_bank(model).ship_prompts["default"].prototypes
    prototypes.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "adapter")
    base.config.save_pretrained(tmp_path / "adapter")
    digits_dataset()[0]["image"].save(tmp_path / "digit.png")
    command = ["explain", str(tmp_path / "adapter"), str(tmp_path / "digit.png"), "--output-dir", str(tmp_path / "out")]
    with forward_selections() as picked:
        assert main(command) == 0
    assert (tmp_path / "out" / "0000_digit.png").is_file()
    drawn = json.loads((tmp_path / "out" / "0000_digit.json").read_text())["drawn"]
    grid = TokenGrid.of(65)  # CLS + 8 x 8 patches
    for name, chosen in zip(["attribute layer 4", "attribute layer 8"], picked):
        cells = [grid.cell(token) for token in chosen[0].tolist()]
        assert drawn[name] == [list(cell) for cell in cells if cell is not None]
        assert [token for kind, token in drawn["prefix"] if kind == name] == [t for t in chosen[0].tolist() if t == 0]
    assert "digit.png: LABEL_" in capsys.readouterr().out
