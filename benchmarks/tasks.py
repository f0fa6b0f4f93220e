# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Offline image-classification tasks for the accuracy benchmark (``benchmarks/accuracy.py``).

Every task is a set of 32x32 RGB ``uint8`` images with integer labels, split train / validation / test, built without
any download and deterministically from a seed (the data seed is fixed; the training seeds of the benchmark only
change initialisation and batch order).

Natural group (real images, bundled with a package):

* ``digits``   scikit-learn's 8x8 handwritten digits (the copy bundled in ``ship_peft/assets/digits``), upsampled
               bilinearly to 32x32 grey-as-RGB; 10 classes; the splits are drawn stratified from the 1,797 images.
* ``textures`` 32x32 crops of 10 photos bundled in the scikit-image wheel (``skimage.data``: astronaut, brick,
               camera, chelsea, coffee, coins, grass, gravel, moon, rocket; no download); the class is the photo.
               Crops are square, side 32-64 px resized to 32, randomly flipped. To keep test crops from overlapping
               training crops, each photo is cut into horizontal bands: rows 0-55 % give train crops, 55-75 %
               validation, 75-100 % test; so the test also measures generalisation to another part of the photo.

Structured group (rendered procedurally with numpy + PIL, in the spirit of VTAB's structured tasks; random
background and object colours, Gaussian pixel noise of std 8/255):

* ``counting``    1-6 non-overlapping dots (radius 2-3); the class is the count - 1 (6 classes; cf. CLEVR-count);
* ``position``    one square (side 4-8) at a random place; the class is the bin of its centre's x coordinate
                  (5 bins; cf. dSprites-location);
* ``orientation`` one bar (length 14-22, width 3) at a random place; the class is its angle in 6 bins of 30 degrees
                  over [0, 180) (cf. dSprites-orientation);
* ``distance``    one disc at a random place plus 0-2 small distractor squares; the class is the disc's radius in
                  5 bins (2-3, 4-5, 6-7, 8-9, 10-11 px): a near object looks bigger (cf. CLEVR-distance / KITTI-dist).

Structured labels are balanced: split of ``n`` images holds every class ``n // C`` or ``n // C + 1`` times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SPLITS = ("train", "validation", "test")
#: Default split sizes (images per split, every task).
DEFAULT_SIZES = {"train": 500, "validation": 200, "test": 500}
NATURAL_TASKS = ("digits", "textures")
STRUCTURED_TASKS = ("counting", "position", "orientation", "distance")
TASKS = NATURAL_TASKS + STRUCTURED_TASKS
TEXTURE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "moon", "rocket")
TEXTURE_BANDS = {"train": (0.0, 0.55), "validation": (0.55, 0.75), "test": (0.75, 1.0)}
NUM_CLASSES = {
    "digits": 10,
    "textures": len(TEXTURE_PHOTOS),
    "counting": 6,
    "position": 5,
    "orientation": 6,
    "distance": 5,
}
GROUP = {**{task: "natural" for task in NATURAL_TASKS}, **{task: "structured" for task in STRUCTURED_TASKS}}
NOISE_STD = 8.0


@dataclass
class TaskData:
    """One task: ``images[split]`` is ``uint8 [n, 32, 32, 3]``, ``labels[split]`` is ``int64 [n]``."""

    name: str
    num_classes: int
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    @property
    def group(self) -> str:
        return GROUP[self.name]

    def describe(self) -> str:
        sizes = " / ".join(str(len(self.labels[split])) for split in SPLITS)
        return f"{self.name} ({self.group}, {self.num_classes} classes, {sizes} train / val / test)"


def _rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, TASKS.index(task), SPLITS.index(split)])


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels, every class ``n // C`` or ``n // C + 1`` times, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background colour and a foreground colour that differ clearly in brightness."""
    while True:
        background = rng.integers(0, 256, 3)
        foreground = rng.integers(0, 256, 3)
        if abs(int(background.mean()) - int(foreground.mean())) >= 60:
            return tuple(int(v) for v in background), tuple(int(v) for v in foreground)


def _finish(canvas: Image.Image, rng: np.random.Generator) -> np.ndarray:
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, NOISE_STD, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def _counting(label: int, rng: np.random.Generator) -> np.ndarray:
    background, foreground = _colours(rng)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < label + 1:
        radius = float(rng.uniform(2.0, 3.5))
        x, y = rng.uniform(radius + 1, IMAGE_SIZE - radius - 1, 2)
        if all(math.hypot(x - px, y - py) > radius + pr + 2 for px, py, pr in placed):
            placed.append((x, y, radius))
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=foreground)
    return _finish(canvas, rng)


def _position(label: int, rng: np.random.Generator, num_bins: int = 5) -> np.ndarray:
    background, foreground = _colours(rng)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    side = float(rng.uniform(4, 8))
    low, high = side / 2, IMAGE_SIZE - side / 2  # centre range; bins split it evenly
    width = (high - low) / num_bins
    x = float(rng.uniform(low + label * width + 0.5, low + (label + 1) * width - 0.5))
    y = float(rng.uniform(low, high))
    ImageDraw.Draw(canvas).rectangle([x - side / 2, y - side / 2, x + side / 2, y + side / 2], fill=foreground)
    return _finish(canvas, rng)


