#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""What dominates a SHIP step, next to the floor (frozen backbone + head) and VPT-deep: torch.profiler.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_step.py --model-size tiny --dtype fp32 --mode train
    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_step.py --model-size tiny --dtype fp32 --mode eval \
        --methods floor ship ship_cache
    python benchmarks/profile_step.py --model-size vit-b16 --dtype bf16 --device cuda --mode train

Same models, batch and dtype as ``benchmarks/speed.py`` (it imports them). All methods are built side by side and
profiled in one session, one step of each in turns (``--steps`` rounds after ``--warmup``), so that load from other
jobs on a shared machine falls on every method alike. It reports, per step and method: the time of each phase
(forward / backward / optimizer), the exact FLOPs by kind of op (``torch.utils.flop_counter``, one more step per
method; ``--no-flops`` skips it), the time per op category (matmuls, attention, LayerNorm, GELU, copies and
concatenations, element-wise, ...) with its difference to the floor, and the top ops. Prints Markdown and writes
``profile_<size>_<device>_<dtype>_<mode>.md`` to ``--output-dir``. Times are the profiler's self times (CPU, or
the device's on CUDA); the profiler adds its own overhead, so compare methods with each other, not with speed.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/speed.py: the models and settings)

#: Op categories: the first whose pattern occurs in the op's name wins (order matters).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention (sdpa)", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")),
    ("matmul (linear, mm, bmm)", ("addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "gemm")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("softmax", ("softmax",)),
    ("copy / cat / layout", ("aten::cat", "aten::copy_", "aten::clone", "contiguous", "aten::to", "_to_copy",
                             "aten::index", "aten::gather", "scatter", "aten::stack", "aten::fill_", "aten::zero_",
                             "aten::empty", "aten::slice_backward", "aten::narrow", "aten::expand")),
    ("top-k / reductions", ("topk", "aten::sum", "aten::mean", "aten::amin", "aten::amax", "norm", "aten::max",
                            "aten::min", "nll_loss", "cross_entropy", "log_softmax")),
    ("optimizer (AdamW)", ("_foreach", "adam", "aten::lerp_", "addcdiv", "addcmul", "aten::sqrt")),
    ("element-wise", ("aten::lerp", "aten::add", "aten::mul", "aten::div", "aten::sub", "aten::rsub", "aten::neg", "aten::where",
                      "aten::clamp", "aten::exp", "aten::pow", "aten::threshold", "aten::ge", "aten::eq")),
)
PHASES = ("## forward", "## backward", "## optimizer", "## eval")
METHOD_RANGE = "method::"


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, patterns in CATEGORIES:
        if any(pattern.lower() in lowered for pattern in patterns):
            return category
    return "other"


def _self_time(event: Any, cuda: bool) -> float:
    if cuda:
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
    return event.self_cpu_time_total


def _total_time(event: Any, cuda: bool) -> float:
    if cuda:
        return getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0))
    return event.cpu_time_total


def step_function(
    model: torch.nn.Module, settings: speed.BenchSettings, mode: str, input_gradient: bool = False
) -> Callable[[], None]:
    """A training step with labelled phases (``input_gradient``: the backward reaches the images), or an eval
    forward."""
    pixels, labels = speed.make_batch(settings)
    pixels.requires_grad_(input_gradient and mode == "train")
    autocast = (
        (lambda: torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16))
        if settings.dtype == "bf16"
        else contextlib.nullcontext
    )
    if mode == "eval":
        model.eval()

        def eval_step() -> None:
            with record_function("## eval"), torch.no_grad(), autocast():
                model(pixel_values=pixels)

        return eval_step
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with record_function("## forward"), autocast():
            loss = model(pixel_values=pixels, labels=labels).loss
        with record_function("## backward"):
            loss.backward()
        with record_function("## optimizer"):
            optimizer.step()

    return train_step


def _method_of(event: Any) -> Optional[str]:
    """The method whose ``method::<name>`` range encloses ``event`` (None outside every range)."""
    parent = event
    while parent is not None:
        if parent.name.startswith(METHOD_RANGE):
            return parent.name[len(METHOD_RANGE) :]
        parent = parent.cpu_parent
    return None


