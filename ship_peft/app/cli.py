# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The ``ship-peft`` command line (also ``python -m ship_peft``): train, evaluate, calibrate, vtab1k, vtab1k-table.

``ship-peft train`` with no ``--model`` is the offline default: the bundled fractal-pretrained ViT on the bundled
digits, SHIP against linear probing and VPT-deep, in a few minutes on 2 CPU cores. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from peft import PeftModel

from .. import __version__
from ..assets import BUNDLED_BACKBONE, resolve_model_path
from ..calibration import collect_cls_features, layer_affinity, semantic_levels
from ..config import ShipConfig
from .data import (
    DIGITS,
    DIGITS_DESCRIPTION,
    ImageClassificationData,
    load_data,
    load_image_processor,
    with_pixels,
)
from .errors import InputError
from .model_card import AdapterCard, push_adapter, write_model_card
from .plots import plot_confusion_matrix, plot_layer_affinity, plot_training_curves
from .training import (
    METHOD_TITLES,
    RECIPE_SHIP_VALUES,
    SHIP_HYPERPARAMETERS,
    TrainedMethod,
    TrainSettings,
    adapter_base_model,
    adapter_num_labels,
    backbone_config,
    build_model,
    calibration_loader,
    calibration_sample,
    distributed_state,
    evaluation_trainer,
    last_logged,
    load_backbone,
    predict,
    say,
    train_method,
    vision_config,
)
from .vtab1k import GRID_SETTINGS, GRID_SHIP, VTAB_TASKS, append_row, get_task, load_task, read_rows, results_table
from .vtab1k import run_task

#: Settings of the offline default (no ``--model``), chosen so that SHIP, VPT-deep and linear probing all train in
#: well under 5 minutes on 2 CPU cores: 3 epochs instead of 100 (so a larger learning rate and a short warm-up), 10
#: prompts per level instead of 50 (a 32x32 image has 65 tokens, not 197), and a share_threshold suited to this
#: backbone, whose adjacent layers are far less alike than ViT-B's: 0.8 gives 7 levels on it, as 0.93-0.95 does on
#: ViT-B/16, where 0.95 would give one level per layer (see the backbone's README). No stochastic depth: it
#: regularises 100-epoch runs; over 3 epochs 0.1 cost validation accuracy (SHIP 0.93 -> 0.92, VPT-deep 0.845 -> 0.815).
OFFLINE_PRESET: dict[str, Any] = {
    "num_prompts": 10,
    "share_threshold": 0.8,
    "drop_path_rate": 0.0,
    "epochs": 3,
    "learning_rate": 3e-2,
    "warmup_epochs": 0.3,
    "logging_steps": 2,
}
OFFLINE_BASELINES = ["vpt-deep", "linear"]
AFFINITY_SWEEP = (0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98)
VTAB_DEFAULT_MODEL = "google/vit-base-patch16-224-in21k"
OFFLINE_MODEL_HELP = f"{BUNDLED_BACKBONE}, the bundled fractal-pretrained ViT, with the offline default's settings"
#: The per-task search of the reference recipe (docs/method.md §6: lr 1e-3 ... 1.0, weight decay 0 ... 1e-2, K among
#: 5 ... 200, alpha 0.93 ... 0.98), one value per decade for lr and weight decay and three for K and alpha: 144 runs
#: a task. Give any of these flags fewer values for a cheaper search.
VTAB_DEFAULT_GRID: dict[str, list[Any]] = {
    "learning_rate": [1e-3, 1e-2, 1e-1, 1.0],
    "weight_decay": [0.0, 1e-4, 1e-3, 1e-2],
    "num_prompts": [5, 50, 200],
    "share_threshold": [0.93, 0.95, 0.98],
}

