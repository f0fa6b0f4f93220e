# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Every supported transformers backbone family, on tiny random models:

(a) with lambda = 0 and decoupled attention SHIP's image tokens never read the prompts, so the outputs equal the
    unwrapped model's (eval and train mode): the seam reproduces each family's block;
(b) the naive oracle (``tests/utils/naive_ship.py``, per-family block parts written out from the weights) in float64, training;
(c) calibration, save/load, the prompt cache and gradient checkpointing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    Aimv2VisionConfig,
    Aimv2VisionModel,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    DINOv3ViTBackbone,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    Siglip2Config,
    Siglip2ForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTModel,
)

import ship_peft
from ship_peft.app.data import digits_dataset

from utils import fill_prototypes, pixels, tiny_vit, tiny_vit_config
from utils.naive_ship import BlockParts, ImageLayout, linear, naive_ship_on_host, vit_parts
from test_forward_naive import (
    TIGHT,
    assert_grads_close,
    assert_no_near_ties,
    grads,
    hyper_parameters,
    naive_prompts,
    sharpen_backbone,
)

SIZES = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
LABELS = torch.tensor([0, 1, 2, 1])


def dinov2_config(cls=Dinov2Config, **overrides):
    return cls(**SIZES, mlp_ratio=2, layerscale_value=0.5, num_labels=3, **overrides)


def dinov3_config(**overrides) -> DINOv3ViTConfig:
    """Registers, layer scale, a gated MLP, no key bias, and the training-time augmentation of the rotary positions."""
    values = dict(
        intermediate_size=64, num_register_tokens=2, layerscale_value=0.5, use_gated_mlp=True, key_bias=False,
        pos_embed_shift=0.1, pos_embed_jitter=1.2, pos_embed_rescale=1.5,
    )
    return DINOv3ViTConfig(**SIZES, **{**values, **overrides})


TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
VISION = {**SIZES, "intermediate_size": 64}


def siglip_classifier() -> SiglipForImageClassification:
    """SigLIP with its classifier on the mean image token (no class token)."""
    return SiglipForImageClassification(SiglipConfig(vision_config=VISION, text_config=TEXT, num_labels=3))


def siglip2_classifier() -> Siglip2ForImageClassification:
    """SigLIP 2 (NaFlex: patchified images with a padding mask), classifier on the mean valid image token."""
    vision = {**VISION, "num_patches": 16}
    vision.pop("image_size")
    return Siglip2ForImageClassification(Siglip2Config(vision_config=vision, text_config=TEXT, num_labels=3))


