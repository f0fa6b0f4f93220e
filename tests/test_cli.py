# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The ``ship-peft`` command line: train / evaluate / calibrate in-process on a tiny ViT and tiny datasets, the
offline default's settings, bad input, and one real ``python -m ship_peft train`` of the offline default."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ship_peft import ShipConfig
from ship_peft.app import cli
from ship_peft.calibration import semantic_levels
from ship_peft.app.cli import OFFLINE_PRESET, build_parser, main

from test_data import save_dataset, save_imagefolder, save_tiny_vit

TINY_SHIP = [
    "--num-prompts",
    "2",
    "--num-prototypes",
    "4",
    "--num-attribute-prompts",
    "3",
    "--share-threshold",
    "0.999",
]
TINY_TRAINING = [
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--warmup-epochs",
    "0",
    "--learning-rate",
    "0.01",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ViT folder and a tiny saved dataset (custom column names, train + test splits)."""
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_vit(root), save_dataset(root, {"train": 30, "test": 9})


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One `ship-peft train` of SHIP and both baselines on the tiny data; returns (output dir, stdout)."""
    model, dataset = tiny
    output = tmp_path_factory.mktemp("train") / "out"
    argv = [
        "train",
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "--validation-size",
        "6",
        "--output-dir",
        str(output),
    ]
    argv += TINY_SHIP + TINY_TRAINING + ["--baselines", "vpt-deep", "linear", "--logging-steps", "1"]
    argv += ["--report-to", "tensorboard"] if _has("tensorboard") else []
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return output, stdout.getvalue()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_train_writes_adapter_card_metrics_and_pictures(trained):
    output, stdout = trained
    adapter = output / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "preprocessor_config.json",
    }
    metrics = json.loads((output / "metrics.json").read_text())
    assert list(metrics["results"]) == ["ship", "vpt-deep", "linear"]
    assert metrics["data"] == {"train": 24, "validation": 6, "test": 9, "classes": 3}
    assert metrics["prompt_layers"] == [0, 1, 2, 3] and len(metrics["layer_affinity"]) == 4
    assert metrics["ship_config"]["num_prompts"] == 2 and metrics["training"]["epochs"] == 2
    for name in ("training_curves.png", "layer_affinity.png", "confusion_matrix.png"):
        with Image.open(output / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 300
    for method, title in (("ship", "SHIP"), ("vpt-deep", "VPT-deep"), ("linear", "linear probe")):
        row = metrics["results"][method]
        assert (
            f"| {title} | {row['test_accuracy']:.4f} | {row['validation_accuracy']:.4f} | "
            f"{row['trainable_parameters']:,} |" in stdout
        )
    card = (adapter / "README.md").read_text()
    assert f"| SHIP (this adapter) | {metrics['results']['ship']['test_accuracy']:.4f} |" in card
    assert "SHIP semantic levels: [0, 1, 2, 3]" in stdout


def test_train_logs_both_losses_per_step_and_to_tensorboard(trained):
    output, stdout = trained
    results = json.loads((output / "metrics.json").read_text())["results"]
    steps = [entry for entry in results["ship"]["log_history"] if "loss" in entry]
    assert len(steps) == 6 and all({"classification_loss", "matching_loss"} <= set(entry) for entry in steps)
    assert not any("matching_loss" in entry for entry in results["vpt-deep"]["log_history"])
    assert "'classification_loss': " in stdout and "'matching_loss': " in stdout  # the Trainer's log lines
    assert results["ship"]["train_seconds"] > 0
    if _has("tensorboard"):
        assert list((output / "logs" / "ship").rglob("events.out.tfevents.*"))


def test_evaluate_reloads_the_adapter_with_the_same_accuracy(trained, tiny, capsys, tmp_path):
    output, _ = trained
    model, dataset = tiny
    metrics = json.loads((output / "metrics.json").read_text())
    argv = [
        "evaluate",
        str(output / "adapter"),
        "--dataset",
        str(dataset),
        "--validation-size",
        "6",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0  # --model defaults to the base recorded in the adapter
    assert f"top-1 accuracy {metrics['results']['ship']['test_accuracy']:.4f}" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["results"]["ship"]["test_accuracy"])
    assert evaluated["model"] == str(model) and (tmp_path / "confusion_matrix.png").is_file()
    assert main(argv[:6] + ["--split", "validation"]) == 0
    assert "validation (6 images)" in capsys.readouterr().out


def test_evaluate_on_data_with_other_classes_is_a_clear_error(trained, tmp_path, capsys):
    output, _ = trained
    other = save_dataset(tmp_path, {"train": 10, "test": 5}, num_classes=5)
    assert main(["evaluate", str(output / "adapter"), "--dataset", str(other)]) == 2
    assert "classifies 3 classes, but" in capsys.readouterr().err


def test_offline_default_uses_its_printed_preset_and_flags_win():
    parser = build_parser()
    offline = parser.parse_args(["train"])
    values = cli._resolve(offline, ["num_prompts", "share_threshold", "num_shared_prompts"], OFFLINE_PRESET)
    assert values == {"num_prompts": OFFLINE_PRESET["num_prompts"], "share_threshold": 0.8, "num_shared_prompts": 10}
    settings = cli._settings(offline, OFFLINE_PRESET)
    assert (settings.epochs, settings.learning_rate) == (OFFLINE_PRESET["epochs"], OFFLINE_PRESET["learning_rate"])
    given = parser.parse_args(["train", "--num-prompts", "7", "--epochs", "1"])
    assert cli._resolve(given, ["num_prompts"], OFFLINE_PRESET) == {"num_prompts": 7}
    assert cli._settings(given, OFFLINE_PRESET).epochs == 1
    user = parser.parse_args(["train", "--model", "google/vit-base-patch16-224-in21k"])
    library = ShipConfig()  # a real backbone gets the library's defaults (tests/test_config.py pins them)
    expected = {"num_prompts": library.num_prompts, "share_threshold": library.share_threshold}
    assert cli._resolve(user, ["num_prompts", "share_threshold"], {}) == expected
    assert cli._settings(user, {}).epochs == 100 and cli._settings(user, {}).warmup_epochs == 10
    assert (
        parser.parse_args(["train", "--no-decoupled-attention", "--prompt-layers", "0", "4"]).decoupled_attention
        is False
    )


def test_every_method_hyperparameter_has_a_flag_with_the_method_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--num-prompts",
        "--share-threshold",
        "--num-shared-prompts",
        "--num-attribute-prompts",
        "--num-attribute-layers",
        "--num-prototypes",
        "--attribute-mix",
        "--decoupled-attention",
        "--prompt-attention-weight",
        "--matching-loss-weight",
        "--matching-top-k",
        "--drop-path-rate",
        "--prompt-layers",
        "--learning-rate",
        "--weight-decay",
        "--epochs",
        "--batch-size",
        "--warmup-epochs",
        "--warmup-start-learning-rate",
        "--min-learning-rate",
        "--seed",
        "--bf16",
        "--output-dir",
        "--report-to",
        "--push-to-hub",
    ):
        assert flag in text
    library = ShipConfig()
    assert f"(default: {library.num_prompts}; offline default: {OFFLINE_PRESET['num_prompts']})" in text
    assert f"(default: {library.share_threshold}; offline default: {OFFLINE_PRESET['share_threshold']})" in text


