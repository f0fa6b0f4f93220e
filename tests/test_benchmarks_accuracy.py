# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The accuracy benchmark's tasks (shapes, labels, determinism, balance) and one ``--quick`` run end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy  # noqa: E402
import tasks  # noqa: E402

SIZES = {"train": 30, "validation": 12, "test": 18}
HAVE_SKIMAGE = importlib.util.find_spec("skimage") is not None
TASKS = [t for t in tasks.TASKS if t != "textures" or HAVE_SKIMAGE]


@pytest.mark.parametrize("name", TASKS)
def test_task_shapes_labels_and_determinism(name):
    data = tasks.load_task(name, SIZES, seed=0)
    again = tasks.load_task(name, SIZES, seed=0)
    assert data.num_classes == tasks.NUM_CLASSES[name]
    for split in tasks.SPLITS:
        images, labels = data.images[split], data.labels[split]
        assert images.shape == (SIZES[split], 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (SIZES[split],) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() < data.num_classes
        np.testing.assert_array_equal(images, again.images[split])
        np.testing.assert_array_equal(labels, again.labels[split])
        counts = np.bincount(labels, minlength=data.num_classes)
        assert counts.max() - counts.min() <= 1, counts  # balanced (digits: stratified)
        assert images.std() > 5  # not blank
    if name != "digits":  # another data seed gives other images
        other = tasks.load_task(name, SIZES, seed=1)
        assert not np.array_equal(other.images["train"], data.images["train"])


def test_splits_differ_and_bad_task():
    data = tasks.load_task("counting", SIZES)
    assert not np.array_equal(data.images["train"][:12], data.images["validation"])
    with pytest.raises(ValueError, match="Unknown task"):
        tasks.load_task("nope", SIZES)


def test_counting_labels_match_rendering():
    """The counting renderer draws label + 1 separate dots (connected components of the foreground)."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for label in range(6):
        image = tasks._counting(label, rng).astype(float)
        background = np.median(image.reshape(-1, 3), axis=0)
        mask = np.abs(image - background).sum(-1) > 90
        assert ndimage.label(mask)[1] == label + 1


def test_quick_run_end_to_end(tmp_path):
    result = accuracy.main(["--quick", "--tasks", "counting", "--methods", "linear", "ship",
                            "--output-dir", str(tmp_path)])
    rows = result["runs"]
    assert {(r["method"], r["seed"]) for r in rows} == {("linear", 0), ("ship", 0)}
    for row in rows:
        for key in ("task", "group", "method", "seed", "lr", "weight_decay", "val_acc", "test_acc",
                    "trainable_params", "total_seconds", "final", "curve"):
            assert key in row
        assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
        assert row["trainable_params"] > 0 and row["final"]
        assert row["curve"][-1]["epoch"] == 1 and row["curve"][-1]["val_acc"] == row["val_acc"]
    ship = next(r for r in rows if r["method"] == "ship")
    assert ship["prompt_layers"][0] == 0 and ship["kmeans_inertia"] > 0
    saved = json.loads((tmp_path / "accuracy_quick.json").read_text())
    assert set(saved["summary"]) == {"linear/counting", "ship/counting"}
    assert "counting" in (tmp_path / "accuracy_quick.md").read_text()
    with pytest.raises(SystemExit, match="protocol 'vtab1k', not 'small'"):  # resuming another protocol's file
        accuracy.main(["--quick", "--protocol", "small", "--tasks", "counting", "--methods", "linear",
                       "--output-dir", str(tmp_path), "--resume"])


def test_a_stopped_resume_leaves_every_run_it_reached_final_in_the_file(tmp_path, monkeypatch):
    """A resume marks the runs it reuses final again as it reaches them; a stop during its first new run must leave
    them final in the file (the report and ``--merge`` read the marks)."""
    argv = ["--quick", "--tasks", "counting", "--methods", "ship", "ship_no_levels", "--output-dir", str(tmp_path)]
    accuracy.main([*argv, "--seeds", "0", "1"])  # explicit seeds apply under --quick

    def stop(*args):
        raise KeyboardInterrupt  # as if the process were stopped during seed 2's first run

    monkeypatch.setattr(accuracy, "run_one", stop)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main([*argv, "--seeds", "0", "1", "2", "--resume"])
    saved = json.loads((tmp_path / "accuracy_quick.json").read_text())
    assert len(saved["runs"]) == 4 and all(row["final"] for row in saved["runs"])
    assert saved["summary"]["ship_no_levels/counting"]["seeds"] == [0, 1]


def test_protocol_defaults_and_overrides():
    args = accuracy.parse_args([])
    assert (args.train_size, args.val_size, args.epochs, args.batch_size) == (800, 200, 15, 64)
    assert args.vpt_prompts == args.ship_prompts + 10 and "position" not in args.tasks
    assert (args.seeds, args.lr_grid) == ([0, 1, 2], "on")
    assert (accuracy.parse_args(["--quick"]).seeds, accuracy.parse_args(["--quick", "--lr-grid", "on"]).lr_grid) \
        == ([0], "on")
    args = accuracy.parse_args(["--protocol", "small", "--epochs", "2"])
    assert (args.train_size, args.epochs, args.dtype) == (160, 2, "bf16")
    assert accuracy.ship_config("ship", accuracy.parse_args([]), 12).drop_path_rate == 0.1  # SHIP's recipe
    assert accuracy.ship_config("vpt_deep", accuracy.parse_args([]), 12).drop_path_rate == 0.0
    changed = accuracy.parse_args(["--ship-config", "drop_path_rate=0", "image_summary=mean"])
    assert accuracy.ship_config("ship_no_shared", changed, 12).drop_path_rate == 0  # SHIP and its ablations
    assert accuracy.ship_config("ship", changed, 12).image_summary == "mean"
    assert accuracy.ship_config("vpt_deep", changed, 12).image_summary == "auto"  # not VPT


def test_diagnostics_train_ship_with_one_setting_changed(tmp_path):
    import accuracy_diagnostics

    rows = accuracy_diagnostics.main(["--task", "counting", "--lr", "0.01", "--variant", "recipe", "num_prompts=5",
                                      "--output-dir", str(tmp_path), "--quick"])
    assert [row["variant"] for row in rows] == ["recipe", "num_prompts=5"]
    assert rows[1]["trainable_params"] - rows[0]["trainable_params"] == 3 * 192 * len(rows[0]["prompt_layers"])
    assert json.loads((tmp_path / "diagnostics_counting.json").read_text())[1]["test_acc"] == rows[1]["test_acc"]
    again = ["--task", "counting", "--variant", "recipe", "--output-dir", str(tmp_path), "--quick", "--resume"]
    assert len(accuracy_diagnostics.main([*again, "--lr", "0.01"])) == 2  # already there: skipped
    assert [row["lr"] for row in accuracy_diagnostics.main([*again, "--lr", "0.1"])] == [0.01, 0.01, 0.1]
    rows = accuracy_diagnostics.main([*again, "--lr", "0.1", "--method", "vpt_deep"])  # not SHIP's row at 0.1
    assert [row["method"] for row in rows] == ["ship", "ship", "ship", "vpt_deep"]
    assert rows[3]["trainable_params"] != rows[2]["trainable_params"]


def test_diagnostics_refuse_a_shipconfig_change_for_a_method_that_has_no_shipconfig(tmp_path, capsys):
    import accuracy_diagnostics

    with pytest.raises(SystemExit):
        accuracy_diagnostics.main(["--task", "counting", "--lr", "0.01", "--method", "lora", "--variant", "K=5",
                                   "--output-dir", str(tmp_path), "--quick"])
    assert "train --method lora with --variant recipe" in capsys.readouterr().err


def test_calibration_levels_are_the_benchmark_runs_levels(tmp_path):
    import calibration_levels

    rows = calibration_levels.main(["--tasks", "counting", "--thresholds", "0", "0.75", "1.01", "--quick",
                                    "--output-dir", str(tmp_path)])
    bench = accuracy.parse_args(["--tasks", "counting", "--quick"])
    data = accuracy.Splits(tasks.load_task("counting", accuracy.split_sizes(bench), bench.data_seed))
    _, extra = accuracy.build_model("ship", data.num_classes, data["train"][0], bench)
    assert rows[0]["levels"]["0.75"] == extra["prompt_layers"]
    assert rows[0]["levels"]["0.0"] == [0] and rows[0]["levels"]["1.01"] == list(range(12))
    assert len(rows[0]["next_layer_affinity"]) == 11
    assert json.loads((tmp_path / "calibration_levels.json").read_text()) == rows


@pytest.mark.parametrize("name", list(accuracy.PROTOCOLS))
def test_schedule_warms_up_then_decays_to_the_floor(name):
    protocol = accuracy.PROTOCOLS[name]
    factor = accuracy.lr_lambda(100, 1e-2, protocol)
    lrs = [1e-2 * factor(step) for step in range(100)]
    assert lrs[9] == pytest.approx(1e-2) and max(lrs) == pytest.approx(1e-2)  # 10 warm-up steps
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[0] == pytest.approx(protocol.warmup_start_lr + (1e-2 - protocol.warmup_start_lr) / 10)
    assert 1e-2 * factor(100) == pytest.approx(protocol.min_lr)


def test_selection_extends_a_winning_edge_then_tries_the_decays():
    """The grid grows one step past a winning edge; the other weight decays run at the chosen rate; ties go to
    the smaller value."""
    args = accuracy.parse_args([])  # SHIP's recipe: rates 3e-3, 1e-2, 3e-2; decays 0, 1e-2; one extension
    calls = []

    def fake_run(score):
        def run(method, seed, hyper, stage):
            calls.append((hyper.lr, hyper.weight_decay))
            return dict(lr=hyper.lr, weight_decay=hyper.weight_decay, val_acc=score(hyper), stage=stage)
        return run

    best = accuracy.select("ship", 0, fake_run(lambda h: h.lr - h.weight_decay), args)  # larger rate wins
    assert calls == [(3e-3, 0.0), (1e-2, 0.0), (3e-2, 0.0), (1e-1, 0.0), (1e-1, 1e-2)]
    assert (best["lr"], best["weight_decay"]) == (1e-1, 0.0)
    calls.clear()
    best = accuracy.select("ship", 0, fake_run(lambda h: 0.5), args)  # all tie: the smallest values
    assert calls == [(3e-3, 0.0), (1e-2, 0.0), (3e-2, 0.0), (1e-3, 0.0), (1e-3, 1e-2)]
    assert (best["lr"], best["weight_decay"]) == (1e-3, 0.0)
    calls.clear()
    best = accuracy.select("ship", 0, fake_run(lambda h: -abs(h.lr - 1e-2) + h.weight_decay), args)
    assert calls == [(3e-3, 0.0), (1e-2, 0.0), (3e-2, 0.0), (1e-2, 1e-2)]  # inside the grid: no extension
    assert (best["lr"], best["weight_decay"]) == (1e-2, 1e-2)
    assert accuracy.one_step_past([1e-4, 3e-4, 1e-3], 1e-4) == 3e-5 and accuracy.one_step_past([1e-2], 1e-2) is None
