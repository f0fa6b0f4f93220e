# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Parity with the authors' own SHIP code, without ``../shared`` at test time.

``fixtures/ship_reference_{a,c}.json`` (made by ``scripts/make_reference_fixture.py`` from
``../shared/reference-outputs/golden_{a,c}.*``) hold the recipe that regenerates, bitwise, the random ViT-B-shaped
model, prompts, prototypes and pixels of each case, and the official code's float64 outputs: logits (train, eval,
no prompts), cross-entropy, matching and total loss, the ordered top-k tokens of every attribute layer and of the
matching loss, and every gradient. Case ``a``: K = 5, levels ``[0, 2, 5, 9, 11]`` (the CLS token is among the
attribute top-k); case ``c``: K = 3, levels ``[0, 4, 7]`` (matching loss on carried prompts).

Tolerances (reference-outputs/README.md): float64 (sdpa) relative 1e-9 on logits, losses and gradients; float32
absolute 2e-5 on logits and losses, relative 1e-4 on gradients; top-k indices identical. "Relative" is
``max|actual - expected| / max|expected|`` over a tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
from unittest import mock

import pytest
import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification

import ship_peft
from utils.reference_fixture import CASES, build_fixture, fixture_path, regenerate_tensors, tensors_sha256

DTYPES = [torch.float64, torch.float32]
FLOAT64_RTOL = 1e-9
FLOAT32_ATOL = 2e-5  # logits and losses
FLOAT32_GRAD_RTOL = 1e-4


@functools.lru_cache(maxsize=None)
def load_fixture(case: str) -> dict:
    return json.loads(fixture_path(case).read_text())


@functools.lru_cache(maxsize=None)
def reference_inputs(case: str) -> dict[str, torch.Tensor]:
    """Weights, prompts, prototypes and pixels of ``case`` (float32, golden-file names)."""
    return regenerate_tensors(load_fixture(case))


def expected(case: str, name: str) -> torch.Tensor:
    return torch.tensor(load_fixture(case)["expected"][name], dtype=torch.float64)


def ship_config(case: str) -> ship_peft.ShipConfig:
    ship = load_fixture(case)["ship"]
    return ship_peft.ShipConfig(
        num_prompts=ship["num_prompts"], prompt_layers=ship["prompt_layers"], num_prototypes=ship["num_prototypes"]
    )


def build_model(case: str, dtype: torch.dtype):
    """The case's ViT with the reference weights, wrapped by ``get_peft_model`` with the reference prompts."""
    tensors = reference_inputs(case)
    config = ViTConfig(**load_fixture(case)["vit_config"], attn_implementation="sdpa")
    vit = ViTForImageClassification(config)
    backbone = {name: value for name, value in tensors.items() if name.startswith(("vit.", "classifier."))}
    vit.load_state_dict(backbone, strict=True)
    model = get_peft_model(vit, ship_config(case)).to(dtype)
    prompts = ship_peft.get_prompt_bank(model).ship_prompts["default"]
    with torch.no_grad():
        for level, semantic in enumerate(prompts.semantic_prompts):
            semantic.copy_(tensors[f"ship.sip.{level}"])
        prompts.shared_prompts.copy_(tensors["ship.ssp"])
        for k in range(prompts.attribute_prompts.shape[0]):
            prompts.attribute_prompts[k].copy_(tensors[f"ship.ap.{k}"])
        prompts.prototypes.copy_(tensors["ship.prototypes"])
    return model


def gradients(model) -> dict[str, torch.Tensor]:
    """Gradient of every trainable parameter, under the reference's names (``ship.sip.0``, ``classifier.weight``)."""
    grads = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        short = name.removeprefix("base_model.model.")
        if short.startswith("vit.ship.ship_prompts.default."):
            short = short.removeprefix("vit.ship.ship_prompts.default.")
            if short == "attribute_prompts":
                grads.update({f"ship.ap.{k}": grad for k, grad in enumerate(parameter.grad)})
                continue
            short = {"shared_prompts": "ship.ssp"}.get(short, short.replace("semantic_prompts.", "ship.sip."))
        else:
            short = short.replace("classifier.modules_to_save.default.", "classifier.")
        grads[short] = parameter.grad
    return grads


@contextlib.contextmanager
def record_top_tokens(selections: list):
    """Record, in call order, which image tokens ``ship_peft`` picks (attribute layers, then the matching loss).

    Wraps ``ship_peft.layer.gather_top_tokens`` and reads the indices off the rows it returns (each picked row is
    found in the layer output), so nothing of the package's selection is recomputed here.
    """
    original = ship_peft.layer.gather_top_tokens

    def recording(tokens, scores, k):
        picked = original(tokens, scores, k)
        same = (picked.detach()[:, :, None, :] == tokens.detach()[:, None, :, :]).all(dim=-1)  # [B, k, N]
        assert bool((same.sum(dim=-1) == 1).all()), "a picked token is not one unique row of the layer output"
        selections.append(same.int().argmax(dim=-1).tolist())
        return picked

    with mock.patch.object(ship_peft.layer, "gather_top_tokens", recording):
        yield


