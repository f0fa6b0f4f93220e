#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Speed and memory of SHIP against the usual baselines, on one backbone, batch and dtype (issue #4, items 1-2).

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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

#: Backbone shapes. ``tiny`` is the project's offline backbone (``tiny-vit-fractal-1k``), ``vit-b16`` ViT-B/16 at 224.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=32,
        patch_size=4,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        layer_norm_eps=1e-6,
    ),
    "vit-b16": dict(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        layer_norm_eps=1e-6,
    ),
}

#: Default semantic levels per size: ``tiny`` as the project's examples, ``vit-b16`` the reference's CIFAR-100 levels.
DEFAULT_PROMPT_LAYERS = {"tiny": [0, 2, 4, 7, 9, 11], "vit-b16": [0, 2, 4, 6, 8, 11]}

METHODS: dict[str, str] = {
    "floor": "frozen backbone + head (floor)",
    "floor_grad": "frozen backbone + head, gradient to the input (deep-prompt floor)",
    "vpt_deep": "VPT-deep (K+S prompts per layer)",
    "ship": "SHIP (default)",
    "ship_cache": "SHIP + inference cache",
    "ship_ckpt": "SHIP + gradient checkpointing",
    "lora": "LoRA r=8 (q, v) + head",
    "full": "full fine-tuning",
}
DEFAULT_METHODS = list(METHODS)

#: Metrics given with a ratio to the floor (throughput: higher is better; all others: lower is better).
RATIO_METRICS = (
    "train_step_s",
    "train_peak_memory_bytes",
    "train_memory_above_idle_bytes",
    "train_saved_activations_bytes",
    "eval_latency_s",
    "eval_throughput_img_s",
    "trainable_params",
    "adapter_bytes",
)

#: Methods whose training step also computes the gradient with respect to the input images.
INPUT_GRADIENT_METHODS = ("floor_grad",)


@dataclasses.dataclass(frozen=True)
class Target:
    """A ratio ``numerator / denominator`` of ``metric`` that should stay at or below ``limit`` (None: reported only),
    for the model sizes in ``sizes`` (issue #10, item 3)."""

    key: str
    description: str
    numerator: str
    metric: str
    denominator: str
    limit: Optional[float]
    sizes: tuple[str, ...] = ("tiny", "vit-b16")


TARGETS = (
    Target("ship_vs_vpt_train", "SHIP training step vs VPT-deep", "ship", "train_step_s", "vpt_deep", 0.65, ("tiny",)),
    Target("ship_vs_lora_train", "SHIP training step vs LoRA r=8", "ship", "train_step_s", "lora", 1.2, ("tiny",)),
    Target(
        "ship_vs_lora_activations",
        "SHIP activations saved for backward vs LoRA r=8",
        "ship",
        "train_saved_activations_bytes",
        "lora",
        1.2,
        ("tiny",),
    ),
    Target("ship_vs_vpt_train_b16", "SHIP training step vs VPT-deep", "ship", "train_step_s", "vpt_deep", 0.85, ("vit-b16",)),
    Target("ship_vs_lora_train_b16", "SHIP training step vs LoRA r=8", "ship", "train_step_s", "lora", 1.15, ("vit-b16",)),
    Target(
        "cache_vs_floor_eval_b16",
        "SHIP eval latency with the cache vs the plain backbone",
        "ship_cache",
        "eval_latency_s",
        "floor",
        1.08,
        ("vit-b16",),
    ),
    Target("ship_vs_floor_grad_train", "SHIP training step vs the deep-prompt floor", "ship", "train_step_s", "floor_grad", None),
)


@dataclasses.dataclass
class BenchSettings:
    """Everything a measurement depends on (JSON-serialisable, so a child process gets the same)."""

    model_size: str = "tiny"
    vit: dict = dataclasses.field(default_factory=lambda: dict(MODEL_SIZES["tiny"]))
    num_labels: int = 100
    batch_size: int = 64
    dtype: str = "fp32"
    steps: int = 10
    warmup: int = 3
    device: str = "cpu"
    num_prompts: int = 50
    num_shared_prompts: int = 10
    prompt_layers: list = dataclasses.field(default_factory=lambda: list(DEFAULT_PROMPT_LAYERS["tiny"]))
    lr: float = 1e-3
    seed: int = 0

    @property
    def num_layers(self) -> int:
        return self.vit["num_hidden_layers"]


# --------------------------------------------------------------------------------------------------------- models


