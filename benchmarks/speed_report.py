# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""What ``benchmarks/speed.py`` reports: ratios to the floor, the targets, the Markdown and JSON files."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from speed_models import DINOV3_REGISTERS, FAMILIES

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
    families: tuple[str, ...] = ("vit",)


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
    # issue 18: the paper's recipe (stochastic depth 0.1) at the speed of the shared prompt path
    Target("drop_vs_ship_train", "SHIP + stochastic depth 0.1 vs SHIP, training step", "ship_drop", "train_step_s", "ship", 1.25, ("tiny",)),
    Target("drop_vs_ship_train_b16", "SHIP + stochastic depth 0.1 vs SHIP, training step", "ship_drop", "train_step_s", "ship", 1.08, ("vit-b16",)),
    Target("drop_vs_lora_train", "SHIP + stochastic depth 0.1 vs LoRA r=8, training step", "ship_drop", "train_step_s", "lora", None),
    # issue 17: a DINOv3-shaped backbone (registers, rotary positions), reported next to LoRA on the same model
    Target("ship_vs_lora_train_dinov3", "SHIP training step vs LoRA r=8", "ship", "train_step_s", "lora", None, families=("dinov3",)),
)


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


def check_targets(
    methods: list[dict[str, Any]], model_size: str, interleaved: bool = True, family: str = "vit"
) -> list[dict[str, Any]]:
    """The targets of ``model_size`` and ``family`` that the measured methods allow checking (``interleaved``: the
    timing samples of all methods were taken in the same rounds, so per-round ratios are also given)."""
    by_name = {row["method"]: row for row in methods}
    checks = []
    for target in TARGETS:
        numerator, metric, denominator, limit = target.numerator, target.metric, target.denominator, target.limit
        if model_size not in target.sizes or family not in target.families:
            continue
        if numerator not in by_name or denominator not in by_name:
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
        "| target | measured (ratio of medians) | median of per-round ratios³ | limit | met |",
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
    registers = DINOV3_REGISTERS if settings.get("family") == "dinov3" else 0
    num_tokens = 1 + registers + (vit["image_size"] // vit["patch_size"]) ** 2
    autocast = " autocast" if settings["dtype"] == "bf16" else ""
    over_rounds = f", median over {results['rounds']} rounds" if results["rounds"] > 1 else ""
    if results.get("timing") == "interleaved":
        over_rounds += ", all methods timed in turns (interleaved)"
    fresh = " (a fresh process per method)" if results["isolation"] == "process" else ""
    vpt_prompts = settings["num_prompts"] + settings["num_shared_prompts"]
    head = (
        f"**{settings['model_size']}** {FAMILIES[settings.get('family', 'vit')]} (image {vit['image_size']}, patch {vit['patch_size']}, "
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
    family = settings.get("family", "vit")
    stem = f"speed_{'' if family == 'vit' else family + '-'}{settings['model_size']}_{device_type}_{settings['dtype']}"
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    return json_path, md_path


