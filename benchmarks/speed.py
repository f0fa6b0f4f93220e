#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Speed and memory of SHIP against the usual baselines, on one backbone, batch and dtype (issues #4 and #10).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --model-size tiny --dtype fp32          # CPU, a few minutes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --model-size tiny --dtype bf16
    python benchmarks/speed.py --model-size vit-b16 --dtype bf16 --device cuda                    # one GPU

Methods (``--methods``; all share the backbone's random weights, the batch and the dtype):

* ``floor``      frozen backbone + trained head: the floor every other figure is divided by;
* ``floor_grad`` the same, with the gradient flowing through the frozen backbone's activations to the input: the
                 least any deep-prompt method pays for a training step (its prompts need that gradient);
* ``vpt_deep``   VPT-deep as the SHIP config ablation, K + S prompts fresh at every layer (as many as SHIP);
* ``ship``       SHIP, default config (K=50, S=10, A=10 at 2 attribute levels, M=200, decoupled attention, matching
                 loss), levels given (``--prompt-layers``), random prototypes;
* ``ship_cache`` SHIP with ``enable_prompt_cache()``: eval only (training always runs the full method = ``ship``);
* ``ship_ckpt``  SHIP with gradient checkpointing (extra row: what the memory target costs in time);
* ``ship_drop``  SHIP with the recipe's stochastic depth (``drop_path_rate=0.1``, ``docs/method.md`` §6);
* ``lora``       PEFT LoRA r=8, alpha=16 on q_proj and v_proj, head trained;
* ``full``       full fine-tuning.

For every method: training step time (zero_grad + forward + backward + AdamW step; median over ``--steps`` after
``--warmup``), peak training memory (CUDA: ``torch.cuda.max_memory_allocated`` after a reset; CPU: peak RSS of a
fresh process per method), evaluation latency per batch (``model.eval()``, ``torch.no_grad()``) and throughput,
trainable parameters, and the file a task needs on top of the shared backbone (PEFT's ``adapter_model.safetensors``;
the head for the floor; every weight for full fine-tuning). Every figure is also given as a ratio to the floor.
Writes ``speed_<size>_<device>_<dtype>.json`` and ``.md`` to ``--output-dir`` and prints the Markdown.

Two passes. Memory pass: each method alone, two eval calls and two training steps; on CPU in a fresh Python process
per method (``--isolation process``, the default there), because a process's peak RSS is a high-water mark that
later methods would inherit; on CUDA in this process with ``max_memory_allocated`` reset per phase. Timing pass
(``--timing interleaved``, the default): all models are built side by side in this process and timed in turns, one
step of each method per round, so that load from other jobs on a shared machine hits every method alike.
``--timing separate`` times each method in its own pass instead (``--rounds R`` repeats those in rotating order and
takes the median over rounds).

Parts: ``speed_models.py`` (the methods, settings, models and batch), ``speed_measure.py`` (timing, memory, the
interleaved rounds), ``speed_report.py`` (ratios to the floor, the targets, Markdown and JSON); this file runs them
(:func:`run_benchmark`) and is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_measure import (  # noqa: E402
    _combine_rounds,
    _measure_in_child,
    machine_description,
    make_eval_step,
    make_train_step,
    measure_interleaved,
    measure_method,
    saved_activation_bytes,
)
from speed_models import (  # noqa: E402
    DEFAULT_METHODS,
    DEFAULT_PROMPT_LAYERS,
    INPUT_GRADIENT_METHODS,
    METHODS,
    FAMILIES,
    MODEL_SIZES,
    BenchSettings,
    adapter_bytes,
    build_model,
    make_batch,
)
from speed_report import RATIO_METRICS, TARGETS, Target, add_ratios, check_targets, markdown_table, write_results  # noqa: E402

#: The benchmark's parts, reachable as ``speed.<name>`` (``profile_step.py`` and the tests use them).
__all__ = [
    "BenchSettings", "DEFAULT_METHODS", "DEFAULT_PROMPT_LAYERS", "INPUT_GRADIENT_METHODS", "METHODS", "MODEL_SIZES",
    "RATIO_METRICS", "TARGETS", "Target", "adapter_bytes", "add_ratios", "build_model", "check_targets", "main",
    "make_batch", "make_eval_step", "make_train_step", "markdown_table", "measure_method", "run_benchmark",
    "saved_activation_bytes", "write_results",
]  # fmt: skip


def run_benchmark(
    settings: BenchSettings,
    methods: Optional[list[str]] = None,
    isolation: str = "auto",
    timing: str = "interleaved",
    rounds: int = 1,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Measure ``methods`` (the floor is always included) and return the JSON-ready results with ratios and
    target checks.

    Memory, parameter counts and adapter sizes come from one pass per method, alone: ``isolation`` ``process`` runs
    each in a fresh interpreter (its own peak RSS), ``none`` in this process, ``auto`` = process on CPU, none on
    CUDA (where the peak counter is reset per phase). Timings: ``timing="interleaved"`` (default) builds all models
    side by side and times them in turns, step by step, so that other load on a shared machine disturbs every
    method alike; ``"separate"`` times each method in its own pass (``rounds`` repeats those passes in rotating
    order and takes the median over rounds)."""
    methods = list(methods or DEFAULT_METHODS)
    if "floor" not in methods:
        methods.insert(0, "floor")
    cuda = torch.device(settings.device).type == "cuda"
    if isolation == "auto":
        isolation = "none" if cuda else "process"
    if isolation not in ("process", "none"):
        raise ValueError(f"isolation must be auto, process or none, got {isolation!r}.")
    if timing not in ("interleaved", "separate"):
        raise ValueError(f"timing must be interleaved or separate, got {timing!r}.")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.time()
    # memory pass: two eval calls and two training steps are enough for the peaks when timing is interleaved
    pass_settings = settings if timing == "separate" else dataclasses.replace(settings, steps=1, warmup=1)
    pass_rounds = rounds if timing == "separate" else 1
    per_method: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    for round_index in range(pass_rounds):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            log(f"memory pass {round_index + 1}/{pass_rounds}: {method} ({isolation} isolation) ...")
            start = time.perf_counter()
            if isolation == "process":
                row = _measure_in_child(method, pass_settings)
            else:
                row = measure_method(method, pass_settings)
            row["_batch_size"] = settings.batch_size
            per_method[method].append(row)
            log(f"    done in {time.perf_counter() - start:.1f} s")
            if cuda:
                torch.cuda.empty_cache()
    rows = []
    for method in methods:
        row = _combine_rounds(per_method[method])
        row.pop("_batch_size", None)
        rows.append(row)
    if timing == "interleaved":
        times = measure_interleaved(methods, settings, log)
        for row in rows:
            measured = times[row["method"]]
            row["eval_latency_all_s"] = measured["eval_latency_all_s"]
            row["eval_latency_s"] = statistics.median(measured["eval_latency_all_s"])
            row["eval_throughput_img_s"] = settings.batch_size / row["eval_latency_s"]
            if measured["train_step_all_s"] is not None:
                row["train_step_all_s"] = measured["train_step_all_s"]
                row["train_step_s"] = statistics.median(measured["train_step_all_s"])
            row["rounds"] = 1
    add_ratios(rows)
    memory_kind = "cuda_max_memory_allocated" if cuda else "peak_rss"
    if isolation == "none" and not cuda:
        memory_kind = "peak_rss_shared_process (not comparable between methods)"
    return dict(
        benchmark="ship-peft speed",
        settings=dataclasses.asdict(settings),
        machine=machine_description(settings.device),
        isolation=isolation,
        timing=timing,
        rounds=rounds if timing == "separate" else 1,
        memory_kind=memory_kind,
        load_average_before=load_before,
        load_average_after=os.getloadavg() if hasattr(os, "getloadavg") else None,
        wall_time_s=time.time() - started,
        methods=rows,
        targets=check_targets(rows, settings.model_size, interleaved=timing == "interleaved", family=settings.family),
    )


# ------------------------------------------------------------------------------------------------------------- CLI


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device.")
    return device


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        model_size=args.model_size,
        family=args.family,
        vit=dict(MODEL_SIZES[args.model_size]),
        num_labels=args.num_labels,
        batch_size=args.batch_size,
        dtype=args.dtype,
        steps=args.steps,
        warmup=args.warmup,
        device=resolve_device(args.device),
        num_prompts=args.num_prompts,
        num_shared_prompts=args.num_shared_prompts,
        prompt_layers=list(args.prompt_layers or DEFAULT_PROMPT_LAYERS[args.model_size]),
        seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="vit", help="backbone family of that shape")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast, fp32 weights")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps before them")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument(
        "--timing",
        choices=["interleaved", "separate"],
        default="interleaved",
        help="interleaved: all models side by side, timed in turns (robust to other load); separate: one pass each",
    )
    parser.add_argument("--rounds", type=int, default=1, help="with --timing separate: repeat, median over rounds")
    parser.add_argument("--isolation", choices=["auto", "process", "none"], default="auto")
    parser.add_argument("--num-labels", type=int, default=100)
    parser.add_argument("--num-prompts", type=int, default=50, help="SHIP K")
    parser.add_argument("--num-shared-prompts", type=int, default=10, help="SHIP S")
    parser.add_argument("--prompt-layers", type=int, nargs="+", default=None, help="SHIP levels (default per size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_child-method", help=argparse.SUPPRESS)
    parser.add_argument("--_child-settings", help=argparse.SUPPRESS)
    parser.add_argument("--_child-result", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args._child_method:
        settings = BenchSettings(**json.loads(args._child_settings))
        result = measure_method(args._child_method, settings)
        Path(args._child_result).write_text(json.dumps(result), encoding="utf-8")
        return result
    settings = settings_from_args(args)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results = run_benchmark(
        settings, args.methods, isolation=args.isolation, timing=args.timing, rounds=args.rounds, log=log
    )
    json_path, md_path = write_results(results, args.output_dir)
    print(markdown_table(results))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # for the child processes (this one has started OpenMP)
    main()
