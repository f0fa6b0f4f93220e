#!/usr/bin/env python
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a Vision Transformer with SHIP on an image-classification dataset, in the shape of transformers'
``examples/pytorch/image-classification/run_image_classification.py``: every ``TrainingArguments`` flag works, the
same for one process or many (``accelerate launch``, ``torchrun``, ``--fsdp``, ``--gradient_accumulation_steps``,
``--bf16``, ``--report_to``, ``--push_to_hub``, ``--resume_from_checkpoint``).

    python examples/image_classification/run_ship.py \\
        --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name uoft-cs/cifar100 \\
        --label_column_name fine_label --output_dir ship-cifar100 --do_train --do_eval \\
        --learning_rate 1e-2 --num_train_epochs 10 --per_device_train_batch_size 64 --bf16 --push_to_hub

    accelerate launch --num_processes 8 examples/image_classification/run_ship.py my_run.yaml

A JSON or YAML file holding the flags can stand in for them (``examples/image_classification/recipe.yaml``: the
paper's recipe). Any ``datasets`` image-classification dataset works: a Hub id (``--dataset_name``) or local image
folders (``--train_dir``, ``--validation_dir``, ``--test_dir``, read as ``imagefolder``). Without a validation split,
``--train_val_split`` of the training images is held out (the accuracy is chosen there, never on test). SHIP's
calibration runs on the training images before training; the matching loss is logged apart
(``classification_loss``, ``matching_loss``). See ``docs/distributed.md`` for several GPUs, nodes and FSDP.
"""

import dataclasses
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Optional

import datasets
import torch
import transformers
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

import ship_peft
from ship_peft.app.training import ShipTrainer, accuracy, calibration_loader, calibration_sample
from ship_peft.calibration import IMAGE_INPUTS
from ship_peft.config import HYPERPARAMETERS

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The backbone to fine-tune."""

    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of a Vision Transformer (README)."})
    image_processor_name: Optional[str] = field(default=None, metadata={"help": "Image processor, if not the model's."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token (else the one `hf auth login` stored)."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "The weights' dtype (float32 trains; use --bf16 for mixed precision); auto: the checkpoint's.",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )


@dataclass
class DataTrainingArguments:
    """The data: a Hub dataset, or local image folders."""

    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hub id (or a path) of the dataset."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Its configuration, if several."})
    train_dir: Optional[str] = field(default=None, metadata={"help": "Folder of training images, one per class."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "Folder of validation images."})
    test_dir: Optional[str] = field(default=None, metadata={"help": "Folder of test images."})
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the labels."})
    train_val_split: float = field(default=0.15, metadata={"help": "Share of train held out without validation."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on this many images at most."})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate (validation, test) on this many at most."}
    )
    calibration_samples: int = field(default=1000, metadata={"help": "Training images SHIP's calibration reads."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None:
            raise ValueError("Give --dataset_name (a Hub id) or --train_dir (a folder of images, one per class).")


def _ship_arguments() -> type:
    """``ShipArguments``: ``ShipConfig``'s method hyper-parameters, with their types, defaults and help (derived, not
    re-typed)."""
    hints = typing.get_type_hints(ship_peft.ShipConfig)
    fields = [
        (item.name, hints[item.name], field(default=item.default, metadata=item.metadata))
        for item in dataclasses.fields(ship_peft.ShipConfig)
        if item.name in HYPERPARAMETERS
    ]
    return dataclasses.make_dataclass("ShipArguments", fields)


ShipArguments = _ship_arguments()


def parse_arguments() -> tuple:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ShipArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def load_splits(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> datasets.DatasetDict:
    """The dataset with ``train``, ``validation`` (held out of train if missing) and, if it has one, ``test``."""
    access = {"cache_dir": model_args.cache_dir, "token": model_args.token}
    if data_args.dataset_name is not None:
        dataset = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, **access)
    else:
        folders = {"train": data_args.train_dir, "validation": data_args.validation_dir, "test": data_args.test_dir}
        files = {split: os.path.join(folder, "**") for split, folder in folders.items() if folder}
        dataset = datasets.load_dataset("imagefolder", data_files=files, **access)
    if "validation" not in dataset:
        held_out = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset["train"], dataset["validation"] = held_out["train"], held_out["test"]
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    limits["test"] = data_args.max_eval_samples
    for split, limit in limits.items():
        if limit is not None and split in dataset:
            dataset[split] = dataset[split].select(range(min(limit, len(dataset[split]))))
    return dataset


def load_classifier(model_args: ModelArguments, label_names: list[str]) -> torch.nn.Module:
    """The model with a head for ``label_names``: its own classifier, or a linear head on a bare backbone."""
    common = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **common)
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:  # DINOv3, AIMv2, vision towers
        backbone = AutoModel.from_pretrained(model_args.model_name_or_path, dtype=dtype, **common)
        return ship_peft.ImageClassifier(backbone, len(label_names), label_names)
    return AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        ignore_mismatched_sizes=True,  # a new head for these classes
        dtype=dtype,
        **common,
    )


class Preprocess:
    """``with_transform`` function: images through the image processor, labels as ``labels``."""

    def __init__(self, processor, image_column: str, label_column: str):
        self.processor, self.image_column, self.label_column = processor, image_column, label_column

    def __call__(self, batch: dict) -> dict:
        processed = self.processor([image.convert("RGB") for image in batch[self.image_column]], return_tensors="pt")
        inputs = {name: processed[name] for name in IMAGE_INPUTS if name in processed}
        return {**inputs, "labels": torch.as_tensor(batch[self.label_column])}


def main() -> None:
    model_args, data_args, ship_args, training_args = parse_arguments()
    if training_args.do_eval and not training_args.do_train:
        raise ValueError(
            "run_ship.py evaluates the adapter it trains: add --do_train, or evaluate a saved adapter with "
            "`ship-peft evaluate ADAPTER --dataset ...` (or PeftModel.from_pretrained)."
        )
    training_args.remove_unused_columns = False  # the image column feeds the transform
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.set_seed(training_args.seed)

    dataset = load_splits(data_args, model_args, training_args.seed)
    label_names = dataset["train"].features[data_args.label_column_name].names
    processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    dataset.set_transform(Preprocess(processor, data_args.image_column_name, data_args.label_column_name))

    model = get_peft_model(
        load_classifier(model_args, label_names), ship_peft.ShipConfig(**dataclasses.asdict(ship_args))
    )
    if training_args.do_train:  # before resuming too: the checkpoint's weights then replace the calibrated ones
        sample = calibration_sample(dataset["train"], data_args.calibration_samples, training_args.seed)
        loader = calibration_loader(sample, training_args.per_device_eval_batch_size)  # this process's shard
        result = ship_peft.initialize_ship_weights(model, loader, max_samples=len(sample), seed=training_args.seed)
        logger.info("SHIP calibration: levels start at layers %s", result.prompt_layers)
    model.print_trainable_parameters()

    trainer = ShipTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        data_collator=default_data_collator,
        compute_metrics=accuracy,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # the adapter: PEFT's save_pretrained
        processor.save_pretrained(training_args.output_dir)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        for split in ("validation", "test"):
            if split in dataset:
                metrics = trainer.evaluate(dataset[split], metric_key_prefix="eval" if split == "validation" else split)
                trainer.log_metrics(split, metrics)
                trainer.save_metrics(split, metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(
            finetuned_from=model_args.model_name_or_path,
            dataset=data_args.dataset_name,
            tags=["image-classification", "ship", "peft"],
        )


if __name__ == "__main__":
    main()
