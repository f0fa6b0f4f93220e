# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Size of a saved SHIP adapter for ViT-B/16 (224, random weights: the size does not depend on them).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/adapter_size.py [--num-prompts 50] [--num-labels 100]
"""

import argparse
import os
import tempfile

from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification

import ship_peft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--num-labels", type=int, default=100)
    parser.add_argument("--prompt-layers", type=int, nargs="+", default=[0, 2, 4, 6, 8, 11])
    args = parser.parse_args()
    vit = ViTForImageClassification(ViTConfig(num_labels=args.num_labels))
    config = ship_peft.ShipConfig(num_prompts=args.num_prompts, prompt_layers=args.prompt_layers)
    model = get_peft_model(vit, config)
    trainable, total = model.get_nb_trainable_parameters()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    print(f"ViT-B/16, K={args.num_prompts}, levels {args.prompt_layers}, {args.num_labels} classes:")
    print(f"  trainable parameters {trainable:,} of {total:,}; adapter_model.safetensors {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
