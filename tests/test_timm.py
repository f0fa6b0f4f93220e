# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""SHIP on timm's VisionTransformer: timm's own loop, gradient checkpointing and ``forward_intermediates`` run the
adapter; deepcopy and ``torch.save`` work at any point of training.

Skipped where timm is not installed, unless ``SHIP_PEFT_REQUIRE_TIMM=1`` (``.ci/run``'s timm environment), where a
missing timm fails.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import ship_peft

if os.environ.get("SHIP_PEFT_REQUIRE_TIMM") == "1":
    import timm  # noqa: F401  (must import here)
else:
    timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

LABELS = torch.tensor([0, 1, 2, 1])


def tiny_timm_ship(**config):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=3).double()
    values = dict(num_prompts=3, prompt_layers=[0, 2, 3], num_prototypes=5, num_attribute_prompts=4)
    model = get_peft_model(vit, ship_peft.ShipConfig(**values, **config))
    for prompts in ship_peft.get_prompt_bank(model).ship_prompts.values():
        prompts.prototypes.copy_(torch.randn(prompts.prototypes.shape, generator=torch.Generator().manual_seed(1)))
    return model


def pixels():
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)).double()


def step(model):
    """One training step's loss (cross-entropy plus the weighted matching loss) and the trainable gradients."""
    model.train()
    model.zero_grad(set_to_none=True)
    with ship_peft.record_matching_loss() as call:
        logits = model(pixels())
    loss = F.cross_entropy(logits, LABELS) + 0.5 * call.matching_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_block_list_keeps_its_shape_and_the_adapter_runs():
    model = tiny_timm_ship()
    blocks = model.base_model.model.blocks
    assert len(blocks) == 4 and all(isinstance(block, ship_peft.ShipBlock) for block in blocks)
    loss, grads = step(model)
    assert torch.isfinite(loss) and all(grad.abs().sum() > 0 for grad in grads.values())


@pytest.mark.parametrize(
    "config",
    [{}, {"decoupled_attention": False}, {"drop_path_rate": 0.5}],
    ids=["shared-path", "per-sample", "stochastic-depth-groups"],
)
def test_timm_s_gradient_checkpointing_gives_the_same_gradients(config):
    """timm recomputes each block's call in backward: it reads the pass state, stochastic-depth masks included, that
    the forward read."""
    model = tiny_timm_ship(**config)
    torch.manual_seed(3)
    loss, grads = step(model)
    model.base_model.model.set_grad_checkpointing(True)
    torch.manual_seed(3)
    checkpointed_loss, checkpointed = step(model)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_reentrant_checkpointing_is_a_clear_error(monkeypatch):
    import timm.layers.config

    model = tiny_timm_ship()
    model.base_model.model.set_grad_checkpointing(True)
    # reentrant checkpoints differentiate only through inputs that require grad (as for LoRA): let them
    model.base_model.model.pos_embed.requires_grad_(True)
    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        step(model)


def test_deepcopy_and_torch_save_after_a_training_step():
    model = tiny_timm_ship()
    step(model)
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    clone.base_model.model.set_grad_checkpointing(True)
    assert not model.base_model.model.grad_checkpointing  # switching the copy leaves the original alone
    model.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(pixels()), model(pixels()))


def test_forward_intermediates_runs_the_adapter():
    model = tiny_timm_ship().eval()
    vit = model.base_model.model
    with torch.no_grad():
        final, intermediates = vit.forward_intermediates(pixels())
        with model.disable_adapter():
            plain_final, plain_intermediates = vit.forward_intermediates(pixels())
        logits = model(pixels())
    assert [tuple(x.shape) for x in intermediates] == [(4, 32, 4, 4)] * 4
    assert not torch.allclose(intermediates[-1], plain_intermediates[-1])
    torch.testing.assert_close(vit.forward_head(final), logits)
