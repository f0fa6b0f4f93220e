# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The inference prompt cache (docs/method.md §5): same logits as the full method, rebuilt on any change."""

import pytest
import ship_peft
import torch

from utils import pixels, tiny_ship_model

LABELS = torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"prompt_layers": [0, 1, 2, 3]},
        {"prompt_layers": [0], "num_attribute_layers": 0},
        {"num_shared_prompts": 0},
        {"prompt_layers": [0, 3], "num_attribute_layers": 1},
    ],
)
def test_cached_logits_equal_the_full_method(config):
    model = tiny_ship_model(seed=11, **config).double().eval()
    x = pixels(5, seed=12).double()
    expected = model(pixel_values=x).logits
    model.enable_prompt_cache()
    first = model(pixel_values=x).logits
    second = model(pixel_values=x[:2]).logits  # reuses the cache with another batch size
    torch.testing.assert_close(first, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, expected[:2], rtol=1e-12, atol=1e-12)


def test_cache_is_used_and_rebuilt_after_an_optimizer_step():
    model = tiny_ship_model(seed=13)
    layer = ship_peft.get_prompt_bank(model)
    model.enable_prompt_cache()
    model.eval()
    model(pixel_values=pixels())
    (cache,) = layer.prompt_cache._memo.values()
    model(pixel_values=pixels())
    assert next(iter(layer.prompt_cache._memo.values())) is cache  # reused

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    outputs = model(pixel_values=pixels(), labels=LABELS)
    assert next(iter(layer.prompt_cache._memo.values())) is cache  # training does not touch the eval memo
    outputs.loss.backward()
    optimizer.step()

    model.eval()
    cached = model(pixel_values=pixels()).logits
    assert next(iter(layer.prompt_cache._memo.values())) is not cache
    model.disable_prompt_cache()
    torch.testing.assert_close(cached, model(pixel_values=pixels()).logits, rtol=1e-5, atol=1e-5)
    assert layer.prompt_cache._memo == {}


def test_cache_needs_decoupled_attention():
    model = tiny_ship_model(decoupled_attention=False)
    with pytest.raises(ValueError, match="needs decoupled attention"):
        model.enable_prompt_cache()