def test_train_push_to_hub_pushes_the_saved_folder(tiny, tmp_path, monkeypatch):
    model, dataset = tiny
    pushed = {}

    def push(peft_model, repo_id, folder, private=None):
        pushed.update(
            repo_id=repo_id,
            card=(folder / "README.md").read_text(),
            private=private,
            files={p.name for p in folder.iterdir()},
        )
        return "https://hub/commit"

    monkeypatch.setattr(cli, "push_adapter", push)
    argv = ["train", "--model", str(model), "--dataset", str(dataset), "--output-dir", str(tmp_path), "--epochs", "1"]
    argv += TINY_SHIP + ["--batch-size", "8", "--warmup-epochs", "0", "--no-progress", "--push-to-hub", "me/tiny-ship"]
    assert main(argv) == 0
    assert pushed["repo_id"] == "me/tiny-ship" and pushed["private"] is None
    assert "PeftModel.from_pretrained(base, 'me/tiny-ship')" in pushed["card"]
    assert "adapter_model.safetensors" in pushed["files"]
    assert not (tmp_path / "logs" / "vpt-deep").exists()  # no baselines by default with --model


def test_calibrate_shows_levels_and_writes_the_heatmap(tiny, tmp_path, capsys):
    model, dataset = tiny
    argv = [
        "calibrate",
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "--share-threshold",
        "0.9",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "calibration.json").read_text())
    assert result["num_samples"] == 27 and result["share_threshold"] == 0.9  # all 27 training images
    affinity = torch.tensor(result["layer_affinity"])
    assert result["prompt_layers"] == semantic_levels(affinity, 0.9)
    assert result["levels_by_threshold"]["0.98"] == semantic_levels(affinity, 0.98)
    assert (
        f"share_threshold 0.9: {len(result['prompt_layers'])} levels starting at layers {result['prompt_layers']}"
        in out
    )
    assert (tmp_path / "layer_affinity.png").is_file()


