# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Deployable eval models of a SHIP adapter: a ``torch.export`` program, or an ONNX file.

Both are the cached inference path (``docs/method.md`` §5): the semantic and shared prompts' keys and values are
computed once, before export, and stored in the graph as constants; the graph takes ``pixel_values`` (any batch
size, the backbone's image size) and returns the logits of the active adapter. What the graph does not cover: other
adapters and mixed-adapter batches, training (no matching loss), the input checks of a ``PeftModel`` call, and the
image preprocessing (use the adapter's saved image processor).

    program = ship_peft.export.export_program(peft_model, example_pixels)     # torch.export.save(program, "m.pt2")
    ship_peft.export.export_onnx(peft_model, example_pixels, "model.onnx")    # needs onnx and onnxscript
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .model import get_prompt_bank


class LogitsOnly(nn.Module):
    """``pixel_values -> logits`` of a task model (what an exported graph takes and returns)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values=pixel_values)
        return output if torch.is_tensor(output) else output.logits


@contextmanager
def frozen_for_export(peft_model: nn.Module, example_pixels: torch.Tensor) -> Iterator[nn.Module]:
    """The active adapter's eval model with its shared prompt path computed once, on ``example_pixels``, and fixed
    (``LogitsOnly`` of the task model); the model is left as it was afterwards."""
    bank = get_prompt_bank(peft_model)
    if len(bank.active_adapters) != 1:
        raise ValueError(f"Export one adapter at a time; active: {bank.active_adapters} (`model.set_adapter(name)`).")
    name = bank.active_adapters[0]
    bank.prompts_of(name)  # a clear error for an adapter that waits for calibration
    model = LogitsOnly(peft_model.get_base_model())
    was_training, was_enabled = peft_model.training, bank.prompt_cache.enabled
    peft_model.eval()
    bank.prompt_cache.enabled = True
    try:
        with torch.no_grad():
            model(example_pixels)  # memoises the shared path (a model without one exports its per-sample path)
        if bank.prompt_cache.has_memo(name):
            bank.prompt_cache.fix(name, bank.prompt_cache.lookup_memo(name))
        yield model.eval()
    finally:
        bank.prompt_cache.unfix(name)
        bank.prompt_cache.enabled = was_enabled
        if not was_enabled:
            bank.prompt_cache.refresh()
        peft_model.train(was_training)


def _dynamic_batch() -> dict[str, dict[int, torch.export.Dim]]:
    return {"pixel_values": {0: torch.export.Dim("batch", min=1, max=65536)}}


def export_program(peft_model: nn.Module, example_pixels: torch.Tensor) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of the active adapter's cached eval path, with a dynamic batch size; save it with
    ``torch.export.save(program, "model.pt2")`` and run ``torch.export.load(...).module()(pixel_values)``."""
    with frozen_for_export(peft_model, example_pixels) as model, torch.no_grad():
        return torch.export.export(model, (example_pixels,), dynamic_shapes=_dynamic_batch(), strict=False)


def export_onnx(peft_model: nn.Module, example_pixels: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """An ONNX file of the active adapter's cached eval path (``torch.onnx.export(..., dynamo=True)``), input
    ``pixel_values`` with a dynamic batch size, output ``logits``. Needs ``onnx`` and ``onnxscript``
    (``pip install "ship-peft[onnx]"``, which also brings onnxruntime to run it)."""
    if importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnx") is None:
        raise ImportError(
            'ONNX export needs onnx and onnxscript (torch.onnx\'s exporter): `pip install "ship-peft[onnx]"`.'
        )
    with frozen_for_export(peft_model, example_pixels) as model, torch.no_grad():
        program = torch.onnx.export(
            model,
            (example_pixels,),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_shapes={"pixel_values": {0: "batch"}},
            dynamo=True,
            verbose=False,
        )
    program.save(os.fspath(path))


__all__ = ["LogitsOnly", "export_onnx", "export_program", "frozen_for_export"]
