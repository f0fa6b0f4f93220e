# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Numerics: bf16/fp16 autocast forward and backward stay finite (tiny model; ViT-B/16-sized random weights with
extreme prompt values), the matching loss and the attribute-prompt cosine are safe for zero vectors, and moving the
model between dtypes and devices keeps the prompts and the prototype buffer together."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification

import ship_peft
from ship_peft.layer import ShipPrompts, prompt_matching_loss

from utils import fill_prototypes, pixels, tiny_ship_model, tiny_vit

LABELS = torch.tensor([0, 1, 2, 1])
AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def ship_prompts(model) -> ShipPrompts:
    return ship_peft.get_prompt_bank(model).ship_prompts["default"]


def make_extreme(prompts: ShipPrompts, scale: float, seed: int = 0) -> None:
    """Prompt values of magnitude ``scale`` (random signs; 0 gives all-zero prompts), one token at +-scale exactly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in prompts.parameters():
            values = torch.randn(parameter.shape, generator=generator).clamp(-1.5, 1.5) * scale
            parameter.copy_(values)
            parameter.view(-1, parameter.shape[-1])[0] = scale * torch.sign(torch.randn(parameter.shape[-1]))


def assert_finite_training_step(model, outputs) -> None:
    for name in ("loss", "logits", "classification_loss", "matching_loss"):
        value = outputs.get(name)
        assert value is not None, f"no {name}"
        assert torch.isfinite(value).all(), f"{name} is not finite: {value}"
    outputs.loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, parameter in trainable:
        assert parameter.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(parameter.grad).all(), f"non-finite gradient for {name}"
    assert any(parameter.grad.abs().sum() > 0 for name, parameter in trainable if "ship_prompts" in name)


# ---------------------------------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "joint"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 1e4, 6e4], ids=["zero", "unit", "1e4", "6e4"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_autocast_training_step_is_finite_on_the_tiny_model(dtype, scale, decoupled):
    model = tiny_ship_model(seed=5, decoupled_attention=decoupled).train()
    if scale != 1.0:
        make_extreme(ship_prompts(model), scale)
    with torch.autocast("cpu", dtype=dtype):
        outputs = model(pixel_values=pixels(), labels=LABELS)
    assert outputs.logits.dtype in (dtype, torch.float32)
    assert_finite_training_step(model, outputs)


@pytest.fixture(scope="module")
def vit_b16():
    """ViT-B/16-sized random weights (768 wide, 12 layers, 12 heads, MLP 3072), built once for this module."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, num_labels=10, layer_norm_eps=1e-6,
    )  # fmt: skip
    return ViTForImageClassification(config)


# fp16 matmuls are emulated on CPUs without native fp16 (about 30x slower than bf16 here), so the fp16 case uses
# 64 x 64 images (16 patches) and K = 10: the width, depth and heads are still ViT-B/16's.
@pytest.mark.parametrize(
    "dtype, image_size, num_prompts",
    [pytest.param(torch.bfloat16, 224, 50, id="bf16-224px-K50"), pytest.param(torch.float16, 64, 10, id="fp16-64px-K10")],
)
def test_autocast_training_step_is_finite_on_vit_b16_with_extreme_prompts(vit_b16, dtype, image_size, num_prompts):
    config = ship_peft.ShipConfig(num_prompts=num_prompts, prompt_layers=[0, 2, 4, 6, 8, 11])  # S = A = 10, M = 200
    model = get_peft_model(copy.deepcopy(vit_b16), config)
    fill_prototypes(model, seed=1)
    make_extreme(ship_prompts(model), 3e4, seed=1)
    model.train()
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=dtype):
        outputs = model(pixel_values=x, labels=torch.tensor([3]), interpolate_pos_encoding=image_size != 224)
    assert_finite_training_step(model, outputs)


# ------------------------------------------------------------------------------------------------------ zero vectors


def dtype_params():
    return [
        pytest.param(torch.float32, id="fp32"),
        pytest.param(torch.bfloat16, id="bf16"),
        pytest.param(torch.float16, id="fp16"),
    ]


@pytest.mark.parametrize("dtype", dtype_params())
def test_matching_loss_is_safe_for_zero_vectors(dtype):
    prompts = torch.zeros(2, 3, 8)
    prompts[0, 1] = 0.5
    prompts[1, 2] = torch.arange(8.0)
    tokens = torch.zeros(2, 4, 8)
    tokens[1, 0] = 1.0
    prompts, tokens = prompts.to(dtype).requires_grad_(), tokens.to(dtype).requires_grad_()
    loss = prompt_matching_loss(prompts, tokens)
    assert torch.isfinite(loss), loss
    # zero prompt rows are orthogonal to everything: distance 1 - 0 = 1 to their best token
    assert 0.0 <= loss.item() <= 1.0
    loss.backward()
    assert torch.isfinite(prompts.grad).all() and torch.isfinite(tokens.grad).all()
    all_zero = prompt_matching_loss(torch.zeros(1, 2, 8, dtype=dtype), torch.zeros(1, 3, 8, dtype=dtype))
    assert all_zero.item() == 1.0


