# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Export of the cached inference path: a torch.export program and an ONNX file (checked with onnxruntime) give the
PyTorch model's logits on inputs other than those used to export, at another batch size."""

from __future__ import annotations

import onnxruntime
import pytest
import torch

import ship_peft
from ship_peft.export import export_onnx, export_program

from utils import pixels, tiny_ship_model


@pytest.mark.parametrize(
    "config", [{}, {"num_shared_prompts": 0, "num_attribute_layers": 0}, {"decoupled_attention": False}]
)
def test_exported_program_gives_the_model_s_logits_at_any_batch_size(config, tmp_path):
    model = tiny_ship_model(seed=31, **config).eval()
    program = export_program(model, pixels(2, seed=1))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for batch in (1, 5):
        x = pixels(batch, seed=10 + batch)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(pixel_values=x).logits, rtol=1e-5, atol=1e-5)
    assert ship_peft.get_prompt_bank(model).prompt_cache._fixed == {}  # the model is left as it was


def test_the_exported_graph_holds_the_cached_prompt_path_as_constants():
    model = tiny_ship_model(seed=32).eval()  # 4 layers, K = 3 and S = 10 input-independent prompts
    program = export_program(model, pixels(2))
    shapes = [tuple(tensor.shape) for tensor in program.constants.values()]
    assert shapes == [(1, 2, 13, 16)] * 8  # a key and a value per layer, computed once at export


def test_onnx_file_runs_in_onnxruntime_with_the_model_s_logits(tmp_path):
    model = tiny_ship_model(seed=33).eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, pixels(2, seed=1), path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"] and session.get_outputs()[0].name == "logits"
    for batch in (1, 4):
        x = pixels(batch, seed=20 + batch)
        (logits,) = session.run(["logits"], {"pixel_values": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(pixel_values=x).logits, rtol=1e-4, atol=1e-5)


def test_exporting_several_active_adapters_is_a_clear_error():
    model = tiny_ship_model(seed=34)
    model.add_adapter("other", ship_peft.ShipConfig(num_prompts=2, prompt_layers=[0], num_attribute_layers=0))
    ship_peft.get_prompt_bank(model).set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="Export one adapter at a time"):
        export_program(model, pixels(2))
