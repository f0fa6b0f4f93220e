#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Throughput of one mixed-adapter batch over 4 SHIP adapters against 4 separate forwards (issue #12, item 1).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/serving.py                    # tiny ViT on CPU, about a minute
    python benchmarks/serving.py --model-size vit-b16 --device cuda

Four SHIP adapters (K = 10, 20, 30, 50; the default's other settings; random prototypes) on one backbone, with the
prompt cache on, in eval under ``torch.no_grad()``. "mixed": one ``model(pixel_values, adapter_names=...)`` call over
``--batch-size`` images, a quarter per adapter; "separate": ``set_adapter`` and one call per adapter on its quarter.
Both are timed in turns (interleaved), ``--steps`` rounds after ``--warmup``; prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_models import DEFAULT_PROMPT_LAYERS, MODEL_SIZES  # noqa: E402

ADAPTERS = {"k10": 10, "k20": 20, "k30": 30, "k50": 50}


def build(model_size: str, device: str) -> torch.nn.Module:
    from peft import get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    import ship_peft

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(**MODEL_SIZES[model_size], num_labels=100, attn_implementation="sdpa"))
    model = None
    for name, num_prompts in ADAPTERS.items():
        config = ship_peft.ShipConfig(num_prompts=num_prompts, prompt_layers=DEFAULT_PROMPT_LAYERS[model_size])
        model = get_peft_model(vit, config, adapter_name=name) if model is None else model
        if name not in model.peft_config:
            model.add_adapter(name, config)
        prompts = ship_peft.get_prompt_bank(model).ship_prompts[name]
        prompts.prototypes.normal_()  # stands in for calibration
        model.set_adapter(name)
        model.enable_prompt_cache()
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = build(args.model_size, args.device)
    size = MODEL_SIZES[args.model_size]["image_size"]
    pixels = torch.randn(args.batch_size, 3, size, size, device=args.device)
    quarter = args.batch_size // len(ADAPTERS)
    names = [name for name in ADAPTERS for _ in range(quarter)]
    pixels = pixels[: len(names)]

    def mixed() -> None:
        model(pixel_values=pixels, adapter_names=names)

    def separate() -> None:
        for index, name in enumerate(ADAPTERS):
            model.set_adapter(name)
            model(pixel_values=pixels[index * quarter : (index + 1) * quarter])

    times = {"mixed": [], "separate": []}
    with torch.no_grad():
        for round_index in range(args.warmup + args.steps):
            for name, function in (("mixed", mixed), ("separate", separate))[:: 1 if round_index % 2 else -1]:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                function()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if round_index >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    print(f"{args.model_size} ViT, {len(names)} images over {len(ADAPTERS)} SHIP adapters (K = {list(ADAPTERS.values())}), "
          f"prompt cache on, {args.device}, torch {torch.__version__}, medians of {args.steps} interleaved rounds:")
    for name, median in medians.items():
        print(f"  {name:<9} {median * 1e3:8.1f} ms per batch   {len(names) / median:8.1f} img/s")
    print(f"  mixed / separate: {medians['mixed'] / medians['separate']:.2f}x the time")


if __name__ == "__main__":
    main()
