# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""How ``benchmarks/speed.py`` measures: step timing, interleaved rounds, peak memory, saved activations."""

from __future__ import annotations

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

from speed_models import METHODS, BenchSettings, build_model, make_batch, adapter_bytes, INPUT_GRADIENT_METHODS

#: The benchmark's command line, which a memory-pass child process runs (``--_child-method``).
SPEED_SCRIPT = Path(__file__).resolve().with_name("speed.py")

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
            str(SPEED_SCRIPT),
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