def test_imagefolder_with_named_columns_trains(tmp_path, tiny):
    model, _ = tiny
    root = save_imagefolder(tmp_path, {"train": 18, "test": 6})
    argv = [
        "train",
        "--model",
        str(model),
        "--dataset",
        str(root),
        "--output-dir",
        str(tmp_path / "out"),
        "--epochs",
        "1",
    ]
    argv += TINY_SHIP + [
        "--batch-size",
        "6",
        "--warmup-epochs",
        "0",
        "--no-progress",
        "--image-column",
        "image",
        "--label-column",
        "label",
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["data"]["classes"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-column", "photo"], "no column 'photo'"),
        (["--image-column", "fine_label"], "holds ClassLabel, not images"),
        (["--test-split", "holdout"], "no split 'holdout'"),
        (["--num-prototypes", "500"], "at least as many samples as prototypes"),
        (["--prompt-layers", "1", "2"], "must start at 0"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(tiny, tmp_path, capsys, extra, message):
    model, dataset = tiny
    argv = ["train", "--model", str(model), "--dataset", str(dataset), "--output-dir", str(tmp_path), "--no-progress"]
    assert main(argv + ["--epochs", "1", "--warmup-epochs", "0"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("ship-peft train: error: ") and message in err


def test_warmup_longer_than_training_is_a_clear_error_before_any_work(tiny, tmp_path, capsys):
    model, dataset = tiny
    assert main(["train", "--model", str(model), "--dataset", str(dataset) + "-missing", "--epochs", "5"]) == 2
    assert (
        "--warmup-epochs (10) must be >= 0 and below --epochs (5.0); give a smaller --warmup-epochs"
        in capsys.readouterr().err
    )


def test_unreadable_model_is_a_clear_error(tmp_path, capsys):
    assert main(["calibrate", "--model", str(tmp_path / "nothing"), "--output-dir", str(tmp_path)]) == 2
    assert "cannot read a model configuration" in capsys.readouterr().err


def test_python_m_ship_peft_runs_the_offline_default_end_to_end(tmp_path):
    """The offline default itself (bundled backbone and digits, no network), on a tiny budget: one SHIP step (the
    baselines' rows of the table are covered in-process above)."""
    argv = [
        "train",
        "--epochs",
        "0.08",
        "--warmup-epochs",
        "0",
        "--calibration-samples",
        "120",
        "--num-prototypes",
        "20",
    ]
    argv += ["--baselines", "--no-progress", "--output-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "ship_peft", *argv], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FutureWarning" not in result.stderr  # PEFT's deprecated transformers calls are not the user's concern
    out = result.stdout
    assert "offline default: the bundled backbone tiny-vit-fractal-1k" in out
    assert "num_prompts              10   (offline default; recipe default 50)" in out
    assert "data: digits, 800 train / 200 validation / 797 test images, 10 classes" in out
    assert "\n| SHIP | " in out and "VPT-deep" not in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "tiny-vit-fractal-1k" and metrics["prompt_layers"][0] == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-vit-fractal-1k" and config["num_prompts"] == 10


def test_each_command_resolves_one_run_spec_before_any_work():
    """parse -> one run spec: every default settled (the offline preset's included), nothing loaded yet."""
    parser = build_parser()
    offline = cli.train_run(parser.parse_args(["train"]))
    assert offline.offline and offline.model_path == cli.BUNDLED_BACKBONE
    assert offline.ship_values["num_prompts"] == OFFLINE_PRESET["num_prompts"]
    assert offline.settings.epochs == OFFLINE_PRESET["epochs"] and offline.baselines == cli.OFFLINE_BASELINES
    assert offline.data.dataset is None and offline.output_dir == Path("outputs/train")
    user = cli.train_run(parser.parse_args(["train", "--model", "org/vit", "--num-prompts", "7", "--baselines", "linear"]))
    assert not user.offline and user.ship_values["num_prompts"] == 7 and user.settings.epochs == 100
    assert user.baselines == ["linear"] and user.ship_values["drop_path_rate"] == 0.1  # the recipe's
    evaluation = cli.evaluate_run(parser.parse_args(["evaluate", "adapter_dir", "--model", "org/vit", "--split", "validation"]))
    assert (evaluation.adapter, evaluation.model_path, evaluation.split, evaluation.output_dir) == (
        "adapter_dir", "org/vit", "validation", None
    )
    calibration = cli.calibrate_run(parser.parse_args(["calibrate"]))
    assert calibration.share_threshold == OFFLINE_PRESET["share_threshold"] and calibration.model_path == cli.BUNDLED_BACKBONE


def test_transformers_pipeline_runs_the_saved_adapter_with_its_label_names(trained, tiny):
    """`transformers.pipeline("image-classification")` takes the SHIP PeftModel as it is (SHIP cannot merge) and
    answers with the label names saved with the adapter (config.json) and the saved image processor."""
    from datasets import load_from_disk
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

    output, _ = trained
    _, dataset = tiny
    adapter = output / "adapter"
    config = AutoConfig.from_pretrained(adapter)
    base_path = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    base = AutoModelForImageClassification.from_pretrained(base_path, config=config, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, adapter).eval()
    processor = AutoImageProcessor.from_pretrained(adapter)
    classify = pipeline("image-classification", model=model, image_processor=processor)
    test = load_from_disk(str(dataset))["test"]
    image_column = next(name for name, feature in test.features.items() if type(feature).__name__ == "Image")
    label_names = list(config.id2label.values())
    label_column = next(name for name, feature in test.features.items() if type(feature).__name__ == "ClassLabel")
    assert label_names == test.features[label_column].names  # the dataset's class names, not LABEL_0, ...
    images = [test[index][image_column].convert("RGB") for index in range(3)]
    answers = classify(images, top_k=len(label_names))
    with torch.no_grad():
        probabilities = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
    for answer, expected in zip(answers, probabilities):
        assert {entry["label"] for entry in answer} == set(label_names)
        scores = {entry["label"]: entry["score"] for entry in answer}
        assert [scores[name] for name in label_names] == pytest.approx(expected.tolist(), abs=1e-5)


def _predict_images(folder):
    """Two RGB images, a grayscale one, a corrupt file and a text file without an image suffix, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(5)
    for index in range(2):
        array = (torch.rand(20, 20, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(array, "RGB").save(folder / f"rgb{index}.png")
    Image.fromarray((torch.rand(20, 20, generator=generator) * 255).to(torch.uint8).numpy(), "L").save(folder / "gray.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_predict_prints_top_k_writes_the_output_and_skips_bad_images(trained, tmp_path, capsys, suffix):
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    output, _ = trained
    adapter = output / "adapter"
    images = _predict_images(tmp_path / "images")
    result = tmp_path / f"predictions{suffix}"
    argv = ["predict", str(adapter), str(images), "--top-k", "2", "--batch-size", "2", "--output", str(result)]
    assert main(argv + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Classified 2 of 4 images; skipped 2:" in out  # notes.txt is no image file of the folder
    assert "gray.png: a L image; the model takes RGB: convert it first" in out
    assert "broken.png: unreadable (UnidentifiedImageError" in out
    # the reference: the adapter's model on the two RGB images
    config = AutoConfig.from_pretrained(adapter)
    base_path = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    base = AutoModelForImageClassification.from_pretrained(base_path, config=config, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, adapter).eval()
    processor = AutoImageProcessor.from_pretrained(adapter)
    rgb = [Image.open(images / f"rgb{index}.png").convert("RGB") for index in range(2)]
    with torch.no_grad():
        expected = model(**processor(rgb, return_tensors="pt")).logits.softmax(-1).topk(2)
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in result.read_text().splitlines()]
        labels = [[entry["label"] for entry in row["predictions"]] for row in rows]
        probabilities = [[entry["probability"] for entry in row["predictions"]] for row in rows]
    else:
        import csv

        rows = list(csv.DictReader(result.open()))
        labels = [[row["label_1"], row["label_2"]] for row in rows]
        probabilities = [[float(row["probability_1"]), float(row["probability_2"])] for row in rows]
    assert [Path(row["path"]).name for row in rows] == ["rgb0.png", "rgb1.png"]
    assert labels == [[config.id2label[i] for i in indices] for indices in expected.indices.tolist()]
    assert probabilities == [pytest.approx(values, abs=1e-5) for values in expected.values.tolist()]
    first = labels[0][0]
    assert f"rgb0.png: {first} " in out


def test_predict_takes_globs_and_rejects_what_names_nothing(trained, tmp_path, capsys):
    output, _ = trained
    images = _predict_images(tmp_path / "images")
    assert main(["predict", str(output / "adapter"), str(images / "rgb*.png"), "--no-progress"]) == 0
    assert "Classified 2 of 2 images." in capsys.readouterr().out
    assert main(["predict", str(output / "adapter"), str(tmp_path / "nothing*.png")]) == 2
    assert "names no image file" in capsys.readouterr().err
    assert main(["predict", str(output / "adapter"), str(images), "--output", str(tmp_path / "out.xlsx")]) == 2
    assert "give a .csv or a .jsonl file" in capsys.readouterr().err


def test_predict_without_saved_label_names_says_so(trained, tmp_path, capsys):
    import shutil

    output, _ = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(output / "adapter", adapter)
    (adapter / "config.json").unlink()
    images = _predict_images(tmp_path / "images")
    assert main(["predict", str(adapter), str(images / "rgb0.png"), "--top-k", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "has no label names" in out and "rgb0.png: LABEL_" in out


@pytest.mark.parametrize("fmt, suffix", [("export", ".pt2"), ("onnx", ".onnx")])
def test_export_writes_a_checked_deployable_model(trained, tmp_path, capsys, fmt, suffix):
    output, _ = trained
    path = tmp_path / f"model{suffix}"
    assert main(["export", str(output / "adapter"), "--format", fmt, "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert path.is_file() and f"Wrote {path}" in out
    difference = float(out.split("max |difference| ")[1].split(".\n")[0].rstrip("."))
    assert difference < 1e-4
