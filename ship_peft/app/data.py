# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Image-classification data for ship-peft.

Any source — the bundled digits, a Hub dataset id, a local ``imagefolder`` directory or a ``datasets`` folder written
by ``save_to_disk`` — is reduced to ``image`` / ``label`` columns (the label a ``ClassLabel``) and to train /
validation / test splits; a missing validation or test split is carved out of train, stratified by label, with a
fixed seed. :func:`with_pixels` then turns the images into ``pixel_values`` with the backbone's own image processor,
on the fly.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoImageProcessor, ViTImageProcessorPil

from ..assets import DIGITS_FILE
from ..calibration import IMAGE_INPUTS
from .errors import InputError

IMAGE, LABEL = "image", "label"

#: Name of the bundled data set (the default of ``--dataset``).
DIGITS = "digits"
DIGITS_DESCRIPTION = "scikit-learn's 8x8 handwritten digits upsampled to 32x32, bundled: no download"
DIGITS_IMAGE_SIZE = 32
DIGITS_NUM_VALIDATION, DIGITS_NUM_TEST = 200, 797  # of 1797: 800 / 200 / 797, the VTAB-1k sizes for train / val

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")


@dataclass
class ImageClassificationData:
    """Train / validation / test splits with an ``image`` column and a ``label`` ``ClassLabel`` column."""

    name: str
    train: Dataset
    validation: Dataset
    test: Dataset

    @property
    def label_names(self) -> list[str]:
        return list(self.train.features[LABEL].names)

    def describe(self) -> str:
        """The split sizes and the number of classes, in words."""
        return (
            f"{len(self.train)} train / {len(self.validation)} validation / {len(self.test)} test images, "
            f"{len(self.label_names)} classes"
        )


def digits_dataset() -> Dataset:
    """The bundled digits (1797 images, 10 classes) as 32x32 RGB images, upsampled bilinearly from 8x8."""
    arrays = np.load(DIGITS_FILE)
    images = [
        Image.fromarray((pixels.astype(np.float32) * (255 / 16)).round().astype(np.uint8))  # grey, 0-255
        .resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.BILINEAR)
        .convert("RGB")
        for pixels in arrays["images"]
    ]
    features = Features({IMAGE: ImageFeature(), LABEL: ClassLabel(names=[str(digit) for digit in range(10)])})
    return Dataset.from_dict({IMAGE: images, LABEL: arrays["labels"].tolist()}, features=features)


def digits_data(seed: int = 0) -> ImageClassificationData:
    """The bundled digits split 800 train / 200 validation / 797 test, stratified, with ``seed``."""
    rest, test = split_off(digits_dataset(), DIGITS_NUM_TEST, seed)
    train, validation = split_off(rest, DIGITS_NUM_VALIDATION, seed)
    return ImageClassificationData(DIGITS, train, validation, test)


