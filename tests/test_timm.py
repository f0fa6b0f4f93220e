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
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

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
    del loss, checkpointed_loss
    assert not tensors_with_history()  # what the recomputation read is dropped with the step's graph


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


# ---------------------------------------------------------------------------------------------------- the families

from types import SimpleNamespace  # noqa: E402

from timm.models.eva import Eva  # noqa: E402

from test_forward_naive import (  # noqa: E402
    TIGHT,
    assert_grads_close,
    assert_no_near_ties,
    grads,
    hyper_parameters,
    naive_prompts,
    sharpen_backbone,
)
from utils import fill_prototypes, tensors_with_history  # noqa: E402
from utils.naive_ship import BlockParts, ImageLayout, naive_ship_on_host  # noqa: E402

COMMON = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=3)

#: family -> builder of a tiny random model
TIMM_FAMILIES = {
    "vit_avg_pool": lambda: VisionTransformer(**COMMON, class_token=False, global_pool="avg"),
    "vit_map_pool": lambda: VisionTransformer(**COMMON, class_token=False, global_pool="map", reg_tokens=1),
    "eva02": lambda: Eva(
        **COMMON, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
        scale_attn_inner=True,
    ),
    "dinov3": lambda: Eva(
        **COMMON, qkv_bias=False, init_values=0.5, rope_type="dinov3", rope_temperature=100, rope_rotate_half=True,
        use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=2, use_fc_norm=False, global_pool="token",
        dynamic_img_size=True,
    ),
    "perception_encoder": lambda: Eva(
        **COMMON, global_pool="map", attn_type="rope", qkv_fused=False, use_pre_transformer_norm=True,
        use_rot_pos_emb=True, ref_feat_shape=(4, 4), rope_grid_offset=1.0, rope_grid_indexing="xy",
        attn_pool_num_heads=2, attn_pool_mlp_ratio=2.0, class_token=False,
    ),
}


def timm_family(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TIMM_FAMILIES[name]().eval()


def ship_on_timm(plain: torch.nn.Module, **config) -> torch.nn.Module:
    values = dict(num_prompts=3, prompt_layers=[0, 2, 3], num_prototypes=5, num_attribute_prompts=4, **config)
    model = get_peft_model(copy.deepcopy(plain), ship_peft.ShipConfig(**values))
    fill_prototypes(model)
    return model


@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_zero_prompt_weight_reproduces_each_timm_family(name):
    plain = timm_family(name)
    model = ship_on_timm(plain, prompt_attention_weight=0.0)
    x = pixels().float()
    for train in (False, True):
        plain.train(train)
        model.train(train)
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ship_on_timm(plain).eval()(x), plain.eval()(x), rtol=1e-3, atol=0)  # lambda > 0 acts


def naive_timm_parts(block) -> BlockParts:
    """A timm block's parts as the oracle reads them: q / k / v cut from a fused projection (EVA: its own q and v
    biases), the attention output norm (EVA-02), layer scale; the token-wise MLP is the block's own."""
    attention = block.attn
    if attention.qkv is None:
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    else:
        size = attention.head_dim * attention.num_heads
        rows = [slice(i * size, (i + 1) * size) for i in range(3)]
        if getattr(attention, "q_bias", None) is not None:
            biases = [attention.q_bias, attention.k_bias, attention.v_bias]
        else:
            biases = [None if attention.qkv.bias is None else attention.qkv.bias[part] for part in rows]
        q, k, v = [SimpleNamespace(weight=attention.qkv.weight[part], bias=bias) for part, bias in zip(rows, biases)]
    scales = [getattr(block, "gamma_1", None), getattr(block, "gamma_2", None)]
    if hasattr(block, "ls1"):
        scales = [getattr(block.ls1, "gamma", None), getattr(block.ls2, "gamma", None)]
    norm = None if isinstance(attention.norm, torch.nn.Identity) else attention.norm
    return BlockParts(block.norm1, q, k, v, attention.proj, block.norm2, block.mlp, *scales, attention_norm=norm)


