# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Fine-tuning SHIP and its baselines (VPT-deep, linear probing) with the Hugging Face ``Trainer``.

The same code runs on one CPU, one GPU, or several processes under ``accelerate launch``: the ``Trainer`` handles
devices and distribution; calibration reads a shard of its images on every process and gathers the features, so
all processes find the same levels and prototypes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import transformers
from accelerate import PartialState
from datasets import Dataset
from huggingface_hub import hf_hub_download
from peft import PeftConfig, get_peft_model
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    EvalPrediction,
    Trainer,
    TrainingArguments,
)
from transformers import default_data_collator, set_seed

from ..assets import resolve_model_path
from ..calibration import CalibrationResult, initialize_ship_weights
from ..classifier import ImageClassifier
from .. import presets
from ..config import HYPERPARAMETERS, ShipConfig
from ..model import classifier_names, resolve_target
from .errors import InputError

METHODS = ("ship", "vpt-deep", "linear")
METHOD_TITLES = {method: presets.TITLES[method] for method in METHODS}

#: ``ShipConfig`` fields that are hyper-parameters of the method (the ``train`` command has a flag for each).
SHIP_HYPERPARAMETERS = HYPERPARAMETERS

#: ``ShipConfig`` fields whose value in the training recipe (docs/method.md §6) differs from the library default: the
#: command line uses these. ``ShipConfig`` itself runs the backbone as given (no stochastic depth) unless asked.
RECIPE_SHIP_VALUES: dict[str, Any] = {"drop_path_rate": 0.1}


@dataclass
class TrainSettings:
    """The usual training hyper-parameters; the defaults are the reference VTAB-1k recipe (docs/method.md §6):
    AdamW, batch 64, 100 epochs, cosine schedule to 1e-5 after 10 epochs of linear warm-up from 1e-6; lr and weight
    decay are the reference script's defaults (it tunes them per task)."""

    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    epochs: float = 100
    batch_size: int = 64
    warmup_epochs: float = 10
    warmup_start_learning_rate: float = 1e-6
    min_learning_rate: float = 1e-5
    seed: int = 42
    bf16: bool = False
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["none"])
    num_workers: int = 0
    calibration_samples: int = 1000
    show_progress: bool = True

    def __post_init__(self):
        if self.epochs <= 0 or self.batch_size < 1:
            raise InputError(f"--epochs ({self.epochs}) must be > 0 and --batch-size ({self.batch_size}) >= 1.")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise InputError(
                f"--warmup-epochs ({self.warmup_epochs}) must be >= 0 and below --epochs ({self.epochs}); give a "
                f"smaller --warmup-epochs (the reference recipe warms up for 10 of its 100 epochs)."
            )
        if self.learning_rate <= 0 or self.warmup_start_learning_rate < 0 or self.min_learning_rate < 0:
            raise InputError(
                f"--learning-rate ({self.learning_rate}) must be > 0, --warmup-start-learning-rate "
                f"({self.warmup_start_learning_rate}) and --min-learning-rate ({self.min_learning_rate}) >= 0."
            )


@dataclass
class TrainedMethod:
    """A trained model and what it took."""

    method: str
    trainer: Trainer
    calibration: Optional[CalibrationResult]
    train_seconds: float

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def log_history(self) -> list[dict[str, float]]:
        return self.trainer.state.log_history


#: transformers model types the command line trains with their own classifier (``AutoModelForImageClassification``)
CLASSIFIER_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip", "siglip", "siglip2", "timm_wrapper")
#: bare backbones (``AutoModel``) the command line trains with a linear head (:class:`ship_peft.ImageClassifier`)
BARE_MODEL_TYPES = ("dinov3_vit", "siglip_vision_model", "siglip2_vision_model", "aimv2_vision_model")
#: every model type the command line trains, see ``ship_peft.backbones``
SUPPORTED_MODEL_TYPES = CLASSIFIER_MODEL_TYPES + BARE_MODEL_TYPES