def split_off(dataset: Dataset, size: Union[int, float], seed: int) -> tuple[Dataset, Dataset]:
    """Split ``size`` examples (a count, or a fraction if < 1) off ``dataset``, stratified by label:
    returns ``(rest, part)``."""
    if not 0 < size < len(dataset):
        raise InputError(
            f"Cannot split {size} examples off a split of {len(dataset)} images; give a size between 0 and "
            f"{len(dataset)} (a fraction < 1 or a count), or provide the split in the dataset itself."
        )
    try:
        parts = dataset.train_test_split(test_size=size, stratify_by_column=LABEL, seed=seed)
    except ValueError as error:  # e.g. a class with a single image
        print(f"Cannot stratify the split ({error}); splitting at random.")
        parts = dataset.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def load_dataset_dict(spec: str, config_name: Optional[str] = None) -> DatasetDict:
    """A ``DatasetDict`` from a ``save_to_disk`` folder, an ``imagefolder`` directory, or a Hub dataset id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = load_from_disk(str(path))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
        return load_dataset("imagefolder", data_dir=str(path))
    if path.exists():
        raise InputError(f"--dataset {spec!r} is a file; give a directory (imagefolder or save_to_disk) or a Hub id.")
    if spec.startswith((".", "/", "~")):
        raise InputError(f"--dataset {spec!r}: no such directory. Check the path.")
    try:
        return load_dataset(spec, config_name)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--dataset {spec!r} is not a local directory and could not be loaded from the Hub ({error}). Give a Hub "
            f"dataset id (with --dataset-config if it has several), an imagefolder directory, or a folder written by "
            f"`Dataset.save_to_disk`."
        ) from error


def find_columns(
    features: Features, image_column: Optional[str] = None, label_column: Optional[str] = None
) -> tuple[str, str]:
    """The image and label columns: the given names (checked), else the first ``Image`` feature and the first
    ``ClassLabel`` feature (or a column called ``label``, ``labels``, ``fine_label``, ...)."""
    described = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
    for given in (image_column, label_column):
        if given is not None and given not in features:
            raise InputError(f"The dataset has no column {given!r}; its columns are: {described}.")
    if image_column is None:
        image_column = next((name for name, f in features.items() if isinstance(f, ImageFeature)), None)
        if image_column is None:
            raise InputError(f"No image column found among: {described}. Name it with --image-column.")
    elif not isinstance(features[image_column], ImageFeature):
        raise InputError(
            f"Column {image_column!r} holds {type(features[image_column]).__name__}, not images; choose an image "
            f"column with --image-column (columns: {described})."
        )
    if label_column is None:
        candidates = [name for name, f in features.items() if isinstance(f, ClassLabel)]
        candidates += [name for name in LABEL_COLUMN_NAMES if name in features]
        if not candidates:
            raise InputError(f"No label column found among: {described}. Name it with --label-column.")
        label_column = candidates[0]
    return image_column, label_column


def standardize(dataset_dict: DatasetDict, image_column: str, label_column: str) -> DatasetDict:
    """Keep only the image and label columns, renamed ``image`` / ``label``, the label cast to a ``ClassLabel``
    (integer labels keep their values, string labels are numbered in sorted order)."""
    renamed = DatasetDict(
        {
            split: dataset.select_columns([image_column, label_column]).rename_columns(
                {image_column: IMAGE, label_column: LABEL}
            )
            for split, dataset in dataset_dict.items()
        }
    )
    feature = next(iter(renamed.values())).features[LABEL]
    if isinstance(feature, ClassLabel):
        return renamed
    values = sorted({value for dataset in renamed.values() for value in dataset[LABEL]})
    if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        if values[0] < 0:
            raise InputError(f"Label column {label_column!r} holds negative labels ({values[0]}); labels must be >= 0.")
        names = [str(index) for index in range(values[-1] + 1)]
    elif isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        names = values
    else:
        raise InputError(
            f"Label column {label_column!r} holds {feature}; labels must be class labels, integers or strings. "
            f"Choose another column with --label-column."
        )
    return renamed.cast_column(LABEL, ClassLabel(names=names))


def _split(dataset_dict: DatasetDict, name: Optional[str], role: str) -> Optional[Dataset]:
    if name is not None and name not in dataset_dict:
        raise InputError(
            f"The dataset has no split {name!r} (--{role}-split); its splits are: {', '.join(dataset_dict)}."
        )
    return dataset_dict[name] if name is not None else None


def choose_splits(
    dataset_dict: DatasetDict,
    name: str,
    train_split: str = "train",
    validation_split: Optional[str] = None,
    test_split: Optional[str] = None,
    validation_size: Union[int, float] = 0.1,
    test_size: Union[int, float] = 0.2,
    seed: int = 0,
) -> ImageClassificationData:
    """Pick the train / validation / test splits of a standardized ``DatasetDict``.

    Without a split name, ``validation`` (or ``valid`` / ``val``) and ``test`` are used if present; a split that is
    still missing is carved out of train (``*_size``: a fraction if < 1, else a count), stratified, with ``seed``.
    """
    train = _split(dataset_dict, train_split, "train")
    if validation_split is None:
        validation_split = next((split for split in VALIDATION_SPLIT_NAMES if split in dataset_dict), None)
    if test_split is None and "test" in dataset_dict:
        test_split = "test"
    test = _split(dataset_dict, test_split, "test")
    if test is None:
        train, test = split_off(train, test_size, seed)
    validation = _split(dataset_dict, validation_split, "validation")
    if validation is None:
        train, validation = split_off(train, validation_size, seed)
    return ImageClassificationData(name, train, validation, test)


def load_data(
    spec: Optional[str] = None,
    *,
    config_name: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    train_split: str = "train",
    validation_split: Optional[str] = None,
    test_split: Optional[str] = None,
    validation_size: Union[int, float] = 0.1,
    test_size: Union[int, float] = 0.2,
    seed: int = 0,
) -> ImageClassificationData:
    """Load ``spec`` (None or ``"digits"``: the bundled digits) as train / validation / test image data.

    Args:
        spec: a Hub dataset id, an ``imagefolder`` directory, a ``save_to_disk`` folder, or None for the digits.
        config_name: the Hub dataset's configuration, if it has several.
        image_column, label_column: column names; None detects them (see :func:`find_columns`).
        train_split, validation_split, test_split: split names; None picks the usual names or carves the split.
        validation_size, test_size: size of a carved split (a fraction if < 1, else a count).
        seed: seed of the carving.
    """
    if spec in (None, DIGITS):
        return digits_data(seed)
    dataset_dict = load_dataset_dict(spec, config_name)
    image_column, label_column = find_columns(next(iter(dataset_dict.values())).features, image_column, label_column)
    return choose_splits(
        standardize(dataset_dict, image_column, label_column),
        spec,
        train_split,
        validation_split,
        test_split,
        validation_size,
        test_size,
        seed,
    )


def load_image_processor(sources: Union[str, Sequence[str]], image_size: Optional[int]) -> Any:
    """The first image processor found in ``sources`` (folders or Hub ids: e.g. an adapter folder, then its base
    model); if none has one, resize to ``image_size`` and normalise with mean = std = 0.5 (the reference recipe,
    docs/method.md §6). A model without a fixed image size (SigLIP 2's NaFlex) needs its own processor."""
    backend = "torchvision" if importlib.util.find_spec("torchvision") else "pil"
    sources = [sources] if isinstance(sources, str) else list(sources)
    for source in sources:
        try:
            return AutoImageProcessor.from_pretrained(source, backend=backend)
        except OSError:
            continue
    if image_size is None:
        raise InputError(
            f"{sources[-1]} has no image processor, and the model has no fixed image size to make one for; save the "
            f"model's image processor with it (`AutoImageProcessor.from_pretrained(...).save_pretrained(folder)`)."
        )
    print(f"{sources[-1]} has no image processor: resizing to {image_size} and normalising with mean = std = 0.5.")
    return ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


class PixelTransform:
    """``Dataset.with_transform`` function: images -> the model's image inputs through an image processor
    (``pixel_values``; SigLIP 2 adds ``pixel_attention_mask`` and ``spatial_shapes``), labels -> ``labels``."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        images = [image.convert("RGB") for image in batch[IMAGE]]
        processed = self.image_processor(images=images, return_tensors="pt")
        inputs = {name: processed[name] for name in IMAGE_INPUTS if name in processed}
        return {**inputs, "labels": torch.as_tensor(batch[LABEL])}


def with_pixels(dataset: Dataset, image_processor: Any) -> Dataset:
    """``dataset`` yielding ``pixel_values`` and ``labels`` (computed on access, nothing is written to disk)."""
    return dataset.with_transform(PixelTransform(image_processor))