def profile_methods(
    methods: list[str], settings: speed.BenchSettings, mode: str, steps: int, warmup: int
) -> list[dict[str, Any]]:
    """Profile ``methods`` side by side in one profiler session, one step of each in turns (as speed.py times
    them), so that load from other jobs falls on every method alike. Ops are attributed to the method whose range
    encloses them."""
    cuda = torch.device(settings.device).type == "cuda"
    if mode == "train" and "ship_cache" in methods:
        raise ValueError("ship_cache is eval-only; profile it with --mode eval.")
    functions = {
        method: step_function(speed.build_model(method, settings), settings, mode, method in speed.INPUT_GRADIENT_METHODS)
        for method in methods
    }
    for _ in range(warmup):
        for function in functions.values():
            function()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for step in range(steps):
            shift = step % len(methods)
            for method in methods[shift:] + methods[:shift]:
                with record_function(METHOD_RANGE + method):
                    functions[method]()
                if cuda:
                    torch.cuda.synchronize()
    phases = {method: defaultdict(float) for method in methods}
    categories = {method: defaultdict(float) for method in methods}
    ops = {method: defaultdict(lambda: [0.0, 0]) for method in methods}
    for event in profiler.events():
        if event.name.startswith(METHOD_RANGE):
            continue
        method = _method_of(event)
        if method is None:
            continue
        if event.name in PHASES:
            # host ranges: their CPU time is the phase's wall time on CPU (on CUDA the host may run ahead)
            phases[method][event.name.strip("# ")] += event.cpu_time_total / steps / 1e3
            continue
        self_time = _self_time(event, cuda) / steps / 1e3
        if self_time <= 0:
            continue
        categories[method][categorize(event.name)] += self_time
        ops[method][event.name][0] += self_time
        ops[method][event.name][1] += 1
    results = []
    for method in methods:
        listed = sorted(((name, t, count // steps) for name, (t, count) in ops[method].items()), key=lambda o: -o[1])
        results.append(
            dict(
                method=method,
                phases=dict(phases[method]),
                categories=dict(categories[method]),
                ops=listed,
                total=sum(categories[method].values()),
            )
        )
    return results


def _cpu_attention_flops() -> dict[Any, Callable[..., int]]:
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU flash kernel: the same formulas for it
    (a ``custom_mapping`` for ``FlopCounterMode``)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,  # FlopCounterMode passes shapes to them
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def count_flops(methods: list[str], settings: speed.BenchSettings, mode: str) -> dict[str, dict[str, float]]:
    """GFLOP of one step per method and kind of op (``torch.utils.flop_counter``): exact, unaffected by load."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = _cpu_attention_flops()
    kinds = {
        "addmm": "linear",
        "mm": "linear",
        "convolution": "patch embedding",
        "bmm": "bmm (q_proj on sliced image rows, CLS scores, cosines)",
    }
    counts = {}
    for method in methods:
        function = step_function(
            speed.build_model(method, settings), settings, mode, method in speed.INPUT_GRADIENT_METHODS
        )
        function()  # warm-up: the prompt cache is built on the first eval call, not on every one
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            function()
        per_kind: dict[str, float] = defaultdict(float)
        for op, flops in counter.get_flop_counts().get("Global", {}).items():
            name = str(op).split(".")[-1]
            per_kind["attention (sdpa)" if "attention" in name else kinds.get(name, name)] += flops / 1e9
        per_kind["total"] = counter.get_total_flops() / 1e9
        counts[method] = dict(per_kind)
    return counts


def flops_report(counts: dict[str, dict[str, float]]) -> str:
    methods = list(counts)
    kinds = {k for c in counts.values() for k in c if k != "total"}
    kinds = sorted(kinds, key=lambda k: -counts[methods[-1]].get(k, 0))
    floor = counts.get("floor", {}).get("total")
    lines = ["| method | " + " | ".join(kinds) + " | total | × floor |", "|---" * (len(kinds) + 3) + "|"]
    for method in methods:
        cells = [f"{counts[method].get(kind, 0.0):.2f}" for kind in kinds]
        ratio = f"{counts[method]['total'] / floor:.2f}×" if floor else "—"
        total = counts[method]["total"]
        lines.append(f"| {speed.METHODS[method]} | " + " | ".join(cells) + f" | {total:.2f} | {ratio} |")
    return "\n".join(lines)


def report(
    results: list[dict[str, Any]],
    settings: speed.BenchSettings,
    mode: str,
    steps: int,
    top: int,
    flops: Optional[dict[str, dict[str, float]]] = None,
) -> str:
    cuda = torch.device(settings.device).type == "cuda"
    unit = "device self time" if cuda else "CPU self time"
    floor = next((r for r in results if r["method"] == "floor"), None)
    lines = [
        f"Profile of one {'training step' if mode == 'train' else 'eval forward'}: {settings.model_size} ViT, batch "
        f"{settings.batch_size}, {settings.dtype}, {settings.device}, {torch.get_num_threads()} threads; "
        f"ms per step ({unit}, mean of {steps} profiled steps).",
        "",
    ]
    phase_names = ["forward", "backward", "optimizer"] if mode == "train" else ["eval"]
    lines += [
        "| method | " + " | ".join(phase_names) + " | sum of op self times |",
        "|---" * (len(phase_names) + 2) + "|",
    ]
    for r in results:
        cells = [f"{r['phases'].get(name, 0.0):.1f}" for name in phase_names]
        lines.append(f"| {speed.METHODS[r['method']]} | " + " | ".join(cells) + f" | {r['total']:.1f} |")
    if flops:
        lines += ["", "GFLOP per step (torch.utils.flop_counter; exact, unaffected by load):", "", flops_report(flops)]
    names = {c for r in results for c in r["categories"]}
    names = sorted(names, key=lambda c: -max(r["categories"].get(c, 0) for r in results))
    lines += ["", "Per op category (ms per step; in brackets: minus the floor):", ""]
    lines += [
        "| category | " + " | ".join(speed.METHODS[r["method"]] for r in results) + " |",
        "|---" * (len(results) + 1) + "|",
    ]
    for name in names:
        cells = []
        for r in results:
            value = r["categories"].get(name, 0.0)
            delta = "" if floor is None or r is floor else f" ({value - floor['categories'].get(name, 0.0):+.1f})"
            cells.append(f"{value:.1f}{delta}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for r in results:
        lines += ["", f"Top {top} ops, {speed.METHODS[r['method']]} (ms per step, calls per step):", ""]
        lines += ["| op | ms | calls | category |", "|---|---|---|---|"]
        for name, value, count in r["ops"][:top]:
            lines.append(f"| `{name}` | {value:.1f} | {count} | {categorize(name)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(speed.MODEL_SIZES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--mode", choices=["train", "eval"], default="train")
    parser.add_argument("--methods", nargs="+", choices=list(speed.METHODS), default=None,
                        help="default: floor vpt_deep ship (train), floor ship ship_cache (eval)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="top ops listed per method")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--prompt-layers", type=int, nargs="+", default=None)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one more step per method)")
    args = parser.parse_args(argv)
    settings = speed.BenchSettings(
        model_size=args.model_size,
        vit=dict(speed.MODEL_SIZES[args.model_size]),
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=speed.resolve_device(args.device),
        prompt_layers=list(args.prompt_layers or speed.DEFAULT_PROMPT_LAYERS[args.model_size]),
    )
    default_methods = ["floor", "vpt_deep", "ship"] if args.mode == "train" else ["floor", "ship", "ship_cache"]
    methods = args.methods or default_methods
    print(f"profiling {', '.join(methods)} in turns ...", file=sys.stderr, flush=True)
    results = profile_methods(methods, settings, args.mode, args.steps, args.warmup)
    flops = None if args.no_flops else count_flops(methods, settings, args.mode)
    text = report(results, settings, args.mode, args.steps, args.top, flops)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"profile_{args.model_size}_{torch.device(settings.device).type}_{args.dtype}_{args.mode}.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {path}", file=sys.stderr)
    return text


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
