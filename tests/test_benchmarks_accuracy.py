# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The accuracy benchmark's tasks (shapes, labels, determinism, balance) and one ``--quick`` run end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy  # noqa: E402
import tasks  # noqa: E402

SIZES = {"train": 30, "validation": 12, "test": 18}
HAVE_SKIMAGE = importlib.util.find_spec("skimage") is not None
TASKS = [t for t in tasks.TASKS if t != "textures" or HAVE_SKIMAGE]


@pytest.mark.parametrize("name", TASKS)
def test_task_shapes_labels_and_determinism(name):
    data = tasks.load_task(name, SIZES, seed=0)
    again = tasks.load_task(name, SIZES, seed=0)
    assert data.num_classes == tasks.NUM_CLASSES[name]
    for split in tasks.SPLITS:
        images, labels = data.images[split], data.labels[split]
        assert images.shape == (SIZES[split], 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (SIZES[split],) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() < data.num_classes
        np.testing.assert_array_equal(images, again.images[split])
        np.testing.assert_array_equal(labels, again.labels[split])
        counts = np.bincount(labels, minlength=data.num_classes)
        assert counts.max() - counts.min() <= 1, counts  # balanced (digits: stratified)
        assert images.std() > 5  # not blank
    if name != "digits":  # another data seed gives other images
        other = tasks.load_task(name, SIZES, seed=1)
        assert not np.array_equal(other.images["train"], data.images["train"])


def test_splits_differ_and_bad_task():
    data = tasks.load_task("counting", SIZES)
    assert not np.array_equal(data.images["train"][:12], data.images["validation"])
    with pytest.raises(ValueError, match="Unknown task"):
        tasks.load_task("nope", SIZES)


def test_counting_labels_match_rendering():
    """The counting renderer draws label + 1 separate dots (connected components of the foreground)."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for label in range(6):
        image = tasks._counting(label, rng).astype(float)
        background = np.median(image.reshape(-1, 3), axis=0)
        mask = np.abs(image - background).sum(-1) > 90
        assert ndimage.label(mask)[1] == label + 1


def test_quick_run_end_to_end(tmp_path):
    result = accuracy.main(["--quick", "--tasks", "counting", "--methods", "linear", "ship",
                            "--output-dir", str(tmp_path)])
    rows = result["runs"]
    assert {(r["method"], r["seed"]) for r in rows} == {("linear", 0), ("ship", 0)}
    for row in rows:
        for key in ("task", "group", "method", "seed", "lr", "val_acc", "test_acc", "trainable_params",
                    "total_seconds", "final"):
            assert key in row
        assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
        assert row["trainable_params"] > 0 and row["final"]
    assert rows[1]["prompt_layers"][0] == 0
    saved = json.loads((tmp_path / "accuracy_quick.json").read_text())
    assert set(saved["summary"]) == {"linear/counting", "ship/counting"}
    assert "counting" in (tmp_path / "accuracy_quick.md").read_text()
