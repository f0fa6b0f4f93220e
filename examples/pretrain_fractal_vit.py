# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Rebuild ship-peft's bundled backbone ``tiny-vit-fractal-1k``: a small ViT pretrained on synthetic fractals.

No natural image is involved: 1000 classes of FractalDB-style images (Kataoka et al., "Pre-training without Natural
Images", ACCV 2020) are drawn on the GPU while training. The recipe (see
``ship_peft/assets/tiny-vit-fractal-1k/README.md``):

* a class is an iterated function system (IFS) of 2-4 affine maps whose singular values follow the sigma-factor rule
  of Anderson & Farrell ("Improving Fractal Pre-training", WACV 2022), kept when its rendering fills >= 12 % of the
  canvas; each of its 300 instances jitters every map parameter by up to 6 %;
* an image is rendered by the chaos game (96 chains x 32 steps after 8 burn-in steps) as the soft occupancy
  ``1 - exp(-count / 2)`` on 32 x 32 pixels, turned by a random multiple of 90 degrees, maybe mirrored, and painted
  with random foreground and background colours; training adds a random 4-pixel reflect-pad crop and a horizontal
  flip; pixels are normalised with mean = std = 0.5;
* ViT: image 32, patch 4, hidden 192, 12 layers, 3 heads, MLP 768, LayerNorm eps 1e-6, 1000-way head;
* AdamW (lr 1e-3, betas 0.9 / 0.999, weight decay 0.05), batch 1024, 5 % linear warm-up then cosine to 0, label
  smoothing 0.1, gradient-norm clip 1.0, bfloat16 autocast; 7,651 steps (about 300 s on one H200).

Usage (GPU; writes config.json, model.safetensors in float16, preprocessor_config.json and a README)::

    python examples/pretrain_fractal_vit.py --output-dir tiny-vit-fractal-1k

The figures to expect from it (final training accuracy about 99 %, downstream probes on digits and textures) are in
the bundled checkpoint's README. A CPU smoke run: ``--device cpu --num-classes 4 --instances 2 --steps 2
--batch-size 8 --hidden-size 32 --num-layers 2 --num-heads 2``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

IMAGE_SIZE = 32
MAX_MAPS = 4


@dataclass
class FractalClasses:
    """Affine maps ``x -> A x + b`` of every instance of every class, and the classes' map probabilities."""

    matrices: torch.Tensor  # [classes, instances, MAX_MAPS, 2, 2]
    offsets: torch.Tensor  # [classes, instances, MAX_MAPS, 2]
    probabilities: torch.Tensor  # [classes, MAX_MAPS] (0 for unused maps)


