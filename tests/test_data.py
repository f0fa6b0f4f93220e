# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""ship_peft.app.data: the bundled digits, datasets from disk / imagefolder / the Hub, columns, splits, pixels.

Also the builders the CLI and training tests share: tiny image datasets (saved to disk or as an imagefolder) and a
tiny random ViT saved to a folder.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from ship_peft.app import data as ship_data
from ship_peft.assets import BUNDLED_BACKBONE, resolve_model_path
from ship_peft.app.data import load_data, load_image_processor, with_pixels
from ship_peft.app.errors import InputError

from utils import tiny_vit


def tiny_images(count: int, num_classes: int = 3, size: int = 16, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """``count`` RGB images whose class is a colour (so that a tiny model can learn it) plus noise."""
    rng = np.random.default_rng(seed)
    labels = [index % num_classes for index in range(count)]
    images = []
    for label in labels:
        pixels = rng.integers(0, 60, (size, size, 3))
        pixels[..., label % 3] += 150 + 30 * (label // 3)
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    return images, labels


def tiny_dataset_dict(splits: dict[str, int], num_classes: int = 3, image="img", label="fine_label") -> DatasetDict:
    """A ``DatasetDict`` with custom column names (an image column and a ClassLabel column) and the given splits."""
    features = Features({image: ImageFeature(), label: ClassLabel(names=[f"class{i}" for i in range(num_classes)])})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                dict(zip((image, label), tiny_images(count, num_classes, seed=seed))), features=features
            )
            for seed, (split, count) in enumerate(splits.items())
        }
    )


def save_dataset(tmp_path: Path, splits: dict[str, int], num_classes: int = 3, **columns) -> Path:
    """``tiny_dataset_dict`` written with ``save_to_disk``; returns its folder."""
    folder = tmp_path / "saved_dataset"
    tiny_dataset_dict(splits, num_classes, **columns).save_to_disk(str(folder))
    return folder


def save_imagefolder(tmp_path: Path, splits: dict[str, int], num_classes: int = 3) -> Path:
    """An ``imagefolder`` directory ``<split>/<class>/<n>.png``; returns its root."""
    root = tmp_path / "imagefolder"
    for seed, (split, count) in enumerate(splits.items()):
        for index, (image, label) in enumerate(zip(*tiny_images(count, num_classes, seed=seed))):
            path = root / split / f"class{label}" / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return root


def save_tiny_vit(tmp_path: Path, name: str = "tiny_vit", **overrides) -> Path:
    """A tiny random ``ViTForImageClassification`` (16x16 images, 4 layers, 3 labels) saved with ``save_pretrained``."""
    folder = tmp_path / name
    tiny_vit(**overrides).save_pretrained(folder)
    return folder


def test_digits_are_scikit_learns_digits_split_800_200_797_stratified():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    arrays = np.load(ship_data.DIGITS_FILE)
    np.testing.assert_array_equal(arrays["images"], digits.images)
    np.testing.assert_array_equal(arrays["labels"], digits.target)

    data = load_data()  # no spec: the bundled digits
    assert data.name == "digits" and data.label_names == [str(d) for d in range(10)]
    assert (len(data.train), len(data.validation), len(data.test)) == (800, 200, 797)
    total = Counter(digits.target.tolist())
    for split, size in ((data.train, 800), (data.validation, 200), (data.test, 797)):
        counts = Counter(split["label"])
        assert all(abs(counts[c] - total[c] * size / 1797) <= 1 for c in range(10)), counts
    assert (
        sum((Counter(data.train["label"]) + Counter(data.validation["label"]) + Counter(data.test["label"])).values())
        == 1797
    )
    image = data.train[0]["image"]
    assert image.size == (32, 32) and image.mode == "RGB"
    again = load_data("digits")
    assert again.test["label"] == data.test["label"]
    assert load_data(seed=1).test["label"] != data.test["label"]


def test_digits_pixels_are_the_8x8_counts_upsampled_bilinearly():
    image = np.asarray(ship_data.digits_dataset()[0]["image"]).astype(np.float64)
    counts = torch.tensor(np.load(ship_data.DIGITS_FILE)["images"][0].astype(np.float64) * 255 / 16)
    expected = F.interpolate(counts[None, None], size=32, mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(image[..., 0], expected, atol=1.0)  # 8-bit rounding
    assert (image[..., 0] == image[..., 2]).all()  # grey


def test_saved_dataset_columns_are_detected_and_validation_is_carved(tmp_path):
    folder = save_dataset(tmp_path, {"train": 30, "test": 9})
    data = load_data(str(folder), validation_size=6, seed=3)
    assert (len(data.train), len(data.validation), len(data.test)) == (24, 6, 9)
    assert data.label_names == ["class0", "class1", "class2"]
    assert data.train.column_names == ["image", "label"]
    assert sorted(Counter(data.validation["label"]).values()) == [2, 2, 2]  # stratified


def test_saved_single_dataset_gets_test_and_validation_carved(tmp_path):
    folder = tmp_path / "single"
    tiny_dataset_dict({"train": 50})["train"].save_to_disk(str(folder))
    data = load_data(str(folder), validation_size=0.2, test_size=10)
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 8, 10)


