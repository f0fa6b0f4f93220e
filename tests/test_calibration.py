# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Calibration (docs/method.md §1): affinity, greedy levels, k-means prototypes, and their errors."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader, TensorDataset

import ship_peft
from ship_peft import ShipConfig, initialize_ship_weights, kmeans, layer_affinity, semantic_levels

from utils import pixels, tiny_vit


def test_grouping_reproduces_the_authors_levels(shared_dir):
    grouping = shared_dir / "reference-outputs" / "grouping"
    expected = json.loads((grouping / "levels.json").read_text())["levels"]
    checked = 0
    for task, by_threshold in expected.items():
        affinity = torch.from_numpy(np.load(grouping / f"{task}.npy"))
        for threshold, levels in by_threshold.items():
            assert semantic_levels(affinity, float(threshold)) == levels, (task, threshold)
            checked += 1
    assert len(expected) == 19 and checked >= 19


def test_levels_from_hand_made_features():
    # Layer features of one image: layers 0-1 identical, 2-3 identical, 4 orthogonal to everything.
    # Pairwise cosines: cos(0,2) = cos(45 deg) = 0.707..., cos(x, 4) = 0.
    e0, e1, e2 = torch.eye(3)
    a, b = e0, (e0 + e1) / 2**0.5
    features = torch.stack([a, a, b, b, e2]).unsqueeze(0).repeat(5, 1, 1)
    affinity = layer_affinity(features)
    assert affinity[0, 1] == pytest.approx(1.0) and affinity[0, 2] == pytest.approx(2**-0.5)
    assert affinity[2, 4] == pytest.approx(0.0)
    assert semantic_levels(affinity, 0.95) == [0, 2, 4]
    assert semantic_levels(affinity, 0.5) == [0, 4]
    assert semantic_levels(layer_affinity(features + 1e-3 * torch.randn_like(features)), 1.0) == [0, 1, 2, 3, 4]


def test_zero_features_give_no_nan():
    features = torch.zeros(4, 3, 8)
    features[:, 0] = 1.0
    affinity = layer_affinity(features)
    assert torch.isfinite(affinity).all()
    assert affinity[0, 1] == 0.0


def test_kmeans_matches_scikit_learn_inertia():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 16, generator=generator) * 4
    points = centres[torch.randint(12, (600,), generator=generator)] + torch.randn(600, 16, generator=generator)
    ours, inertia = kmeans(points, 12, seed=42)
    reference = sklearn_cluster.KMeans(n_clusters=12, random_state=42, n_init=1).fit(points.double().numpy())
    assert inertia <= reference.inertia_ * 1.02
    recomputed = torch.cdist(points.double(), ours).square().min(dim=1).values.sum().item()
    assert inertia == pytest.approx(recomputed)


def test_kmeans_is_deterministic_for_a_seed_and_handles_duplicates():
    points = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    first, _ = kmeans(points, 8, seed=3)
    second, _ = kmeans(points, 8, seed=3)
    assert torch.equal(first, second)
    duplicates = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(10, 1)  # 2 distinct points, 5 clusters
    centres, inertia = kmeans(duplicates, 5)
    assert torch.isfinite(centres).all() and inertia == pytest.approx(0.0)


def test_kmeans_with_fewer_samples_than_prototypes_is_an_error():
    with pytest.raises(ValueError, match="got 3 samples for 5 prototypes.*num_prototypes"):
        kmeans(torch.randn(3, 4), 5)


def independent_cls_features(vit, images):
    with torch.no_grad():
        hidden = vit.vit(images, output_hidden_states=True).hidden_states[1:]
    return torch.stack([h[:, 0] for h in hidden], dim=1)


def test_calibration_end_to_end_builds_prompts_and_persists_levels(tmp_path):
    images = pixels(24, seed=2)
    model = get_peft_model(tiny_vit(seed=3), ShipConfig(num_prompts=2, share_threshold=0.97, num_prototypes=6))
    loader = DataLoader(TensorDataset(images, torch.zeros(24, dtype=torch.long)), batch_size=10)
    result = initialize_ship_weights(model, loader, show_progress=False)

    features = independent_cls_features(tiny_vit(seed=3), images)
    normed = torch.nn.functional.normalize(features.double(), dim=-1)
    expected_affinity = sum(f @ f.T for f in normed) / len(normed)
    torch.testing.assert_close(result.affinity, expected_affinity.float())
    assert result.prompt_layers == semantic_levels(expected_affinity, 0.97)
    assert len(result.prompt_layers) > 1, "pick a threshold that splits the tiny model into levels"
    assert model.peft_config["default"].prompt_layers == result.prompt_layers
    layer = ship_peft.get_prompt_bank(model)
    prompts = layer.ship_prompts["default"]
    assert len(prompts.semantic_prompts) == len(result.prompt_layers)
    assert torch.equal(prompts.prototypes, result.prototypes.float())
    assert all(p.requires_grad for p in prompts.parameters())
    assert result.num_samples == 24

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_vit(seed=3), tmp_path)
    assert reloaded.peft_config["default"].prompt_layers == result.prompt_layers
    torch.testing.assert_close(reloaded(pixel_values=images[:3]).logits, model(pixel_values=images[:3]).logits)


def test_calibration_accepts_a_datasets_dataset_and_keeps_given_levels():
    data = Dataset.from_dict({"pixel_values": pixels(12, seed=4).numpy(), "label": [0] * 12})
    model = get_peft_model(tiny_vit(), ShipConfig(num_prompts=2, prompt_layers=[0, 3], num_prototypes=4))
    result = initialize_ship_weights(model, data, max_samples=10, show_progress=False)
    assert result.prompt_layers == [0, 3] and result.num_samples == 10
    model(pixel_values=pixels(2))  # usable now: prototypes exist


def test_calibration_is_deterministic_for_a_seed():
    images = pixels(16, seed=5)
    runs = []
    for _ in range(2):
        model = get_peft_model(tiny_vit(), ShipConfig(num_prompts=2, num_prototypes=4))
        runs.append(initialize_ship_weights(model, [{"pixel_values": images}], seed=7, show_progress=False))
    assert runs[0].prompt_layers == runs[1].prompt_layers
    assert torch.equal(runs[0].prototypes, runs[1].prototypes)


@pytest.mark.parametrize(
    "data, error, words",
    [
        ([], ValueError, "empty"),
        ([{"image": torch.zeros(1)}], ValueError, "pixel_values"),
        (Dataset.from_dict({"image": [[0.0]]}), ValueError, "no `pixel_values` column"),
        ([{"pixel_values": torch.zeros(2, 3, 16, 16)}], ValueError, "got 2 samples for 5 prototypes"),
        (["not a batch"], TypeError, "dicts with `pixel_values`"),
    ],
)
def test_calibration_errors_name_the_problem(data, error, words):
    model = get_peft_model(tiny_vit(), ShipConfig(num_prompts=2, num_prototypes=5))
    with pytest.raises(error, match=words):
        initialize_ship_weights(model, data, show_progress=False)


def test_constant_images_give_finite_affinity():
    model = get_peft_model(tiny_vit(), ShipConfig(num_prompts=2, num_prototypes=2))
    result = initialize_ship_weights(model, [{"pixel_values": torch.zeros(4, 3, 16, 16)}], show_progress=False)
    assert torch.isfinite(result.affinity).all() and torch.isfinite(result.prototypes).all()