def naive_timm_layout(plain: torch.nn.Module):
    """The family's image layout from the host's block arguments: timm's rotary embedding written out (``rope`` is
    ``[sin ; cos]``; interleaved pairs, or halves with ``rotate_half``) after the prefix tokens, and the image
    summary (the mean token without a class token)."""
    attention = plain.blocks[0].attn
    num_prefix, half = getattr(attention, "num_prefix_tokens", 0), getattr(attention, "rotate_half", False)
    summary = "cls" if getattr(plain, "cls_token", None) is not None else "mean"

    def turn(patches: torch.Tensor) -> torch.Tensor:
        if half:
            first, second = patches.chunk(2, dim=-1)
            return torch.cat([-second, first], dim=-1)
        return torch.stack([-patches[..., 1::2], patches[..., ::2]], dim=-1).flatten(-2)

    def layout_of(args: tuple, kwargs: dict) -> ImageLayout:
        rope = kwargs.get("rope")
        if rope is None:
            return ImageLayout(summary=summary)
        sin, cos = rope.chunk(2, dim=-1)

        def rotate(x: torch.Tensor) -> torch.Tensor:  # one head's queries or keys [B, N, d]
            prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
            return torch.cat([prefix, patches * cos + turn(patches) * sin], dim=1)

        return ImageLayout(rotate=rotate, summary=summary)

    return layout_of


@pytest.mark.parametrize("case", [{}, {"decoupled_attention": False}], ids=["default", "not_decoupled"])
@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_each_timm_family_matches_the_naive_oracle(name, case):
    plain = timm_family(name, seed=1)
    sharpen_backbone(plain, seed=1)
    plain.double()
    model = ship_on_timm(plain, **case).double().train()
    plain_copy = copy.deepcopy(plain).train()
    x = pixels()
    naive, hyper = naive_prompts(model), hyper_parameters(model)
    parts = [naive_timm_parts(block) for block in plain_copy.blocks]
    expected = naive_ship_on_host(
        plain_copy, plain_copy.blocks, parts, 2, naive, hyper, x, LABELS, layout_of=naive_timm_layout(plain_copy)
    )
    assert_no_near_ties(expected)
    with ship_peft.record_matching_loss() as call:
        logits = model(x)
    loss = F.cross_entropy(logits, LABELS) + hyper.matching_loss_weight * call.matching_loss
    torch.testing.assert_close(logits, expected.logits, **TIGHT)
    torch.testing.assert_close(loss, expected.loss, **TIGHT)
    prompts = ship_peft.get_prompt_bank(model).ship_prompts["default"]
    package = {f"prompt.{n}": p for n, p in prompts.named_parameters()}
    oracle = {"prompt.semantic_prompts." + str(g): p for g, p in enumerate(naive.semantic_prompts)}
    oracle.update({"prompt.shared_prompts": naive.shared_prompts, "prompt.attribute_prompts": naive.attribute_prompts})
    for n, p in model.base_model.model.head.modules_to_save["default"].named_parameters():
        package[f"head.{n}"], oracle[f"head.{n}"] = p, plain_copy.head.get_parameter(n)
    assert_grads_close(grads(loss, package), grads(expected.loss, oracle), TIGHT, "loss")


@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_calibration_reads_each_timm_family_s_image_summary(name):
    plain = timm_family(name, seed=2)
    sharpen_backbone(plain, seed=2)  # layers far apart: several levels
    config = ship_peft.ShipConfig(num_prompts=2, num_prototypes=3, share_threshold=0.9999)
    model = get_peft_model(copy.deepcopy(plain), config)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    outputs = []
    handles = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in plain.blocks]
    with torch.no_grad():
        plain(x)
    for handle in handles:
        handle.remove()
    summary = (lambda h: h[:, 0]) if getattr(plain, "cls_token", None) is not None else (lambda h: h.mean(dim=1))
    features = ship_peft.calibration.collect_features(model, [x], show_progress=False)
    torch.testing.assert_close(features, torch.stack([summary(h) for h in outputs], dim=1))
    result = ship_peft.initialize_ship_weights(model, [x], show_progress=False)
    assert result.prompt_layers == ship_peft.semantic_levels(ship_peft.layer_affinity(features), 0.9999)
    assert result.prototypes.shape == (3, 32)


