#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Accuracy of SHIP against the usual baselines and its own ablations, on the offline backbone.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/accuracy.py --tasks counting --name vtab1k_part1 --resume
    OMP_WAIT_POLICY=PASSIVE python benchmarks/accuracy.py --protocol small ...   # the earlier 160-image run
    OMP_WAIT_POLICY=PASSIVE python benchmarks/accuracy.py --quick                # seconds: a smoke run

Backbone: ``ship_peft/assets/tiny-vit-fractal-1k`` (ViT, image 32, patch 4, hidden 192, 12 layers), a new head of
the task's size. Tasks: :mod:`tasks` (natural: digits, textures; structured: counting, position, orientation,
distance; all offline and deterministic).

Methods (``--methods``):

* ``linear``       linear probe: only the head is trained (on the frozen final CLS features, computed once: the same
                   model as training the head inside the frozen ViT, much cheaper);
* ``vpt_shallow``  VPT-shallow: ``--vpt-prompts`` prompts inserted at layer 0 and carried through all layers, joint
                   attention;
* ``vpt_deep``     VPT-deep: ``--vpt-prompts`` fresh prompts at every layer, joint attention;
* ``lora``         PEFT LoRA r=8, alpha=16, dropout 0 on ``q_proj`` / ``v_proj``, head in ``modules_to_save``;
* ``full``         full fine-tuning;
* ``ship``         SHIP: ``K`` = ``--ship-prompts``, S = 10 shared, A = 10 attribute prompts at 2 attribute levels,
                   M = ``--prototypes``, decoupled attention (lambda 0.1), matching loss 0.5, levels from calibration on
                   the training split with alpha = ``--share-threshold``;
* ablations, each removing one SHIP component, all else (SHIP's recipe and its chosen learning rate and weight
  decay) unchanged: ``ship_no_levels`` (every layer its own level), ``ship_no_shared`` (S = 0),
  ``ship_no_attribute`` (no attribute prompts), ``ship_no_matching`` (matching-loss weight 0), ``ship_no_decoupled``
  (one joint softmax).

