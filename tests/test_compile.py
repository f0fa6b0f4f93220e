# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""torch.compile: no graph break inside SHIP's tuner layer, the compiled model's loss and gradients equal eager mode's,
and the value checks of a forward never make the host wait for the device."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch._dynamo

import ship_peft

from utils import pixels, tiny_ship_model

LABELS = torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_no_graph_break_inside_the_ship_blocks(mode, cache):
    model = tiny_ship_model(seed=1).train(mode == "train")
    if cache:
        model.enable_prompt_cache()
    blocks = model.base_model.model.vit.layers
    hidden = model.base_model.model.vit.embeddings(pixels())

    def run_blocks(hidden_states):  # the host's loop
        for block in blocks:
            hidden_states = block(hidden_states)
        return hidden_states

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(run_blocks)(hidden)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_graph_break_in_the_whole_peft_model_call(mode):
    model = tiny_ship_model(seed=1).train(mode == "train")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(pixel_values=pixels(), labels=LABELS)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]


def forward_backward(model, train: bool):
    with torch.set_grad_enabled(train):
        outputs = model(pixel_values=pixels(), labels=LABELS)
    if not train:
        return outputs.loss.detach(), outputs.logits.detach(), []
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.grad = None
    outputs.loss.backward()
    return outputs.loss.detach(), outputs.logits.detach(), [parameter.grad.clone() for parameter in trainable]


@pytest.mark.parametrize(
    "mode, config", [("train", {}), ("eval", {}), ("train", {"drop_path_rate": 0.5})], ids=["train", "eval", "drop-path"]
)
def test_compiled_model_gives_the_eager_loss_and_gradients(mode, config):
    """Stochastic depth draws its masks on the host, outside the graph (one graph break at the first block), from
    torch's generator: the same seed gives the same masks compiled and eager."""
    model = tiny_ship_model(seed=2, **config).train(mode == "train")
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = forward_backward(model, mode == "train")
    torch.manual_seed(0)
    compiled = forward_backward(torch.compile(model, backend="aot_eager"), mode == "train")
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    assert len(compiled[2]) == len(eager[2])
    for compiled_grad, eager_grad in zip(compiled[2], eager[2]):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"pixel_values": torch.full((4, 3, 16, 16), float("nan")), "labels": LABELS}, "NaN or inf"),
        ({"pixel_values": pixels(), "labels": torch.tensor([0, 1, 2, 3])}, r"labels must lie in \[0, 3\)"),
    ],
    ids=["non-finite-pixels", "labels-out-of-range"],
)
def test_value_checks_are_device_asserts_off_cpu(inputs, message):
    """Where the host would wait (an accelerator, or a compiled graph), bad values go to ``torch._assert_async``."""
    model = tiny_ship_model(seed=3).train()
    calls = []
    real = torch._assert_async
    with mock.patch("torch.compiler.is_compiling", return_value=True), mock.patch.object(
        torch, "_assert_async", side_effect=lambda condition, text: calls.append(text) or real(condition, text)
    ):
        with pytest.raises(RuntimeError, match=message):
            model(**inputs)
    assert any(__import__("re").search(message, text) for text in calls)


@pytest.mark.parametrize("config", [{}, {"drop_path_rate": 0.3}], ids=["default", "stochastic-depth"])
def test_a_training_forward_reads_no_tensor_value_on_the_host(config):
    """Every value check of a training forward is an asynchronous assert: nothing calls ``item``/``bool`` on a tensor
    (on a GPU each would wait for the device), the prototype check included; stochastic depth groups the samples by
    masks drawn on the host."""
    model = tiny_ship_model(seed=4, **config).train()
    reads = []

    def record(name):
        original = getattr(torch.Tensor, name)
        return mock.patch.object(torch.Tensor, name, lambda self, *a: reads.append(name) or original(self, *a))

    with mock.patch("torch.compiler.is_compiling", return_value=True), record("item"), record("__bool__"), record(
        "tolist"
    ):
        model(pixel_values=pixels(), labels=LABELS).loss.backward()
    assert reads == []