def _uniform(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(low.shape, generator=generator, device=low.device)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def sample_systems(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` random IFS of 2-4 maps with the sigma-factor rule: singular values ``s1 >= s2`` in [0, 1] with
    ``sum(s1 + 2 s2)`` uniform in ``[(5 + N) / 2, (6 + N) / 2]`` for ``N`` maps; ``A = R(theta) diag(s1, s2) R(phi) D``
    with random rotations and a random sign flip ``D``; ``b`` uniform in [-1, 1]. Map probabilities are
    proportional to ``|det A|``."""
    device = generator.device
    num_maps = torch.randint(2, MAX_MAPS + 1, (count,), generator=generator, device=device)
    remaining = _uniform((5 + num_maps) / 2, (6 + num_maps) / 2, generator)
    singular = torch.zeros(count, MAX_MAPS, 2, device=device)
    for index in range(MAX_MAPS):
        used = index < num_maps
        later = (num_maps - index - 1).clamp_min(0).float()
        share = torch.where(
            later > 0, _uniform((remaining - 3 * later).clamp_min(0), remaining.clamp_max(3), generator), remaining
        )
        first = _uniform(share / 3, share.clamp_max(1), generator)
        singular[:, index] = torch.where(used[:, None], torch.stack([first, (share - first) / 2], -1), 0.0)
        remaining = torch.where(used, remaining - share, remaining)
    shape = (count, MAX_MAPS, 2)
    angles = _uniform(torch.zeros(shape, device=device), torch.full(shape, 2 * math.pi, device=device), generator)
    signs = torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1
    matrices = _rotation(angles[..., 0]) @ torch.diag_embed(singular) @ _rotation(angles[..., 1])
    matrices = matrices @ torch.diag_embed(signs)
    offsets = _uniform(-torch.ones(shape, device=device), torch.ones(shape, device=device), generator)
    used = torch.arange(MAX_MAPS, device=device) < num_maps[:, None]
    probabilities = (matrices.det().abs() + 1e-3) * used  # a degenerate map keeps a small chance
    return matrices, offsets, probabilities / probabilities.sum(-1, keepdim=True)


def render(
    matrices: torch.Tensor,
    offsets: torch.Tensor,
    probabilities: torch.Tensor,
    generator: torch.Generator,
    chains: int = 96,
    steps: int = 32,
    burn_in: int = 8,
) -> torch.Tensor:
    """Chaos game for a batch of IFS (``[B, MAX_MAPS, 2, 2]``, ``[B, MAX_MAPS, 2]``, ``[B, MAX_MAPS]``): the soft
    occupancy ``1 - exp(-count / 2)`` of the visited points on ``[B, 32, 32]`` pixels, the attractor fitted to the
    canvas."""
    batch = matrices.shape[0]
    rows = torch.arange(batch, device=matrices.device)[:, None]
    choices = torch.multinomial(probabilities, chains * (steps + burn_in), replacement=True, generator=generator)
    choices = choices.view(batch, steps + burn_in, chains)
    point = torch.zeros(batch, chains, 2, device=matrices.device)
    visited = []
    for step in range(steps + burn_in):
        chosen = choices[:, step]
        point = (matrices[rows, chosen] @ point.unsqueeze(-1)).squeeze(-1) + offsets[rows, chosen]
        if step >= burn_in:
            visited.append(point)
    points = torch.nan_to_num(torch.cat(visited, 1), posinf=1e6, neginf=-1e6)
    low, high = points.amin(1, keepdim=True), points.amax(1, keepdim=True)
    scale = (high - low).amax(-1, keepdim=True).clamp_min(1e-6)
    pixels = (((points - (low + high) / 2) / scale + 0.5) * (IMAGE_SIZE - 1)).round().long().clamp(0, IMAGE_SIZE - 1)
    counts = torch.zeros(batch, IMAGE_SIZE * IMAGE_SIZE, device=matrices.device)
    ones = torch.ones(pixels.shape[:2], device=matrices.device)
    counts.scatter_add_(1, pixels[..., 1] * IMAGE_SIZE + pixels[..., 0], ones)
    return (1 - torch.exp(-counts / 2)).view(batch, IMAGE_SIZE, IMAGE_SIZE)


def make_classes(
    num_classes: int, instances: int, min_fill: float, jitter: float, generator: torch.Generator
) -> FractalClasses:
    """``num_classes`` IFS whose rendering fills at least ``min_fill`` of the canvas, each with ``instances``
    jittered copies (every map parameter times ``1 + U(-jitter, jitter)``)."""
    kept: list[tuple[torch.Tensor, ...]] = []
    found = 0
    while found < num_classes:
        systems = sample_systems(4 * num_classes, generator)
        filled = (render(*systems, generator) > 0).float().mean((1, 2)) >= min_fill
        kept.append(tuple(part[filled] for part in systems))
        found += int(filled.sum())
    matrices, offsets, probabilities = (torch.cat(parts)[:num_classes] for parts in zip(*kept))

    def jittered(values: torch.Tensor) -> torch.Tensor:
        copies = values.unsqueeze(1).expand(-1, instances, *values.shape[1:])
        return copies * (1 + _uniform(-jitter * torch.ones_like(copies), jitter * torch.ones_like(copies), generator))

    return FractalClasses(jittered(matrices), jittered(offsets), probabilities)


def training_batch(
    classes: FractalClasses, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of augmented, normalised fractal images ``[B, 3, 32, 32]`` and their class labels."""
    device = classes.matrices.device
    num_classes, instances = classes.matrices.shape[:2]
    labels = torch.randint(num_classes, (batch_size,), generator=generator, device=device)
    instance = torch.randint(instances, (batch_size,), generator=generator, device=device)
    occupancy = render(
        classes.matrices[labels, instance], classes.offsets[labels, instance], classes.probabilities[labels], generator
    )
    turns = torch.randint(4, (batch_size,), generator=generator, device=device)
    for quarter in range(1, 4):
        occupancy[turns == quarter] = torch.rot90(occupancy[turns == quarter], quarter, dims=(1, 2))
    mirrored = torch.rand(batch_size, generator=generator, device=device) < 0.5
    occupancy[mirrored] = occupancy[mirrored].flip(1)
    foreground, background = (torch.rand(batch_size, 3, 1, 1, generator=generator, device=device) for _ in range(2))
    images = background + occupancy[:, None] * (foreground - background)
    images = random_crop_and_flip(images, generator)
    return (images - 0.5) / 0.5, labels


def random_crop_and_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random ``padding``-pixel reflect-pad crop and horizontal flip of every image."""
    batch, _, size, _ = images.shape
    device = images.device
    padded = F.pad(images, [padding] * 4, mode="reflect")
    top, left = (torch.randint(2 * padding + 1, (batch, 1), generator=generator, device=device) for _ in range(2))
    span = torch.arange(size, device=device)
    rows, columns = top + span, left + span
    flip = torch.rand(batch, 1, generator=generator, device=device) < 0.5
    columns = torch.where(flip, columns.flip(1), columns)
    batch_index = torch.arange(batch, device=device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2)


def learning_rate_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine to 0."""
    warmup_steps = max(1, round(warmup * total))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_model(args: argparse.Namespace) -> ViTForImageClassification:
    """A randomly initialised ViT of the recipe's shape (or the sizes given)."""
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        intermediate_size=4 * args.hidden_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,
        num_labels=args.num_classes,
        attn_implementation="sdpa",
    )
    return ViTForImageClassification(config)


def train(args: argparse.Namespace) -> None:
    """Make the fractal classes, pretrain the ViT on freshly rendered batches, and save it."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    classes = make_classes(args.num_classes, args.instances, args.min_fill, args.jitter, generator)
    print(f"{args.num_classes} fractal classes x {args.instances} instances in {time.perf_counter() - start:.1f} s")
    model = build_model(args).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(0.9, 0.999),
        weight_decay=args.weight_decay,
        fused=device.type == "cuda",
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, args.steps, args.warmup)
    )
    correct = seen = 0
    start = time.perf_counter()
    for step in range(args.steps):
        images, labels = training_batch(classes, args.batch_size, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_bf16):
            logits = model(pixel_values=images).logits
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        correct += int((logits.argmax(-1) == labels).sum())
        seen += labels.numel()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1}/{args.steps}  loss {loss.item():.3f}  train accuracy {correct / seen:.3f}  "
                f"{(step + 1) * args.batch_size / elapsed:,.0f} images/s  {elapsed:.0f} s"
            )
            correct = seen = 0
    save(model, args, time.perf_counter() - start)


def save(model: ViTForImageClassification, args: argparse.Namespace, seconds: float) -> None:
    """Write the checkpoint in float16, its image processor and a short README."""
    output = Path(args.output_dir)
    model.half().save_pretrained(output)
    ViTImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(output)
    (output / "README.md").write_text(
        f"# Fractal-pretrained ViT\n\nBuilt by `examples/pretrain_fractal_vit.py` of ship-peft: {args.num_classes} "
        f"fractal classes x {args.instances} instances, {args.steps} steps of batch {args.batch_size} in "
        f"{seconds:.0f} s (seed {args.seed}). See ship-peft's `ship_peft/assets/tiny-vit-fractal-1k/README.md` for the recipe and the "
        f"figures to expect.\n",
        encoding="utf-8",
    )
    print(f"Saved to {output}/")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's flags; the defaults are the recipe."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="tiny-vit-fractal-1k")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=300, help="instances per class")
    parser.add_argument("--min-fill", type=float, default=0.12, help="least share of the canvas a class must fill")
    parser.add_argument("--jitter", type=float, default=0.06, help="relative jitter of an instance's map parameters")
    parser.add_argument("--steps", type=int, default=7651)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="share of the steps for the linear warm-up")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--no-bf16", action="store_true", help="train in float32")
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--num-heads", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=100)
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
