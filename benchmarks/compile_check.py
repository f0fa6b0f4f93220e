#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""torch.compile and SHIP: graph breaks (``torch._dynamo.explain``) and the compiled model's loss (issue #10, item 2).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compile_check.py            # CPU, inductor, ~2-4 minutes

For SHIP and, as the bar, PEFT LoRA on the same tiny ViT, in training and in eval, it prints the graph breaks
``torch._dynamo.explain`` finds (with their reasons) in the whole ``PeftModel`` call and inside SHIP's tuner layer
alone, then runs ``torch.compile(model)`` (``--backend``, inductor by default) and compares its loss and logits
with eager mode. Exits 1 when SHIP's layer has a graph break or the compiled figures differ.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model
from transformers import ViTConfig, ViTForImageClassification

import ship_peft

VIT = dict(
    image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128
)


def build(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(**VIT, num_labels=10, attn_implementation="sdpa"))
    if method == "lora":
        return get_peft_model(vit, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))
    model = get_peft_model(vit, ship_peft.ShipConfig(num_prompts=8, prompt_layers=[0, 2, 3], num_prototypes=16))
    layer = ship_peft.get_prompt_bank(model)
    layer.ship_prompts["default"].prototypes.normal_()  # stands in for calibration
    return model


def run(model, pixels, labels, train: bool):
    """Forward (and in training backward): the outputs and the trainable parameters' gradients."""
    with torch.set_grad_enabled(train):
        outputs = model(pixel_values=pixels, labels=labels)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not train:
        return outputs, []
    for parameter in parameters:
        parameter.grad = None
    outputs.loss.backward()
    return outputs, [parameter.grad.clone() for parameter in parameters]


def graph_breaks(function, *args, **kwargs) -> list[str]:
    """The graph breaks ``torch._dynamo.explain`` finds: one line each (the reason, where dynamo gives one)."""
    explanation = torch._dynamo.explain(function)(*args, **kwargs)
    reasons = [reason.reason.splitlines()[0] for reason in explanation.break_reasons]
    return reasons + ["(no reason given)"] * (explanation.graph_break_count - len(reasons))


def report(method: str, backend: str) -> bool:
    model = build(method)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    ok = True
    for mode in ("train", "eval"):
        model.train(mode == "train")
        torch._dynamo.reset()
        breaks = graph_breaks(model, pixel_values=pixels, labels=labels)
        print(f"{method} {mode}: PeftModel call: {len(breaks)} graph break(s)")
        for reason in breaks:
            print(f"    - {reason}")
        if method == "ship":
            layer = ship_peft.get_prompt_bank(model)
            hidden = model.base_model.model.vit.embeddings(pixels)
            torch._dynamo.reset()
            inner = graph_breaks(layer, hidden)
            print(f"{method} {mode}: inside SHIP's layer: {len(inner)} graph break(s)")
            for reason in inner:
                print(f"    - {reason}")
            ok &= not inner
        torch._dynamo.reset()
        eager, eager_grads = run(model, pixels, labels, mode == "train")
        compiled, compiled_grads = run(torch.compile(model, backend=backend), pixels, labels, mode == "train")
        errors = {
            "loss": (compiled.loss - eager.loss).abs().item(),
            "logits": (compiled.logits - eager.logits).abs().max().item(),
            "gradients": max(((a - b).abs().max().item() for a, b in zip(compiled_grads, eager_grads)), default=0.0),
        }
        print(f"{method} {mode}: compiled ({backend}) vs eager, max abs difference: {errors}")
        ok &= max(errors.values()) < 1e-4
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    args = parser.parse_args()
    ok = all([report("ship", args.backend), report("lora", args.backend)])
    print("OK" if ok else "FAILED: a graph break inside SHIP's layer, or compiled figures that differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
