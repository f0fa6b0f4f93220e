# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""examples/pretrain_fractal_vit.py, the script that rebuilds the bundled backbone: its fractal classes follow the
recipe, and a tiny CPU run writes a checkpoint that loads like the bundled one."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoImageProcessor, ViTForImageClassification

from ship_peft.assets import bundled_backbone_path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "pretrain_fractal_vit.py"
spec = importlib.util.spec_from_file_location("pretrain_fractal_vit", SCRIPT)
fractal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fractal)


def test_systems_follow_the_sigma_factor_rule():
    generator = torch.Generator().manual_seed(0)
    matrices, offsets, probabilities = fractal.sample_systems(500, generator)
    singular = torch.linalg.svdvals(matrices)  # [500, 4, 2], descending
    used = probabilities > 0
    num_maps = used.sum(-1)
    assert set(num_maps.tolist()) == {2, 3, 4}
    assert (singular[~used] < 1e-6).all() and (singular <= 1 + 1e-5).all()
    sigma = ((singular[..., 0] + 2 * singular[..., 1]) * used).sum(-1)
    assert ((sigma >= (5 + num_maps) / 2 - 1e-4) & (sigma <= (6 + num_maps) / 2 + 1e-4)).all()
    assert torch.allclose(probabilities.sum(-1), torch.ones(500)) and (offsets.abs() <= 1).all()


def test_classes_fill_the_canvas_and_instances_are_jittered():
    generator = torch.Generator().manual_seed(1)
    classes = fractal.make_classes(6, 3, min_fill=0.12, jitter=0.06, generator=generator)
    assert classes.matrices.shape == (6, 3, 4, 2, 2) and classes.offsets.shape == (6, 3, 4, 2)
    ratio = classes.matrices[:, 1:] / classes.matrices[:, :1].where(classes.matrices[:, :1] != 0, torch.ones(1))
    assert (ratio[classes.matrices[:, 1:] != 0] - 1).abs().max() <= 2 * 0.06 / 0.94 + 1e-6
    images, labels = fractal.training_batch(classes, 16, generator)
    assert images.shape == (16, 3, 32, 32) and labels.max() < 6
    assert images.min() >= -1 - 1e-6 and images.max() <= 1 + 1e-6
    occupancy = fractal.render(classes.matrices[:, 0], classes.offsets[:, 0], classes.probabilities, generator)
    assert ((occupancy > 0).float().mean((1, 2)) >= 0.1).all()  # jittered instances fill about as much as the class


def test_tiny_cpu_run_writes_a_checkpoint_like_the_bundled_one(tmp_path):
    argv = ["--device", "cpu", "--num-classes", "3", "--instances", "2", "--steps", "2", "--batch-size", "4"]
    argv += ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--output-dir", str(tmp_path), "--no-bf16"]
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2/2" in result.stdout
    model = ViTForImageClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 3 and model.config.layer_norm_eps == 1e-6 and model.config.patch_size == 4
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    bundled = AutoImageProcessor.from_pretrained(bundled_backbone_path(), backend="pil")
    assert processor.to_dict() == bundled.to_dict()
    defaults = fractal.parse_args([])
    bundled_config = json.loads((bundled_backbone_path() / "config.json").read_text())
    assert (defaults.hidden_size, defaults.num_layers, defaults.num_heads, defaults.num_classes) == (
        bundled_config["hidden_size"],
        bundled_config["num_hidden_layers"],
        bundled_config["num_attention_heads"],
        1000,
    )
    assert (defaults.steps, defaults.batch_size, defaults.learning_rate, defaults.weight_decay) == (
        7651,
        1024,
        1e-3,
        0.05,
    )
