# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""``ship-peft predict``: the top-k labels of a saved SHIP adapter for image files, folders or globs."""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..calibration import IMAGE_INPUTS
from .errors import InputError

#: File suffixes taken from a folder (a file named on the command line is read whatever its suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: ``--output`` formats, by suffix.
OUTPUT_FORMATS = (".csv", ".jsonl")


@dataclass
class Prediction:
    """One image's top-k labels, best first, with their probabilities."""

    path: str
    labels: list[str]
    probabilities: list[float]


@dataclass
class Skipped:
    """An image that was not classified, and why."""

    path: str
    reason: str


@dataclass
class PredictOutcome:
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def image_paths(inputs: Sequence[str]) -> list[Path]:
    """The image files that ``inputs`` name: files as given, folders' image files (recursively, sorted), globs'
    matches (``**`` included); an input that names nothing is an error, before any work."""
    paths: list[Path] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(match) for match in glob.glob(str(path), recursive=True) if Path(match).is_file())
        if not found:
            raise InputError(f"{text!r} names no image file (not a file, a folder with images, or a matching glob).")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def check_output(output: str | None) -> None:
    if output is not None and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise InputError(f"--output {output!r}: give a .csv or a .jsonl file.")


def read_image(path: Path, mode: str = "RGB") -> Image.Image | str:
    """The image at ``path``, or why it cannot be classified (unreadable, or another mode than ``mode``)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != mode:
                return (
                    f"a {image.mode} image; the model takes {mode}: convert it first "
                    f"(`Image.open(path).convert({mode!r})`)"
                )
            return image.copy()
    except (OSError, UnidentifiedImageError, ValueError) as error:
        return f"unreadable ({type(error).__name__}: {error})"


def batches(paths: Sequence[Path], batch_size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(paths), batch_size):
        yield paths[start : start + batch_size]


def predict_images(
    model: torch.nn.Module,
    processor: Any,
    label_names: list[str],
    paths: Sequence[Path],
    top_k: int,
    batch_size: int,
    show_progress: bool = True,
) -> PredictOutcome:
    """Classify ``paths`` in batches; unreadable images and images of another mode are skipped, not fatal."""
    outcome = PredictOutcome()
    device = next(model.parameters()).device
    k = min(top_k, len(label_names))
    progress = tqdm(total=len(paths), unit="img", disable=not show_progress, desc="predict")
    for batch in batches(paths, batch_size):
        images, kept = [], []
        for path in batch:
            image = read_image(path)
            if isinstance(image, str):
                outcome.skipped.append(Skipped(str(path), image))
            else:
                images.append(image)
                kept.append(path)
        if images:
            processed = processor(images, return_tensors="pt")
            inputs = {name: processed[name].to(device) for name in IMAGE_INPUTS if name in processed}
            with torch.no_grad():
                probabilities = model(**inputs).logits.float().softmax(dim=-1)
            top = probabilities.topk(k, dim=-1)
            for path, values, indices in zip(kept, top.values.tolist(), top.indices.tolist()):
                outcome.predictions.append(Prediction(str(path), [label_names[i] for i in indices], values))
        progress.update(len(batch))
    progress.close()
    return outcome


def write_predictions(predictions: Sequence[Prediction], output: Path) -> None:
    """``.jsonl``: one object per image; ``.csv``: one row per image, ``label_1, probability_1, ...``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".jsonl":
        with output.open("w", encoding="utf-8") as handle:
            for prediction in predictions:
                pairs = zip(prediction.labels, prediction.probabilities)
                entries = [{"label": label, "probability": probability} for label, probability in pairs]
                handle.write(json.dumps({"path": prediction.path, "predictions": entries}) + "\n")
        return
    k = max((len(prediction.labels) for prediction in predictions), default=0)
    with output.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        columns = [name for rank in range(1, k + 1) for name in (f"label_{rank}", f"probability_{rank}")]
        writer.writerow(["path", *columns])
        for prediction in predictions:
            cells = [cell for pair in zip(prediction.labels, prediction.probabilities) for cell in pair]
            writer.writerow([prediction.path, *cells])