_SHIP_FIELDS = {field.name: field for field in dataclasses.fields(ShipConfig)}
_SETTINGS_FIELDS = {field.name: field for field in dataclasses.fields(TrainSettings)}
_TRAINING_FLAGS = {  # TrainSettings field -> (flag, help)
    "learning_rate": ("--learning-rate", "peak learning rate of AdamW"),
    "weight_decay": ("--weight-decay", "AdamW weight decay"),
    "epochs": ("--epochs", "training epochs"),
    "batch_size": ("--batch-size", "batch size per device (training, evaluation and calibration)"),
    "warmup_epochs": ("--warmup-epochs", "epochs of linear warm-up before the cosine decay"),
    "warmup_start_learning_rate": ("--warmup-start-learning-rate", "learning rate at the start of the warm-up"),
    "min_learning_rate": ("--min-learning-rate", "learning rate at the end of the cosine decay"),
    "seed": ("--seed", "seed of the prompts, the head, the data order and the k-means"),
    "logging_steps": ("--logging-steps", "log the losses every this many steps"),
    "num_workers": ("--num-workers", "data-loader worker processes"),
    "calibration_samples": ("--calibration-samples", "training images used by SHIP's calibration"),
}


def _default(name: str) -> Any:
    """The recipe's value of a flag (docs/method.md §6; the method's default for SHIP's own hyper-parameters)."""
    if name in RECIPE_SHIP_VALUES:
        return RECIPE_SHIP_VALUES[name]
    field = _SHIP_FIELDS.get(name) or _SETTINGS_FIELDS[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _help(text: str, name: str, preset: dict[str, Any], grid: dict[str, list[Any]]) -> str:
    if name in grid:
        return f"{text}; several values are searched (default: {' '.join(map(str, grid[name]))})"
    offline = f"; offline default: {preset[name]}" if name in preset else ""
    return f"{text} (default: {_default(name)}{offline})"


def _type_of(name: str) -> Callable[[str], Any]:
    field = _SHIP_FIELDS.get(name) or _SETTINGS_FIELDS[name]
    return {"int": int, "float": float}[str(field.type)]


def add_ship_arguments(
    parser: argparse.ArgumentParser, preset: dict[str, Any], grid: Optional[dict[str, list[Any]]] = None
) -> None:
    """A flag for every SHIP hyper-parameter, default None (resolved later: ``preset``, else the method's default
    from ``ShipConfig``); names in ``grid`` take several values."""
    grid = grid or {}
    group = parser.add_argument_group("SHIP hyper-parameters (docs/method.md)")
    for name in SHIP_HYPERPARAMETERS:
        flag, text = f"--{name.replace('_', '-')}", _SHIP_FIELDS[name].metadata["help"].rstrip(".")
        if name == "decoupled_attention":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=_help(text, name, preset, grid))
        elif name == "prompt_layers":
            group.add_argument(flag, type=int, nargs="+", metavar="LAYER", help=f"{text} (default: calibration)")
        else:
            nargs = "+" if name in grid else None
            group.add_argument(flag, type=_type_of(name), nargs=nargs, help=_help(text, name, preset, grid))