def _orientation(label: int, rng: np.random.Generator, num_bins: int = 6) -> np.ndarray:
    background, foreground = _colours(rng)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    step = 180.0 / num_bins
    angle = math.radians(float(rng.uniform(label * step + 2, (label + 1) * step - 2)))
    length, width = float(rng.uniform(14, 22)), 3.0
    cx, cy = rng.uniform(length / 2 - 2, IMAGE_SIZE - length / 2 + 2, 2)
    dx, dy = math.cos(angle) * length / 2, -math.sin(angle) * length / 2  # image y grows downwards
    nx, ny = -dy / (length / 2) * width / 2, dx / (length / 2) * width / 2
    corners = [(cx + dx + nx, cy + dy + ny), (cx + dx - nx, cy + dy - ny), (cx - dx - nx, cy - dy - ny),
               (cx - dx + nx, cy - dy + ny)]
    ImageDraw.Draw(canvas).polygon(corners, fill=foreground)
    return _finish(canvas, rng)


def _distance(label: int, rng: np.random.Generator) -> np.ndarray:
    background, foreground = _colours(rng)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 3))):  # distractors: small squares of another colour
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        side = float(rng.uniform(2, 4))
        x, y = rng.uniform(side, IMAGE_SIZE - side, 2)
        draw.rectangle([x, y, x + side, y + side], fill=colour)
    radius = float(rng.uniform(2 + 2 * label, 4 + 2 * label - 0.01))
    x, y = rng.uniform(radius, IMAGE_SIZE - radius, 2)
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=foreground)
    return _finish(canvas, rng)


RENDERERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "counting": _counting,
    "position": _position,
    "orientation": _orientation,
    "distance": _distance,
}


def structured_task(name: str, sizes: dict[str, int], seed: int = 0) -> TaskData:
    """A procedurally rendered task (see the module docstring), deterministic for ``seed``."""
    render = RENDERERS[name]
    images, labels = {}, {}
    for split in SPLITS:
        rng = _rng(seed, name, split)
        labels[split] = balanced_labels(sizes[split], NUM_CLASSES[name], rng)
        images[split] = np.stack([render(int(label), rng) for label in labels[split]])
    return TaskData(name, NUM_CLASSES[name], images, labels)


def digits_task(sizes: dict[str, int], seed: int = 0) -> TaskData:
    """The bundled digits, stratified into splits of ``sizes`` (their sum must not exceed 1,797)."""
    from ship_peft.assets import DIGITS_FILE

    arrays = np.load(DIGITS_FILE)
    raw, all_labels = arrays["images"], arrays["labels"].astype(np.int64)
    total = sum(sizes[split] for split in SPLITS)
    if total > len(all_labels):
        raise ValueError(f"digits has {len(all_labels)} images; the splits ask for {total}.")
    rng = _rng(seed, "digits", "train")
    # stratified: interleave the classes (each shuffled), then take consecutive slices
    per_class = [rng.permutation(np.flatnonzero(all_labels == c)) for c in range(10)]
    order = [index for rank in range(max(map(len, per_class))) for group in per_class if rank < len(group)
             for index in [group[rank]]]
    images, labels, start = {}, {}, 0
    for split in SPLITS:
        chosen = np.array(order[start:start + sizes[split]])
        start += sizes[split]
        chosen = chosen[rng.permutation(len(chosen))]
        labels[split] = all_labels[chosen]
        images[split] = np.stack([
            np.asarray(
                Image.fromarray((raw[i].astype(np.float32) * (255 / 16)).round().astype(np.uint8))
                .resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                .convert("RGB")
            )
            for i in chosen
        ])
    return TaskData("digits", 10, images, labels)


def _texture_photos() -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The textures task crops photos bundled with scikit-image (no download): `pip install scikit-image`, "
            "or leave the task out (--tasks)."
        ) from error
    photos = []
    for name in TEXTURE_PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())
        if photo.ndim == 2:
            photo = np.repeat(photo[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(photo[:, :, :3]).astype(np.uint8))
    return photos


def textures_task(sizes: dict[str, int], seed: int = 0) -> TaskData:
    """32x32 crops of the 10 scikit-image photos; the class is the photo; splits come from disjoint bands."""
    photos = _texture_photos()
    images, labels = {}, {}
    for split in SPLITS:
        rng = _rng(seed, "textures", split)
        labels[split] = balanced_labels(sizes[split], len(photos), rng)
        crops = []
        for label in labels[split]:
            photo = photos[label]
            height, width = photo.shape[:2]
            top_fraction, bottom_fraction = TEXTURE_BANDS[split]
            top, bottom = int(top_fraction * height), int(bottom_fraction * height)
            side = int(rng.integers(32, min(64, bottom - top) + 1))
            y = int(rng.integers(top, bottom - side + 1))
            x = int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crops.append(np.asarray(crop))
        images[split] = np.stack(crops)
    return TaskData("textures", len(photos), images, labels)


def load_task(name: str, sizes: dict[str, int] | None = None, seed: int = 0) -> TaskData:
    """Task ``name`` (one of :data:`TASKS`) with split ``sizes`` (default :data:`DEFAULT_SIZES`)."""
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    if name == "digits":
        return digits_task(sizes, seed)
    if name == "textures":
        return textures_task(sizes, seed)
    if name in RENDERERS:
        return structured_task(name, sizes, seed)
    raise ValueError(f"Unknown task {name!r}; choose among {', '.join(TASKS)}.")