@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_each_timm_family_saves_loads_caches_and_checkpoints(name, tmp_path):
    plain = timm_family(name, seed=3)
    model = ship_on_timm(plain).eval()
    x = pixels().float()
    expected = model(x)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path).eval()
    torch.testing.assert_close(reloaded(x), expected)
    reloaded.enable_prompt_cache()
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-6)
    assert ship_peft.get_prompt_bank(reloaded).prompt_cache._memo
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(5)
        trained = ship_on_timm(plain).train()
        trained.base_model.model.set_grad_checkpointing(checkpointing)
        with ship_peft.record_matching_loss() as call:
            loss = trained(x).square().mean() + call.matching_loss
        loss.backward()
        gradients.append({n: p.grad for n, p in trained.named_parameters() if p.requires_grad})
    for key in gradients[0]:
        torch.testing.assert_close(gradients[1][key], gradients[0][key], msg=key)


@pytest.mark.parametrize(
    "overrides, reason",
    [({"attn_type": "rope", "qkv_fused": False, "num_kv_heads": 1}, "grouped-query"), ({"use_post_norm": True}, "EvaBlock")],
    ids=["grouped-query-attention", "post-norm"],
)
def test_eva_blocks_ship_does_not_model_are_clear_errors(overrides, reason):
    torch.manual_seed(0)
    eva = Eva(**COMMON, use_rot_pos_emb=True, ref_feat_shape=(4, 4), **overrides)
    with pytest.raises(TypeError, match=rf"SHIP does not support this Eva: .*{reason}.*Supported: "):
        get_peft_model(eva, ship_peft.ShipConfig(num_prompts=2, prompt_layers=[0]))


@pytest.mark.parametrize(
    "architecture",
    ["vit_small_patch16_224", "vit_base_patch16_siglip_224", "eva02_tiny_patch14_224", "vit_small_patch16_dinov3",
     "vit_pe_core_small_patch16_384"],
)
def test_cli_trains_and_calibrates_a_local_timm_model(architecture, tmp_path, capsys):
    """A timm model saved the Hugging Face way (transformers' ``TimmWrapper``: config.json + safetensors, as timm
    models are on the Hub) trains, calibrates and evaluates through the command line, its ``head`` trained."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from ship_peft.app.cli import main
    from test_data import save_dataset

    shape = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)
    torch.manual_seed(0)
    data_config = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}  # the processor's
    config = TimmWrapperConfig(architecture=architecture, model_args=shape, num_labels=3, pretrained_cfg=data_config)
    folder = tmp_path / "model"
    TimmWrapperForImageClassification(config).save_pretrained(folder)
    dataset = save_dataset(tmp_path, {"train": 24, "test": 6})
    common = ["--model", str(folder), "--dataset", str(dataset), "--no-progress"]
    assert main(["calibrate", *common, "--output-dir", str(tmp_path / "calibration")]) == 0
    assert "levels starting at layers" in capsys.readouterr().out
    train = ["train", *common, "--output-dir", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "8"]
    train += ["--warmup-epochs", "0", "--num-prompts", "2", "--num-attribute-prompts", "3", "--validation-size", "6"]
    train += ["--num-prototypes", "4", "--baselines", "linear"]
    assert main(train) == 0
    adapter = tmp_path / "out" / "adapter"
    saved = set(load_file(adapter / "adapter_model.safetensors"))
    assert any("timm_model.head" in key for key in saved) and any("ship_prompts" in key for key in saved)
    assert main(["evaluate", str(adapter), "--dataset", str(dataset)]) == 0
