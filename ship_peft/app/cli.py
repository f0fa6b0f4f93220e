# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The ``ship-peft`` command line (also ``python -m ship_peft``): train, evaluate, calibrate, vtab1k, vtab1k-table.

Each command is a pipeline that reads top-down: the flags are parsed, then resolved into one run spec
(:class:`TrainRun`, :class:`EvaluateRun`, :class:`CalibrateRun`: every default, the offline preset's included, is
settled there), the spec is run (:func:`train`, :func:`evaluate`, :func:`calibrate`), and the outcome is reported
(``report_*``: files, tables, the Hub).

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

import torch
from PIL import Image
from peft import PeftModel

from .. import __version__
from ..calibration import IMAGE_INPUTS
from ..explain import explain
from ..export import export_onnx, export_program
from ..safe_io import load_adapter, save_adapter
from ..assets import BUNDLED_BACKBONE, resolve_model_path
from ..calibration import collect_features, layer_affinity, semantic_levels
from ..classifier import ImageClassifier
from ..config import IMAGE_SUMMARIES, ShipConfig
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
from ..model import get_prompt_bank
from .predict import PredictOutcome, check_output, image_paths, predict_images, read_image, write_predictions
from .plots import plot_confusion_matrix, plot_explanation, plot_layer_affinity, plot_training_curves
from .training import (
    METHOD_TITLES,
    RECIPE_SHIP_VALUES,
    SHIP_HYPERPARAMETERS,
    TrainedMethod,
    TrainSettings,
    adapter_base_model,
    adapter_label_names,
    adapter_num_labels,
    backbone_config,
    build_model,
    calibration_loader,
    calibration_sample,
    distributed_state,
    end_distributed,
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
        elif name == "image_summary":
            group.add_argument(flag, choices=IMAGE_SUMMARIES, help=_help(text, name, preset, grid))
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
    for add_command in (
        _add_train, _add_evaluate, _add_predict, _add_explain, _add_export, _add_calibrate, _add_vtab1k,
        _add_vtab1k_table,
    ):  # fmt: skip
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


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """The saved adapter (positional) and ``--model`` (default: the base model the adapter records)."""
    parser.add_argument("adapter", help="adapter folder (the adapter/ folder of a train run) or Hub repository id")
    parser.add_argument("--model", default=None, help="the backbone (default: the base model recorded in the adapter)")


def _add_explain(commands: Any) -> None:
    explain = commands.add_parser(
        "explain",
        help="draw what a SHIP adapter looks at in images: its attention, the tokens it picked, its prediction",
        description="For every image: the last layer's attention of the image summary (the CLS token, or the mean "
        "token without one) over the patches, the patches whose tokens built each attribute layer's prompts and "
        "those the matching loss compares the prompts with, and the predicted label. One PNG and one JSON per image.",
    )
    add_adapter_arguments(explain)
    explain.add_argument("images", nargs="+", help="image files, folders (searched recursively) or globs")
    explain.add_argument("--output-dir", default="outputs/explain", help="where to write (default: outputs/explain)")
    explain.set_defaults(handler=command_explain)


def _add_predict(commands: Any) -> None:
    predict = commands.add_parser(
        "predict",
        help="top-k labels of a saved SHIP adapter (folder or Hub id) for image files, folders or globs",
        description="Classify images with a SHIP adapter, in batches, and print each image's top-k labels with their "
        "probabilities (the adapter's label names). Unreadable images and images of another mode than RGB are "
        "skipped with a message; the run ends with a summary of them.",
    )
    add_adapter_arguments(predict)
    predict.add_argument("images", nargs="+", help="image files, folders (searched recursively) or globs")
    predict.add_argument("--top-k", type=int, default=5, help="labels shown per image (default: 5)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward (default: 32)")
    predict.add_argument("--output", help="also write the predictions to a .csv or .jsonl file")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(handler=command_predict)


def _add_export(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="write a deployable eval model of a SHIP adapter: a torch.export program (.pt2) or an ONNX file",
        description="Export the cached inference path of a SHIP adapter (the input-independent prompts computed once "
        "and stored as constants) with a dynamic batch size, then check it against the PyTorch model on another "
        "batch. The graph takes pixel_values (preprocess with the adapter's image processor) and returns logits.",
    )
    add_adapter_arguments(export)
    export.add_argument("--format", choices=["export", "onnx"], default="export", help="torch.export (.pt2) or ONNX")
    export.add_argument("--output", help="file to write (default: outputs/export/model.pt2 or model.onnx)")
    export.set_defaults(handler=command_export)


def _add_calibrate(commands: Any) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="show the semantic levels of a model on a dataset and write the layer-affinity heatmap",
        description="Run SHIP's calibration (layer affinity of the image-summary features: the CLS token, or the mean "
        "token for backbones without one) and show the levels it gives.",
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


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Which dataset and splits a command reads (the data and split flags), as :func:`load_data` takes them."""

    dataset: Optional[str]
    config_name: Optional[str]
    image_column: Optional[str]
    label_column: Optional[str]
    train_split: str
    validation_split: Optional[str]
    test_split: Optional[str]
    validation_size: float
    test_size: float
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataSpec":
        return cls(
            dataset=args.dataset,
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

    def load(self) -> ImageClassificationData:
        values = dataclasses.asdict(self)
        data = load_data(values.pop("dataset"), **values)
        say(f"data: {data.name}, {_describe(data)}")
        return data


def _processor(model_path: str, adapter: Optional[str] = None) -> Any:
    """The image processor saved with ``adapter`` (if given), else the backbone's, else the recipe's default."""
    sources = [adapter] if adapter else []
    image_size = getattr(vision_config(backbone_config(model_path)), "image_size", None)  # NaFlex: none
    return load_image_processor([*sources, resolve_model_path(model_path)], image_size)


def _inference_model(adapter: str, model_path: str, label_names: list[str]) -> PeftModel:
    """A saved adapter on its backbone, in eval mode, with the prompt cache where it applies (docs/method.md §5)."""
    model = load_adapter(load_backbone(model_path, label_names), adapter).eval()
    if model.peft_config["default"].decoupled_attention:
        model.enable_prompt_cache()
    return model


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


@dataclasses.dataclass
class TrainRun:
    """One ``ship-peft train`` run, every value resolved from the flags (the offline default's included)."""

    model_path: str
    offline: bool  # no --model: the bundled backbone with OFFLINE_PRESET
    ship_values: dict[str, Any]
    settings: TrainSettings
    baselines: list[str]
    data: DataSpec
    output_dir: Path
    push_to_hub: Optional[str]
    hub_private: bool
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def preset(self) -> dict[str, Any]:
        return OFFLINE_PRESET if self.offline else {}


@dataclasses.dataclass
class TrainOutcome:
    """What training gave: the data, the trained methods, their result rows and SHIP's test predictions."""

    data: ImageClassificationData
    processor: Any
    runs: dict[str, TrainedMethod]
    results: dict[str, dict[str, Any]]
    ship_predictions: list[Any]


def run_pipeline(
    args: argparse.Namespace,
    spec: Callable[[argparse.Namespace], Any],
    execute: Callable[[Any], Any],
    report: Callable[[Any, Any], None],
) -> int:
    """A command: parse (done) -> one run spec -> run it -> report (on the main process)."""
    outcome = execute(run := spec(args))
    if distributed_state().is_main_process:
        report(run, outcome)
    return 0


def command_train(args: argparse.Namespace) -> int:
    """``ship-peft train``."""
    return run_pipeline(args, train_run, train, report_train)


def train_run(args: argparse.Namespace) -> TrainRun:
    """The run the flags ask for."""
    offline = args.model is None
    preset = OFFLINE_PRESET if offline else {}
    return TrainRun(
        model_path=args.model or BUNDLED_BACKBONE,
        offline=offline,
        ship_values=_resolve(args, SHIP_HYPERPARAMETERS, preset),
        settings=_settings(args, preset),
        baselines=args.baselines if args.baselines is not None else (OFFLINE_BASELINES if offline else []),
        data=DataSpec.from_args(args),
        output_dir=Path(args.output_dir),
        push_to_hub=args.push_to_hub,
        hub_private=args.hub_private,
    )


def train(run: TrainRun) -> TrainOutcome:
    """Load the data, train SHIP and the baselines on it with the same budget, and predict the test split."""
    if run.offline:
        say(f"ship-peft train, offline default: the bundled backbone {BUNDLED_BACKBONE} (no --model given).")
    _print_settings("SHIP hyper-parameters:", run.ship_values, run.preset)
    _print_settings("training:", _training_values(run.settings), run.preset)
    data = run.data.load()
    processor = _processor(run.model_path)
    splits = (data.train, data.validation, data.test)
    train_split, validation, test = (with_pixels(split, processor) for split in splits)
    runs, results, ship_predictions = {}, {}, []
    for method in ["ship", *run.baselines]:
        say(f"\n=== {METHOD_TITLES[method]} ===")
        logs = run.output_dir / "logs" / method
        runs[method] = train_method(
            method, run.model_path, data.label_names, train_split, run.settings, run.ship_values, logs, validation
        )
        test_accuracy, *predictions = predict(runs[method].trainer, test, "test")
        results[method] = _method_row(runs[method], test_accuracy)
        if method == "ship":
            ship_predictions = predictions
    say(f"SHIP semantic levels: {runs['ship'].calibration.prompt_layers}")
    return TrainOutcome(data, processor, runs, results, ship_predictions)


def report_train(run: TrainRun, outcome: TrainOutcome) -> None:
    """Save the adapter with its model card, the pictures and metrics.json; print the table; push if asked."""
    data, results, ship = outcome.data, outcome.results, outcome.runs["ship"]
    card = AdapterCard(
        config=ship.model.peft_config["default"],
        base_model=run.model_path,
        dataset=data.name,
        dataset_description=_describe(data),
        label_names=data.label_names,
        test_accuracy=results["ship"]["test_accuracy"],
        validation_accuracy=results["ship"]["validation_accuracy"],
        trainable_parameters=results["ship"]["trainable_parameters"],
        training=_training_values(run.settings),
        comparison={METHOD_TITLES[method]: results[method]["test_accuracy"] for method in run.baselines},
        levels_calibrated=run.ship_values["prompt_layers"] is None,
        repo_id=run.push_to_hub,
        bare_backbone=isinstance(ship.model.get_base_model(), ImageClassifier),
    )
    output_dir = run.output_dir
    adapter_dir = _save_adapter(ship, outcome.processor, card, output_dir / "adapter")
    _save_pictures(outcome.runs, outcome.ship_predictions, data, card, output_dir)
    _save_metrics(ship, results, data, card, output_dir / "metrics.json", time.perf_counter() - run.started)
    say(f"\nTop-1 on {data.name} test ({len(data.test)} images) at the end of training, same data and budget:\n")
    say(results_markdown(results))
    say(
        f"\nWrote the adapter with its model card to {adapter_dir}/, and metrics.json, training_curves.png, "
        f"layer_affinity.png and confusion_matrix.png to {output_dir}/ ({time.perf_counter() - run.started:.0f} s)."
    )
    if run.push_to_hub:
        url = push_adapter(ship.model, run.push_to_hub, adapter_dir, private=run.hub_private or None)
        say(f"Pushed the adapter to {url}")


def _training_values(settings: TrainSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in _TRAINING_FLAGS}


def _describe(data: ImageClassificationData) -> str:
    return data.describe() + (f" ({DIGITS_DESCRIPTION})" if data.name == DIGITS else "")


def _save_adapter(ship: TrainedMethod, processor: Any, card: AdapterCard, folder: Path) -> Path:
    """The folder that ``--push-to-hub`` uploads: the adapter, the image processor, the model's ``config.json``
    (its label names, ``id2label``, for ``transformers.pipeline`` and ``evaluate``) and the model card."""
    save_adapter(ship.model, folder, save_embedding_layers=False)  # SHIP never changes embeddings; no Hub lookup
    ship.model.get_base_model().config.save_pretrained(folder)
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


@dataclasses.dataclass(frozen=True)
class EvaluateRun:
    """One ``ship-peft evaluate`` run, resolved from the flags."""

    adapter: str
    model_path: str
    data: DataSpec
    split: str
    batch_size: int
    bf16: bool
    output_dir: Optional[Path]


@dataclasses.dataclass
class EvaluateOutcome:
    data: ImageClassificationData
    num_images: int
    top1: float
    predicted: Any
    labels: Any


def command_evaluate(args: argparse.Namespace) -> int:
    """``ship-peft evaluate``."""
    return run_pipeline(args, evaluate_run, evaluate, report_evaluate)


def evaluate_run(args: argparse.Namespace) -> EvaluateRun:
    """The run the flags ask for (the backbone: ``--model``, else the one the adapter records)."""
    return EvaluateRun(
        adapter=args.adapter,
        model_path=args.model or adapter_base_model(args.adapter),
        data=DataSpec.from_args(args),
        split=args.split,
        batch_size=args.batch_size,
        bf16=args.bf16,
        output_dir=Path(args.output_dir) if args.output_dir else None,
    )


def evaluate(run: EvaluateRun) -> EvaluateOutcome:
    """Load the adapter onto its backbone and predict the split (the prompt cache on, as for any inference)."""
    data = run.data.load()
    dataset = {"train": data.train, "validation": data.validation, "test": data.test}[run.split]
    num_labels = adapter_num_labels(run.adapter)
    if num_labels != len(data.label_names):
        raise InputError(
            f"The adapter {run.adapter} classifies {num_labels} classes, but {data.name} has {len(data.label_names)}; "
            f"evaluate it on the kind of data it was trained on."
        )
    model = _inference_model(run.adapter, run.model_path, data.label_names)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = evaluation_trainer(model, run.batch_size, run.bf16, str(run.output_dir or scratch))
        processor = _processor(run.model_path, run.adapter)
        top1, predicted, labels = predict(trainer, with_pixels(dataset, processor), run.split)
    return EvaluateOutcome(data, len(dataset), top1, predicted, labels)


def report_evaluate(run: EvaluateRun, outcome: EvaluateOutcome) -> None:
    """Print the accuracy; with ``--output-dir``, write metrics.json and the confusion matrix."""
    data = outcome.data
    say(f"{run.adapter} on {data.name} {run.split} ({outcome.num_images} images): top-1 accuracy {outcome.top1:.4f}")
    if run.output_dir is None:
        return
    run.output_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "adapter": run.adapter,
        "model": run.model_path,
        "dataset": data.name,
        "split": run.split,
        "num_images": outcome.num_images,
        "accuracy": outcome.top1,
    }
    (run.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    plot_confusion_matrix(
        outcome.labels,
        outcome.predicted,
        data.label_names,
        run.output_dir / "confusion_matrix.png",
        f"{data.name} {run.split}",
    )


@dataclasses.dataclass(frozen=True)
class ExplainRun:
    """One ``ship-peft explain`` run, resolved from the flags."""

    adapter: str
    model_path: str
    images: list[Path]
    output_dir: Path


def command_explain(args: argparse.Namespace) -> int:
    """``ship-peft explain``."""
    return run_pipeline(args, explain_run, explain_images, report_explain)


def explain_run(args: argparse.Namespace) -> ExplainRun:
    return ExplainRun(
        adapter=args.adapter,
        model_path=args.model or adapter_base_model(args.adapter),
        images=image_paths(args.images),
        output_dir=Path(args.output_dir),
    )


def explain_images(run: ExplainRun) -> list[tuple[Path, Any]]:
    """Every readable image's picture and record: ``(picture, record)`` pairs (a reason instead for a skipped one)."""
    label_names = adapter_label_names(run.adapter)
    model = _inference_model(run.adapter, run.model_path, label_names).to(distributed_state().device)
    if get_prompt_bank(model).backbone.pixel_layout != "images":
        raise InputError("`ship-peft explain` draws square patch grids; SigLIP 2's NaFlex patches are not drawn yet.")
    processor = _processor(run.model_path, run.adapter)
    written = []
    for index, path in enumerate(run.images):
        image = read_image(path)
        if isinstance(image, str):
            written.append((path, image))
            continue
        processed = processor([image], return_tensors="pt")
        inputs = {name: processed[name].to(model.device) for name in IMAGE_INPUTS if name in processed}
        explanation = explain(model, inputs.pop("pixel_values"), **inputs)
        probability, predicted = explanation.logits.float().softmax(dim=-1)[0].max(dim=0)
        title = f"{path.name}: predicted {label_names[predicted]} ({probability:.2f})"
        stem = run.output_dir / f"{index:04d}_{path.stem}"
        drawn = plot_explanation(
            processed_image(processor, processed["pixel_values"][0], image),
            explanation.attention[0],
            {layer: tokens[0].tolist() for layer, tokens in explanation.attribute_tokens.items()},
            explanation.matching_tokens[0].tolist(),
            title,
            stem.with_suffix(".png"),
        )
        record = {"image": str(path), "predicted": label_names[predicted], "probability": float(probability)}
        record["drawn"] = drawn
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        written.append((stem.with_suffix(".png"), record))
    return written


def _square_images(model: PeftModel, command: str) -> tuple[int, int]:
    """The channels and the side of the square images ``model`` takes (for a model of any size, DINOv3's say, its
    configured ``image_size``); a clear error where there is none (SigLIP 2's NaFlex patches, timm models of any
    size)."""
    bank = get_prompt_bank(model)
    blocks_name = model.peft_config["default"].target_modules[0]
    host = model.get_base_model().get_submodule(blocks_name.removesuffix(bank.backbone.blocks_path).rstrip("."))
    channels, size = bank.backbone.image_format(host) if bank.backbone.pixel_layout == "images" else (None, None)
    configured = getattr(vision_config(model.config), "image_size", None)
    if size is None and isinstance(configured, int) and channels is not None:
        size = (configured, configured)
    if size is None or size[0] != size[1]:
        raise InputError(
            f"`ship-peft {command}` needs a model of one square image size, but this {type(host).__name__} takes "
            f"images of any size, or as patches (SigLIP 2's NaFlex); export it from Python with an example batch of "
            f"the size you serve (`ship_peft.export.export_program(model, example)`, docs/serving.md)."
        )
    return channels, size[0]


def processed_image(processor: Any, pixel_values: torch.Tensor, image: Any) -> Any:
    """The image as the model saw it (``pixel_values`` ``[C, H, W]`` un-normalised), so that the patch grid lies on
    it whatever the processor resized or cropped; the original ``image`` where the processor names no mean and std."""
    data_config = getattr(processor, "data_config", {})  # transformers' timm wrapper
    mean = getattr(processor, "image_mean", None) or data_config.get("mean")
    std = getattr(processor, "image_std", None) or data_config.get("std")
    if mean is None or std is None:
        return image
    shape = (-1, 1, 1)
    pixels = pixel_values.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    return Image.fromarray((pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def report_explain(run: ExplainRun, outcome: list[tuple[Path, Any]]) -> None:
    for picture, record in outcome:
        if isinstance(record, str):
            say(f"{picture}: skipped ({record})")
        else:
            say(f"{record['image']}: {record['predicted']} ({record['probability']:.3f}) -> {picture}")


@dataclasses.dataclass(frozen=True)
class PredictRun:
    """One ``ship-peft predict`` run, resolved from the flags (the images listed before any model is loaded)."""

    adapter: str
    model_path: str
    images: list[Path]
    top_k: int
    batch_size: int
    output: Optional[Path]
    show_progress: bool


def command_predict(args: argparse.Namespace) -> int:
    """``ship-peft predict``."""
    return run_pipeline(args, predict_run, predict_run_images, report_predict)


def predict_run(args: argparse.Namespace) -> PredictRun:
    if args.top_k < 1 or args.batch_size < 1:
        raise InputError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}.")
    check_output(args.output)
    return PredictRun(
        adapter=args.adapter,
        model_path=args.model or adapter_base_model(args.adapter),
        images=image_paths(args.images),
        top_k=args.top_k,
        batch_size=args.batch_size,
        output=Path(args.output) if args.output else None,
        show_progress=not args.no_progress,
    )


def predict_run_images(run: PredictRun) -> PredictOutcome:
    """Load the adapter with its label names (its ``config.json``) and classify the images."""
    label_names = adapter_label_names(run.adapter)
    model = _inference_model(run.adapter, run.model_path, label_names).to(distributed_state().device)
    processor = _processor(run.model_path, run.adapter)
    return predict_images(model, processor, label_names, run.images, run.top_k, run.batch_size, run.show_progress)


def report_predict(run: PredictRun, outcome: PredictOutcome) -> None:
    """Print every image's top-k and a summary of the skipped images; write ``--output``."""
    for prediction in outcome.predictions:
        best = ", ".join(f"{label} {p:.3f}" for label, p in zip(prediction.labels, prediction.probabilities))
        say(f"{prediction.path}: {best}")
    if run.output is not None:
        write_predictions(outcome.predictions, run.output)
        say(f"Wrote {len(outcome.predictions)} predictions to {run.output}")
    summary = f"Classified {len(outcome.predictions)} of {len(run.images)} images"
    if not outcome.skipped:
        say(summary + ".")
        return
    say(f"{summary}; skipped {len(outcome.skipped)}:")
    for skipped in outcome.skipped:
        say(f"  {skipped.path}: {skipped.reason}")


def command_export(args: argparse.Namespace) -> int:
    """``ship-peft export``: export the adapter, then check the written file against the PyTorch model."""
    suffix = ".pt2" if args.format == "export" else ".onnx"
    output = Path(args.output) if args.output else Path("outputs/export") / f"model{suffix}"
    model_path = args.model or adapter_base_model(args.adapter)
    label_names = adapter_label_names(args.adapter)
    model = _inference_model(args.adapter, model_path, label_names)
    channels, size = _square_images(model, "export")
    example = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    check = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))  # another batch size
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = model(pixel_values=check).logits
    if args.format == "export":
        program = export_program(model, example)
        torch.export.save(program, str(output))
        with torch.no_grad():
            exported = torch.export.load(str(output)).module()(check)
    else:
        export_onnx(model, example, output)
        exported = _run_onnx(output, check)
    error = "not checked (`pip install onnxruntime` to run the ONNX file)" if exported is None else (
        f"max |difference| {(torch.as_tensor(exported) - expected).abs().max().item():.2e}"
    )
    say(f"Wrote {output}: logits of {args.adapter} for pixel_values [batch, {channels}, {size}, {size}], "
        f"{len(label_names)} labels; checked on a batch of 3 against the PyTorch model: {error}.")
    return 0


def _run_onnx(path: Path, pixel_values: torch.Tensor) -> Optional[Any]:
    """The ONNX file's logits for ``pixel_values`` (onnxruntime), or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0]


@dataclasses.dataclass(frozen=True)
class CalibrateRun:
    """One ``ship-peft calibrate`` run, resolved from the flags."""

    model_path: str
    share_threshold: float
    data: DataSpec
    calibration_samples: int
    batch_size: int
    seed: int
    show_progress: bool
    output_dir: Path


@dataclasses.dataclass
class CalibrateOutcome:
    data: ImageClassificationData
    num_samples: int
    affinity: Any
    levels: list[int]
    sweep: dict[float, list[int]]


def command_calibrate(args: argparse.Namespace) -> int:
    """``ship-peft calibrate``."""
    return run_pipeline(args, calibrate_run, calibrate, report_calibrate)


def calibrate_run(args: argparse.Namespace) -> CalibrateRun:
    """The run the flags ask for (no ``--model``: the bundled backbone with the offline default's threshold)."""
    preset = OFFLINE_PRESET if args.model is None else {}
    return CalibrateRun(
        model_path=args.model or BUNDLED_BACKBONE,
        share_threshold=_resolve(args, ["share_threshold"], preset)["share_threshold"],
        data=DataSpec.from_args(args),
        calibration_samples=args.calibration_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        show_progress=not args.no_progress,
        output_dir=Path(args.output_dir),
    )


def calibrate(run: CalibrateRun) -> CalibrateOutcome:
    """The layer affinity of the backbone's CLS features on a training sample, and the levels it gives."""
    data = run.data.load()
    processor = _processor(run.model_path)
    sample = calibration_sample(with_pixels(data.train, processor), run.calibration_samples, run.seed)
    model = build_model("ship", run.model_path, data.label_names, {"share_threshold": run.share_threshold})
    model.to(distributed_state().device)
    loader = calibration_loader(sample, run.batch_size)
    features = collect_features(model, loader, len(sample), run.batch_size, run.show_progress)
    affinity = layer_affinity(features).float().cpu()
    thresholds = sorted({*AFFINITY_SWEEP, run.share_threshold})
    sweep = {threshold: semantic_levels(affinity, threshold) for threshold in thresholds}
    return CalibrateOutcome(data, len(sample), affinity, semantic_levels(affinity, run.share_threshold), sweep)


def report_calibrate(run: CalibrateRun, outcome: CalibrateOutcome) -> None:
    """Print the levels (and those of other thresholds); write the heatmap and calibration.json."""
    data, affinity, levels = outcome.data, outcome.affinity, outcome.levels
    adjacent = ", ".join(f"{affinity[i, i + 1]:.2f}" for i in range(affinity.shape[0] - 1))
    say(
        f"Layer affinity of {run.model_path} on {outcome.num_samples} images of {data.name}; "
        f"adjacent layers: {adjacent}"
    )
    say(f"share_threshold {run.share_threshold}: {len(levels)} levels starting at layers {levels}")
    say("other thresholds:")
    for threshold, found in outcome.sweep.items():
        say(f"  {threshold:<5} {len(found):>2} levels {found}")
    run.output_dir.mkdir(parents=True, exist_ok=True)
    plot_layer_affinity(
        affinity,
        levels,
        run.output_dir / "layer_affinity.png",
        f"Layer affinity of {run.model_path} on {data.name} (share_threshold {run.share_threshold})",
    )
    result = {
        "model": run.model_path,
        "dataset": data.name,
        "num_samples": outcome.num_samples,
        "share_threshold": run.share_threshold,
        "prompt_layers": levels,
        "levels_by_threshold": {str(threshold): found for threshold, found in outcome.sweep.items()},
        "layer_affinity": affinity.tolist(),
    }
    (run.output_dir / "calibration.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    say(f"Wrote layer_affinity.png and calibration.json to {run.output_dir}/")


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
        save_adapter(final.model, output_dir / "adapter", save_embedding_layers=False)
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
            status = args.handler(args)
        except InputError as error:
            print(f"ship-peft {args.command}: error: {error}", file=sys.stderr)
            return 2
    end_distributed()
    return status