def build_model(method: str, settings: BenchSettings) -> torch.nn.Module:
    """The model of ``method`` on the shared random backbone (seeded: every method gets the same weights)."""
    from peft import get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    import ship_peft
    from ship_peft import presets

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {sorted(METHODS)}.")
    torch.manual_seed(settings.seed)
    vit = ViTForImageClassification(
        ViTConfig(**settings.vit, num_labels=settings.num_labels, attn_implementation="sdpa")
    )
    if method in ("floor", "floor_grad"):
        for name, parameter in vit.named_parameters():
            parameter.requires_grad_(name.startswith("classifier."))
        model = vit
    elif method == "full":
        model = vit.requires_grad_(True)
    elif method == "lora":
        model = get_peft_model(vit, presets.adapter_config("lora", settings.num_layers, modules_to_save=["classifier"]))
    elif method == "vpt_deep":  # as many prompt tokens per layer as SHIP carries: K + S
        vpt_prompts = settings.num_prompts + settings.num_shared_prompts
        model = get_peft_model(vit, presets.adapter_config("vpt-deep", settings.num_layers, num_prompts=vpt_prompts))
    else:  # ship, ship_cache, ship_ckpt
        config = presets.adapter_config(
            "ship",
            settings.num_layers,
            num_prompts=settings.num_prompts,
            num_shared_prompts=settings.num_shared_prompts,
            prompt_layers=list(settings.prompt_layers),
        )
        model = get_peft_model(vit, config)
        generator = torch.Generator().manual_seed(settings.seed)
        for prompts in ship_peft.get_ship_layer(model).ship_prompts.values():
            if prompts.prototypes is not None:  # stands in for calibration (random prototypes: speed only)
                prompts.prototypes.copy_(torch.randn(prompts.prototypes.shape, generator=generator))
        if method == "ship_cache":
            model.enable_prompt_cache()
        if method == "ship_ckpt":
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(settings.device)


def make_batch(settings: BenchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed + 1)
    size = settings.vit["image_size"]
    pixels = torch.randn(settings.batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, settings.num_labels, (settings.batch_size,), generator=generator)
    return pixels.to(settings.device), labels.to(settings.device)


def adapter_bytes(model: torch.nn.Module) -> int:
    """Bytes a task stores on top of the shared backbone: PEFT's adapter file, else every trainable tensor."""
    from peft import PeftModel
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        if isinstance(model, PeftModel):
            model.save_pretrained(folder)
            path = os.path.join(folder, "adapter_model.safetensors")
        else:
            path = os.path.join(folder, "model.safetensors")
            tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_file(tensors, path)
        return os.path.getsize(path)


# ------------------------------------------------------------------------------------------------------ measuring