A **protocol** (:data:`PROTOCOLS`, ``--protocol``) fixes the split sizes, the schedule and every method family's
recipe (:class:`Recipe`: AdamW's learning-rate grid, its weight-decay grid, stochastic depth):

* ``vtab1k`` (default): VTAB-1k's budget, 800 train / 200 validation images per task and a held-out test split;
  AdamW, batch 64, linear warm-up from 1e-6 over the first 10 % of the steps, cosine to 1e-5 (the paper's schedule,
  docs/method.md §6, over fewer epochs), stochastic depth 0.1 in SHIP's recipe;
* ``small``: the earlier CPU run (160 train images, 40 steps, weight decay 0, no stochastic depth).

Selection, on the **validation** split at the first seed: every learning rate of the method's grid (weight decay
at its grid's first value); where the best one lies on an edge of the grid, the grid grows one step past it, up to
the protocol's ``extend_edges`` times; then every other weight decay of the grid at the chosen rate. Ties go to the
smaller rate, then the smaller decay. The ablations take SHIP's choice. Then the other seeds are trained with the
chosen values; the test accuracy of every seed is reported as mean +- std (sample std over seeds). The data are the
same for every seed (``--data-seed``); a training seed changes the initialisation of the new parameters, the batch
order and the stochastic-depth masks. Every run also records its training curve (training loss and validation
accuracy every ``curve_every`` epochs) and, for SHIP, what calibration found.

Writes ``<name>.json`` (every run, rewritten after each) and ``<name>.md`` (the table) to ``--output-dir``.
``--resume`` skips the runs already in the JSON, so a run stopped anywhere goes on where it stopped; ``--merge``
writes one report from the files of several processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks as task_module  # noqa: E402

BACKBONE = Path(__file__).resolve().parents[1] / "ship_peft" / "assets" / "tiny-vit-fractal-1k"
BASELINES = ("linear", "vpt_shallow", "vpt_deep", "lora", "full", "ship")
ABLATIONS = ("ship_no_levels", "ship_no_shared", "ship_no_attribute", "ship_no_matching", "ship_no_decoupled")
METHODS = BASELINES + ABLATIONS
FAMILY = {"linear": "head", "vpt_shallow": "vpt", "vpt_deep": "vpt", "ship": "prompt", "lora": "lora",
          "full": "full", **{name: "prompt" for name in ABLATIONS}}
LABELS = {
    "linear": "linear probe", "vpt_shallow": "VPT-shallow", "vpt_deep": "VPT-deep", "lora": "LoRA (r=8, q,v)",
    "full": "full fine-tuning", "ship": "**SHIP**", "ship_no_levels": "SHIP − levels (α=1)",
    "ship_no_shared": "SHIP − shared prompts", "ship_no_attribute": "SHIP − attribute prompts",
    "ship_no_matching": "SHIP − matching loss", "ship_no_decoupled": "SHIP − decoupled attention",
}


@dataclass(frozen=True)
class Recipe:
    """How a method family is trained and tuned: AdamW's learning-rate grid and weight-decay grid (the first decay
    is the one the rates are searched at), and the stochastic depth of the frozen blocks (prompt methods only)."""

    learning_rates: tuple[float, ...]
    weight_decays: tuple[float, ...] = (0.0,)
    drop_path_rate: float = 0.0


@dataclass(frozen=True)
class Protocol:
    """Split sizes, schedule, SHIP's size and every method family's :class:`Recipe`."""

    sizes: dict[str, int]
    epochs: int
    batch_size: int
    dtype: str
    warmup_start_lr: float  # the warm-up rises linearly from here (0: from lr / warm-up steps at the first step)
    min_lr: float  # the cosine's floor
    extend_edges: int  # how often the learning-rate grid may grow past a winning edge
    curve_every: int  # epochs between two points of the validation curve (0: none)
    ship_prompts: int
    prototypes: int
    methods: tuple[str, ...]
    recipes: dict[str, Recipe] = field(default_factory=dict)


PROTOCOLS = {
    # VTAB-1k's data budget with each family's own recipe; 15 epochs (the paper runs 100) to fit a 2-core CPU.
    "vtab1k": Protocol(
        sizes={"train": 800, "validation": 200, "test": 500}, epochs=15, batch_size=64, dtype="fp32",
        warmup_start_lr=1e-6, min_lr=1e-5, extend_edges=1, curve_every=3, ship_prompts=10, prototypes=200,
        methods=("ship", "lora", "linear", "full", "vpt_deep") + ABLATIONS,  # the order they run in
        recipes={
            "head": Recipe((1e-2, 3e-2, 1e-1)),
            "prompt": Recipe((3e-3, 1e-2, 3e-2), (0.0, 1e-2), drop_path_rate=0.1),  # SHIP's paper tunes lr, wd
            "vpt": Recipe((1e-3, 3e-3, 1e-2), (0.0, 1e-2)),  # VPT's paper tunes lr and wd (0 ... 1e-2)
            "lora": Recipe((1e-3, 3e-3, 1e-2)),  # LoRA's paper tunes the rate only
            "full": Recipe((1e-4, 3e-4, 1e-3), (0.0, 1e-2)),  # as VPT's paper tunes full fine-tuning
        }),
    # The earlier, deliberately tiny CPU run: 160 train images, 40 steps, no weight decay, no stochastic depth.
    "small": Protocol(
        sizes={"train": 160, "validation": 100, "test": 250}, epochs=4, batch_size=16, dtype="bf16",
        warmup_start_lr=0.0, min_lr=0.0, extend_edges=0, curve_every=0, ship_prompts=10, prototypes=100,
        methods=METHODS,
        recipes={
            "head": Recipe((3e-2, 1e-1)), "prompt": Recipe((1e-2, 3e-2)),
            # VPT's third, lower value: in the first run it diverged at 3e-2 and was unstable at 1e-2
            "vpt": Recipe((3e-3, 1e-2, 3e-2)), "lora": Recipe((2e-3, 1e-2)), "full": Recipe((2e-4, 1e-3)),
        }),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="vtab1k",
                        help="split sizes, schedule and recipes (see the module's docstring)")
    parser.add_argument("--tasks", nargs="+", default=None, choices=task_module.TASKS,
                        help="default: every task but position")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="default: the protocol's")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="training seeds; the first one also selects the learning rate and weight decay "
                             "(default: 0 1 2; with --quick: 0)")
    parser.add_argument("--epochs", type=int, help="default: the protocol's")
    parser.add_argument("--batch-size", type=int, help="default: the protocol's")
    parser.add_argument("--train-size", type=int, help="default: the protocol's")
    parser.add_argument("--val-size", type=int, help="default: the protocol's")
    parser.add_argument("--test-size", type=int, help="default: the protocol's")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--vpt-prompts", type=int, help="VPT prompts per layer (default: SHIP's K + S)")
    parser.add_argument("--ship-prompts", type=int, help="SHIP's K (default: the protocol's)")
    parser.add_argument("--share-threshold", type=float, default=0.75, help="SHIP's alpha")
    parser.add_argument("--prototypes", type=int, help="SHIP's M (<= --train-size; default: the protocol's)")
    parser.add_argument("--ship-config", nargs="+", default=[], metavar="NAME=VALUE",
                        help="ShipConfig fields changed for SHIP and its ablations (diagnostics; values read as JSON)")
    parser.add_argument("--lr-grid", choices=("on", "off"),
                        help="off: the first value of each grid (no selection); default: on (with --quick: off)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"),
                        help="bf16: forward passes under bf16 autocast (parameters and optimizer stay fp32)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="accuracy", help="stem of the output files")
    parser.add_argument("--resume", action="store_true", help="skip the runs already in the output JSON")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="only write the report of these result files together (runs of several processes)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: tiny splits, 1 epoch, one seed, no grid, K=S=A=2, M=8 "
                             "(flags given explicitly still apply)")
    args = parser.parse_args(argv)
    protocol = PROTOCOLS[args.protocol]
    defaults = dict(epochs=protocol.epochs, batch_size=protocol.batch_size, dtype=protocol.dtype,
                    train_size=protocol.sizes["train"], val_size=protocol.sizes["validation"],
                    test_size=protocol.sizes["test"], ship_prompts=protocol.ship_prompts,
                    prototypes=protocol.prototypes, methods=list(protocol.methods),
                    tasks=[t for t in task_module.TASKS if t != "position"], seeds=[0, 1, 2], lr_grid="on")
    if args.quick:
        defaults.update(train_size=24, val_size=12, test_size=12, epochs=1, batch_size=12, ship_prompts=2,
                        prototypes=8, vpt_prompts=4, seeds=[0], lr_grid="off")
        if args.name == "accuracy":
            args.name = "accuracy_quick"
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.ship_overrides = dict(map(config_value, args.ship_config))
    if args.vpt_prompts is None:
        args.vpt_prompts = args.ship_prompts + 10  # as many prompt tokens per layer as SHIP's K + S
    if args.prototypes > args.train_size:
        parser.error(f"--prototypes ({args.prototypes}) must not exceed --train-size ({args.train_size})")
    return args


