#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Why SHIP loses a task of the accuracy benchmark: SHIP trained with one setting changed at a time.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/accuracy_diagnostics.py --task counting --lr 0.03 \\
        --variant recipe drop_path_rate=0 prompt_attention_weight=0.5 num_prompts=50

Every variant is SHIP under the ``vtab1k`` protocol of ``benchmarks/accuracy.py`` (same data, schedule, seed and
learning rate) with the named ``ShipConfig`` fields changed (``recipe``: none changed); other arguments go to
``benchmarks/accuracy.py`` (``--quick``, ``--epochs``, ...). ``--method`` trains another of the benchmark's methods
instead (a baseline at a rate of your choice, say); only SHIP and its ablations take ``NAME=VALUE`` variants. Each
prints and records its validation and test accuracy, training curve and trainable parameters in
``<output-dir>/diagnostics_<task>.json`` (``--resume`` skips the variants already there for the same method, rate,
decay, seed and arguments). These are diagnostics, not results: the values compared here are not selected on
validation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import tasks as task_module  # noqa: E402


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=task_module.TASKS)
    parser.add_argument("--method", default="ship", choices=accuracy.METHODS)
    parser.add_argument("--lr", type=float, required=True, help="e.g. SHIP's chosen learning rate on this task")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", nargs="+", required=True, help="'recipe' or NAME=VALUE[,NAME=VALUE] of ShipConfig")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results" / "issue20")
    parser.add_argument("--resume", action="store_true")
    args, benchmark_args = parser.parse_known_args(argv)
    if accuracy.FAMILY[args.method] != "prompt" and args.variant != ["recipe"]:
        parser.error(f"--variant NAME=VALUE changes ShipConfig fields of SHIP and its ablations only; "
                     f"train --method {args.method} with --variant recipe")
    bench = accuracy.parse_args(["--threads", str(args.threads), *benchmark_args])
    accuracy.torch.set_num_threads(args.threads)
    data = accuracy.Splits(task_module.load_task(args.task, accuracy.split_sizes(bench), bench.data_seed))
    path = args.output_dir / f"diagnostics_{args.task}.json"
    rows = json.loads(path.read_text()) if args.resume and path.exists() else []
    for variant in args.variant:
        key = (args.method, variant, benchmark_args, args.lr, args.weight_decay, args.seed)
        if any((row["method"], row["variant"], row["benchmark_args"], row["lr"], row["weight_decay"], row["seed"])
               == key for row in rows):
            continue
        bench.ship_overrides = {} if variant == "recipe" else dict(map(accuracy.config_value, variant.split(",")))
        hyper = accuracy.Hyper(args.lr, args.weight_decay)
        row = accuracy.run_one(args.task, data, args.method, args.seed, hyper, bench, accuracy.FeatureCache())
        rows.append(dict(variant=variant, benchmark_args=benchmark_args, **row))
        path.write_text(json.dumps(rows, indent=1))
        curve = [round(100 * p["val_acc"]) for p in row["curve"] if "val_acc" in p]
        print(f"{args.task} {args.method} {variant} {' '.join(benchmark_args)} seed {args.seed}: "
              f"val {row['val_acc']:.3f} test {row['test_acc']:.3f} final loss {row['final_train_loss']:.3f} "
              f"curve {curve}", flush=True)
    return rows


if __name__ == "__main__":
    main()
