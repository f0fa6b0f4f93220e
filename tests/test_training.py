# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""ship_peft.app.training: models of the three methods, calibration sample, Trainer arguments, separate loss logging."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import ResNetConfig

from ship_peft import ShipConfig
from ship_peft.app import training
from ship_peft.app.data import choose_splits, load_image_processor, standardize, with_pixels
from ship_peft.app.errors import InputError
from ship_peft.app.training import TrainSettings, build_model, method_config, train_method

from utils import tiny_vit
from test_data import save_tiny_vit, tiny_dataset_dict

SHIP = dict(num_prompts=2, share_threshold=0.999, num_prototypes=4, num_attribute_prompts=3)
LABELS = ["a", "b", "c"]


@pytest.fixture
def tiny_data(tmp_path):
    data = choose_splits(
        standardize(tiny_dataset_dict({"train": 24, "validation": 6, "test": 6}), "img", "fine_label"), "tiny"
    )
    processor = load_image_processor(str(save_tiny_vit(tmp_path)), 16)
    return tmp_path / "tiny_vit", {
        name: with_pixels(getattr(data, name), processor) for name in ("train", "validation", "test")
    }


def test_vpt_deep_and_linear_are_the_documented_ablations():
    vpt = method_config("vpt-deep", {"num_prompts": 7, "share_threshold": 0.5}, num_layers=4)
    assert vpt.prompt_layers == [0, 1, 2, 3]
    assert (vpt.num_shared_prompts, vpt.num_attribute_layers, vpt.decoupled_attention, vpt.matching_loss_weight) == (
        0,
        0,
        False,
        0.0,
    )
    assert vpt.num_prompts == 7
    ship = method_config("ship", {"num_prompts": 7}, num_layers=4)
    assert ship.prompt_layers is None and ship.share_threshold == ShipConfig().share_threshold and ship.decoupled_attention
    assert method_config("linear", {}, num_layers=4) is None
    with pytest.raises(InputError, match="Unknown method 'lora'; choose from ship, vpt-deep, linear"):
        method_config("lora", {}, num_layers=4)
    with pytest.raises(InputError, match=r"share_threshold must lie in \(0.0, 1.0\]"):
        method_config("ship", {"share_threshold": 1.5}, num_layers=4)


def test_models_train_only_their_own_parts(tmp_path):
    folder = save_tiny_vit(tmp_path)
    linear = build_model("linear", str(folder), LABELS, {})
    assert {name for name, p in linear.named_parameters() if p.requires_grad} == {
        "classifier.weight",
        "classifier.bias",
    }
    vpt = build_model("vpt-deep", str(folder), LABELS, {"num_prompts": 5})
    trainable = sum(p.numel() for p in vpt.parameters() if p.requires_grad)
    assert trainable == 4 * 5 * 32 + (32 * 3 + 3)  # K prompts in each of the 4 layers, and the head
    with pytest.raises(InputError, match="names layer 7, but the backbone has 4 layers"):
        build_model("ship", str(folder), LABELS, {"prompt_layers": [0, 7]})


def test_backbone_gets_a_new_head_and_keeps_its_weights_and_name(tmp_path):
    folder = save_tiny_vit(tmp_path, num_labels=5)
    model = training.load_backbone(str(folder), LABELS)
    assert model.classifier.out_features == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.dtype == torch.float32 and model.name_or_path == str(folder)
    reference = tiny_vit(num_labels=5)
    assert torch.equal(
        model.vit.embeddings.patch_embeddings.projection.weight,
        reference.vit.embeddings.patch_embeddings.projection.weight,
    )
    kept = training.load_backbone(str(folder), list("vwxyz"))
    assert torch.equal(kept.classifier.weight, reference.classifier.weight)  # same size: the head is kept


def test_non_vit_models_and_unreadable_paths_are_clear_errors(tmp_path):
    ResNetConfig().save_pretrained(tmp_path / "resnet")
    with pytest.raises(InputError, match="is a 'resnet' model; the command line trains the model types vit, deit, dinov2"):
        training.load_backbone(str(tmp_path / "resnet"), LABELS)
    with pytest.raises(InputError, match="cannot read a model configuration"):
        training.backbone_config(str(tmp_path / "nothing-here"))


def test_calibration_sample_is_random_not_the_first_images():
    dataset = standardize(tiny_dataset_dict({"train": 40}), "img", "fine_label")["train"]
    dataset = dataset.select(sorted(range(40), key=lambda index: dataset[index]["label"]))  # sorted by class
    sample = training.calibration_sample(dataset, 9, seed=0)
    assert len(sample) == 9 and len(set(sample["label"])) == 3
    assert training.calibration_sample(dataset, 9, seed=0)["label"] == sample["label"]
    assert len(training.calibration_sample(dataset, 100, seed=0)) == 40