def config_value(text: str) -> tuple[str, Any]:
    """``"name=value"`` -> ``("name", value)``, the value read as JSON where it parses (``"a=0.5"`` -> 0.5)."""
    name, _, value = text.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def recipe_of(method: str, args: argparse.Namespace) -> Recipe:
    return PROTOCOLS[args.protocol].recipes[FAMILY[method]]


# ----------------------------------------------------------------------------------------------------- models


def ship_config(method: str, args: argparse.Namespace, num_layers: int):
    """The ``ShipConfig`` of a prompt method: its preset (:mod:`ship_peft.presets`) on this benchmark's values."""
    from ship_peft import presets

    small = dict(num_shared_prompts=2, num_attribute_prompts=2, matching_top_k=4) if args.quick else {}
    name = method.replace("_", "-")
    drop = dict(drop_path_rate=recipe_of(method, args).drop_path_rate)
    if name in ("vpt-shallow", "vpt-deep"):
        return presets.adapter_config(name, num_layers, num_prompts=args.vpt_prompts, **drop)
    values = dict(num_prompts=args.ship_prompts, share_threshold=args.share_threshold, num_prototypes=args.prototypes)
    config = presets.adapter_config(name, num_layers, **values, **small, **drop)
    return replace(config, **args.ship_overrides)


