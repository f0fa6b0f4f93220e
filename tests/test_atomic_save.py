# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""``save_pretrained`` replaces each adapter file atomically: a failing or interrupted save leaves the old file."""

from __future__ import annotations

import builtins
import errno
import inspect
import os
import stat
from pathlib import Path

import peft.config
import peft.peft_model
import peft.utils.save_and_load
import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

import ship_peft
from utils import tiny_ship_model, tiny_vit
from ship_peft import safe_io

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in get_peft_model_state_dict(model).items()}


def change_prompts(model) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ship_prompts" in name:
                parameter.add_(1.0)


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def assert_holds(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    loaded = PeftModel.from_pretrained(tiny_vit(seed=1), folder)
    reloaded = get_peft_model_state_dict(loaded)
    assert reloaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.fixture
def first_save(tmp_path):
    """A folder holding a saved adapter; returns the model, the folder, its tensors and its files' bytes."""
    model = tiny_ship_model()
    model.save_pretrained(tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS, CONFIG)}
    return model, tmp_path, adapter_tensors(model), files


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failing_weights_write_keeps_the_previous_adapter(first_save, monkeypatch, failure):
    model, folder, tensors, files = first_save
    change_prompts(model)
    written: list[str] = []

    def write_half_then_fail(flat_tensors, filename, metadata=None):
        # safetensors' native writer, dying midway: part of a file exists when the error comes
        written.append(os.fspath(filename))
        Path(filename).write_bytes(files[WEIGHTS][: len(files[WEIGHTS]) // 2])
        raise failure

    monkeypatch.setattr(safetensors.torch, "serialize_file", write_half_then_fail)
    with pytest.raises(type(failure)):
        model.save_pretrained(folder)
    monkeypatch.undo()

    assert written and Path(written[0]).name != WEIGHTS  # the writer was handed a temporary file
    assert (folder / WEIGHTS).read_bytes() == files[WEIGHTS]
    assert (folder / CONFIG).read_bytes() == files[CONFIG]
    assert leftovers(folder) == []
    assert_holds(folder, tensors)


def test_failing_weights_write_into_a_new_folder_leaves_no_file(tmp_path, monkeypatch):
    def fail(flat_tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(safetensors.torch, "serialize_file", fail)
    with pytest.raises(OSError, match="Input/output error"):
        tiny_ship_model().save_pretrained(tmp_path)
    assert not (tmp_path / WEIGHTS).exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failing_config_write_keeps_the_previous_config(first_save, monkeypatch, failure):
    model, folder, tensors, files = first_save
    model.peft_config["default"].revision = "second-save"  # the new config differs from the saved one

    def open_that_fails_midway(file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        if "w" not in mode:
            return handle

        class HalfWriter:
            def __enter__(self):
                return self

            def __exit__(self, *exc_info):
                handle.close()

            def write(self, text):
                handle.write(text[: len(text) // 2])
                handle.flush()
                raise failure

        return HalfWriter()

    # PEFT writes the json with a plain open(); shadow the builtin inside peft.config only
    monkeypatch.setattr(peft.config, "open", open_that_fails_midway, raising=False)
    with pytest.raises(type(failure)):
        model.save_pretrained(folder)
    monkeypatch.undo()

    assert (folder / CONFIG).read_bytes() == files[CONFIG]
    assert leftovers(folder) == []
    assert PeftConfig.from_pretrained(folder).revision is None
    assert_holds(folder, tensors)


def test_normal_save_writes_the_same_files_as_peft_and_round_trips(tmp_path, monkeypatch):
    model = tiny_ship_model()
    replaced: list[str] = []
    real_replace = os.replace

    def recording_replace(source, destination):
        replaced.append(Path(destination).name)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recording_replace)
    (tmp_path / "atomic").mkdir()
    model.save_pretrained(tmp_path / "atomic")  # safe_serialization defaults to True
    model.save_pretrained(tmp_path / "atomic")  # into an existing folder
    monkeypatch.undo()
    assert replaced == [WEIGHTS, CONFIG, WEIGHTS, CONFIG]  # both files went through a temporary file

    # PEFT's writers, unwrapped
    monkeypatch.setattr(peft.peft_model, "safe_save_file", inspect.unwrap(peft.peft_model.safe_save_file))
    monkeypatch.setattr(
        peft.config.PeftConfigMixin, "save_pretrained", inspect.unwrap(peft.config.PeftConfigMixin.save_pretrained)
    )
    model.save_pretrained(tmp_path / "plain")
    monkeypatch.undo()

    atomic, plain = tmp_path / "atomic", tmp_path / "plain"
    assert sorted(path.name for path in atomic.iterdir()) == sorted(path.name for path in plain.iterdir())
    for path in plain.iterdir():
        assert (atomic / path.name).read_bytes() == path.read_bytes(), path.name
        assert stat.S_IMODE((atomic / path.name).stat().st_mode) == stat.S_IMODE(path.stat().st_mode), path.name
    assert_holds(atomic, adapter_tensors(model))


def test_registration_wraps_once():
    wrapped = {
        "weights": (peft.peft_model, "safe_save_file", safetensors.torch.save_file),
        "config": (peft.config.PeftConfigMixin, "save_pretrained", None),
        "loader": (peft.utils.save_and_load, "safe_load_file", safetensors.torch.load_file),
    }
    before = {key: getattr(owner, name) for key, (owner, name, _) in wrapped.items()}
    ship_peft.register()
    safe_io.install()
    for key, (owner, name, original) in wrapped.items():
        current = getattr(owner, name)
        assert current is before[key], key  # not wrapped again
        assert getattr(current, safe_io.WRAPPED_MARK, False), key  # but wrapped
        inner = current.__wrapped__
        assert not hasattr(inner, safe_io.WRAPPED_MARK), key  # exactly once
        if original is not None:
            assert inner is original, key


def test_other_peft_methods_save_and_load_untouched(tmp_path, monkeypatch):
    """safe_io only changes SHIP adapters: LoRA's files are written by PEFT itself and its load errors stay PEFT's."""
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append(os.path.basename(dst)) or real_replace(src, dst))
    lora = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier"]))
    lora.save_pretrained(tmp_path / "lora")
    assert replaced == []  # written in place, as PEFT does
    tiny_ship_model().save_pretrained(tmp_path / "ship")
    assert sorted(replaced) == ["adapter_config.json", "adapter_model.safetensors"]

    for name in ("lora", "ship"):
        path = tmp_path / name / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(SafetensorError) as info:
        PeftModel.from_pretrained(tiny_vit(), tmp_path / "lora")
    assert not isinstance(info.value, safe_io.CorruptAdapterFileError)
    with pytest.raises(safe_io.CorruptAdapterFileError):
        PeftModel.from_pretrained(tiny_vit(), tmp_path / "ship")