def test_schedule_warms_up_from_1e6_then_decays_to_the_minimum(tmp_path):
    """docs/method.md §6: cosine schedule with 10 warm-up epochs from 1e-6 (of 100), min lr 1e-5; 10 steps an epoch."""
    arguments = training.training_arguments(TrainSettings(learning_rate=0.1), tmp_path, evaluate_each_epoch=False)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=arguments.learning_rate)
    total = 1000
    scheduler = transformers.get_scheduler(  # as Trainer.create_scheduler does
        arguments.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=arguments.get_warmup_steps(total),
        num_training_steps=total,
        scheduler_specific_kwargs=arguments.lr_scheduler_kwargs,
    )
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-6)
    warmup = rates[:100]
    assert all(b > a for a, b in zip(warmup, warmup[1:])) and rates[99] == pytest.approx(0.1)
    decay = rates[99:]
    assert all(b <= a for a, b in zip(decay, decay[1:])) and rates[-1] == pytest.approx(1e-5, rel=0.01)
    assert rates[550] == pytest.approx(1e-5 + (0.1 - 1e-5) / 2, rel=0.02)  # half-way down the cosine


def test_training_arguments_follow_the_recipe(tmp_path):
    settings = TrainSettings(epochs=20, warmup_epochs=2, report_to=["tensorboard"], seed=3)
    arguments = training.training_arguments(settings, tmp_path, evaluate_each_epoch=True)
    assert arguments.optim == "adamw_torch"
    assert (arguments.learning_rate, arguments.weight_decay, arguments.per_device_train_batch_size) == (1e-3, 1e-3, 64)
    assert (
        arguments.eval_strategy == "epoch"
        and arguments.save_strategy == "no"
        and arguments.report_to == ["tensorboard"]
    )
    assert arguments.label_names == ["labels"] and not arguments.remove_unused_columns and arguments.seed == 3
    assert training.training_arguments(settings, tmp_path, evaluate_each_epoch=False).eval_strategy == "no"
    with pytest.raises(InputError, match=r"--warmup-epochs \(20\) must be >= 0 and below --epochs \(20\)"):
        TrainSettings(epochs=20, warmup_epochs=20)
    with pytest.raises(InputError, match=r"--epochs \(0\) must be > 0"):
        TrainSettings(epochs=0)
    for bad in (dict(learning_rate=0.0), dict(warmup_start_learning_rate=-1e-6), dict(min_learning_rate=-1.0)):
        with pytest.raises(InputError, match=r"--learning-rate \(.*\) must be > 0, --warmup-start-learning-rate"):
            TrainSettings(**bad)


def test_ship_run_logs_cross_entropy_and_matching_loss_separately(tiny_data):
    folder, splits = tiny_data
    settings = TrainSettings(
        epochs=2, batch_size=8, warmup_epochs=0, learning_rate=1e-2, logging_steps=1, show_progress=False
    )
    run = train_method(
        "ship", str(folder), LABELS, splits["train"], settings, SHIP, folder.parent / "out", splits["validation"]
    )
    steps = [entry for entry in run.log_history if "loss" in entry]
    assert len(steps) == 6  # 24 images / batch 8 x 2 epochs, logged every step
    for entry in steps:
        assert entry["matching_loss"] > 0
        assert entry["loss"] == pytest.approx(entry["classification_loss"] + 0.5 * entry["matching_loss"], abs=2e-3)
    assert [entry["epoch"] for entry in run.log_history if "eval_accuracy" in entry] == [1.0, 2.0]
    assert run.calibration.num_samples == 24 and run.calibration.prompt_layers == [0, 1, 2, 3]
    accuracy, predicted, labels = training.predict(run.trainer, splits["test"], "test")
    assert accuracy == pytest.approx((predicted == labels).mean()) and len(labels) == 6


def test_baselines_log_their_cross_entropy_without_matching_loss(tiny_data):
    folder, splits = tiny_data
    settings = TrainSettings(epochs=1, batch_size=8, warmup_epochs=0, logging_steps=1, show_progress=False)
    for method in ("vpt-deep", "linear"):
        run = train_method(method, str(folder), LABELS, splits["train"], settings, SHIP, folder.parent / method)
        steps = [entry for entry in run.log_history if "loss" in entry]
        assert steps and all(e["classification_loss"] == pytest.approx(e["loss"], abs=1e-3) for e in steps)
        assert not any("matching_loss" in entry for entry in run.log_history) and run.calibration is None


def test_report_to_tensorboard_writes_event_files(tiny_data):
    pytest.importorskip("tensorboard")
    folder, splits = tiny_data
    settings = TrainSettings(
        epochs=1, batch_size=8, warmup_epochs=0, logging_steps=1, report_to=["tensorboard"], show_progress=False
    )
    output_dir = folder.parent / "tensorboard_run"
    train_method("linear", str(folder), LABELS, splits["train"], settings, SHIP, output_dir)
    events = list(output_dir.rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "train/classification_loss" in accumulator.Tags()["scalars"]


def test_adapter_helpers_read_classes_and_base_model(tiny_data, tmp_path):
    folder, splits = tiny_data
    settings = TrainSettings(epochs=1, batch_size=8, warmup_epochs=0, show_progress=False)
    run = train_method("ship", str(folder), LABELS, splits["train"], settings, SHIP, tmp_path / "run")
    run.model.save_pretrained(tmp_path / "adapter")
    assert training.adapter_num_labels(str(tmp_path / "adapter")) == 3
    assert training.adapter_base_model(str(tmp_path / "adapter")) == str(folder)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["prompt_layers"] == [0, 1, 2, 3]
    with pytest.raises(InputError, match="is not a PEFT adapter folder"):
        training.adapter_base_model(str(tmp_path))