@functools.lru_cache(maxsize=None)
def run(case: str, dtype: torch.dtype) -> dict:
    """Eval forward, train forward + backward, and a forward with the adapter disabled, on the reference batch."""
    model = build_model(case, dtype)
    tensors = reference_inputs(case)
    pixel_values = tensors["inputs.pixel_values"].to(dtype)
    labels = torch.tensor(load_fixture(case)["labels"])
    result = {"top_k_eval": [], "top_k_train": []}

    model.eval()
    with torch.no_grad(), record_top_tokens(result["top_k_eval"]):
        result["logits_eval"] = model(pixel_values=pixel_values).logits

    model.train()
    with record_top_tokens(result["top_k_train"]):
        output = model(pixel_values=pixel_values, labels=labels)
    output.loss.backward()
    result["logits_train"] = output.logits.detach()
    result["ce_loss"] = output.classification_loss.detach()
    result["matching_loss"] = output.matching_loss.detach()
    result["total_loss"] = output.loss.detach()
    result["grads"] = {name: grad.detach() for name, grad in gradients(model).items()}

    model.eval()
    with torch.no_grad(), model.disable_adapter():
        result["logits_noprompt"] = model(pixel_values=pixel_values).logits
    return result


def assert_matches(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, what: str, grad: bool = False):
    actual = actual.to(torch.float64)
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    error = (actual - reference).abs().max().item()
    scale = reference.abs().max().item()
    if dtype == torch.float64:
        assert error <= FLOAT64_RTOL * scale, f"{what}: relative error {error / scale:.3g} > {FLOAT64_RTOL}"
    elif grad:
        assert error <= FLOAT32_GRAD_RTOL * scale, f"{what}: relative error {error / scale:.3g} > {FLOAT32_GRAD_RTOL}"
    else:
        assert error <= FLOAT32_ATOL, f"{what}: absolute error {error:.3g} > {FLOAT32_ATOL}"


parametrize_case = pytest.mark.parametrize("case", CASES)
parametrize_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])


@parametrize_case
def test_fixture_regenerates_reference_inputs(case):
    assert tensors_sha256(reference_inputs(case)) == load_fixture(case)["inputs_sha256"], (
        "torch's CPU normal_ stream no longer gives the reference tensors; every parity test of this case is void. "
        "Store the tensors themselves instead of the recipe (see tests/utils/reference_fixture.py)."
    )


@parametrize_case
def test_default_config_is_reference_recipe(case):
    ship = load_fixture(case)["ship"]
    config = ship_config(case)
    for name in (
        "num_shared_prompts",
        "num_attribute_prompts",
        "attribute_mix",
        "prompt_attention_weight",
        "matching_loss_weight",
        "matching_top_k",
    ):
        assert getattr(config, name) == ship[name], name
    assert config.decoupled_attention
    assert config.attribute_layers() == ship["attribute_layers"]


@parametrize_case
@parametrize_dtype
def test_logits_and_losses(case, dtype):
    result = run(case, dtype)
    for name in ("logits_eval", "logits_train", "ce_loss", "matching_loss", "total_loss"):
        assert result[name].dtype == dtype, name
        assert_matches(result[name], expected(case, name), dtype, name)


@parametrize_case
@parametrize_dtype
def test_gradients(case, dtype):
    grads = run(case, dtype)["grads"]
    reference = load_fixture(case)["expected"]["grads"]
    assert sorted(grads) == sorted(reference), "trainable parameters differ from the reference's"
    for name, values in reference.items():
        assert_matches(grads[name], torch.tensor(values, dtype=torch.float64), dtype, f"grad {name}", grad=True)


@parametrize_case
@parametrize_dtype
def test_disabled_adapter_is_plain_backbone(case, dtype):
    assert_matches(run(case, dtype)["logits_noprompt"], expected(case, "logits_noprompt"), dtype, "logits_noprompt")


@parametrize_case
@parametrize_dtype
def test_top_k_tokens(case, dtype):
    result, reference = run(case, dtype), load_fixture(case)["expected"]
    # eval: one selection per attribute layer (no matching loss); train: the same, then the matching loss's
    assert result["top_k_eval"] == reference["ap_topk"]
    assert result["top_k_train"] == reference["ap_topk"] + [reference["match_topk"]]


@parametrize_case
def test_fixture_matches_shared(case, shared_dir):
    assert build_fixture(shared_dir / "reference-outputs", case) == load_fixture(case)
