# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The bad-input catalogue (docs/bad-input.md): each input gives an error that names the problem and the fix."""

import json

import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils import pixels, tiny_ship_model, tiny_vit
from ship_peft.safe_io import CorruptAdapterFileError, load_adapter


@pytest.mark.parametrize(
    "images, interpolate, words",
    [
        (torch.randn(2, 3, 24, 24), False, r"24x24 but the backbone takes 16x16.*interpolate_pos_encoding=True"),
        (torch.randn(2, 1, 16, 16), False, r"1 channels but the backbone expects 3.*convert\('RGB'\)"),
        (torch.randn(3, 16, 16), False, r"\[batch, channels, height, width\].*image processor"),
        (torch.full((2, 3, 16, 16), float("nan")), False, "NaN or inf.*normalised"),
        (torch.full((2, 3, 16, 16), float("inf")), False, "NaN or inf"),
    ],
)
def test_bad_images(images, interpolate, words):
    model = tiny_ship_model()
    with pytest.raises(ValueError, match=words):
        model(pixel_values=images, interpolate_pos_encoding=interpolate)


def test_other_image_size_runs_with_interpolated_positions():
    logits = tiny_ship_model()(pixel_values=torch.randn(2, 3, 24, 24), interpolate_pos_encoding=True).logits
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 3, 1]), torch.tensor([0, -2, 1, 1])])
def test_labels_outside_num_labels(labels):
    model = tiny_ship_model().train()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*num_labels="):
        model(pixel_values=pixels(), labels=labels)


def test_ignore_index_is_a_valid_label():
    model = tiny_ship_model().train()
    assert torch.isfinite(model(pixel_values=pixels(), labels=torch.tensor([0, -100, 2, 1])).loss)


@pytest.fixture
def saved_adapter(tmp_path):
    tiny_ship_model().save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "backbone, words",
    [
        ({"hidden_size": 48}, r"(?s)does not fit.*shared_prompts: saved \(10, 32\), model \(10, 48\)"),
        ({"num_labels": 5}, r"(?s)does not fit.*classifier.*saved \(3, 32\), model \(5, 32\).*num_labels"),
        ({"num_hidden_layers": 2}, r"backbone has 2 layers.*load it onto the backbone it was trained with"),
    ],
)
def test_adapter_on_another_backbone(saved_adapter, backbone, words):
    with pytest.raises(ValueError, match=words):
        PeftModel.from_pretrained(tiny_vit(**backbone), saved_adapter)


def _flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"\x10\x00",  # cut after two bytes
        lambda data: data[: len(data) // 2],  # cut inside the tensor data
        lambda data: data[:-1],  # one byte missing
        lambda data: _flip_bit(data, 9),  # bit flip in the JSON header
        lambda data: _flip_bit(data, 0),  # bit flip in the header length
    ],
    ids=["two-bytes", "half", "last-byte-missing", "header-bit-flip", "length-bit-flip"],
)
def test_truncated_or_corrupted_adapter_file(saved_adapter, damage):
    path = saved_adapter / "adapter_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptAdapterFileError) as caught:
        load_adapter(tiny_vit(), saved_adapter)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value.__cause__, SafetensorError)
    message = str(caught.value)
    assert str(path) in message
    assert "truncated or corrupted" in message and "not a valid safetensors file" in message
    assert "save_pretrained" in message and "force_download=True" in message


@pytest.mark.parametrize(
    "field, value, error, words",
    [
        ("num_prompts", "50", TypeError, "num_prompts must be an int"),
        ("share_threshold", 2.0, ValueError, r"share_threshold must lie in \(0.0, 1.0\]"),
        ("prompt_layers", [0, 5, 3], ValueError, "strictly increasing"),
    ],
)
def test_adapter_config_with_bad_values(saved_adapter, field, value, error, words):
    path = saved_adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(error, match=words):
        PeftConfig.from_pretrained(saved_adapter)


def test_adapter_config_with_unknown_fields_loads_with_a_warning(saved_adapter):
    path = saved_adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["field_from_a_newer_version"] = 1
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="field_from_a_newer_version"):
        loaded = PeftConfig.from_pretrained(saved_adapter)
    assert not hasattr(loaded, "field_from_a_newer_version")


def test_more_attribute_prompts_than_image_tokens():
    model = tiny_ship_model(num_attribute_prompts=18)  # the tiny ViT has 17 image tokens
    with pytest.raises(ValueError, match="num_attribute_prompts=18 exceeds the 17 image tokens"):
        model(pixel_values=pixels())


def test_attention_mask_is_an_error_not_ignored():
    model = tiny_ship_model()
    with pytest.raises(NotImplementedError, match="takes no attention mask"):
        model(pixel_values=pixels(), attention_mask=torch.ones(4, 17))


def test_empty_batch_is_a_clear_error():
    model = tiny_ship_model().eval()
    with pytest.raises(ValueError, match="no image"):
        model(pixel_values=pixels(0))


def test_return_dict_false_keeps_the_matching_loss():
    model = tiny_ship_model(seed=3).train()
    labels = torch.tensor([0, 1, 2, 1])
    as_dict = model(pixel_values=pixels(), labels=labels)
    as_tuple = model(pixel_values=pixels(), labels=labels, return_dict=False)
    assert as_dict.matching_loss > 0
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    logits_only = model(pixel_values=pixels(), return_dict=False)
    torch.testing.assert_close(logits_only[0], as_dict.logits)


def test_incomplete_adapter_file_names_the_missing_tensors(tmp_path):
    tiny_ship_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = sorted(name for name in tensors if "shared_prompts" in name or "semantic_prompts.1" in name)
    save_file({name: tensor for name, tensor in tensors.items() if name not in dropped}, path)
    with pytest.raises(ValueError, match=r"incomplete: it lacks 2 tensor\(s\)") as info:
        PeftModel.from_pretrained(tiny_vit(), tmp_path)
    assert "shared_prompts" in str(info.value) and "semantic_prompts.1" in str(info.value)
    # a missing classifier tensor is PEFT's own KeyError (modules_to_save), which names it too
    save_file({name: tensor for name, tensor in tensors.items() if "classifier.bias" not in name}, path)
    with pytest.raises(KeyError, match="classifier.bias"):
        PeftModel.from_pretrained(tiny_vit(), tmp_path)