def build_model(method: str, num_classes: int, train_x: torch.Tensor, args: argparse.Namespace):
    """The model of ``method`` on ``args.device`` (calibrated for SHIP) and extra facts for the JSON row."""
    import peft
    import ship_peft
    from ship_peft import presets
    from transformers import ViTForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    vit = ViTForImageClassification.from_pretrained(str(BACKBONE), num_labels=num_classes,
                                                    ignore_mismatched_sizes=True, dtype=torch.float32)
    extra: dict[str, Any] = {}
    if method in ("linear", "full"):
        for name, parameter in vit.named_parameters():
            parameter.requires_grad_(method == "full" or name.startswith("classifier."))
        return vit.to(args.device), extra
    if method == "lora":
        config = presets.adapter_config("lora", vit.config.num_hidden_layers, modules_to_save=["classifier"])
        return peft.get_peft_model(vit, config).to(args.device), extra
    model = peft.get_peft_model(vit, ship_config(method, args, vit.config.num_hidden_layers)).to(args.device)
    if method != "vpt_shallow" and method != "vpt_deep":
        loader = torch.utils.data.DataLoader(train_x, batch_size=100)
        result = ship_peft.initialize_ship_weights(model, loader, max_samples=len(train_x), show_progress=False)
        extra["prompt_layers"] = list(result.prompt_layers)
        extra["kmeans_inertia"] = result.inertia
    return model, extra


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------- training


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """``uint8 [n, 32, 32, 3]`` -> normalised ``float32 [n, 3, 32, 32]`` (mean = std = 0.5)."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def lr_lambda(total_steps: int, lr: float, protocol: Protocol) -> Callable[[int], float]:
    """The factor on ``lr`` at each step: linear warm-up over the first 10 % of the steps from
    ``protocol.warmup_start_lr``, then a cosine down to ``protocol.min_lr``."""
    warmup = max(1, round(0.1 * total_steps))
    start, floor = protocol.warmup_start_lr / lr, protocol.min_lr / lr

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def autocast(args: argparse.Namespace):
    device_type = "cuda" if str(args.device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
             batch: int = 250) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), batch):
        with autocast(args):
            logits = model(pixel_values=x[start:start + batch].to(args.device)).logits
        correct += (logits.argmax(-1).cpu() == y[start:start + batch]).sum().item()
    return correct / len(x)


@dataclass
class Hyper:
    """The values a run is trained with (its place in the grid)."""

    lr: float
    weight_decay: float


def train(model, parameters, x, y, hyper: Hyper, seed: int, args: argparse.Namespace, forward=None,
          validate: Optional[Callable[[], float]] = None) -> list[dict[str, float]]:
    """``args.epochs`` epochs of AdamW on ``parameters``; returns the curve: the mean training loss of every epoch,
    with the validation accuracy every ``curve_every`` epochs (and after the last)."""
    protocol = PROTOCOLS[args.protocol]
    optimizer = torch.optim.AdamW(parameters, lr=hyper.lr, weight_decay=hyper.weight_decay)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.epochs * steps_per_epoch, hyper.lr,
                                                                       protocol))
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        losses = []
        for start in range(0, len(x), args.batch_size):
            index = order[start:start + args.batch_size]
            xb, yb = x[index].to(args.device), y[index].to(args.device)
            with autocast(args):
                loss = forward(xb, yb) if forward else model(pixel_values=xb, labels=yb).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
        point = dict(epoch=epoch, train_loss=torch.stack(losses).mean().item())
        every = protocol.curve_every
        if validate is not None and every and (epoch % every == 0 or epoch == args.epochs):
            point["val_acc"] = validate()
        curve.append(point)
    return curve


class FeatureCache:
    """Final CLS features (after the last LayerNorm) of the frozen backbone, per task and split: the linear probe's
    input, computed once."""

    def __init__(self):
        self.features: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, task: str, split: str, vit, x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
        if (task, split) not in self.features:
            vit.eval()
            with torch.no_grad(), autocast(args):
                out = [vit.vit(pixel_values=x[s:s + 250].to(args.device)).last_hidden_state[:, 0].float()
                       for s in range(0, len(x), 250)]
            self.features[(task, split)] = torch.cat(out)
        return self.features[(task, split)]


def run_one(task, data, method: str, seed: int, hyper: Hyper, args, cache: FeatureCache) -> dict[str, Any]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    start = time.perf_counter()
    model, extra = build_model(method, data.num_classes, data["train"][0], args)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "linear":
        head = model.classifier
        feats = {split: cache.get(task, split, model, data[split][0], args) for split in task_module.SPLITS}

        def accuracy(split):
            head.eval()
            with torch.no_grad():
                return (head(feats[split]).argmax(-1).cpu() == data[split][1]).float().mean().item()

        curve = train(head, params, feats["train"], data["train"][1], hyper, seed, args,
                      forward=lambda xb, yb: torch.nn.functional.cross_entropy(head(xb), yb),
                      validate=lambda: accuracy("validation"))
    else:
        def accuracy(split):
            return evaluate(model, data[split][0], data[split][1], args)

        curve = train(model, params, data["train"][0], data["train"][1], hyper, seed, args,
                      validate=lambda: accuracy("validation"))
    train_seconds = time.perf_counter() - start
    return dict(task=task, group=task_module.GROUP[task], method=method, seed=seed, **asdict(hyper),
                val_acc=accuracy("validation"), test_acc=accuracy("test"), final_train_loss=curve[-1]["train_loss"],
                trainable_params=trainable_parameters(model), train_seconds=round(train_seconds, 2),
                total_seconds=round(time.perf_counter() - start, 2), curve=curve, **extra)


def split_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The number of images of each split."""
    return {"train": args.train_size, "validation": args.val_size, "test": args.test_size}


