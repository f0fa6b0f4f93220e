# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""SHIP's stochastic depth (``ShipConfig.drop_path_rate``, ``docs/method.md`` §5-§6), drawn once per training pass.

Every sample drops each residual branch of layer ``i`` (attention and MLP, drawn separately, as timm and the
reference do) with probability ``rate_i``; a kept branch is scaled by ``1 / (1 - rate_i)``. The same draw covers the
sample's image tokens and its prompts.

The masks of the whole pass are drawn up front, on the host, from torch's global (seeded) generator, so grouping
the samples by them never waits for the device. A sample's semantic-prompt state entering layer ``i`` depends only
on which of its branches were dropped since the level it belongs to started (a level starts with fresh prompts), so
samples with the same *history* share that state: the shared prompt path runs once per history group, a tree that
splits only where some sample's branch is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

#: The branches of a block, in the order their masks are drawn.
BRANCHES = ("attention", "mlp")


@dataclasses.dataclass(frozen=True)
class BranchScales:
    """The factor each row's residual branch is multiplied by: 0 (dropped) or ``1 / (1 - rate)`` (kept), per branch.
    ``None`` for a branch that no row drops at this layer (the branch is then added as it is)."""

    attention: Optional[torch.Tensor] = None
    mlp: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class LayerDrops:
    """The stochastic depth of one layer for a batch, and the history groups around it.

    Attributes:
        samples: each sample's branch scales at this layer ``[B]``.
        members: the history group of each sample entering this layer ``[B]`` (an index into the shared path's
            states), or None when all samples are in one group.
        parents: for each group leaving this layer, the group it came from entering it ``[G_out]``; None when no
            group splits here (group ``g`` stays ``g``).
        groups: each group's branch scales at this layer, for the groups leaving it ``[G_out]``.
    """

    samples: BranchScales
    members: Optional[torch.Tensor]
    parents: Optional[torch.Tensor]
    groups: BranchScales


@torch.compiler.disable  # host-side bookkeeping: numpy, and group counts that decide tensor shapes
def draw_drops(
    rates: Sequence[float], batch_size: int, level_starts: Sequence[int], device: torch.device
) -> list[LayerDrops]:
    """Draw every layer's masks for ``batch_size`` samples (``rates[i]``: layer ``i``'s drop probability) from
    torch's global generator, on the host, and plan the pass with them (:func:`plan_drops`)."""
    rates = np.asarray(rates, dtype=np.float64)
    keep = torch.rand(len(rates), len(BRANCHES), batch_size, dtype=torch.float64).numpy() >= rates[:, None, None]
    return plan_drops(keep, rates, level_starts, device)


def plan_drops(
    keep: np.ndarray, rates: Sequence[float], level_starts: Sequence[int], device: torch.device
) -> list[LayerDrops]:
    """The pass's stochastic depth for the masks ``keep`` ``[layers, 2, B]`` (True: the sample keeps that layer's
    attention / MLP branch), with the samples grouped by their history since the last of ``level_starts``. The
    tensors reach ``device`` in one copy for the indices and one for the scales, without waiting for it."""
    arrays = [array for layer in _histories(keep, rates, level_starts) for array in layer]
    tensors = _to_device(arrays, device)
    return [
        LayerDrops(BranchScales(*layer[0:2]), layer[2], layer[3], BranchScales(*layer[4:6]))
        for layer in zip(*[iter(tensors)] * 6)
    ]


def _histories(keep: np.ndarray, rates: np.ndarray, level_starts: Sequence[int]):
    """Per layer, as host arrays (None where not needed): the samples' attention and MLP scales, the samples' groups
    entering the layer, the parents of the groups leaving it, and those groups' attention and MLP scales."""
    batch_size = keep.shape[-1]
    history = np.zeros(batch_size, dtype=np.int64)  # each sample's group entering the layer
    for layer, rate in enumerate(rates):
        if layer in level_starts:  # fresh semantic prompts: the state entering this layer is the same for all
            history = np.zeros(batch_size, dtype=np.int64)
        # each group leaving the layer is coded (its group entering it, attention kept, MLP kept)
        codes, leaving = np.unique(history * 4 + keep[layer, 0] * 2 + keep[layer, 1], return_inverse=True)
        group_keep = np.stack([(codes >> 1) & 1, codes & 1]).astype(bool)
        yield (
            *_scales(keep[layer], rate),
            history if history.any() else None,
            codes // 4 if len(codes) > history.max() + 1 else None,
            *_scales(group_keep, rate),
        )
        history = leaving.reshape(batch_size)


def _scales(kept: np.ndarray, rate: float) -> list[Optional[np.ndarray]]:
    """``kept`` ``[2, n]`` (attention, MLP) -> each branch's scales, None for a branch nothing drops."""
    return [None if row.all() else row / (1.0 - rate) for row in kept]


def _to_device(arrays: list[Optional[np.ndarray]], device: torch.device) -> list[Optional[torch.Tensor]]:
    """The arrays as tensors on ``device`` (float32 scales, which every device holds; int64 indices): one copy per
    kind, from pinned memory without waiting on CUDA; each tensor is a view of its copy."""
    tensors: list[Optional[torch.Tensor]] = [None] * len(arrays)
    device = torch.device(device)
    for kind, dtype in ((np.float64, np.float32), (np.int64, np.int64)):
        where = [i for i, array in enumerate(arrays) if array is not None and array.dtype == kind]
        if not where:
            continue
        packed = torch.from_numpy(np.concatenate([arrays[i] for i in where]).astype(dtype))
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            packed = packed.to(device)
        for i, part in zip(where, packed.split([arrays[i].size for i in where])):
            tensors[i] = part
    return tensors
