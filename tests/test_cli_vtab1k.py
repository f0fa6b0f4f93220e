# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""``ship-peft vtab1k`` on tiny tasks with the VTAB-1k schema: the protocol (search on train800 -> val200, final run
on train800val200, test used once at the end), the result rows, the table, and bad input."""

from __future__ import annotations

import json

import pytest
from datasets import DatasetDict

from ship_peft.app import vtab1k
from ship_peft.app.cli import main
from ship_peft.app.errors import InputError

from test_data import save_tiny_vit, tiny_dataset_dict, tiny_images

SIZES = {"train800": 8, "val200": 4, "test": 8}
TINY = ["--num-prompts", "2", "--num-prototypes", "4", "--num-attribute-prompts", "3", "--share-threshold", "0.999"]
TINY += ["--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", "--no-progress", "--weight-decay", "0.001"]


def write_vtab_folder(root, task: str = "kitti", num_classes: int = 4, label_offset: int = 0):
    """``root/<task>/`` in the common vtab-1k layout: images/ and the four image lists."""
    folder = root / task
    (folder / "images").mkdir(parents=True)
    lines = {}
    for seed, (split, count) in enumerate(SIZES.items()):
        images, labels = tiny_images(count, num_classes, seed=seed)
        lines[split] = []
        for index, (image, label) in enumerate(zip(images, labels)):
            name = f"images/{split}_{index}.png"
            image.save(folder / name)
            lines[split].append(f"{name} {label + label_offset}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, entries in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("vtab_model"), num_labels=4)


def test_vtab1k_searches_on_val200_trains_on_1000_and_tests_once(tiny_model, tmp_path, monkeypatch):
    root = write_vtab_folder(tmp_path / "vtab-1k")
    calls = []
    real_train, real_predict = vtab1k.train_method, vtab1k.predict

    def train_method(method, model_path, label_names, train, settings, ship_values, output_dir, monitor=None):
        calls.append(("train", len(train), settings.learning_rate, monitor))
        return real_train(method, model_path, label_names, train, settings, ship_values, output_dir, monitor)

    def predict(trainer, dataset, split):
        result = real_predict(trainer, dataset, split)
        calls.append(("predict", split, len(dataset), result[0]))
        return result

    monkeypatch.setattr(vtab1k, "train_method", train_method)
    monkeypatch.setattr(vtab1k, "predict", predict)
    output = tmp_path / "out"
    argv = [
        "vtab1k",
        "--task",
        "kitti",
        "--data-root",
        str(root),
        "--model",
        str(tiny_model),
        "--output-dir",
        str(output),
    ]
    assert main(argv + TINY + ["--lr", "0.001", "0.1"]) == 0

    assert [call[:3] for call in calls] == [
        ("train", 8, 0.001),
        ("predict", "val200", 4),
        ("train", 8, 0.1),
        ("predict", "val200", 4),
        ("train", 12, calls[4][2]),
        ("predict", "test", 8),
    ]
    assert all(call[3] is None for call in calls if call[0] == "train")  # nothing is evaluated during training
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    val = {entry["learning_rate"]: entry["val200_top1"] for entry in row["search"]}
    assert val == {0.001: calls[1][3], 0.1: calls[3][3]}
    best = 0.001 if val[0.001] >= val[0.1] else 0.1  # the first of equals
    assert row["selected"] == {"learning_rate": best, "weight_decay": 0.001, "num_prompts": 2, "share_threshold": 0.999}
    assert calls[4][2] == best and row["top1"] == calls[5][3]
    assert (row["task"], row["group"], row["num_train"], row["num_test"]) == ("kitti", "Structured", 12, 8)
    assert row["prompt_layers"] == [0, 1, 2, 3] and row["model"] == str(tiny_model)
    assert row["recipe"]["settings"]["learning_rate"] == best and row["recipe"]["ship"]["drop_path_rate"] == 0.1
    assert row["recipe"]["settings"]["warmup_start_learning_rate"] == 1e-6 and row["recipe"]["ship"]["num_prompts"] == 2
    assert (output / "kitti" / "adapter" / "adapter_config.json").is_file()


def test_an_interrupted_search_reuses_the_runs_it_finished(tiny_model, tmp_path, monkeypatch):
    root = write_vtab_folder(tmp_path / "vtab-1k")
    output = tmp_path / "out"
    argv = ["vtab1k", "--task", "kitti", "--data-root", str(root), "--model", str(tiny_model)]
    argv += ["--output-dir", str(output), "--lr", "0.001", "0.1"] + TINY
    real_train = vtab1k.train_method
    trained, interrupt = [], [True]

    def train_method(method, model_path, label_names, train, settings, *args, **kwargs):
        trained.append((len(train), settings.learning_rate, settings.epochs))
        if len(trained) == 2 and interrupt:
            interrupt.clear()
            raise KeyboardInterrupt  # the second search run of the first attempt dies
        return real_train(method, model_path, label_names, train, settings, *args, **kwargs)

    monkeypatch.setattr(vtab1k, "train_method", train_method)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    first = json.loads((output / "kitti" / "search" / "0" / "search.json").read_text())
    assert first["candidate"]["learning_rate"] == 0.001
    assert not (output / "kitti" / "search" / "1" / "search.json").exists()

    trained.clear()
    assert main(argv) == 0
    assert [run[:2] for run in trained] == [(8, 0.1), (12, trained[-1][1])]  # lr 0.001 was not trained again
    row = json.loads((output / "results.jsonl").read_text())
    candidate = {"learning_rate": 0.001, "weight_decay": 0.001, "num_prompts": 2, "share_threshold": 0.999}
    assert row["search"][0] == {**candidate, "val200_top1": first["val200_top1"]}

    trained.clear()
    assert main(argv + ["--epochs", "2"]) == 0  # other settings: the earlier runs do not count
    assert [run[2] for run in trained] == [2, 2, 2]  # nothing reused


def test_vtab1k_from_a_dataset_with_vtab_splits_and_a_single_candidate(tiny_model, tmp_path, capsys):
    splits = tiny_dataset_dict(SIZES, num_classes=4)
    DatasetDict(splits).save_to_disk(str(tmp_path / "vtab-kitti"))
    results = tmp_path / "all.jsonl"
    argv = ["vtab1k", "--task", "kitti", "--dataset", str(tmp_path / "vtab-{task}"), "--model", str(tiny_model)]
    argv += ["--output-dir", str(tmp_path / "out"), "--results", str(results), "--lr", "0.01"] + TINY
    assert main(argv) == 0
    row = json.loads(results.read_text())
    assert row["search"] == [] and row["num_train"] == 12  # train800 + val200
    assert "kitti: top-1" in capsys.readouterr().out


def test_vtab1k_table_has_group_means(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    for task, top1 in (("cifar100", 0.5), ("dtd", 0.7), ("eurosat", 0.9), ("cifar100", 0.6)):
        vtab1k.append_row(results, {"task": task, "group": vtab1k.VTAB_TASKS[task].group, "top1": top1})
    assert main(["vtab1k-table", str(results)]) == 0
    table = capsys.readouterr().out
    assert "| Natural | cifar100 | 60.00 |" in table  # the last row of a task wins
    assert "| Natural | **mean** (2/7 tasks) | **65.00** |" in table
    assert "| Specialized | **mean** (1/4 tasks) | **90.00** |" in table
    assert "| all | **mean of group means** | **77.50** |" in table
    assert "Structured" not in table


def test_vtab1k_bad_input_names_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["vtab1k", "--task", "imagenet", "--data-root", str(tmp_path)])
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
    with pytest.raises(InputError, match="Unknown VTAB-1k task 'cifar10'; the tasks are: cifar100, caltech101"):
        vtab1k.get_task("cifar10")
    task = vtab1k.get_task("kitti")
    with pytest.raises(InputError, match="holds no VTAB-1k task 'kitti'"):
        vtab1k.load_task(task, data_root=str(tmp_path))
    write_vtab_folder(tmp_path / "labels", label_offset=3)
    with pytest.raises(InputError, match="has label 6, but the task has 4 classes"):
        vtab1k.load_task(task, data_root=str(tmp_path / "labels"))
    folder = write_vtab_folder(tmp_path / "broken") / "kitti"
    (folder / "val200.txt").write_text("images/val200_0.png 1\nno-label-here\n")
    with pytest.raises(InputError, match=r"val200.txt, line 2: expected 'relative/image/path label'"):
        vtab1k.load_task(task, data_root=str(folder))
    (folder / "val200.txt").write_text("images/val200_0.png 1\nimages/gone.png 2\n")
    with pytest.raises(InputError, match=r"lists 1 images that do not exist, e.g. .*images/gone.png"):
        vtab1k.load_task(task, data_root=str(folder))
    DatasetDict(train=tiny_dataset_dict({"train": 4})["train"]).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(InputError, match=r"lacks the VTAB-1k split\(s\) \['train800', 'val200', 'test'\]"):
        vtab1k.load_task(task, dataset=str(tmp_path / "plain"))
    with pytest.raises(InputError, match="exactly one of --data-root"):
        vtab1k.load_task(task)