def naflex_inputs(batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A NaFlex batch of 16-patch images, some of them padded (grids 4x4, 3x4, 4x4, 4x3, ...)."""
    shapes = torch.tensor([[4, 4], [3, 4], [4, 4], [4, 3]] * ((batch + 3) // 4))[:batch]
    mask = (torch.arange(16)[None] < shapes.prod(-1)[:, None]).long()
    patches = torch.randn(batch, 16, 3 * 4 * 4, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(**SIZES, intermediate_size=64, hidden_act="quick_gelu")


def clip_classifier() -> CLIPForImageClassification:
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    return CLIPForImageClassification(CLIPConfig(vision_config=clip_vision_config().to_dict(), text_config=text, num_labels=3))


#: family name -> (builder of a tiny random model, whether it has a classification head)
MODELS = {
    "vit": (lambda: tiny_vit(), True),
    "vit_bare": (lambda: ViTModel(tiny_vit_config()), False),
    "deit": (lambda: DeiTForImageClassification(DeiTConfig(**SIZES, intermediate_size=64, num_labels=3)), True),
    "deit_bare": (lambda: DeiTModel(DeiTConfig(**SIZES, intermediate_size=64)), False),
    "deit_teacher": (
        lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**SIZES, intermediate_size=64, num_labels=3)),
        True,
    ),
    "dinov2": (lambda: Dinov2ForImageClassification(dinov2_config()), True),
    "dinov2_swiglu": (lambda: Dinov2ForImageClassification(dinov2_config(use_swiglu_ffn=True)), True),
    "dinov2_bare": (lambda: Dinov2Model(dinov2_config()), False),
    "dinov2_registers": (
        lambda: Dinov2WithRegistersForImageClassification(
            dinov2_config(Dinov2WithRegistersConfig, num_register_tokens=2)
        ),
        True,
    ),
    "dinov3": (lambda: ship_peft.ImageClassifier(DINOv3ViTModel(dinov3_config()), 3), True),
    "dinov3_bare": (lambda: DINOv3ViTModel(dinov3_config(use_gated_mlp=False, key_bias=True)), False),
    "dinov3_backbone": (lambda: DINOv3ViTBackbone(dinov3_config(out_indices=[2, 4])), False),
    "siglip": (siglip_classifier, True),
    "siglip_vision": (lambda: SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=True)), False),
    "siglip2": (siglip2_classifier, True),
    "aimv2": (lambda: ship_peft.ImageClassifier(Aimv2VisionModel(Aimv2VisionConfig(**VISION, use_head=False)), 3), True),
    "aimv2_bare": (lambda: Aimv2VisionModel(Aimv2VisionConfig(**VISION, use_head=True, qkv_bias=True)), False),
    "clip": (clip_classifier, True),
    "clip_vision": (lambda: CLIPVisionModel(clip_vision_config()), False),
}
HEADED = [name for name, (_, headed) in MODELS.items() if headed]


#: families without a class token: SHIP's image summary is the mean of the (valid) image tokens
MEAN_SUMMARY = ("siglip", "aimv2")


def model_inputs(name: str, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the family's model takes: images, or SigLIP 2's NaFlex batch."""
    return naflex_inputs(batch, seed) if name.startswith("siglip2") else {"pixel_values": pixels(batch, seed=seed)}


def plain_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def ship_on(plain: torch.nn.Module, **config) -> PeftModel:
    values = dict(num_prompts=3, prompt_layers=[0, 2, 3], num_prototypes=5, num_attribute_prompts=4)
    values.update(config)
    model = get_peft_model(copy.deepcopy(plain), ship_peft.ShipConfig(**values))
    fill_prototypes(model)
    return model


def outputs_of(output) -> list[torch.Tensor]:
    """The tensors a user reads: logits, or the features of a bare backbone (a dense backbone's feature maps)."""
    if torch.is_tensor(output):
        return [output]
    keys = ("logits", "last_hidden_state", "pooler_output")
    return [output[key] for key in keys if output.get(key) is not None] + list(output.get("feature_maps") or ())


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_prompt_weight_reproduces_the_backbone(name):
    plain = plain_model(name)
    model = ship_on(plain, prompt_attention_weight=0.0)
    x = model_inputs(name)
    for train in (False, True):
        plain.train(train)
        model.train(train)
        torch.manual_seed(0)  # the same draws of any training-time randomness of the host (DINOv3's positions)
        expected = outputs_of(plain(**x))
        torch.manual_seed(0)
        got = outputs_of(model(**x))
        assert len(got) == len(expected) > 0
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and with lambda > 0 the prompts do change the outputs (the comparison above is not vacuous)
    model = ship_on(plain).eval()
    assert not torch.allclose(outputs_of(model(**x))[0], outputs_of(plain.eval()(**x))[0], atol=1e-4)


def naive_parts(block) -> BlockParts:
    """The block's parts as the oracle reads them (attribute names of each family, weights only)."""
    if hasattr(block, "layernorm_before"):  # ViT, DeiT
        return vit_parts(block)
    if hasattr(block, "layer_scale1"):  # DINOv2 (SwiGLU: SiLU gate), DINOv3 (gated: GELU gate; plain: up / down)
        a, mlp = block.attention, block.mlp
        gate = F.gelu if type(block).__name__.startswith("DINOv3") else F.silu
        if hasattr(mlp, "gate_proj"):
            feed = lambda x: linear(gate(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)
        elif hasattr(mlp, "up_proj"):
            feed = lambda x: linear(F.gelu(linear(x, mlp.up_proj)), mlp.down_proj)
        else:
            feed = lambda x: linear(F.gelu(linear(x, mlp.fc1)), mlp.fc2)
        return BlockParts(
            block.norm1, a.q_proj, a.k_proj, a.v_proj, a.o_proj, block.norm2, feed,
            block.layer_scale1.lambda1, block.layer_scale2.lambda1,
        )
    if hasattr(block, "rms_norm1"):  # AIMv2: RMSNorm, SwiGLU
        a, ffn = block.attention, block.ffn
        return BlockParts(
            block.rms_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, block.rms_norm2,
            lambda x: linear(F.silu(linear(x, ffn.gate_proj)) * linear(x, ffn.up_proj), ffn.down_proj),
        )
    a, mlp = block.self_attn, block.mlp  # CLIP: quick GELU; SigLIP: tanh GELU
    if type(block).__name__.startswith("Siglip"):
        activation = lambda h: F.gelu(h, approximate="tanh")
    else:
        activation = lambda h: h * torch.sigmoid(1.702 * h)
    return BlockParts(
        block.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, block.layer_norm2,
        lambda x: linear(activation(linear(x, mlp.fc1)), mlp.fc2),
    )


def naive_layout(name: str, inputs: dict[str, torch.Tensor]):
    """The family's image layout, read from the host's block arguments (DINOv3's rotary positions) or the model's
    inputs (SigLIP 2's padding)."""
    valid = inputs["pixel_attention_mask"].bool() if "pixel_attention_mask" in inputs else None
    summary = "mean" if name.startswith(MEAN_SUMMARY) else "cls"

    def layout_of(args: tuple, kwargs: dict) -> ImageLayout:
        rotate = naive_rotary(kwargs) if name.startswith("dinov3") else None
        return ImageLayout(rotate=rotate, valid=valid, summary=summary)

    return layout_of


def naive_rotary(block_kwargs: dict):
    """DINOv3's rotary embedding, written out from the ``(cos, sin)`` the host hands its blocks: the last
    ``len(cos)`` tokens (the patches) turn each pair ``(x_i, x_{i+d/2})`` by their angle; CLS and registers do not."""
    cos, sin = block_kwargs["position_embeddings"]
    num_patches = cos.shape[0]

    def rotate(x: torch.Tensor) -> torch.Tensor:  # one head's queries or keys [B, N, d]
        prefix, patches = x[:, :-num_patches], x[:, -num_patches:]
        first, second = patches.chunk(2, dim=-1)
        return torch.cat([prefix, patches * cos + torch.cat([-second, first], dim=-1) * sin], dim=1)

    return rotate


def head_names(model) -> list[str]:
    return model.peft_config["default"].modules_to_save


NAIVE_CASES = {
    "default": dict(),
    "not_decoupled": dict(decoupled_attention=False),
    "no_shared_one_level": dict(prompt_layers=[0], num_shared_prompts=0, num_prompts=5),
}


@pytest.mark.parametrize("case", list(NAIVE_CASES))
@pytest.mark.parametrize("name", [n for n in HEADED if n != "vit"])  # ViT: test_forward_naive.py
def test_training_matches_the_naive_oracle(name, case):
    plain = plain_model(name, seed=1)
    sharpen_backbone(plain, seed=1)
    plain.double()
    model = ship_on(plain, **NAIVE_CASES[case]).double().train()  # the prompts too
    plain_copy = copy.deepcopy(plain).train()
    inputs = {key: value.double() if value.is_floating_point() else value for key, value in model_inputs(name, seed=1).items()}
    x = inputs.pop("pixel_values")
    naive = naive_prompts(model)
    hyper = hyper_parameters(model)
    heads = head_names(model)
    plain_blocks = list(plain_copy.get_submodule(model.peft_config["default"].target_modules[0]))
    parts = [naive_parts(block) for block in plain_blocks]
    num_heads = SIZES["num_attention_heads"]
    torch.manual_seed(0)  # the same draws of the host's training-time randomness (DINOv3's positions)
    expected = naive_ship_on_host(
        plain_copy, plain_blocks, parts, num_heads, naive, hyper, x, LABELS, layout_of=naive_layout(name, inputs),
        **inputs,
    )
    assert_no_near_ties(expected)
    torch.manual_seed(0)
    with ship_peft.record_matching_loss() as call:
        labels = {} if "teacher" in name else {"labels": LABELS}
        outputs = model(pixel_values=x, **inputs, **labels)
    loss = getattr(outputs, "loss", None)
    if loss is None:  # DeiT with teacher computes no loss: add the matching loss as a user would
        loss = F.cross_entropy(outputs.logits, LABELS) + hyper.matching_loss_weight * call.matching_loss
    # AIMv2's RMSNorm computes in float32 whatever the model's dtype: float32 agreement is all there is to have
    tolerance = dict(rtol=1e-5, atol=1e-6) if name.startswith("aimv2") else TIGHT
    torch.testing.assert_close(outputs.logits, expected.logits, **tolerance)
    torch.testing.assert_close(loss, expected.loss, **tolerance)
    package = {f"prompt.{n}": p for n, p in ship_peft.get_prompt_bank(model).ship_prompts["default"].named_parameters()}
    oracle = {"prompt.semantic_prompts." + str(g): p for g, p in enumerate(naive.semantic_prompts)}
    oracle.update({"prompt.shared_prompts": naive.shared_prompts, "prompt.attribute_prompts": naive.attribute_prompts})
    for head in heads:
        for n, p in model.base_model.model.get_submodule(head).modules_to_save["default"].named_parameters():
            package[f"{head}.{n}"] = p
            oracle[f"{head}.{n}"] = plain_copy.get_submodule(head).get_parameter(n)
    oracle = {k: v for k, v in oracle.items() if v is not None}
    assert_grads_close(grads(loss, package), grads(expected.loss, oracle), tolerance, "loss")


def block_summaries(name: str, plain, inputs: dict) -> torch.Tensor:
    """The plain model's image summary after every block, ``[B, L, D]`` (through its own output_hidden_states): the
    CLS token, or for the families without one the mean of the valid image tokens."""
    hidden = plain(**inputs, output_hidden_states=True).hidden_states[1:]
    if not name.startswith(MEAN_SUMMARY):
        return torch.stack([h[:, 0] for h in hidden], dim=1)
    valid = inputs.get("pixel_attention_mask", torch.ones(hidden[0].shape[:2])).float()[..., None]
    return torch.stack([(h * valid).sum(1) / valid.sum(1) for h in hidden], dim=1)


@pytest.mark.parametrize(
    "name", ["deit", "dinov2_registers", "clip", "dinov2_bare", "dinov3", "siglip", "siglip2", "aimv2_bare"]
)
def test_calibration_reads_each_family_s_image_summary(name):
    plain = plain_model(name, seed=2)
    config = ship_peft.ShipConfig(num_prompts=2, num_prototypes=3, share_threshold=0.9999)  # several levels
    model = get_peft_model(copy.deepcopy(plain), config)
    inputs = model_inputs(name, 8, seed=2)
    features = ship_peft.calibration.collect_features(model, [inputs], show_progress=False)
    torch.testing.assert_close(features, block_summaries(name, plain, inputs))
    result = ship_peft.initialize_ship_weights(model, [inputs], show_progress=False)
    assert result.prompt_layers == ship_peft.semantic_levels(ship_peft.layer_affinity(features), 0.9999)
    assert result.prototypes.shape == (3, 32)
    model.train()(**inputs)  # calibrated: the adapter runs


@pytest.mark.parametrize(
    "name",
    ["deit_teacher", "dinov2_swiglu", "dinov3", "dinov3_backbone", "clip", "clip_vision", "siglip_vision", "siglip2",
     "aimv2"],
)
def test_save_load_cache_and_checkpointing(name, tmp_path):
    plain = plain_model(name, seed=3)
    model = ship_on(plain).eval()
    x = model_inputs(name, seed=3)
    expected = outputs_of(model(**x))
    model.save_pretrained(tmp_path)
    if name == "deit_teacher":
        keys = set(load_file(tmp_path / "adapter_model.safetensors"))
        assert any("cls_classifier" in k for k in keys) and any("distillation_classifier" in k for k in keys)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path).eval()
    for a, b in zip(outputs_of(reloaded(**x)), expected):
        torch.testing.assert_close(a, b)
    reloaded.enable_prompt_cache()
    for a, b in zip(outputs_of(reloaded(**x)), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ship_peft.get_prompt_bank(reloaded).prompt_cache._memo

    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(5)
        trained = ship_on(plain).train()
        if checkpointing:
            trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        outputs_of(trained(**x))[0].square().mean().backward()
        gradients.append({n: p.grad for n, p in trained.named_parameters() if p.requires_grad and p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    for key in gradients[0]:
        torch.testing.assert_close(gradients[0][key], gradients[1][key])


def test_a_dinov2_adapter_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    plain = plain_model("dinov2_swiglu", seed=4)
    plain.save_pretrained(tmp_path / "base")
    model = ship_on(plain).eval()
    model.save_pretrained(tmp_path / "adapter")
    x = pixels(seed=4)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, ship_peft; from peft import PeftModel; "
        "from transformers import AutoModelForImageClassification as A; "
        f"m = PeftModel.from_pretrained(A.from_pretrained({str(tmp_path / 'base')!r}), {str(tmp_path / 'adapter')!r}).eval(); "
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(x).logits)


def test_unsupported_models_say_why_and_list_the_families():
    from transformers import SwinConfig, SwinModel

    swin = SwinModel(SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[1], window_size=2))
    with pytest.raises(TypeError, match="windowed attention.*Supported: transformers ViT / DeiT; transformers DINOv2"):
        get_peft_model(swin, ship_peft.ShipConfig())
    with pytest.raises(ValueError, match=r"matches none of the block sequences SHIP can wrap .*\['vit.layers'\]"):
        get_peft_model(tiny_vit(), ship_peft.ShipConfig(target_modules=["vit.layers.0"]))


def test_attention_mask_is_a_clear_error():
    model = ship_on(plain_model("dinov2"))
    with pytest.raises(NotImplementedError, match="takes no attention mask"):
        mask = torch.ones(4, 17, dtype=torch.bool)
        mask[:, -1] = False  # an all-true mask is dropped by transformers before the blocks
        model(pixel_values=pixels(), attention_mask=mask)


@pytest.mark.parametrize(
    "name", ["deit", "dinov2_registers", "dinov3_bare", "clip", "siglip", "siglip2", "aimv2_bare"]
)
def test_cli_trains_and_calibrates_a_local_model_of_each_family(name, tmp_path, capsys):
    from ship_peft.app.cli import main
    from test_data import save_dataset

    folder = tmp_path / name
    plain_model(name, seed=6).save_pretrained(folder)
    if name == "siglip2":  # NaFlex: the processor patchifies the images, with a padding mask
        from transformers import Siglip2ImageProcessor

        Siglip2ImageProcessor(patch_size=4, max_num_patches=16).save_pretrained(folder)
    dataset = save_dataset(tmp_path, {"train": 24, "test": 6})
    common = ["--model", str(folder), "--dataset", str(dataset), "--no-progress"]
    assert main(["calibrate", *common, "--output-dir", str(tmp_path / "calibration")]) == 0
    assert "levels starting at layers" in capsys.readouterr().out
    train = ["train", *common, "--output-dir", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "8"]
    train += ["--warmup-epochs", "0", "--num-prompts", "2", "--num-attribute-prompts", "3", "--validation-size", "6"]
    train += ["--num-prototypes", "4"]
    assert main(train) == 0
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert main(["evaluate", str(adapter), "--dataset", str(dataset)]) == 0
    export = ["export", str(adapter), "--format", "export", "--output", str(tmp_path / "model.pt2")]
    if name == "siglip2":  # patchified NaFlex images: no one image size to export for
        assert main(export) == 2 and "NaFlex" in capsys.readouterr().err
    elif name == "dinov3_bare":  # any size: exported at its configured size, and checked; explained
        assert main(export) == 0 and (tmp_path / "model.pt2").is_file()
        digits_dataset()[0]["image"].save(tmp_path / "digit.png")
        assert main(["explain", str(adapter), str(tmp_path / "digit.png"), "--output-dir", str(tmp_path / "why")]) == 0
        assert (tmp_path / "why" / "0000_digit.png").is_file()


def test_the_image_summary_is_the_class_token_where_there_is_one_and_else_the_mean():
    """docs/method.md §7: ``image_summary="auto"`` keeps the paper's CLS token; "mean" is an explicit option."""
    vit = ship_on(plain_model("vit"))
    assert ship_peft.get_prompt_bank(vit).summary_of(vit.peft_config["default"]) == "cls"
    siglip = ship_on(plain_model("siglip"))
    assert ship_peft.get_prompt_bank(siglip).summary_of(siglip.peft_config["default"]) == "mean"
    with pytest.raises(ValueError, match="needs a class token.*image_summary='mean' or 'auto'"):
        ship_on(plain_model("siglip"), image_summary="cls")
    x = pixels(seed=7)
    torch.manual_seed(0)
    by_cls = ship_on(plain_model("vit")).train()(pixel_values=x, labels=LABELS)
    torch.manual_seed(0)
    by_mean = ship_on(plain_model("vit"), image_summary="mean").train()(pixel_values=x, labels=LABELS)
    assert not torch.allclose(by_mean.matching_loss, by_cls.matching_loss)  # another ranking, another loss


def test_the_matching_loss_leaves_out_padding_a_short_image_ranks():
    """A NaFlex image with fewer valid tokens than ``matching_top_k`` ranks padding (score -inf) among its top
    tokens; the matching loss leaves those out."""
    from ship_peft.functional import prompt_matching_loss

    prompts, tokens = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.5], [3.0, 2.0, float("-inf"), float("-inf")]], dtype=torch.float64)
    tokens_with_garbage = tokens.clone()
    tokens_with_garbage[1, 2:] = prompts[1, :2]  # padding rows that would match the prompts perfectly
    loss = prompt_matching_loss(prompts, tokens_with_garbage, scores)
    expected = torch.stack(
        [prompt_matching_loss(prompts[:1], tokens[:1]), prompt_matching_loss(prompts[1:], tokens[1:, :2])]
    ).mean()
    torch.testing.assert_close(loss, expected)