class Splits:
    """A task's splits as normalised tensors: ``data[split] = (x, y)``."""

    def __init__(self, task: task_module.TaskData):
        self.num_classes = task.num_classes
        self.tensors = {split: (to_pixels(task.images[split]), torch.from_numpy(task.labels[split]))
                        for split in task_module.SPLITS}

    def __getitem__(self, split: str):
        return self.tensors[split]


# -------------------------------------------------------------------------------------------------- selection


def best_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the best validation accuracy; ties go to the smaller rate, then the smaller decay."""
    ordered = sorted(rows, key=lambda r: (r["lr"], r.get("weight_decay", 0.0)))
    return max(ordered, key=lambda r: r["val_acc"])


def one_step_past(rates: list[float], best: float) -> Optional[float]:
    """The next rate on the 1-3-10 ladder past ``best`` where ``best`` is an edge of the (sorted) ``rates``; else
    None."""
    if len(rates) < 2 or rates[0] < best < rates[-1]:
        return None
    rungs = sorted(m * 10.0 ** e for m in (1, 3) for e in range(-8, 3))
    index = min(range(len(rungs)), key=lambda i: abs(math.log(rungs[i] / best)))
    return float(f"{rungs[index + (1 if best == rates[-1] else -1)]:.0e}")


def select(method: str, seed: int, run: Callable[[str, int, Hyper, str], dict[str, Any]],
           args: argparse.Namespace) -> dict[str, Any]:
    """The module's selection rule (see its docstring) for ``method``; returns the chosen run."""
    recipe = recipe_of(method, args)
    rates = sorted(recipe.learning_rates) if args.lr_grid == "on" else [recipe.learning_rates[0]]
    decays = recipe.weight_decays if args.lr_grid == "on" else recipe.weight_decays[:1]
    rows = [run(method, seed, Hyper(lr, decays[0]), "select") for lr in rates]
    for _ in range(PROTOCOLS[args.protocol].extend_edges):
        past = one_step_past(rates, best_of(rows)["lr"])
        if past is None:
            break
        rates = sorted(rates + [past])
        rows.append(run(method, seed, Hyper(past, decays[0]), "select (grid extended)"))
    chosen_lr = best_of(rows)["lr"]
    rows += [run(method, seed, Hyper(chosen_lr, decay), "select") for decay in decays[1:]]
    return best_of(rows)


