# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""``examples/image_classification/run_ship.py``, transformers' image-classification example with SHIP: it trains
the bundled tiny ViT on the bundled digits written as a local ``imagefolder``, in one process and under
``accelerate launch`` with 2 CPU processes (gloo), and the two runs log the same losses step by step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageClassification

import ship_peft
from ship_peft.app.data import digits_dataset
from ship_peft.assets import bundled_backbone_path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_classification" / "run_ship.py"
SPLITS = {"train": range(0, 64), "validation": range(64, 84), "test": range(84, 104)}


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """The first 104 bundled digits as ``imagefolder`` trees: ``<split>/<class>/<index>.png``."""
    root = tmp_path_factory.mktemp("digits")
    digits = digits_dataset()
    for split, rows in SPLITS.items():
        for index in rows:
            row = digits[index]
            folder = root / split / str(row["label"])
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].save(folder / f"{index}.png")
    return root


def run_example(digits_folder: Path, output_dir: Path, processes: int) -> dict:
    """One run of the example (1 epoch, global batch 8); its ``trainer_state.json``."""
    arguments = [
        "--model_name_or_path", str(bundled_backbone_path()), "--output_dir", str(output_dir),
        *(f"--{split}_dir={digits_folder / split}" for split in SPLITS),
        "--do_train", "--do_eval", "--num_train_epochs", "1", "--per_device_train_batch_size", str(8 // processes),
        "--learning_rate", "1e-2", "--logging_steps", "1", "--seed", "0", "--report_to", "none",
        "--num_prompts", "2", "--share_threshold", "0.8", "--num_prototypes", "4", "--calibration_samples", "32",
        "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",
    ]  # fmt: skip
    launcher = [sys.executable, str(EXAMPLE)]
    if processes > 1:  # accelerate's multi-process launcher (named --multi_gpu), on CPU processes with gloo
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), str(EXAMPLE)]  # fmt: skip
        arguments += ["--ddp_backend", "gloo"]
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(2 // processes)}
    result = subprocess.run([*launcher, *arguments], capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((output_dir / "trainer_state.json").read_text())


def free_port() -> int:
    """A port nothing listens on now (accelerate's launcher would take 29500, which another run may hold)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def logged(state: dict, key: str) -> list[float]:
    return [entry[key] for entry in state["log_history"] if key in entry and "train_runtime" not in entry]


def test_one_process_and_two_processes_log_the_same_losses(digits_folder, tmp_path):
    one = run_example(digits_folder, tmp_path / "one", processes=1)
    two = run_example(digits_folder, tmp_path / "two", processes=2)
    assert len(logged(one, "loss")) == 8  # 64 images, batch 8
    for key in ("loss", "classification_loss", "matching_loss"):
        assert logged(two, key) == pytest.approx(logged(one, key), rel=1e-3), key
    # evaluated on validation and test; the adapter and the image processor are saved and load
    for prefix in ("eval", "test"):
        assert 0.0 <= json.loads((tmp_path / "one" / "all_results.json").read_text())[f"{prefix}_accuracy"] <= 1.0
    base = AutoModelForImageClassification.from_pretrained(
        bundled_backbone_path(), num_labels=10, ignore_mismatched_sizes=True, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, tmp_path / "one")
    assert ship_peft.get_prompt_bank(model).ship_config["default"].prompt_layers  # calibrated levels saved
    assert (tmp_path / "one" / "preprocessor_config.json").is_file()


def test_a_yaml_file_stands_in_for_the_flags(digits_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {bundled_backbone_path()}\ntrain_dir: {digits_folder / 'train'}\n"
        f"output_dir: {tmp_path / 'out'}\ndo_train: true\nmax_train_samples: 16\nnum_train_epochs: 1\n"
        "per_device_train_batch_size: 8\nnum_prompts: 2\nnum_prototypes: 4\nshare_threshold: 0.8\nuse_cpu: true\n"
        "report_to: none\nsave_strategy: 'no'\ndecoupled_attention: false\n"
    )
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, str(EXAMPLE), str(config)], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["num_prompts"] == 2 and saved["decoupled_attention"] is False


def test_the_recipe_file_parses_into_the_paper_s_recipe():
    """``recipe.yaml`` holds docs/method.md §6's recipe: AdamW, cosine to 1e-5 after a 10 % warm-up from 1e-6 of the
    learning rate 1e-2, 100 epochs at batch 64, stochastic depth 0.1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_ship", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    parser = example.HfArgumentParser(
        (example.ModelArguments, example.DataTrainingArguments, example.ShipArguments, example.TrainingArguments)
    )
    model, data, ship, training = parser.parse_yaml_file(str(EXAMPLE.parent / "recipe.yaml"))
    assert (ship.drop_path_rate, ship.num_prompts, data.calibration_samples) == (0.1, 50, 1000)
    assert (training.num_train_epochs, training.per_device_train_batch_size, training.learning_rate) == (100, 64, 0.01)
    assert training.lr_scheduler_kwargs == {"min_lr": 1e-5, "warmup_lr_rate": 1e-4}  # 1e-6 / 1e-2
    assert training.lr_scheduler_type.value == "cosine_warmup_with_min_lr" and training.warmup_steps == 0.1
    ship_peft.ShipConfig(**vars(ship))  # a valid SHIP configuration