def test_siglip2_mixed_adapter_batches_of_padded_images_are_a_clear_error():
    model = ship_on(plain_model("siglip2")).eval()
    with pytest.raises(NotImplementedError, match="padded images.*each adapter in its own call"):
        model(**naflex_inputs(), adapter_names=["default", "__base__", "default", "__base__"])


def test_image_classifier_loss_is_a_batch_mean_the_trainer_averages():
    """The Trainer must not hand it an item count (it would then skip averaging over accumulation steps and scale
    by the processes), and pipelines read its device."""
    classifier = ship_peft.ImageClassifier(DINOv3ViTModel(dinov3_config()), 3)
    assert classifier.accepts_loss_kwargs is False
    assert classifier.device == torch.device("cpu")
    assert classifier.classifier.weight.dtype == next(classifier.backbone.parameters()).dtype
    bf16 = ship_peft.ImageClassifier(DINOv3ViTModel(dinov3_config()).to(torch.bfloat16), 3)
    assert bf16.classifier.weight.dtype == torch.bfloat16


def test_siglip2_needs_patchified_images():
    model = ship_on(plain_model("siglip2"))
    with pytest.raises(ValueError, match=r"patchified images.*pixel_attention_mask"):
        model(pixel_values=pixels(), pixel_attention_mask=torch.ones(4, 16), spatial_shapes=torch.tensor([[4, 4]] * 4))