def test_imagefolder_directory_labels_come_from_folder_names(tmp_path):
    root = save_imagefolder(tmp_path, {"train": 12, "validation": 6, "test": 6})
    data = load_data(str(root))
    assert (len(data.train), len(data.validation), len(data.test)) == (12, 6, 6)
    assert data.label_names == ["class0", "class1", "class2"]
    assert Counter(data.test["label"]) == {0: 2, 1: 2, 2: 2}


def test_named_columns_and_splits_are_checked(tmp_path):
    folder = save_dataset(tmp_path, {"train": 12, "val": 6, "test": 6}, image="picture", label="y")
    data = load_data(str(folder), image_column="picture", label_column="y")
    assert len(data.validation) == 6  # "val" is recognised as the validation split
    with pytest.raises(InputError, match=r"no column 'photo'.*picture \(Image\)"):
        load_data(str(folder), image_column="photo")
    with pytest.raises(InputError, match=r"Column 'y' holds ClassLabel, not images"):
        load_data(str(folder), image_column="y")
    with pytest.raises(InputError, match=r"no split 'holdout' \(--test-split\).*train, val, test"):
        load_data(str(folder), test_split="holdout")


def test_missing_image_or_label_column_names_the_flag(tmp_path):
    no_image = tmp_path / "no_image"
    DatasetDict(train=Dataset.from_dict({"x": [1, 2], "label": [0, 1]})).save_to_disk(str(no_image))
    with pytest.raises(InputError, match="No image column found among: x \\(Value\\).*--image-column"):
        load_data(str(no_image))
    no_label = tmp_path / "no_label"
    images, _ = tiny_images(4)
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    DatasetDict(train=Dataset.from_dict({"image": images, "caption": list("abcd")}, features=features)).save_to_disk(
        str(no_label)
    )
    with pytest.raises(InputError, match="No label column found.*--label-column"):
        load_data(str(no_label))


def test_integer_and_string_labels_become_class_labels(tmp_path):
    images, _ = tiny_images(12)
    integers = tmp_path / "integers"
    ints = [0, 2, 5, 2] * 3
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    DatasetDict(train=Dataset.from_dict({"image": images, "label": ints}, features=features)).save_to_disk(
        str(integers)
    )
    data = load_data(str(integers), validation_size=3, test_size=3)
    assert data.label_names == ["0", "1", "2", "3", "4", "5"]  # values kept: label 5 is still class 5
    assert sorted(set(data.train["label"]) | set(data.test["label"]) | set(data.validation["label"])) == [0, 2, 5]
    strings = tmp_path / "strings"
    features = Features({"image": ImageFeature(), "label": Value("string")})
    names = ["cat", "ant", "dog"] * 4
    DatasetDict(train=Dataset.from_dict({"image": images, "label": names}, features=features)).save_to_disk(
        str(strings)
    )
    data = load_data(str(strings), validation_size=3, test_size=3)
    assert data.label_names == ["ant", "cat", "dog"]
    example = data.train[0]
    assert data.label_names[example["label"]] in {"ant", "cat", "dog"}


def test_unreadable_dataset_specs_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no such directory"):
        load_data(str(tmp_path / "missing"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        load_data(str(a_file))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/data' on the Hub")

    monkeypatch.setattr(ship_data, "load_dataset", offline)
    with pytest.raises(InputError, match=r"could not be loaded from the Hub \(Couldn't reach"):
        load_data("someone/data")


def test_split_sizes_out_of_range_are_clear_errors(tmp_path):
    folder = save_dataset(tmp_path, {"train": 10})
    with pytest.raises(InputError, match="Cannot split 20 examples off a split of 8 images"):
        load_data(str(folder), test_size=2, validation_size=20)


def test_pixels_come_from_the_models_processor_or_the_recipes_fallback(tmp_path, capsys):
    data = ship_data.choose_splits(
        ship_data.standardize(tiny_dataset_dict({"train": 9, "validation": 3, "test": 3}), "img", "fine_label"), "tiny"
    )
    folder = save_tiny_vit(tmp_path)
    processor = load_image_processor(str(folder), 16)
    assert "no image processor" in capsys.readouterr().out
    example = with_pixels(data.test, processor)[0]
    assert example["pixel_values"].shape == (3, 16, 16)
    assert -1.0 <= float(example["pixel_values"].min()) and float(example["pixel_values"].max()) <= 1.0
    assert int(example["labels"]) == data.test[0]["label"]

    bundled = load_image_processor(resolve_model_path(BUNDLED_BACKBONE), 224)  # its own config wins: 32x32
    batch = with_pixels(load_data().test.select(range(2)), bundled)[:2]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert float(batch["pixel_values"].min()) == pytest.approx(-1.0, abs=0.02)  # mean = std = 0.5
