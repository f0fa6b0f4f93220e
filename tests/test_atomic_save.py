# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""``ship_peft.safe_io.save_adapter`` replaces each adapter file atomically: a failing or interrupted save leaves the
old file; ``load_adapter`` names a damaged file. Nothing of PEFT is replaced: ``save_pretrained`` stays PEFT's own."""

from __future__ import annotations

import builtins
import errno
import os
import stat
from pathlib import Path

import peft.config
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
    safe_io.save_adapter(model, tmp_path)
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
        safe_io.save_adapter(model, folder)
    monkeypatch.undo()

    assert written and Path(written[0]).parent != folder  # the writer wrote into a temporary folder
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
        safe_io.save_adapter(tiny_ship_model(), tmp_path)
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
        safe_io.save_adapter(model, folder)
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
    safe_io.save_adapter(model, tmp_path / "atomic")
    safe_io.save_adapter(model, tmp_path / "atomic")  # into an existing folder
    model.save_pretrained(tmp_path / "plain")  # PEFT's own save: untouched by ship_peft
    monkeypatch.undo()
    assert sorted(replaced) == sorted(["README.md", WEIGHTS, CONFIG] * 2)  # every file went through a temporary one

    atomic, plain = tmp_path / "atomic", tmp_path / "plain"
    assert sorted(path.name for path in atomic.iterdir()) == sorted(path.name for path in plain.iterdir())
    for path in plain.iterdir():
        if path.name != "README.md":  # the model card names the folder it was written to
            assert (atomic / path.name).read_bytes() == path.read_bytes(), path.name
        assert stat.S_IMODE((atomic / path.name).stat().st_mode) == stat.S_IMODE(path.stat().st_mode), path.name
    assert_holds(atomic, adapter_tensors(model))


def test_damaged_files_are_named_by_load_adapter_and_left_to_peft_otherwise(tmp_path):
    """``load_adapter`` names a damaged file, for any PEFT method; ``PeftModel.from_pretrained`` is PEFT's own."""
    lora = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier"]))
    safe_io.save_adapter(lora, tmp_path / "lora")
    safe_io.save_adapter(tiny_ship_model(), tmp_path / "ship")
    for name in ("lora", "ship"):
        path = tmp_path / name / WEIGHTS
        path.write_bytes(path.read_bytes()[:10])
        with pytest.raises(SafetensorError) as info:
            PeftModel.from_pretrained(tiny_vit(), tmp_path / name)
        assert not isinstance(info.value, safe_io.CorruptAdapterFileError)
        with pytest.raises(safe_io.CorruptAdapterFileError, match="truncated or corrupted"):
            safe_io.load_adapter(tiny_vit(), tmp_path / name)