def vision_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The vision part of ``config`` (CLIP's ``vision_config``; the config itself otherwise)."""
    return getattr(config, "vision_config", None) or config


def backbone_config(model_path: str) -> transformers.PretrainedConfig:
    """The configuration of ``model_path`` (a Hub id, a folder, or the bundled backbone's name), checked to be of a
    supported family."""
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model_path))
    except (OSError, ValueError) as error:
        raise InputError(
            f"--model {model_path!r}: cannot read a model configuration ({error}). Give a Hub model id or a local "
            f"folder written by `save_pretrained`."
        ) from error
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"--model {model_path!r} is a {config.model_type!r} model; the command line trains the model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (e.g. google/vit-base-patch16-224-in21k, facebook/dinov2-small, "
            f"timm/eva02_small_patch14_224.mim_in22k)."
        )
    return config


def load_backbone(model_path: str, label_names: list[str]) -> torch.nn.Module:
    """A float32 image classifier with a head for ``label_names``: the model's own
    (``AutoModelForImageClassification``; a new head if the sizes differ), or, for a bare backbone (DINOv3), a
    linear head on its pooled feature (:class:`ship_peft.ImageClassifier`, saved with the adapter).

    ``model_path`` is recorded as the model's name, so adapters name their base as the user did.
    """
    bare = backbone_config(model_path).model_type in BARE_MODEL_TYPES
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report is summarised below
    transformers.logging.disable_progress_bar()
    labels = {} if bare else {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: index for index, name in enumerate(label_names)},
        "ignore_mismatched_sizes": True,
    }
    try:
        model, info = (AutoModel if bare else AutoModelForImageClassification).from_pretrained(
            resolve_model_path(model_path), **labels, dtype=torch.float32, output_loading_info=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    heads = () if bare else tuple(f"{name}." for name in classifier_names(model, resolve_target(model, None)))
    missing = [key for key in info["missing_keys"] if not key.startswith(heads)]
    if missing:
        say(f"warning: {model_path} has no weights for {len(missing)} backbone tensors ({missing[:3]} ...): random.")
    if bare:
        model = ImageClassifier(model, len(label_names), label_names)
    model.name_or_path = model_path  # what PEFT records as the adapter's base model
    return model


def method_config(method: str, ship_values: dict[str, Any], num_layers: int) -> Optional[ShipConfig]:
    """The adapter configuration of ``method`` ("ship", "vpt-deep"; None for "linear") from SHIP's hyper-parameters
    (the presets of :mod:`ship_peft.presets`; VPT-deep gets ``num_prompts`` = K prompts at every layer)."""
    if method not in METHODS:
        raise InputError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    try:
        return presets.adapter_config(method, num_layers, **ship_values)
    except (TypeError, ValueError) as error:
        raise InputError(str(error)) from error


def build_model(method: str, model_path: str, label_names: list[str], ship_values: dict[str, Any]) -> torch.nn.Module:
    """The backbone with ``method``'s trainable parts: a SHIP / VPT-deep PEFT model, or the head alone (linear)."""
    backbone = load_backbone(model_path, label_names)
    blocks_name = resolve_target(backbone, None)
    config = method_config(method, ship_values, len(backbone.get_submodule(blocks_name)))
    if config is None:  # the linear probe: the classifiers alone
        heads = tuple(f"{name}." for name in classifier_names(backbone, blocks_name))
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad = name.startswith(heads)
        return backbone
    try:
        return get_peft_model(backbone, config)
    except ValueError as error:  # e.g. a level start beyond the backbone's depth
        raise InputError(str(error)) from error


def cpu_processes() -> bool:
    """Whether this is one of several processes (``torchrun`` / ``accelerate launch``) on a machine without GPUs: they
    then train on the CPU with the gloo backend."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def end_distributed() -> None:
    """Under ``torchrun``, once a command succeeded: wait for every process (the main one may still be writing), then
    close the process group, so that no process exits while another still talks to it (gloo aborts at exit then)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def distributed_state() -> PartialState:
    """This process's place among the launched processes (one process: the only, main one)."""
    return PartialState(cpu=cpu_processes())


def say(*values: Any) -> None:
    """``print`` on the main process only."""
    distributed_state().print(*values)


def calibration_sample(train: Dataset, max_samples: int, seed: int) -> Dataset:
    """Up to ``max_samples`` training images drawn at random with ``seed`` (not the first ones: a dataset sorted by
    class would bias the affinity and the prototypes)."""
    return train.shuffle(seed=seed).select(range(min(len(train), max_samples)))


def calibration_loader(sample: Dataset, batch_size: int) -> DataLoader:
    """This process's share of the calibration ``sample``: under several processes calibration gathers every
    process's features, so each reads a contiguous shard and all of them compute the same levels and prototypes."""
    state = distributed_state()
    shard = sample.shard(num_shards=state.num_processes, index=state.process_index, contiguous=True)
    return DataLoader(shard, batch_size=batch_size, collate_fn=default_data_collator)


def calibrate(model: torch.nn.Module, train: Dataset, settings: TrainSettings) -> CalibrationResult:
    """SHIP calibration (levels, prototypes) on up to ``calibration_samples`` random training images."""
    sample = calibration_sample(train, settings.calibration_samples, settings.seed)
    model.to(distributed_state().device)
    try:
        return initialize_ship_weights(
            model,
            calibration_loader(sample, settings.batch_size),
            max_samples=len(sample),
            seed=settings.seed,
            show_progress=settings.show_progress,
        )
    except ValueError as error:  # e.g. fewer images than prototypes
        raise InputError(str(error)) from error


class ShipTrainer(Trainer):
    """``Trainer`` that also logs the cross-entropy (``classification_loss``) and SHIP's prompt matching loss
    (``matching_loss``) separately, averaged over the logging interval and over processes."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            classification = outputs.get("classification_loss")
            if classification is None:
                classification = outputs["loss"]
            else:  # on the loss's footing: the Trainer scales the loss (in place) by what the processes share of it
                classification = classification * self._loss_scale(num_items_in_batch)
            parts = {"classification_loss": classification}
            if outputs.get("matching_loss") is not None:
                parts["matching_loss"] = outputs["matching_loss"]
            for key, value in parts.items():
                self._loss_sums[key] = self._loss_sums.get(key, 0.0) + value.detach().float()
            self._loss_calls += 1
        return (loss, outputs) if return_outputs else loss

    def _loss_scale(self, num_items_in_batch: Any) -> int:
        """The factor ``Trainer.compute_loss`` multiplies the loss by: the processes that average the items of a
        batch (``average_tokens_across_devices``), else 1."""
        takes_items = self.model_accepts_loss_kwargs or self.compute_loss_func
        if not (self.args.average_tokens_across_devices and takes_items) or num_items_in_batch is None:
            return 1
        return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._loss_calls:
            for key, total in self._loss_sums.items():
                logs[key] = round(self.accelerator.reduce(total / self._loss_calls, reduction="mean").item(), 4)
            self._loss_sums, self._loss_calls = {}, 0
        super().log(logs, start_time)


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Top-1 accuracy of logits against labels (``compute_metrics`` of the ``Trainer``)."""
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def training_arguments(settings: TrainSettings, output_dir: Path, evaluate_each_epoch: bool) -> TrainingArguments:
    """``TrainingArguments`` of the recipe: AdamW, cosine to ``min_learning_rate`` after a linear warm-up from
    ``warmup_start_learning_rate``, no checkpoints (nothing is selected during training), progress bars and the
    chosen loggers."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        optim="adamw_torch",
        lr_scheduler_type="cosine_warmup_with_min_lr",
        lr_scheduler_kwargs={
            "min_lr": settings.min_learning_rate,
            "warmup_lr_rate": settings.warmup_start_learning_rate / settings.learning_rate,
        },
        warmup_steps=settings.warmup_epochs / settings.epochs,  # a float below 1 is a fraction of all steps
        seed=settings.seed,
        bf16=settings.bf16,
        eval_strategy="epoch" if evaluate_each_epoch else "no",
        save_strategy="no",
        logging_steps=settings.logging_steps,
        report_to=settings.report_to,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=settings.num_workers,
        **_device_arguments(),
        disable_tqdm=not settings.show_progress,
    )


def _device_arguments() -> dict[str, Any]:
    """``TrainingArguments`` that follow the hardware: pinned memory only with CUDA, gloo for CPU processes. Every
    trainable tensor of SHIP, VPT-deep and the linear probe takes part in every training forward, so DDP need not
    search the autograd graph for unused parameters each step (the ``Trainer`` would, for a ``PeftModel``)."""
    return {
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": cpu_processes(),
        "ddp_backend": "gloo" if cpu_processes() else None,
        "ddp_find_unused_parameters": False,
    }


def evaluation_trainer(model: torch.nn.Module, batch_size: int, bf16: bool, output_dir: str) -> Trainer:
    """A ``Trainer`` for prediction only (``predict``)."""
    arguments = TrainingArguments(
        output_dir=output_dir,
        per_device_eval_batch_size=batch_size,
        bf16=bf16,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        **_device_arguments(),
    )
    return Trainer(model=model, args=arguments, compute_metrics=accuracy)


def train_method(
    method: str,
    model_path: str,
    label_names: list[str],
    train: Dataset,
    settings: TrainSettings,
    ship_values: dict[str, Any],
    output_dir: Path,
    monitor: Optional[Dataset] = None,
) -> TrainedMethod:
    """Build ``method``'s model, calibrate it (SHIP), and fine-tune it on ``train`` (datasets yielding
    ``pixel_values`` / ``labels``); ``monitor`` (the validation split) is evaluated after every epoch."""
    set_seed(settings.seed)
    model = build_model(method, model_path, label_names, ship_values)
    calibration = calibrate(model, train, settings) if method == "ship" else None
    if method == "ship" and model.peft_config["default"].decoupled_attention:
        model.enable_prompt_cache()  # evaluation runs the input-independent prompts once (docs/method.md §5)
    trainer = ShipTrainer(
        model=model,
        args=training_arguments(settings, output_dir, evaluate_each_epoch=monitor is not None),
        train_dataset=train,
        eval_dataset=monitor,
        compute_metrics=accuracy,
    )
    start = time.perf_counter()
    trainer.train()
    return TrainedMethod(method, trainer, calibration, time.perf_counter() - start)


def predict(trainer: Trainer, dataset: Dataset, split: str) -> tuple[float, np.ndarray, np.ndarray]:
    """``(accuracy, predicted labels, true labels)`` of the trained model on ``dataset``."""
    output = trainer.predict(dataset, metric_key_prefix=split)
    return output.metrics[f"{split}_accuracy"], np.argmax(output.predictions, axis=-1), output.label_ids


def last_logged(log_history: list[dict[str, float]], key: str) -> Optional[float]:
    """The last value of ``key`` in a ``Trainer`` log history (None if never logged)."""
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def adapter_num_labels(adapter: str) -> int:
    """Number of classes of a saved SHIP adapter (rows of its classifier: the first of its ``modules_to_save``), from
    a folder or a Hub repository."""
    heads = PeftConfig.from_pretrained(adapter).modules_to_save or []
    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        path = hf_hub_download(adapter, "adapter_model.safetensors")
    with safe_open(str(path), framework="pt") as tensors:
        for head in heads:  # in order: the first classifier's matrix
            shapes = [tensors.get_slice(key).get_shape() for key in tensors.keys() if key.endswith(f"{head}.weight")]
            if shapes and len(shapes[0]) == 2:
                return shapes[0][0]
    raise InputError(
        f"{adapter} holds no classifier weights; train it with the model's classifier in modules_to_save "
        f"(`ship-peft train` does)."
    )


def adapter_label_names(adapter: str) -> list[str]:
    """The label names saved with an adapter (its ``config.json``'s ``id2label``, as ``ship-peft train`` writes it);
    ``LABEL_0``, ``LABEL_1``, ... when it has none."""
    num_labels = adapter_num_labels(adapter)
    try:
        id2label = transformers.AutoConfig.from_pretrained(adapter).id2label
    except (OSError, ValueError):
        id2label = {}
    if len(id2label) != num_labels:
        say(f"{adapter} has no label names for its {num_labels} classes (no config.json): using LABEL_0, ...")
        return [f"LABEL_{index}" for index in range(num_labels)]
    return [id2label[index] for index in range(num_labels)]


def adapter_base_model(adapter: str) -> str:
    """The base model recorded in a saved adapter's configuration."""
    try:
        return PeftConfig.from_pretrained(adapter).base_model_name_or_path
    except (OSError, ValueError) as error:
        raise InputError(
            f"{adapter!r} is not a PEFT adapter folder or Hub repository ({error}); give the folder that holds "
            f"adapter_config.json (the `adapter/` folder of a `ship-peft train` run)."
        ) from error