# ------------------------------------------------------------------------------------------------------ report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs visible"


def at_grid_edge(rows: list[dict[str, Any]], final: dict[str, Any]) -> bool:
    """Whether ``final``'s rate is the smallest or largest one tried in its selection (the grid may be too narrow)."""
    rates = sorted({r["lr"] for r in rows if r["stage"].startswith("select")})
    return len(rates) > 1 and final["lr"] in (rates[0], rates[-1])


def mean_curve(final: list[dict[str, Any]]) -> dict[int, float]:
    """Validation accuracy at each point of the training curve, mean over the seeds (empty without curves)."""
    points = [{p["epoch"]: p["val_acc"] for p in r.get("curve", ()) if "val_acc" in p} for r in final]
    return {epoch: statistics.mean(p[epoch] for p in points) for epoch in points[0] if all(epoch in p for p in points)}


def summarize(rows: list[dict[str, Any]], methods: list[str], task_names: list[str]) -> dict[str, Any]:
    """Per method and task: the chosen values, the final rows (one per seed), mean and std of test accuracy."""
    summary: dict[str, Any] = {}
    for method in methods:
        for task in task_names:
            mine = [r for r in rows if r["method"] == method and r["task"] == task]
            final = [r for r in mine if r.get("final")]
            if not final:
                continue
            accs = [r["test_acc"] for r in final]
            summary[f"{method}/{task}"] = dict(
                lr=final[0]["lr"], weight_decay=final[0].get("weight_decay", 0.0),
                lr_at_grid_edge=at_grid_edge(mine, final[0]) if method not in ABLATIONS else None,
                seeds=[r["seed"] for r in final], test_acc=accs, val_acc=[r["val_acc"] for r in final],
                mean=statistics.mean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                trainable_params=final[0]["trainable_params"], prompt_layers=final[0].get("prompt_layers"),
                seconds=statistics.mean(r["total_seconds"] for r in final),
                val_curve=mean_curve(final),
            )
    return summary


