# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Calibration (``docs/method.md`` §1): layer affinity, semantic levels and k-means prototypes from training data.

Like PEFT's data-driven LoRA initialisers (EVA: ``get_peft_model`` then ``initialize_lora_eva_weights``), it runs
after ``get_peft_model``::

    model = get_peft_model(vit, ShipConfig())
    result = initialize_ship_weights(model, train_dataloader)
    print(result.prompt_layers, result.affinity)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import ShipConfig
from .functional import summary_features
from .layer import adapters_disabled
from .model import get_prompt_bank


@dataclass
class CalibrationResult:
    """What calibration found.

    Attributes:
        affinity: ``[L, L]`` mean over images of the cosine similarity between the image-summary features (CLS by
            default) of every pair of layers.
        prompt_layers: first layer of every semantic level (now also in the adapter's config).
        prototypes: ``[M, D]`` k-means prototypes of the last layer's image-summary features (None without attribute
            prompts).
        inertia: k-means inertia (sum of squared distances to the nearest prototype), or None.
        num_samples: number of images used.
    """

    affinity: torch.Tensor
    prompt_layers: list[int]
    prototypes: Optional[torch.Tensor]
    inertia: Optional[float]
    num_samples: int


def semantic_levels(affinity: torch.Tensor, share_threshold: float) -> list[int]:
    """Greedy grouping of docs/method.md §1: layer ``j`` starts a new level when ``affinity[start, j] < threshold``."""
    start, levels = 0, [0]
    for layer in range(1, affinity.shape[0]):
        if affinity[start, layer] < share_threshold:
            levels.append(layer)
            start = layer
    return levels


def layer_affinity(features: torch.Tensor) -> torch.Tensor:
    """``features [n, L, D]`` -> ``[L, L]`` mean over samples of the per-sample cosine-similarity matrix.

    Zero feature vectors count as similarity 0 (never NaN).
    """
    normalized = F.normalize(features.double(), dim=-1)
    return torch.einsum("nld,nmd->lm", normalized, normalized) / features.shape[0]


def _kmeans_plus_plus(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn: ``2 + log(k)`` candidates per centre, the best one kept)."""
    num_points = points.shape[0]
    num_trials = 2 + int(torch.log(torch.tensor(float(num_clusters))).item())
    first = torch.randint(num_points, (1,), generator=generator, device=generator.device).to(points.device)
    centers = [points[first[0]]]
    closest = torch.cdist(points, centers[0][None]).squeeze(1).square()
    for _ in range(1, num_clusters):
        total = closest.sum()
        if total <= 0:  # every point coincides with a centre: pick any (duplicates are allowed)
            weights = torch.ones_like(closest)
        else:
            weights = closest / total
        candidates = torch.multinomial(weights.cpu(), num_trials, replacement=True, generator=_cpu(generator))
        candidates = candidates.to(points.device)
        distances = torch.cdist(points[candidates], points).square()  # [trials, n]
        candidate_closest = torch.minimum(closest[None], distances)
        best = candidate_closest.sum(dim=1).argmin()
        centers.append(points[candidates[best]])
        closest = candidate_closest[best]
    return torch.stack(centers)


def _cpu(generator: torch.Generator) -> torch.Generator:
    if generator.device.type == "cpu":
        return generator
    cpu_generator = torch.Generator()
    cpu_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item()))
    return cpu_generator


def kmeans(
    points: torch.Tensor, num_clusters: int, seed: int = 42, max_iter: int = 300, tol: float = 1e-4
) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding, in torch on ``points``' device; returns ``(centres, inertia)``.

    Deterministic for a seed. ``tol`` is relative to the mean feature variance, as in scikit-learn. Every centre is
    the mean of its cluster's points; an empty cluster takes the point farthest from its centre.
    """
    if points.shape[0] < num_clusters:
        raise ValueError(
            f"k-means needs at least as many samples as prototypes: got {points.shape[0]} samples for "
            f"{num_clusters} prototypes. Calibrate on more images or lower `ShipConfig.num_prototypes`."
        )
    points = points.double()
    generator = torch.Generator(device=points.device).manual_seed(seed)
    centers = _kmeans_plus_plus(points, num_clusters, generator)
    threshold = tol * points.var(dim=0).mean()
    for _ in range(max_iter):
        distances = torch.cdist(points, centers).square()
        assignment = distances.argmin(dim=1)
        new_centers = _cluster_means(points, assignment, centers, distances)
        shift = (new_centers - centers).square().sum()
        centers = new_centers
        if shift <= threshold:
            break
    distances = torch.cdist(points, centers).square()
    assignment = distances.argmin(dim=1)
    centers = _cluster_means(points, assignment, centers, distances)
    inertia = (points - centers[assignment]).square().sum().item()
    return centers, inertia


