# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/speed.py: one step on a very small ViT, structure of the JSON and Markdown, ratios to the floor.

No timing assertions: only that every figure is there and that ratios are value / floor value.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SPEED_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("ship_benchmarks_speed", SPEED_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def micro_settings(speed):
    """A 3-layer, 32-wide ViT on 16x16 images (N = 17), batch 2: one step takes milliseconds."""
    vit = dict(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        layer_norm_eps=1e-6,
    )
    return speed.BenchSettings(
        model_size="micro",
        vit=vit,
        num_labels=5,
        batch_size=2,
        steps=1,
        warmup=0,
        device="cpu",
        num_prompts=3,
        num_shared_prompts=2,
        prompt_layers=[0, 1, 2],
    )


@pytest.fixture(scope="module")
def results(speed):
    return speed.run_benchmark(micro_settings(speed), ["floor", "ship", "ship_cache"], isolation="none")


def test_every_method_has_every_figure(speed, results):
    assert [row["method"] for row in results["methods"]] == ["floor", "ship", "ship_cache"]
    for row in results["methods"]:
        for key in ("eval_latency_s", "eval_throughput_img_s", "trainable_params", "adapter_bytes"):
            assert row[key] > 0, (row["method"], key)
        assert set(row["ratios"]) == set(speed.RATIO_METRICS)
    floor, ship, cache = results["methods"]
    assert floor["train_step_s"] > 0 and ship["train_step_s"] > 0
    assert floor["train_peak_memory_bytes"] > 0
    # prompts need gradients through every frozen layer: SHIP keeps activations, the floor only the head's input
    assert ship["train_saved_activations_bytes"] > floor["train_saved_activations_bytes"] > 0
    # the cache is eval-only: no training figures of its own
    assert cache["train_step_s"] is None and cache["ratios"]["train_step_s"] is None
    # the floor trains the head only; SHIP adds its prompts to the same head
    assert floor["trainable_params"] == 32 * 5 + 5
    assert ship["trainable_params"] > floor["trainable_params"]
    assert ship["trainable_params"] == cache["trainable_params"]
    assert math.isclose(floor["eval_throughput_img_s"], 2 / floor["eval_latency_s"])


def test_ratios_are_relative_to_the_floor(speed, results):
    floor = results["methods"][0]
    for row in results["methods"]:
        for metric in speed.RATIO_METRICS:
            value, ratio = row.get(metric), row["ratios"][metric]
            if value is None or not floor.get(metric):
                assert ratio is None
            else:
                assert math.isclose(ratio, value / floor[metric]), (row["method"], metric)
    assert all(ratio in (None, 1.0) for ratio in floor["ratios"].values())


def test_add_ratios_by_hand(speed):
    rows = [
        dict(method="floor", train_step_s=2.0, eval_latency_s=1.0, adapter_bytes=100, trainable_params=10),
        dict(method="ship", train_step_s=3.0, eval_latency_s=None, adapter_bytes=250, trainable_params=0),
    ]
    speed.add_ratios(rows)
    assert rows[1]["ratios"]["train_step_s"] == 1.5
    assert rows[1]["ratios"]["adapter_bytes"] == 2.5
    assert rows[1]["ratios"]["eval_latency_s"] is None
    assert rows[1]["ratios"]["train_peak_memory_bytes"] is None  # missing on both
    with pytest.raises(ValueError, match="floor"):
        speed.add_ratios([dict(method="ship", train_step_s=1.0)])


def test_targets(speed):
    rows = [
        dict(method="floor", train_step_s=1.0, eval_latency_s=1.0),
        dict(method="floor_grad", train_step_s=2.0, eval_latency_s=1.0),
        dict(method="vpt_deep", train_step_s=5.0, eval_latency_s=3.0),
        dict(method="ship", train_step_s=3.0, eval_latency_s=1.5, train_saved_activations_bytes=120),
        dict(method="ship_cache", eval_latency_s=1.05),
        dict(method="lora", train_step_s=2.6, eval_latency_s=1.0, train_saved_activations_bytes=100),
    ]
    tiny = {check["key"]: check for check in speed.check_targets(rows, "tiny", interleaved=False)}
    assert set(tiny) == {"ship_vs_vpt_train", "ship_vs_lora_train", "ship_vs_lora_activations", "ship_vs_floor_grad_train"}
    assert math.isclose(tiny["ship_vs_vpt_train"]["ratio"], 0.6) and tiny["ship_vs_vpt_train"]["met"] is True
    assert math.isclose(tiny["ship_vs_lora_train"]["ratio"], 3.0 / 2.6) and tiny["ship_vs_lora_train"]["met"] is True
    assert math.isclose(tiny["ship_vs_lora_activations"]["ratio"], 1.2) and tiny["ship_vs_lora_activations"]["met"]
    assert math.isclose(tiny["ship_vs_floor_grad_train"]["ratio"], 1.5) and tiny["ship_vs_floor_grad_train"]["met"] is None
    b16 = {check["key"]: check for check in speed.check_targets(rows, "vit-b16", interleaved=False)}
    assert set(b16) == {"ship_vs_vpt_train_b16", "ship_vs_lora_train_b16", "cache_vs_floor_eval_b16", "ship_vs_floor_grad_train"}
    assert b16["ship_vs_lora_train_b16"]["met"] is False  # 1.15 < 3.0 / 2.6
    assert math.isclose(b16["cache_vs_floor_eval_b16"]["ratio"], 1.05) and b16["cache_vs_floor_eval_b16"]["met"]
    # a method that was not measured leaves its targets out
    assert {check["key"] for check in speed.check_targets(rows[:4], "tiny", interleaved=False)} == {
        "ship_vs_vpt_train", "ship_vs_floor_grad_train"
    }


def test_floor_grad_backward_reaches_the_images(speed):
    settings = micro_settings(speed)
    model = speed.build_model("floor_grad", settings)
    pixels, labels = speed.make_batch(settings)
    saved = speed.saved_activation_bytes(model, settings, pixels, labels, input_gradient=True)
    assert saved > 10 * speed.saved_activation_bytes(model, settings, pixels, labels)  # the floor keeps ~nothing


def test_json_and_markdown_files(speed, results, tmp_path):
    json_path, md_path = speed.write_results(results, str(tmp_path))
    assert json_path.name == "speed_micro_cpu_fp32.json" and md_path.name == "speed_micro_cpu_fp32.md"
    loaded = json.loads(json_path.read_text())
    assert loaded["methods"][1]["ratios"] == results["methods"][1]["ratios"]
    assert {"settings", "machine", "memory_kind", "targets", "methods"} <= set(loaded)
    table = md_path.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header = rows[0]
    for title in ("train step", "eval latency", "eval throughput", "trainable params", "adapter file"):
        assert title in header
    labels = [speed.METHODS[name] for name in ("floor", "ship", "ship_cache")]
    method_rows = [line for line in rows if line.split(" | ")[0][2:] in labels]
    assert len(method_rows) == 3
    assert "(1.00×)" in method_rows[0]  # the floor's own ratio
    assert "= SHIP¹" in method_rows[2]  # the cache row has no training figures of its own
    assert method_rows[0].count("|") == header.count("|")
    assert "| target |" in table
    with_targets = dict(results, targets=speed.check_targets(
        [dict(method="floor", train_step_s=1.0), dict(method="floor_grad", train_step_s=2.0),
         dict(method="ship", train_step_s=3.0)], "tiny", interleaved=False))  # fmt: skip
    assert "| SHIP training step vs the deep-prompt floor | 1.50× | — | — (reported) | — |" in speed.markdown_table(
        with_targets
    )


def test_markdown_ratio_cells_match_json(speed, results):
    table = speed.markdown_table(results)
    ship = results["methods"][1]
    ship_row = next(line for line in table.splitlines() if line.startswith("| SHIP (default)"))
    assert f"({ship['ratios']['trainable_params']:.2f}×)" in ship_row
    assert f"({ship['ratios']['train_step_s']:.2f}×)" in ship_row


def test_targets_are_checked_for_their_family_only(speed):
    """Issue 10's ViT targets do not judge a DINOv3-shaped run; that run reports SHIP against LoRA on its model."""
    rows = [
        {"method": "ship", "train_step_s": 1.2, "train_saved_activations_bytes": 10},
        {"method": "lora", "train_step_s": 1.0, "train_saved_activations_bytes": 9},
    ]
    vit = {check["key"] for check in speed.check_targets(rows, "tiny", interleaved=False)}
    dinov3 = speed.check_targets(rows, "tiny", interleaved=False, family="dinov3")
    assert "ship_vs_lora_train" in vit and "ship_vs_lora_train_dinov3" not in vit
    assert [(check["key"], check["limit"]) for check in dinov3] == [("ship_vs_lora_train_dinov3", None)]
    assert dinov3[0]["ratio"] == pytest.approx(1.2)