def _accuracy_table(summary: dict[str, Any], methods: list[str], task_names: list[str]) -> list[str]:
    lines = ["| method | trainable params (range over tasks) | " + " | ".join(task_names) + " | natural | structured "
             "| mean |", "|" + "---|" * (len(task_names) + 5)]
    for method in methods:
        cells, groups = [], {"natural": [], "structured": []}
        params: list[int] = []
        for task in task_names:
            entry = summary.get(f"{method}/{task}")
            if entry is None:
                cells.append("–")
                continue
            params.append(entry["trainable_params"])
            seeds = "" if len(entry["seeds"]) > 2 else f" ({len(entry['seeds'])} seed{'s' * (len(entry['seeds']) > 1)})"
            cells.append(f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}{seeds}")
            groups[task_module.GROUP[task]].append(entry["mean"])
        complete = all(f"{method}/{task}" in summary for task in task_names)
        means = [f"{100 * statistics.mean(v):.1f}" if v and complete else "–" for v in groups.values()]
        all_means = groups["natural"] + groups["structured"]
        overall = f"{100 * statistics.mean(all_means):.1f}" if all_means and complete else "–"
        params_text = "–" if not params else (
            f"{min(params):,}" if min(params) == max(params) else f"{min(params):,}–{max(params):,}")
        lines.append(f"| {LABELS[method]} | {params_text} | " + " | ".join(cells)
                     + f" | {' | '.join(means)} | {overall} |")
    return lines


def _choice_table(summary: dict[str, Any], methods: list[str], task_names: list[str]) -> list[str]:
    lines = ["", "Chosen learning rate / weight decay (first seed's validation accuracy; ablations use SHIP's; "
             "† the rate is an edge of the grid tried):", "",
             "| method | " + " | ".join(task_names) + " |", "|" + "---|" * (len(task_names) + 1)]
    for method in methods:
        cells = []
        for task in task_names:
            entry = summary.get(f"{method}/{task}")
            cells.append("–" if entry is None else f"{entry['lr']:g} / {entry['weight_decay']:g}"
                         + (" †" if entry["lr_at_grid_edge"] else ""))
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def _curve_table(summary: dict[str, Any], methods: list[str], task_names: list[str]) -> list[str]:
    entries = [summary[f"{m}/{t}"] for m in methods for t in task_names if f"{m}/{t}" in summary]
    epochs = next((list(e["val_curve"]) for e in entries if e["val_curve"]), None)
    if epochs is None:
        return []
    lines = ["", f"Validation accuracy (%) along training, mean over seeds, after epochs {', '.join(map(str, epochs))}:",
             "", "| method | " + " | ".join(task_names) + " |", "|" + "---|" * (len(task_names) + 1)]
    for method in methods:
        cells = [" → ".join(f"{100 * v:.0f}" for v in summary[f"{method}/{t}"]["val_curve"].values())
                 if f"{method}/{t}" in summary else "–" for t in task_names]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict[str, Any], methods: list[str], task_names: list[str], meta: dict[str, Any]) -> str:
    text = "\n".join(_accuracy_table(summary, methods, task_names) + _choice_table(summary, methods, task_names)
                     + _curve_table(summary, methods, task_names))
    levels = [f"{t}: {summary[f'ship/{t}']['prompt_layers']}" for t in task_names if f"ship/{t}" in summary]
    if levels:
        text += "\n\nSHIP levels found by calibration (α = {}): {}.".format(meta["settings"]["share_threshold"],
                                                                            "; ".join(levels))
    return text + "\n"


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """One report from the result files of several processes (e.g. one per group of tasks)."""
    parts = [json.loads(path.read_text()) for path in args.merge]
    protocols = {part["meta"]["settings"].get("protocol", "small") for part in parts}
    if len(protocols) > 1:
        raise SystemExit(f"--merge: these files ran different protocols ({', '.join(sorted(protocols))}).")
    rows = [row for part in parts for row in part["runs"]]
    task_names = [t for t in task_module.TASKS if any(r["task"] == t for r in rows)]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    meta = dict(parts[0]["meta"], parts=[dict(file=str(p), command=part["meta"]["command"],
                                              elapsed_seconds=part["meta"].get("elapsed_seconds"))
                                         for p, part in zip(args.merge, parts)])
    meta["settings"] = dict(meta["settings"], tasks=task_names)
    summary = summarize(rows, methods, task_names)
    result = dict(meta=meta, summary=summary, runs=rows)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.output_dir / f"{args.name}.md").write_text(markdown(summary, methods, task_names, meta))
    print((args.output_dir / f"{args.name}.md").read_text())
    return result


