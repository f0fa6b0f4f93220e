#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The levels SHIP's calibration finds on each task of the accuracy benchmark, at several share thresholds α.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/calibration_levels.py [--tasks counting ...]

Calibration (docs/method.md §1) groups consecutive layers whose image summaries stay similar on the training
split. This prints, per task of ``benchmarks/accuracy.py`` (same tasks, data and backbone; other arguments go to
it), the affinity of each layer with the next and the levels at each α, and writes them to
``<output-dir>/calibration_levels.json``. It trains nothing: it shows whether the levels depend on the task, and how
many there are at the paper's α (0.93 … 0.98).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import tasks as task_module  # noqa: E402


def task_levels(task: str, thresholds: list[float], bench: argparse.Namespace) -> dict[str, Any]:
    """The layer affinity of ``task``'s training split and the levels at each threshold."""
    import peft
    from ship_peft.calibration import collect_features, layer_affinity, semantic_levels
    from transformers import ViTForImageClassification

    data = task_module.load_task(task, accuracy.split_sizes(bench), bench.data_seed)
    images = accuracy.to_pixels(data.images["train"])
    vit = ViTForImageClassification.from_pretrained(str(accuracy.BACKBONE), dtype=torch.float32)
    model = peft.get_peft_model(vit, accuracy.ship_config("ship", bench, vit.config.num_hidden_layers))
    features = collect_features(model, torch.utils.data.DataLoader(images, batch_size=100),
                                max_samples=len(images), show_progress=False)
    affinity = layer_affinity(features)
    return dict(task=task, num_images=len(images),
                next_layer_affinity=[round(float(affinity[i, i + 1]), 3) for i in range(affinity.shape[0] - 1)],
                levels={str(alpha): semantic_levels(affinity, alpha) for alpha in thresholds})


def markdown(rows: list[dict[str, Any]], thresholds: list[float]) -> str:
    columns = ["task", "affinity of layer i with i + 1", *(f"levels at α = {a}" for a in thresholds)]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        affinity = " ".join(f"{a:.2f}" for a in row["next_layer_affinity"])
        levels = " | ".join(str(row["levels"][str(a)]) for a in thresholds)
        lines.append(f"| {row['task']} | {affinity} | {levels} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95, 0.98],
                        help="the α values (the accuracy benchmark uses its --share-threshold; the paper tunes "
                             "0.93 ... 0.98)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results" / "issue20")
    args, benchmark_args = parser.parse_known_args(argv)
    bench = accuracy.parse_args(["--threads", str(args.threads), *benchmark_args])
    torch.set_num_threads(args.threads)
    rows = [task_levels(task, args.thresholds, bench) for task in bench.tasks]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "calibration_levels.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows, args.thresholds))
    return rows


if __name__ == "__main__":
    main()