def add_training_arguments(
    parser: argparse.ArgumentParser, preset: dict[str, Any], grid: Optional[dict[str, list[Any]]] = None
) -> None:
    """Flags of the usual training hyper-parameters, default None (resolved later: ``preset``, else the reference
    recipe of docs/method.md §6); names in ``grid`` take several values."""
    grid = grid or {}
    group = parser.add_argument_group("training")
    for name, (flag, text) in _TRAINING_FLAGS.items():
        nargs = "+" if name in grid else None
        group.add_argument(flag, type=_type_of(name), nargs=nargs, help=_help(text, name, preset, grid))
    lr_nargs = "+" if "learning_rate" in grid else None
    group.add_argument("--lr", dest="learning_rate", type=float, nargs=lr_nargs, help="same as --learning-rate")
    group.add_argument("--bf16", action="store_true", help="train and evaluate under bfloat16 autocast")
    group.add_argument(
        "--report-to",
        nargs="+",
        default=["none"],
        metavar="LOGGER",
        help="loggers as in transformers: tensorboard, wandb, ... (default: none)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_model_arguments(parser: argparse.ArgumentParser, model_default: str = OFFLINE_MODEL_HELP) -> None:
    """``--model`` (default None, described by ``model_default``) and the data flags (dataset, columns)."""
    parser.add_argument(
        "--model", default=None, help=f"Hub id or local folder of a transformers ViT (default: {model_default})"
    )
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default=None,
        help=f"Hub dataset id, imagefolder directory, or save_to_disk folder (default: {DIGITS}, {DIGITS_DESCRIPTION})",
    )
    group.add_argument("--dataset-config", default=None, help="configuration of a Hub dataset that has several")
    group.add_argument("--image-column", default=None, help="image column (default: the first Image column)")
    group.add_argument(
        "--label-column", default=None, help="label column (default: the first ClassLabel column, or 'label', ...)"
    )


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose or carve the train / validation / test splits."""
    group = parser.add_argument_group("splits")
    group.add_argument("--train-split", default="train", help="training split (default: train)")
    group.add_argument(
        "--validation-split",
        default=None,
        help="validation split (default: validation/valid/val, else carved from train)",
    )
    group.add_argument("--test-split", default=None, help="test split (default: test, else carved from train)")
    group.add_argument(
        "--validation-size",
        type=_size,
        default=0.1,
        help="size of a carved validation split: fraction or count (default: 0.1)",
    )
    group.add_argument(
        "--test-size", type=_size, default=0.2, help="size of a carved test split: fraction or count (default: 0.2)"
    )
    group.add_argument("--split-seed", type=int, default=0, help="seed of carved splits (default: 0)")


def _size(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a split size must be > 0 (a fraction below 1 or a count), got {text}")
    return value if value < 1 else int(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``ship-peft`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ship-peft",
        description="SHIP (Semantic Hierarchical Prompt tuning, ICASSP 2025) for transformers ViTs, as a PEFT method.",
    )
    parser.add_argument("--version", action="version", version=f"ship-peft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_train, _add_evaluate, _add_calibrate, _add_vtab1k, _add_vtab1k_table):
        add_command(commands)
    return parser


def _add_train(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="calibrate, fine-tune, evaluate and save a SHIP adapter (no --model: the offline default)",
        description="Calibrate SHIP on the training split, fine-tune it with the Hugging Face Trainer, report top-1 on "
        "the test split at the end of training, and save the adapter, metrics.json and pictures. Without --model this "
        "is the offline default: the bundled backbone on the bundled digits, against linear probing and VPT-deep.",
    )
    add_model_arguments(train)
    add_split_arguments(train)
    add_ship_arguments(train, OFFLINE_PRESET)
    add_training_arguments(train, OFFLINE_PRESET)
    train.add_argument("--output-dir", default="outputs/train", help="where to write (default: outputs/train)")
    train.add_argument(
        "--baselines",
        nargs="*",
        choices=["vpt-deep", "linear"],
        help="also train these on the same data and budget (default: both for the offline default, none otherwise)",
    )
    train.add_argument("--push-to-hub", metavar="REPO_ID", help="push the adapter and its card to this Hub repository")
    train.add_argument("--hub-private", action="store_true", help="make a new Hub repository private")
    train.set_defaults(handler=command_train)


def _add_evaluate(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="top-1 of a saved SHIP adapter (folder or Hub id) on a dataset split",
        description="Evaluate a SHIP adapter on a split of a dataset (default: the bundled digits' test split).",
    )
    evaluate.add_argument("adapter", help="adapter folder (the adapter/ folder of a train run) or Hub repository id")
    add_model_arguments(evaluate, model_default="the base model recorded in the adapter")
    add_split_arguments(evaluate)
    evaluate.add_argument(
        "--split", choices=["train", "validation", "test"], default="test", help="split to evaluate (default: test)"
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: 64)")
    evaluate.add_argument("--bf16", action="store_true", help="evaluate under bfloat16 autocast")
    evaluate.add_argument("--output-dir", help="write metrics.json and a confusion matrix here")
    evaluate.set_defaults(handler=command_evaluate)


def _add_calibrate(commands: Any) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="show the semantic levels of a model on a dataset and write the layer-affinity heatmap",
        description="Run SHIP's calibration (layer affinity of the CLS features) and show the levels it gives.",
    )
    add_model_arguments(calibrate)
    add_split_arguments(calibrate)
    calibrate.add_argument(
        "--share-threshold",
        type=float,
        help=_help("alpha: layer-affinity threshold of a level", "share_threshold", OFFLINE_PRESET, {}),
    )
    calibrate.add_argument("--calibration-samples", type=int, default=1000, help="training images used (default: 1000)")
    calibrate.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    calibrate.add_argument("--seed", type=int, default=42, help="seed of the image sample (default: 42)")
    calibrate.add_argument("--no-progress", action="store_true", help="no progress bar")
    calibrate.add_argument(
        "--output-dir", default="outputs/calibrate", help="where to write (default: outputs/calibrate)"
    )
    calibrate.set_defaults(handler=command_calibrate)


def _add_vtab1k(commands: Any) -> None:
    vtab = commands.add_parser(
        "vtab1k",
        help="one VTAB-1k task with the standard protocol, adding a JSON row to a results file",
        description="Search the hyper-parameters given several values on train800 -> val200, train the best on "
        "train800val200, and report top-1 on test at the end of training (nothing is selected on test).",
    )
    vtab.add_argument("--task", required=True, choices=list(VTAB_TASKS), metavar="TASK", help=", ".join(VTAB_TASKS))
    source = vtab.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", help="vtab-1k folder: <root>/<task>/{train800,val200,train800val200,test}.txt")
    source.add_argument("--dataset", help="Hub id or save_to_disk folder ({task} is replaced) with VTAB-1k splits")
    vtab.add_argument("--model", default=VTAB_DEFAULT_MODEL, help=f"a transformers ViT (default: {VTAB_DEFAULT_MODEL})")
    vtab.add_argument("--image-column", help="image column of --dataset (default: detected)")
    vtab.add_argument("--label-column", help="label column of --dataset (default: detected)")
    add_ship_arguments(vtab, {}, grid={name: VTAB_DEFAULT_GRID[name] for name in GRID_SHIP})
    add_training_arguments(vtab, {}, grid={name: VTAB_DEFAULT_GRID[name] for name in GRID_SETTINGS})
    vtab.add_argument("--output-dir", default="outputs/vtab1k", help="where to write (default: outputs/vtab1k)")
    vtab.add_argument("--results", help="JSON-lines file that gets the task's row (default: OUTPUT_DIR/results.jsonl)")
    vtab.set_defaults(handler=command_vtab1k)


def _add_vtab1k_table(commands: Any) -> None:
    table = commands.add_parser("vtab1k-table", help="the table of a VTAB-1k results file (per task, group means)")
    table.add_argument("results", help="the JSON-lines file written by `ship-peft vtab1k`")
    table.set_defaults(handler=command_vtab1k_table)


def _resolve(args: argparse.Namespace, names: Sequence[str], preset: dict[str, Any]) -> dict[str, Any]:
    """Every flag in ``names``: as given, else the preset's value, else the method's default."""
    values = {}
    for name in names:
        given = getattr(args, name, None)
        values[name] = given if given is not None else preset.get(name, _default(name))
    return values


def _settings(args: argparse.Namespace, preset: dict[str, Any], searched: Sequence[str] = ()) -> TrainSettings:
    """The training settings from the flags (``searched`` ones keep their defaults: a grid search sets them)."""
    return TrainSettings(
        **_resolve(args, [name for name in _TRAINING_FLAGS if name not in searched], preset),
        bf16=args.bf16,
        report_to=args.report_to,
        show_progress=not args.no_progress,
    )


def _print_settings(title: str, values: dict[str, Any], preset: dict[str, Any]) -> None:
    say(title)
    for name, value in values.items():
        note = (
            f"   (offline default; recipe default {_default(name)})" if name in preset and value == preset[name] else ""
        )
        say(f"  {name:<24} {value}{note}")


def _load_data(args: argparse.Namespace) -> ImageClassificationData:
    data = load_data(
        args.dataset,
        config_name=args.dataset_config,
        image_column=args.image_column,
        label_column=args.label_column,
        train_split=args.train_split,
        validation_split=args.validation_split,
        test_split=args.test_split,
        validation_size=args.validation_size,
        test_size=args.test_size,
        seed=args.split_seed,
    )
    say(f"data: {data.name}, {_describe(data)}")
    return data


def _processor(model_path: str) -> Any:
    return load_image_processor(resolve_model_path(model_path), vision_config(backbone_config(model_path)).image_size)


def _method_row(trained: TrainedMethod, test_accuracy: float) -> dict[str, Any]:
    return {
        "test_accuracy": test_accuracy,
        "validation_accuracy": last_logged(trained.log_history, "eval_accuracy"),
        "trainable_parameters": trained.trainable_parameters,
        "train_seconds": round(trained.train_seconds, 1),
        "log_history": trained.log_history,
    }


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The comparison table printed at the end of ``train``."""
    lines = [
        "| method | test accuracy | validation accuracy | trainable parameters | training time |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, row in results.items():
        validation = f"{row['validation_accuracy']:.4f}" if row["validation_accuracy"] is not None else "—"
        lines.append(
            f"| {METHOD_TITLES[method]} | {row['test_accuracy']:.4f} | {validation} | "
            f"{row['trainable_parameters']:,} | {row['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def command_train(args: argparse.Namespace) -> int:
    """``ship-peft train``."""
    start = time.perf_counter()
    model_path = args.model or BUNDLED_BACKBONE
    preset = OFFLINE_PRESET if args.model is None else {}
    ship_values = _resolve(args, SHIP_HYPERPARAMETERS, preset)
    settings = _settings(args, preset)
    baselines = args.baselines if args.baselines is not None else (OFFLINE_BASELINES if preset else [])
    if preset:
        say(f"ship-peft train, offline default: the bundled backbone {BUNDLED_BACKBONE} (no --model given).")
    _print_settings("SHIP hyper-parameters:", ship_values, preset)
    _print_settings("training:", _training_values(settings), preset)
    data = _load_data(args)
    processor = _processor(model_path)
    train, validation, test = (with_pixels(split, processor) for split in (data.train, data.validation, data.test))
    output_dir = Path(args.output_dir)
    runs, results, test_predictions = {}, {}, {}
    for method in ["ship", *baselines]:
        say(f"\n=== {METHOD_TITLES[method]} ===")
        runs[method] = train_method(
            method, model_path, data.label_names, train, settings, ship_values, output_dir / "logs" / method, validation
        )
        test_accuracy, *test_predictions[method] = predict(runs[method].trainer, test, "test")
        results[method] = _method_row(runs[method], test_accuracy)
    say(f"SHIP semantic levels: {runs['ship'].calibration.prompt_layers}")
    if not distributed_state().is_main_process:
        return 0
    card = AdapterCard(
        config=runs["ship"].model.peft_config["default"],
        base_model=model_path,
        dataset=data.name,
        dataset_description=_describe(data),
        label_names=data.label_names,
        test_accuracy=results["ship"]["test_accuracy"],
        validation_accuracy=results["ship"]["validation_accuracy"],
        trainable_parameters=results["ship"]["trainable_parameters"],
        training=_training_values(settings),
        comparison={METHOD_TITLES[method]: results[method]["test_accuracy"] for method in baselines},
        levels_calibrated=ship_values["prompt_layers"] is None,
        repo_id=args.push_to_hub,
    )
    adapter_dir = _save_adapter(runs["ship"], processor, card, output_dir / "adapter")
    _save_pictures(runs, test_predictions["ship"], data, card, output_dir)
    _save_metrics(runs["ship"], results, data, card, output_dir / "metrics.json", time.perf_counter() - start)
    say(f"\nTop-1 on {data.name} test ({len(data.test)} images) at the end of training, same data and budget:\n")
    say(results_markdown(results))
    say(
        f"\nWrote the adapter with its model card to {adapter_dir}/, and metrics.json, training_curves.png, "
        f"layer_affinity.png and confusion_matrix.png to {output_dir}/ ({time.perf_counter() - start:.0f} s)."
    )
    if args.push_to_hub:
        url = push_adapter(runs["ship"].model, args.push_to_hub, adapter_dir, private=args.hub_private or None)
        say(f"Pushed the adapter to {url}")
    return 0


def _training_values(settings: TrainSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in _TRAINING_FLAGS}


def _describe(data: ImageClassificationData) -> str:
    return data.describe() + (f" ({DIGITS_DESCRIPTION})" if data.name == DIGITS else "")


def _save_adapter(ship: TrainedMethod, processor: Any, card: AdapterCard, folder: Path) -> Path:
    """The folder that ``--push-to-hub`` uploads: the adapter, the image processor and the model card."""
    ship.model.save_pretrained(folder, save_embedding_layers=False)  # SHIP never changes embeddings; no Hub lookup
    processor.save_pretrained(folder)
    write_model_card(folder, card)
    return folder


def _save_pictures(
    runs: dict[str, TrainedMethod],
    ship_predictions: list[Any],
    data: ImageClassificationData,
    card: AdapterCard,
    output_dir: Path,
) -> None:
    histories = {METHOD_TITLES[method]: run.log_history for method, run in runs.items()}
    plot_training_curves(histories, output_dir / "training_curves.png")
    calibration = runs["ship"].calibration
    title = f"Layer affinity of {card.base_model} on {data.name} (share_threshold {card.config.share_threshold})"
    plot_layer_affinity(calibration.affinity, calibration.prompt_layers, output_dir / "layer_affinity.png", title)
    predicted, labels = ship_predictions
    title = f"SHIP on {data.name} test"
    plot_confusion_matrix(labels, predicted, data.label_names, output_dir / "confusion_matrix.png", title)


def _save_metrics(
    ship: TrainedMethod,
    results: dict[str, dict[str, Any]],
    data: ImageClassificationData,
    card: AdapterCard,
    path: Path,
    seconds: float,
) -> None:
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    metrics = {
        "model": card.base_model,
        "dataset": data.name,
        "data": {**{name: len(split) for name, split in splits.items()}, "classes": len(data.label_names)},
        "ship_config": {name: getattr(card.config, name) for name in SHIP_HYPERPARAMETERS},
        "training": card.training,
        "prompt_layers": ship.calibration.prompt_layers,
        "layer_affinity": ship.calibration.affinity.tolist(),
        "calibration_samples": ship.calibration.num_samples,
        "results": results,
        "seconds": round(seconds, 1),
    }
    path.write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def command_evaluate(args: argparse.Namespace) -> int:
    """``ship-peft evaluate``."""
    model_path = args.model or adapter_base_model(args.adapter)
    data = _load_data(args)
    dataset = {"train": data.train, "validation": data.validation, "test": data.test}[args.split]
    num_labels = adapter_num_labels(args.adapter)
    if num_labels != len(data.label_names):
        raise InputError(
            f"The adapter {args.adapter} classifies {num_labels} classes, but {data.name} has {len(data.label_names)}; "
            f"evaluate it on the kind of data it was trained on."
        )
    model = PeftModel.from_pretrained(load_backbone(model_path, data.label_names), args.adapter).eval()
    if model.peft_config["default"].decoupled_attention:
        model.enable_prompt_cache()  # the input-independent prompts run once (docs/method.md §5)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = evaluation_trainer(model, args.batch_size, args.bf16, args.output_dir or scratch)
        processor = load_image_processor(
            [args.adapter, resolve_model_path(model_path)], vision_config(backbone_config(model_path)).image_size
        )
        top1, predicted, labels = predict(trainer, with_pixels(dataset, processor), args.split)
    say(f"{args.adapter} on {data.name} {args.split} ({len(dataset)} images): top-1 accuracy {top1:.4f}")
    if args.output_dir and distributed_state().is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics = {
            "adapter": args.adapter,
            "model": model_path,
            "dataset": data.name,
            "split": args.split,
            "num_images": len(dataset),
            "accuracy": top1,
        }
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        plot_confusion_matrix(
            labels, predicted, data.label_names, output_dir / "confusion_matrix.png", f"{data.name} {args.split}"
        )
    return 0


def command_calibrate(args: argparse.Namespace) -> int:
    """``ship-peft calibrate``."""
    model_path = args.model or BUNDLED_BACKBONE
    share_threshold = _resolve(args, ["share_threshold"], OFFLINE_PRESET if args.model is None else {})[
        "share_threshold"
    ]
    data = _load_data(args)
    sample = calibration_sample(with_pixels(data.train, _processor(model_path)), args.calibration_samples, args.seed)
    model = build_model("ship", model_path, data.label_names, {"share_threshold": share_threshold})
    model.to(distributed_state().device)
    num_samples = len(sample)
    loader = calibration_loader(sample, args.batch_size)
    features = collect_cls_features(model, loader, num_samples, args.batch_size, not args.no_progress)
    affinity = layer_affinity(features).float().cpu()
    levels = semantic_levels(affinity, share_threshold)
    sweep = {
        threshold: semantic_levels(affinity, threshold) for threshold in sorted({*AFFINITY_SWEEP, share_threshold})
    }
    adjacent = ", ".join(f"{affinity[i, i + 1]:.2f}" for i in range(affinity.shape[0] - 1))
    say(f"Layer affinity of {model_path} on {num_samples} images of {data.name}; adjacent layers: {adjacent}")
    say(f"share_threshold {share_threshold}: {len(levels)} levels starting at layers {levels}")
    say("other thresholds:")
    for threshold, found in sweep.items():
        say(f"  {threshold:<5} {len(found):>2} levels {found}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_layer_affinity(
        affinity,
        levels,
        output_dir / "layer_affinity.png",
        f"Layer affinity of {model_path} on {data.name} (share_threshold {share_threshold})",
    )
    result = {
        "model": model_path,
        "dataset": data.name,
        "num_samples": num_samples,
        "share_threshold": share_threshold,
        "prompt_layers": levels,
        "levels_by_threshold": {str(threshold): found for threshold, found in sweep.items()},
        "layer_affinity": affinity.tolist(),
    }
    (output_dir / "calibration.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    say(f"Wrote layer_affinity.png and calibration.json to {output_dir}/")
    return 0


def command_vtab1k(args: argparse.Namespace) -> int:
    """``ship-peft vtab1k``."""
    task = get_task(args.task)
    grid_names = [*GRID_SETTINGS, *GRID_SHIP]
    grid = {name: getattr(args, name) or VTAB_DEFAULT_GRID[name] for name in grid_names}
    ship_values = _resolve(args, [name for name in SHIP_HYPERPARAMETERS if name not in GRID_SHIP], {})
    settings = _settings(args, {}, searched=GRID_SETTINGS)
    _print_settings(
        f"VTAB-1k {task.name} ({task.group}, {task.num_classes} classes) with {args.model}; searched:", grid, {}
    )
    fixed = {name: value for name, value in _training_values(settings).items() if name not in GRID_SETTINGS}
    _print_settings("fixed:", {**ship_values, **fixed}, {})
    splits = load_task(task, args.data_root, args.dataset, args.image_column, args.label_column)
    say("splits: " + ", ".join(f"{name} {len(split)}" for name, split in splits.items()))
    output_dir = Path(args.output_dir) / task.name
    row, final = run_task(task, splits, args.model, _processor(args.model), settings, ship_values, grid, output_dir)
    if distributed_state().is_main_process:
        results = Path(args.results) if args.results else Path(args.output_dir) / "results.jsonl"
        append_row(results, row)
        final.model.save_pretrained(output_dir / "adapter", save_embedding_layers=False)
        say(
            f"\n{task.name}: top-1 {row['top1']:.4f} on {row['num_test']} test images with {row['selected']}; "
            f"levels {row['prompt_layers']}. Row added to {results}."
        )
    return 0


def command_vtab1k_table(args: argparse.Namespace) -> int:
    """``ship-peft vtab1k-table``."""
    say(results_table(read_rows(Path(args.results))))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ship-peft`` command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        # PEFT 0.21 still calls transformers 5's deprecated gradient-checkpointing names: nothing for a user to fix
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        try:
            return args.handler(args)
        except InputError as error:
            print(f"ship-peft {args.command}: error: {error}", file=sys.stderr)
            return 2