# --------------------------------------------------------------------------------------------------------- main


def resumed_rows(json_path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs already in ``json_path``, their choices to be made again (a grid may have grown)."""
    saved = json.loads(json_path.read_text())
    protocol = saved["meta"]["settings"].get("protocol", "small")
    if protocol != args.protocol:
        raise SystemExit(f"--resume: {json_path} holds runs of protocol {protocol!r}, not {args.protocol!r}; "
                         "pass --protocol {protocol} or another --name.")
    rows = saved["runs"]
    for row in rows:
        row.setdefault("weight_decay", 0.0)
        if row["method"] in args.methods:
            row["final"] = False
    return rows


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.output_dir / f"{args.name}.json", args.output_dir / f"{args.name}.md"
    rows = resumed_rows(json_path, args) if args.resume and json_path.exists() else []
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    protocol = PROTOCOLS[args.protocol]
    meta = dict(command="python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                machine=machine(), device=args.device, torch=torch.__version__, settings=settings,
                recipes={k: asdict(v) for k, v in protocol.recipes.items()})
    methods = list(dict.fromkeys(args.methods))  # the order they run in; tables follow METHODS
    table_methods = [m for m in METHODS if m in methods]
    cache = FeatureCache()
    started = time.perf_counter()

    def save() -> dict[str, Any]:
        summary = summarize(rows, table_methods, args.tasks)
        meta["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        result = dict(meta=meta, summary=summary, runs=rows)
        json_path.write_text(json.dumps(result, indent=1))
        md_path.write_text(markdown(summary, table_methods, args.tasks, meta))
        return result

    for task in args.tasks:
        data = Splits(task_module.load_task(task, split_sizes(args), args.data_seed))
        print("task", task, {s: len(data[s][1]) for s in task_module.SPLITS}, flush=True)

        def run(method: str, seed: int, hyper: Hyper, stage: str) -> dict[str, Any]:
            key = (task, method, seed, hyper.lr, hyper.weight_decay)
            row = next((r for r in rows if (r["task"], r["method"], r["seed"], r["lr"], r["weight_decay"]) == key),
                       None)
            if row is None:
                row = dict(run_one(task, data, method, seed, hyper, args, cache), stage=stage, final=False)
                rows.append(row)
                print(f"[{time.perf_counter() - started:7.1f}s] {task:11s} {method:18s} seed {seed} lr {hyper.lr:g} "
                      f"wd {hyper.weight_decay:g}: val {row['val_acc']:.3f} test {row['test_acc']:.3f} "
                      f"({row['total_seconds']:.1f}s)", flush=True)
            elif row["final"] or stage != "final":
                return row  # a run from the file, nothing new to record
            row["final"] = stage == "final"
            save()  # every new run and every run newly final, so a run stopped anywhere leaves a true file
            return row

        first = args.seeds[0]
        chosen: dict[str, Hyper] = {}
        # 1. each non-ablation method's learning rate and weight decay, on the first seed's validation accuracy
        for method in methods:
            if method not in ABLATIONS:
                best = select(method, first, run, args)
                chosen[method] = Hyper(best["lr"], best["weight_decay"])
                run(method, first, chosen[method], "final")  # the chosen run, from the file: now final
        # 2. the ablations with SHIP's values (the first values of its grid without a SHIP run)
        prompt = recipe_of("ship", args)
        for method in methods:
            if method in ABLATIONS:
                chosen[method] = chosen.get("ship", Hyper(prompt.learning_rates[0], prompt.weight_decays[0]))
                run(method, first, chosen[method], "final")
        # 3. the other seeds
        for seed in args.seeds[1:]:
            for method in methods:
                run(method, seed, chosen[method], "final")
    result = save()
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {meta['elapsed_seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