@pytest.mark.parametrize("dtype", dtype_params())
def test_attribute_prompt_cosine_is_safe_for_zero_tokens_and_prototypes(dtype):
    config = ship_peft.ShipConfig(num_prompts=2, prompt_layers=[0, 2], num_attribute_prompts=3, num_prototypes=4)
    prompts = ShipPrompts(config, hidden_size=8).to(dtype)
    with torch.no_grad():
        prompts.prototypes.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
        prompts.prototypes[1] = 0.0  # a zero prototype
    top_tokens = torch.zeros(2, 3, 8, dtype=dtype)
    top_tokens[1, 0] = 1.0
    top_tokens.requires_grad_()
    attribute = prompts.attribute_prompts_for(2, top_tokens)
    assert attribute.shape == (2, 3, 8)
    assert torch.isfinite(attribute).all()
    # a zero token has cosine 0 with every prototype: the pattern is their plain mean
    expected = config.attribute_mix * prompts.prototypes.mean(0) + (1 - config.attribute_mix) * prompts.attribute_prompts[0, 0]
    torch.testing.assert_close(attribute[0, 0], expected, rtol=0.02, atol=0.02)
    attribute.float().sum().backward()
    assert torch.isfinite(top_tokens.grad).all() and torch.isfinite(prompts.attribute_prompts.grad).all()


def test_zero_prompts_train_with_finite_gradients():
    model = tiny_ship_model(seed=6).train()
    make_extreme(ship_prompts(model), 0.0)
    assert_finite_training_step(model, model(pixel_values=pixels(), labels=LABELS))


# ------------------------------------------------------------------------------------------ dtype and device moves


def ship_tensors(model) -> dict[str, torch.Tensor]:
    prompts = ship_prompts(model)
    return {name: tensor.detach().clone() for name, tensor in [*prompts.named_parameters(), *prompts.named_buffers()]}


@pytest.mark.parametrize(
    "move, dtype, tolerance",
    [
        pytest.param(lambda m: m.double(), torch.float64, 1e-5, id="double"),
        pytest.param(lambda m: m.half(), torch.float16, 3e-2, id="half"),
        pytest.param(lambda m: m.to(torch.bfloat16), torch.bfloat16, 1e-1, id="to-bf16"),
        pytest.param(lambda m: m.to("cpu", torch.float64), torch.float64, 1e-5, id="to-cpu-float64"),
    ],
)
def test_dtype_moves_keep_prompts_and_prototypes_together(move, dtype, tolerance):
    model = tiny_ship_model(seed=7).eval()
    x = pixels()
    expected = model(pixel_values=x).logits
    before = ship_tensors(model)
    assert before["prototypes"].abs().sum() > 0

    assert move(model) is model
    after = ship_tensors(model)
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == dtype and tensor.device == before[name].device, name
        assert torch.equal(tensor, before[name].to(dtype)), name
    logits = model(pixel_values=x).logits  # float32 pixels are cast to the backbone's dtype
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), expected, rtol=tolerance, atol=tolerance)

    model.float()
    for name, tensor in ship_tensors(model).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name].to(dtype).float()), name
    torch.testing.assert_close(model(pixel_values=x).logits, expected, rtol=tolerance, atol=tolerance)


def test_prompt_cache_follows_dtype_moves():
    """The inference cache of the static prompts is rebuilt after every move: never a stale dtype or stale values."""
    model = tiny_ship_model(seed=8).eval()
    reference = copy.deepcopy(model)  # the same moves, without the cache
    model.enable_prompt_cache()
    x = pixels()
    moves = [
        (lambda m: m, torch.float32),
        (lambda m: m.double(), torch.float64),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),  # rounds every value
        (lambda m: m.float(), torch.float32),  # values now differ from the first float32 pass
        (lambda m: m.half(), torch.float16),
        (lambda m: m.double(), torch.float64),
    ]
    for move, dtype in moves:
        move(model), move(reference)
        cached, plain = model(pixel_values=x).logits, reference(pixel_values=x).logits
        assert cached.dtype == plain.dtype == dtype
        tolerance = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
        torch.testing.assert_close(cached, plain, rtol=tolerance, atol=tolerance, msg=str(dtype))


def test_low_precision_backbone_keeps_float32_prompts_and_trains():
    """As PEFT does for float16/bfloat16 bases: the adapter stays float32; calibration and training still work."""
    base = tiny_vit(seed=9).to(torch.bfloat16)
    model = get_peft_model(base, ship_peft.ShipConfig(num_prompts=3, share_threshold=0.97, num_prototypes=4))
    ship_peft.initialize_ship_weights(model, [pixels(8, seed=1)], show_progress=False)
    for name, tensor in ship_tensors(model).items():
        assert tensor.dtype == torch.float32, name
    assert ship_prompts(model).prototypes.abs().sum() > 0
    model.train()
    outputs = model(pixel_values=pixels(), labels=LABELS)
    assert outputs.logits.dtype == torch.bfloat16
    assert_finite_training_step(model, outputs)
    assert ship_prompts(model).shared_prompts.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_moves_keep_prompts_and_prototypes_together():
    model = tiny_ship_model(seed=10).eval()
    x = pixels()
    expected = model(pixel_values=x).logits
    before = ship_tensors(model)
    model.to("cuda")
    for name, tensor in ship_tensors(model).items():
        assert tensor.device.type == "cuda" and torch.equal(tensor.cpu(), before[name]), name
    torch.testing.assert_close(model(pixel_values=x.cuda()).logits.cpu(), expected, rtol=1e-4, atol=1e-4)
    model.enable_prompt_cache()
    torch.testing.assert_close(model(pixel_values=x.cuda()).logits.cpu(), expected, rtol=1e-4, atol=1e-4)
    model.half()
    torch.testing.assert_close(model(pixel_values=x.cuda()).logits.float().cpu(), expected, rtol=3e-2, atol=3e-2)
    model.cpu().float()
    for name, tensor in ship_tensors(model).items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, before[name].half().float()), name
    torch.testing.assert_close(model(pixel_values=x).logits, expected, rtol=3e-2, atol=3e-2)
    model.train()
    with torch.autocast("cuda", dtype=torch.float16):
        outputs = model.cuda()(pixel_values=x.cuda(), labels=LABELS.cuda())
    assert_finite_training_step(model, outputs)