def _cluster_means(
    points: torch.Tensor, assignment: torch.Tensor, centers: torch.Tensor, distances: torch.Tensor
) -> torch.Tensor:
    num_clusters = centers.shape[0]
    counts = torch.bincount(assignment, minlength=num_clusters)
    sums = torch.zeros_like(centers).index_add_(0, assignment, points)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(points.dtype)
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        own_distance = distances.gather(1, assignment[:, None]).squeeze(1)
        farthest = own_distance.topk(len(empty)).indices
        means[empty] = points[farthest]
    return means


#: The image inputs a batch may carry for the model (SigLIP 2's NaFlex batches add the padding mask and grid shapes).
IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def _image_batches(data: Union[DataLoader, Iterable, Any], batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Yield the model's image inputs (``pixel_values``, with SigLIP 2's mask and shapes) from a DataLoader of
    dicts/tuples/tensors or from a ``datasets.Dataset``."""
    if hasattr(data, "with_format") and hasattr(data, "column_names"):  # a datasets.Dataset
        if "pixel_values" not in data.column_names:
            raise ValueError(
                f"The dataset has no `pixel_values` column (columns: {data.column_names}); apply the backbone's "
                f"image processor first, e.g. with `dataset.with_transform(...)`."
            )
        columns = [name for name in IMAGE_INPUTS if name in data.column_names]
        data = DataLoader(data.with_format("torch", columns=columns), batch_size=batch_size)
    for batch in data:
        if isinstance(batch, dict) or hasattr(batch, "keys"):
            if "pixel_values" not in batch:
                raise ValueError(f"Calibration batches need a `pixel_values` entry, got keys {list(batch.keys())}.")
            yield {name: batch[name] for name in IMAGE_INPUTS if name in batch}
        elif isinstance(batch, (list, tuple)):
            yield {"pixel_values": batch[0]}
        elif isinstance(batch, torch.Tensor):
            yield {"pixel_values": batch}
        else:
            raise TypeError(
                f"Calibration batches must be dicts with `pixel_values`, (pixels, labels) tuples or tensors; got "
                f"{type(batch).__name__}."
            )


def _num_images(data: Any) -> Optional[int]:
    """Number of images in a dataset or a DataLoader over one, if known."""
    dataset = getattr(data, "dataset", data)
    try:
        return len(dataset)
    except TypeError:
        return None


@torch.no_grad()
def collect_features(
    model: nn.Module,
    data: Union[DataLoader, Iterable, Any],
    max_samples: int = 1000,
    batch_size: int = 64,
    show_progress: bool = True,
    adapter_name: str = "default",
) -> torch.Tensor:
    """The image summary of every block's output (residual stream, before the final norm) of the plain backbone:
    the CLS token, or the mean of the valid image tokens, as adapter ``adapter_name``'s ``image_summary`` says.

    The model runs with its adapters disabled, in eval mode; forward hooks on the backbone's blocks read the
    summary. Returns ``[n, L, D]`` float32 on the model's device, ``n <= max_samples``. Under
    ``torch.distributed`` each process reads its own share of the data and the features of all processes are
    gathered, in rank order.
    """
    bank = get_prompt_bank(model)
    summary = bank.summary_of(bank.ship_config[adapter_name])
    device = next(bank.base_blocks()[0].parameters()).device
    was_training = model.training
    per_block: list[torch.Tensor] = []

    def read_summary(block: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        valid = bank.backbone.block_inputs(block.base_layer, args[1:], kwargs).valid
        per_block.append(summary_features(_tensor(output), valid, summary))

    handles = [block.register_forward_hook(read_summary, with_kwargs=True) for block in bank.block_sequence[0]]
    model.eval()
    features: list[torch.Tensor] = []
    count = 0
    total = min(max_samples, _num_images(data) or max_samples)
    progress = tqdm(total=total, desc="SHIP calibration", unit="img", disable=not show_progress)
    try:
        with adapters_disabled(model):
            for inputs in _image_batches(data, batch_size):
                inputs = {name: value[: max_samples - count].to(device) for name, value in inputs.items()}
                pixel_values = inputs.pop("pixel_values")
                per_block.clear()
                model(pixel_values, **inputs)  # positional: timm models name it `x`
                features.append(torch.stack(per_block, dim=1).float())
                taken = pixel_values.shape[0]
                count += taken
                progress.update(taken)
                if count >= max_samples:
                    break
    finally:
        progress.close()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    local = torch.cat(features) if features else None
    gathered = _gather_across_processes(local, bank.num_layers, bank.hidden_size, device)
    if gathered is None or gathered.shape[0] == 0:
        raise ValueError("Calibration got no images: the data loader or dataset is empty.")
    return gathered[:max_samples]


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _gather_across_processes(
    features: Optional[torch.Tensor], num_layers: int, hidden_size: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Under ``torch.distributed``, every rank's features in rank order (so all ranks compute the same levels and
    prototypes); otherwise ``features`` unchanged."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return features
    if features is None:
        features = torch.zeros(0, num_layers, hidden_size, device=device)
    world_size = torch.distributed.get_world_size()
    count = torch.tensor([features.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    torch.distributed.all_gather(counts, count)
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros(largest, num_layers, hidden_size, device=device, dtype=features.dtype)
    padded[: features.shape[0]] = features
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)])


def initialize_ship_weights(
    model: nn.Module,
    data: Union[DataLoader, Iterable, Any],
    adapter_name: str = "default",
    max_samples: int = 1000,
    batch_size: int = 64,
    seed: int = 42,
    show_progress: bool = True,
) -> CalibrationResult:
    """Calibrate a SHIP adapter on training data (docs/method.md §1) and build its prompts.

    Runs the frozen backbone (no prompts, eval mode) over up to ``max_samples`` images, computes the layer affinity,
    the semantic levels for ``share_threshold`` (unless ``prompt_layers`` was given) and k-means prototypes of the
    last layer's image-summary features (CLS by default); then (re)creates the adapter's prompts for those levels and
    records ``prompt_layers`` in its config so ``save_pretrained`` persists it. Create the optimizer after this call.

    Args:
        model: a ``PeftModel`` (or the model inside it) with a SHIP adapter.
        data: a DataLoader yielding dicts with ``pixel_values`` (or ``(pixels, labels)``), or a ``datasets.Dataset``
            with a ``pixel_values`` column.
        adapter_name: the adapter to calibrate.
        max_samples: images used at most (the reference uses 1000).
        batch_size: batch size when ``data`` is a ``datasets.Dataset``.
        seed: seed of the k-means++ initialisation.
        show_progress: show a progress bar.
    """
    bank = get_prompt_bank(model)
    if adapter_name not in bank.ship_config:
        raise ValueError(f"No SHIP adapter named {adapter_name!r}; adapters: {sorted(bank.ship_config)}.")
    config: ShipConfig = bank.ship_config[adapter_name]
    features = collect_features(model, data, max_samples, batch_size, show_progress, adapter_name)
    affinity = layer_affinity(features)
    prompt_layers = config.prompt_layers or semantic_levels(affinity, config.share_threshold)
    config.prompt_layers = prompt_layers
    prototypes, inertia = None, None
    if config.attribute_layers():
        prototypes, inertia = kmeans(features[:, -1], config.num_prototypes, seed=seed)
    bank.update_layer(adapter_name, config)
    ship_prompts = bank.ship_prompts[adapter_name]
    if prototypes is not None:
        ship_prompts.prototypes.copy_(prototypes.to(ship_prompts.prototypes.dtype))
    if adapter_name not in bank.active_adapters:
        ship_prompts.requires_grad_(False)
    return CalibrationResult(affinity.float().cpu(), list(prompt_layers), prototypes, inertia, features.shape[0])
