# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Pictures of a run: training curves, the layer-affinity heatmap with its semantic levels, a confusion matrix, and
what SHIP looks at in an image (``ship-peft explain``).

Drawn with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

MAX_ANNOTATED_CELLS = 16  # write the numbers into heatmaps up to this many rows


def plot_training_curves(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Training losses (cross-entropy, and SHIP's matching loss dashed) and validation accuracy against epochs, for
    every method's ``Trainer`` log history."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for color, (title, history) in zip(_colors(), histories.items()):
        for key, style, name in (("classification_loss", "-", "cross-entropy"), ("matching_loss", "--", "matching")):
            points = [(entry["epoch"], entry[key]) for entry in history if key in entry]
            if points:
                loss_axes.plot(*zip(*points), style, marker=".", color=color, label=f"{title}: {name}")
        points = [(entry["epoch"], entry["eval_accuracy"]) for entry in history if "eval_accuracy" in entry]
        if points:
            accuracy_axes.plot(*zip(*points), "o-", color=color, label=title)
    loss_axes.set(title="Training losses", xlabel="epoch", ylabel="loss")
    accuracy_axes.set(title="Validation accuracy", xlabel="epoch", ylabel="top-1 accuracy")
    for axes in (loss_axes, accuracy_axes):
        if axes.has_data():
            axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_layer_affinity(
    affinity: torch.Tensor, prompt_layers: Sequence[int], path: Path, title: str = "Layer affinity"
) -> Path:
    """Heatmap of the ``[L, L]`` layer affinity with every semantic level outlined (levels start at
    ``prompt_layers``)."""
    matrix = affinity.float().cpu().numpy()
    num_layers = matrix.shape[0]
    figure = Figure(figsize=(6.5, 5.5), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="viridis", vmax=1.0)
    figure.colorbar(image, ax=axes, label="mean cosine similarity of CLS features")
    if num_layers <= MAX_ANNOTATED_CELLS:
        _annotate(axes, matrix, "{:.2f}")
    bounds = list(prompt_layers) + [num_layers]
    for start, end in zip(bounds, bounds[1:]):
        axes.add_patch(
            Rectangle((start - 0.5, start - 0.5), end - start, end - start, fill=False, edgecolor="red", linewidth=2.5)
        )
    axes.set(
        title=f"{title}\nlevels start at layers {list(prompt_layers)}",
        xlabel="layer",
        ylabel="layer",
        xticks=range(num_layers),
        yticks=range(num_layers),
    )
    return _save(figure, path)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` counts: row = true class, column = predicted class."""
    pairs = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, label_names: Sequence[str], path: Path, title: Optional[str] = None
) -> Path:
    """Confusion matrix of ``predictions`` against ``labels`` (true classes in rows)."""
    matrix = confusion_matrix(labels, predictions, len(label_names))
    size = min(4 + 0.35 * len(label_names), 16)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, label="images")
    if len(label_names) <= MAX_ANNOTATED_CELLS:
        _annotate(axes, matrix, "{:d}", dark_high=True)
    if len(label_names) <= 2 * MAX_ANNOTATED_CELLS:
        axes.set_xticks(range(len(label_names)), label_names, rotation=90)
        axes.set_yticks(range(len(label_names)), label_names)
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    axes.set(title=f"{title or 'Confusion matrix'} (accuracy {accuracy:.3f})", xlabel="predicted", ylabel="true")
    return _save(figure, path)


def _annotate(axes, matrix: np.ndarray, template: str, dark_high: bool = False) -> None:
    """Write every cell's value, in white on the dark half of the colour map."""
    middle = (matrix.max() + matrix.min()) / 2
    for (row, column), value in np.ndenumerate(matrix):
        color = "white" if (value > middle) == dark_high else "black"
        axes.text(column, row, template.format(value), ha="center", va="center", fontsize="x-small", color=color)


def _colors() -> list[str]:
    return [f"C{index}" for index in range(10)]


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


@dataclass(frozen=True)
class TokenGrid:
    """How an image's tokens lie on it: ``prefix`` tokens (class, registers) first, then a ``side`` x ``side`` grid
    of patches in raster order (square images, as the command line's image processors make them)."""

    prefix: int
    side: int

    @classmethod
    def of(cls, num_tokens: int) -> "TokenGrid":
        side = math.isqrt(num_tokens)
        return cls(num_tokens - side * side, side)

    def cell(self, token: int) -> Optional[tuple[int, int]]:
        """``(row, column)`` of a patch token; None for a prefix token."""
        return None if token < self.prefix else divmod(token - self.prefix, self.side)


def plot_explanation(
    image: Image.Image,
    attention: torch.Tensor,
    attribute_tokens: dict[int, Sequence[int]],
    matching_tokens: Sequence[int],
    title: str,
    path: Path,
) -> dict[str, list]:
    """``image`` twice: under the last layer's summary attention over its patches (left), and with the patches SHIP
    picked (right): those that built each attribute layer's prompts (filled, a colour per layer) and those the
    matching loss compares the prompts with (outlined). Returns what it drew: the cells ``[row, column]`` of each
    kind, and the picked prefix tokens (class, registers), which have no cell and are named in the legend."""
    grid = TokenGrid.of(attention.numel())
    width, height = image.size
    cell_width, cell_height = width / grid.side, height / grid.side
    figure = Figure(figsize=(10, 5.2), layout="constrained")
    attention_axes, tokens_axes = figure.subplots(1, 2)
    heat = attention[grid.prefix :].reshape(grid.side, grid.side).float().cpu().numpy()
    for axes in (attention_axes, tokens_axes):  # pixel edges at 0 ... width, as the cells
        axes.imshow(image, extent=(0, width, height, 0))
        axes.set_axis_off()
    attention_axes.imshow(heat, extent=(0, width, height, 0), alpha=0.55, cmap="inferno")
    attention_axes.set_title("last layer: where the image summary attends")
    drawn: dict[str, list] = {"prefix": []}
    layers = zip(attribute_tokens.items(), _colors())
    kinds = [(f"attribute layer {layer}", tokens, color) for (layer, tokens), color in layers]
    kinds.append(("matching loss", matching_tokens, None))  # outlined
    for name, tokens, color in kinds:
        drawn[name] = []
        for token in map(int, tokens):
            cell = grid.cell(token)
            if cell is None:
                drawn["prefix"].append([name, token])
                continue
            drawn[name].append(list(cell))
            row, column = cell
            corner = (column * cell_width, row * cell_height)
            style = {"edgecolor": "white", "facecolor": "none"} if color is None else {"color": color, "alpha": 0.45}
            tokens_axes.add_patch(Rectangle(corner, cell_width, cell_height, linewidth=2, **style))
        tokens_axes.plot([], [], "s", color=color or "white", markeredgecolor="black", label=name)
    if drawn["prefix"]:
        picked = ", ".join(f"{name}: token {token}" for name, token in drawn["prefix"])
        tokens_axes.plot([], [], " ", label=f"also picked (no cell): {picked}")
    tokens_axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    tokens_axes.set_title("the tokens SHIP picked")
    figure.suptitle(title)
    _save(figure, path)
    return drawn