def _rss_now() -> Optional[int]:
    """Current resident set size in bytes (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _rss_peak() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _autocast(settings: BenchSettings) -> contextlib.AbstractContextManager:
    if settings.dtype == "bf16":
        return torch.autocast(device_type=torch.device(settings.device).type, dtype=torch.bfloat16)
    if settings.dtype != "fp32":
        raise ValueError(f"dtype must be fp32 or bf16, got {settings.dtype!r}.")
    return contextlib.nullcontext()


def _timed(settings: BenchSettings, function: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    cuda = torch.device(settings.device).type == "cuda"
    for _ in range(warmup):
        function()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def make_train_step(
    model: torch.nn.Module, settings: BenchSettings, pixels, labels, input_gradient: bool = False
) -> Callable[[], float]:
    """One optimisation step (zero_grad, forward with labels, backward, AdamW step) as a closure; with
    ``input_gradient`` the backward also reaches the images (``floor_grad``)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    pixels = pixels.detach().requires_grad_(input_gradient)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        pixels.grad = None
        with _autocast(settings):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def saved_activation_bytes(
    model: torch.nn.Module, settings: BenchSettings, pixels, labels, input_gradient: bool = False
) -> int:
    """Bytes of the tensors one training forward saves for backward, model weights excluded (each storage once).

    Allocator-independent (RSS on CPU keeps freed memory): the activation memory a training step holds at its
    peak. With activation checkpointing, tensors saved inside a checkpointed layer are dropped and recomputed in
    backward, so they do not count (one layer's worth exists again during its recompute)."""
    weights = {tensor.data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in weights:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    pixels = pixels.detach().requires_grad_(input_gradient)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _autocast(settings):
        loss = model(pixel_values=pixels, labels=labels).loss
    del loss
    return sum(storages.values())


def make_eval_step(model: torch.nn.Module, settings: BenchSettings, pixels) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.no_grad(), _autocast(settings):
            return model(pixel_values=pixels).logits

    return step


def measure_method(method: str, settings: BenchSettings) -> dict[str, Any]:
    """Measure one method in this process; returns a flat dict of figures (None where not applicable).

    Order: evaluation first, then training, so the CPU peak RSS after training is the training peak (RSS peaks
    only grow; a training step always needs more than an eval pass). ``ship_cache`` has no training figures: the
    cache is eval-only and training runs the full method, i.e. the ``ship`` row.
    """
    device = torch.device(settings.device)
    cuda = device.type == "cuda"
    torch.manual_seed(settings.seed)
    model = build_model(method, settings)
    pixels, labels = make_batch(settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = dict(method=method, label=METHODS[method], trainable_params=trainable, total_params=total)
    idle = torch.cuda.memory_allocated(device) if cuda else _rss_now()
    result["idle_memory_bytes"] = idle

    model.eval()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = _timed(settings, make_eval_step(model, settings, pixels), settings.warmup, settings.steps)
    result["eval_latency_s"] = statistics.median(times)
    result["eval_latency_all_s"] = times
    result["eval_throughput_img_s"] = settings.batch_size / result["eval_latency_s"]
    result["eval_peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else _rss_peak()

    train_keys = (
        "train_step_s",
        "train_step_all_s",
        "train_peak_memory_bytes",
        "train_memory_above_idle_bytes",
        "train_saved_activations_bytes",
    )
    if method == "ship_cache":
        result.update(dict.fromkeys(train_keys))
        result["note"] = "the cache is eval-only: training runs the full method (see the `ship` row)"
    else:
        model.train()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step = make_train_step(model, settings, pixels, labels, method in INPUT_GRADIENT_METHODS)
        times = _timed(settings, step, settings.warmup, settings.steps)
        result["train_step_s"] = statistics.median(times)
        result["train_step_all_s"] = times
        peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_peak()
        result["train_peak_memory_bytes"] = peak
        result["train_memory_above_idle_bytes"] = peak - idle if idle is not None else None
        result["train_saved_activations_bytes"] = saved_activation_bytes(
            model, settings, pixels, labels, method in INPUT_GRADIENT_METHODS
        )
    result["adapter_bytes"] = adapter_bytes(model)
    return result


def _measure_in_child(method: str, settings: BenchSettings) -> dict[str, Any]:
    """Run :func:`measure_method` in a fresh interpreter, so its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as folder:
        result_file = os.path.join(folder, "result.json")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--_child-method",
            method,
            "--_child-settings",
            json.dumps(dataclasses.asdict(settings)),
            "--_child-result",
            result_file,
        ]
        environment = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        process = subprocess.run(command, env=environment, capture_output=True, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"Measuring {method!r} failed (exit {process.returncode}):\n{process.stderr[-4000:]}")
        with open(result_file) as handle:
            return json.load(handle)


def _combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of every scalar figure; per-step samples of all rounds are kept."""
    combined = dict(rounds[0])
    for key, value in rounds[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in rounds if r.get(key) is not None]
            combined[key] = statistics.median(values) if values else None
        elif isinstance(value, list):
            combined[key] = [sample for r in rounds for sample in (r.get(key) or [])]
    if combined.get("eval_latency_s"):
        # throughput from the median latency, so the two columns agree
        combined["eval_throughput_img_s"] = rounds[0]["_batch_size"] / combined["eval_latency_s"]
    combined["rounds"] = len(rounds)
    return combined


def add_ratios(methods: list[dict[str, Any]]) -> None:
    """Set ``ratios[metric] = value / floor's value`` on every row (None where either is missing or zero)."""
    floor = next((row for row in methods if row["method"] == "floor"), None)
    if floor is None:
        raise ValueError("The floor (frozen backbone + head) must be measured: every ratio is relative to it.")
    for row in methods:
        row["ratios"] = {}
        for metric in RATIO_METRICS:
            value, base = row.get(metric), floor.get(metric)
            row["ratios"][metric] = value / base if value is not None and base else None


def check_targets(methods: list[dict[str, Any]], model_size: str, interleaved: bool = True) -> list[dict[str, Any]]:
    """The targets of ``model_size`` that the measured methods allow checking (``interleaved``: the timing samples of
    all methods were taken in the same rounds, so per-round ratios are also given)."""
    by_name = {row["method"]: row for row in methods}
    checks = []
    for target in TARGETS:
        numerator, metric, denominator, limit = target.numerator, target.metric, target.denominator, target.limit
        if model_size not in target.sizes or numerator not in by_name or denominator not in by_name:
            continue
        value, base = by_name[numerator].get(metric), by_name[denominator].get(metric)
        ratio = value / base if value is not None and base else None
        # with interleaved timing, sample i of every method ran in the same round: the median of the per-round
        # ratios is a second estimate, less sensitive to load that changes between rounds
        samples = {"train_step_s": "train_step_all_s", "eval_latency_s": "eval_latency_all_s"}.get(metric)
        paired = None
        if interleaved and samples and by_name[numerator].get(samples) and by_name[denominator].get(samples):
            pairs = zip(by_name[numerator][samples], by_name[denominator][samples])
            paired = statistics.median(a / b for a, b in pairs)
        checks.append(
            dict(
                key=target.key,
                target=target.description,
                ratio=ratio,
                paired_ratio=paired,
                limit=limit,
                met=None if ratio is None or limit is None else ratio <= limit,
                compared=f"{numerator} / {denominator} ({metric})",
            )
        )
    return checks


def machine_description(device: str) -> dict[str, Any]:
    info: dict[str, Any] = dict(
        device=device,
        torch=torch.__version__,
        python=platform.python_version(),
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        cpu_model=_cpu_model(),
    )
    try:
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:  # pragma: no cover
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _interleave(settings: BenchSettings, functions: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
    """Time ``functions`` in turns (A B C, B C A, ...): load that comes and goes hits every method alike."""
    names = list(functions)
    for _ in range(settings.warmup):
        for name in names:
            functions[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(settings.steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            times[name] += _timed(settings, functions[name], 0, 1)
    return times


def measure_interleaved(
    methods: list[str], settings: BenchSettings, log: Callable[[str], None] = lambda message: None
) -> dict[str, dict[str, list[float]]]:
    """Eval latencies and training step times of all ``methods``, built side by side in this process and timed
    in turns. Memory is not measured here (the other models are resident)."""
    pixels, labels = make_batch(settings)
    models = {method: build_model(method, settings) for method in methods}
    log(f"interleaved timing: eval, {settings.warmup} warm-up + {settings.steps} rounds of {len(methods)} methods")
    eval_steps = {}
    for method, model in models.items():
        model.eval()
        eval_steps[method] = make_eval_step(model, settings, pixels)
    eval_times = _interleave(settings, eval_steps)
    trained = [method for method in methods if method != "ship_cache"]
    log(f"interleaved timing: training, {settings.warmup} warm-up + {settings.steps} rounds of {len(trained)} methods")
    train_steps = {}
    for method in trained:
        models[method].train()
        train_steps[method] = make_train_step(
            models[method], settings, pixels, labels, method in INPUT_GRADIENT_METHODS
        )
    train_times = _interleave(settings, train_steps)
    return {
        method: dict(eval_latency_all_s=eval_times[method], train_step_all_s=train_times.get(method))
        for method in methods
    }


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
        targets=check_targets(rows, settings.model_size, interleaved=timing == "interleaved"),
    )


# ------------------------------------------------------------------------------------------------------- reporting


def _ratio(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}×" if value >= 100 else f"{value:.2f}×"


def _cell(value: Optional[float], ratio: Optional[float], fmt: Callable[[float], str]) -> str:
    return "—" if value is None else f"{fmt(value)} ({_ratio(ratio)})"


def _mib(value: float) -> str:
    mib = value / 2**20
    return f"{mib:,.0f} MiB" if mib >= 10 else f"{mib:.2f} MiB"


def _int(value: float) -> str:
    return f"{int(value):,}"


def _file_size(value: float) -> str:
    return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"


def markdown_table(results: dict[str, Any]) -> str:
    """The methods table (each cell: value (ratio to the floor)) plus the target checks, as Markdown."""
    cpu = not results["memory_kind"].startswith("cuda")
    memory_title = "peak train RSS" if cpu else "peak train memory"
    header = ["method", "train step", memory_title]
    if cpu:
        header.append("train RSS above idle")
    header.append("activations saved for backward²")
    header += ["eval latency / batch", "eval throughput", "trainable params", "adapter file"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["methods"]:
        ratios = row["ratios"]
        training_note = "= SHIP¹" if row["method"] == "ship_cache" else "—"
        cells = [
            row["label"],
            _cell(row["train_step_s"], ratios["train_step_s"], lambda v: f"{v * 1e3:,.1f} ms")
            if row["train_step_s"] is not None
            else training_note,
            _cell(row["train_peak_memory_bytes"], ratios["train_peak_memory_bytes"], _mib)
            if row["train_peak_memory_bytes"] is not None
            else training_note,
        ]
        if cpu:
            value = row.get("train_memory_above_idle_bytes")
            cells.append(
                _cell(value, ratios["train_memory_above_idle_bytes"], _mib) if value is not None else training_note
            )
        value = row.get("train_saved_activations_bytes")
        saved = _cell(value, ratios["train_saved_activations_bytes"], _mib) if value is not None else training_note
        cells.append(saved)
        cells += [
            _cell(row["eval_latency_s"], ratios["eval_latency_s"], lambda v: f"{v * 1e3:,.1f} ms"),
            _cell(row["eval_throughput_img_s"], ratios["eval_throughput_img_s"], lambda v: f"{v:,.0f} img/s"),
            _cell(row["trainable_params"], ratios["trainable_params"], _int),
            _cell(row["adapter_bytes"], ratios["adapter_bytes"], _file_size),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    target_lines = [
        "| target (issue #10) | measured (ratio of medians) | median of per-round ratios³ | limit | met |",
        "|---|---|---|---|---|",
    ]
    for check in results["targets"]:
        met = "—" if check["met"] is None else ("yes" if check["met"] else "**no**")
        paired = _ratio(check.get("paired_ratio"))
        target_lines.append(
            f"| {check['target']} | {_ratio(check['ratio'])} | {paired} | {_limit(check['limit'])} | {met} |"
        )

    settings, machine = results["settings"], results["machine"]
    vit = settings["vit"]
    hardware = machine.get("gpu") or f"{machine['cpu_model']} ({machine['cpu_count']} CPUs)"
    num_tokens = 1 + (vit["image_size"] // vit["patch_size"]) ** 2
    autocast = " autocast" if settings["dtype"] == "bf16" else ""
    over_rounds = f", median over {results['rounds']} rounds" if results["rounds"] > 1 else ""
    if results.get("timing") == "interleaved":
        over_rounds += ", all methods timed in turns (interleaved)"
    fresh = " (a fresh process per method)" if results["isolation"] == "process" else ""
    vpt_prompts = settings["num_prompts"] + settings["num_shared_prompts"]
    head = (
        f"**{settings['model_size']}** ViT (image {vit['image_size']}, patch {vit['patch_size']}, "
        f"hidden {vit['hidden_size']}, {vit['num_hidden_layers']} layers, {vit['num_attention_heads']} heads, "
        f"N = {num_tokens} tokens), {settings['num_labels']} classes, batch {settings['batch_size']}, "
        f"{settings['dtype']}{autocast}, sdpa, on {hardware}, torch {machine['torch']} "
        f"({machine['torch_threads']} threads). SHIP: K={settings['num_prompts']}, S={settings['num_shared_prompts']}, "
        f"A=10 at 2 attribute levels, M=200, levels {settings['prompt_layers']}; VPT-deep: {vpt_prompts} prompts "
        f"at every layer. Medians of {settings['steps']} steps after {settings['warmup']} warm-up{over_rounds}; "
        f"memory: {results['memory_kind']}{fresh}. Cells: value (ratio to the floor)."
    )
    notes = (
        "¹ The cache is eval-only; training runs the full method (the SHIP row).\n"
        "² Tensors one training forward keeps for backward, weights excluded: the allocator-independent activation "
        "memory (tensors inside checkpointed layers are recomputed, so they do not count).\n"
        "³ With interleaved timing, step i of every method ran in the same round; the median of the per-round "
        "ratios is a second estimate, less sensitive to load that changes from round to round. `met` uses the "
        "ratio of medians.\n\n"
        f"Load average before/after: {_load(results['load_average_before'])} / {_load(results['load_average_after'])} "
        "(other jobs share this machine; timings are medians, see the JSON for every sample)."
    )
    return f"{head}\n\n{table}\n\n{chr(10).join(target_lines)}\n\n{notes}\n"


def _limit(value: Optional[float]) -> str:
    return "— (reported)" if value is None else f"≤ {value:.2f}×"


def _load(value) -> str:
    return "n/a" if not value else ", ".join(f"{v:.2f}" for v in value)


def write_results(results: dict[str, Any], output_dir: str) -> tuple[Path, Path]:
    settings = results["settings"]
    device_type = torch.device(settings["device"]).type
    stem = f"speed_{settings['model_size']}_{device_type}_{settings['dtype']}"
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    return json_path, md_path


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
