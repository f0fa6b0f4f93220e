# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Distributed SHIP (2 CPU processes, gloo): calibration gathers every rank's features, DDP training with the HF
Trainer equals one process with the same global batch and seed, and only rank 0 writes files.

The 2-process run (``tests/utils/distributed_train.py`` under ``torchrun``) is launched once per module (about 20 s on 2
cores); the single-process references run in this process with the same functions. Skipped only where
``torch.distributed``/gloo is unavailable, or with ``SHIP_PEFT_SKIP_DISTRIBUTED=1``; ``.ci/run`` runs it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from utils import distributed_train as harness

SCRIPT = Path(harness.__file__)
WORLD_SIZE = 2

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available())
    or os.environ.get("SHIP_PEFT_SKIP_DISTRIBUTED") == "1",
    reason="needs torch.distributed with gloo (or SHIP_PEFT_SKIP_DISTRIBUTED=1 was set)",
)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """Run the harness under ``torchrun --standalone`` (a free port) with 2 processes; the ranks' records."""
    output_dir = tmp_path_factory.mktemp("distributed")
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
        str(SCRIPT), str(output_dir),
    ]  # fmt: skip
    try:
        completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the distributed run hung (> 180 s); output:\n{(error.stdout or '')[-3000:]}{error.stderr or ''}")
    log = (completed.stdout + completed.stderr)[-6000:]
    assert completed.returncode == 0, f"torchrun failed:\n{log}"
    records = [torch.load(output_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    assert [record["world_size"] for record in records] == [WORLD_SIZE] * WORLD_SIZE
    return output_dir, records


@pytest.fixture(scope="module")
def single_process_training(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("single")
    result = harness.train(str(output_dir), world_size=1)
    assert result["error"] is None, result["error"]
    return output_dir, result["adapter"], result["initial"]


def check_calibration(records, key):
    """Every rank found the levels, affinity and prototypes of one process calibrating on the union of the shards."""
    union = harness.calibration_images()
    expected = harness.calibrate(union)
    for record in records:
        found = record[key]
        assert "error" not in found, f"rank {record['rank']}: {found['error']}"
        assert found["num_samples"] == len(union)
        assert found["prompt_layers"] == found["config_prompt_layers"] == expected["prompt_layers"]
        torch.testing.assert_close(found["affinity"], expected["affinity"], rtol=0, atol=1e-6)
        torch.testing.assert_close(found["prototypes"], expected["prototypes"], rtol=0, atol=1e-6)
    # the check can fail: calibrating on one shard alone finds other prototypes
    alone = harness.calibrate(harness.calibration_shards(WORLD_SIZE, uneven=key.endswith("uneven"))[1])
    assert not torch.allclose(alone["prototypes"], expected["prototypes"], atol=1e-3)


def test_distributed_calibration_gathers_features_so_every_rank_finds_the_same_levels_and_prototypes(distributed_run):
    check_calibration(distributed_run[1], "calibration")


def test_distributed_calibration_with_shards_of_different_sizes_and_batch_counts(distributed_run):
    # rank 0 reads 16 images in 4 batches, rank 1 reads 8 in 2
    check_calibration(distributed_run[1], "calibration_uneven")


def test_distributed_ranks_hold_identical_adapters_after_ddp_training(distributed_run):
    records = distributed_run[1]
    for record in records:
        assert record["training"]["adapter"], "no adapter tensors recorded"
    for name, tensor in records[0]["training"]["adapter"].items():
        assert torch.equal(tensor, records[1]["training"]["adapter"][name]), name


def test_distributed_training_equals_one_process_with_the_same_global_batch(distributed_run, single_process_training):
    output_dir, records = distributed_run
    for record in records:
        assert record["training"]["error"] is None, f"rank {record['rank']}: {record['training']['error']}"
    distributed = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    single = load_file(single_process_training[0] / "adapter" / "adapter_model.safetensors")
    assert distributed.keys() == single.keys() and len(single) == 8
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    # the check can fail: training moved every trained tensor far beyond the tolerance
    trained, initial = single_process_training[1], single_process_training[2]
    for name in trained:
        if "prototypes" not in name:
            assert (trained[name] - initial[name]).abs().max() > 1e-3, name


def test_gradient_accumulation_equals_one_batch_of_the_same_size(tmp_path, single_process_training):
    accumulated = harness.train(str(tmp_path), world_size=1, gradient_accumulation_steps=2)
    assert accumulated["error"] is None, accumulated["error"]
    single = single_process_training[1]
    for name, tensor in accumulated["adapter"].items():
        torch.testing.assert_close(tensor, single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_distributed_only_rank_zero_writes_files(distributed_run):
    output_dir, records = distributed_run
    for record in records:
        rank = record["rank"]
        canary = [write for write in record["writes"] if write.split(" ", 1)[1].startswith(f"canary_rank{rank}")]
        # the recorder sees every kind of write (else this test could not fail)
        assert {write.split(" ")[0] for write in canary} >= {
            "os.mkdir", "safetensors.torch.save_file", "torch.serialization.save", "open",
        }, canary  # fmt: skip
        library = [write for write in record["writes"] if write not in canary]
        if rank == 0:
            # the Trainer's save_model: PEFT's own writes (its safetensors writer is Rust, unseen by audit hooks)
            assert "open adapter/adapter_config.json" in library, library
        else:
            assert library == [], f"rank {rank} wrote files: {library}"
    assert {path.name for path in (output_dir / "adapter").iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors",
    }  # fmt: skip


def _launch(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``ship-peft`` under ``torchrun --standalone`` with 2 CPU processes; fails the test if it hangs."""
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE)]
    try:
        completed = subprocess.run(
            [*command, "-m", "ship_peft", *argv], env=environment, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the distributed run hung (> {timeout} s); output:\n{(error.stdout or '')[-3000:]}")
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    return completed


def test_vtab1k_search_under_two_processes_resumes_where_it_stopped(tmp_path):
    """The main process decides which search runs are already done and tells the other: both take the same path
    (a disagreement would hang the collective calls), every setting is chosen once, and DDP finds no unused
    trainable parameter."""
    from test_cli_vtab1k import TINY, write_vtab_folder
    from test_data import save_tiny_vit

    model = save_tiny_vit(tmp_path / "model", num_labels=4)
    output = tmp_path / "out"
    argv = ["vtab1k", "--task", "kitti", "--data-root", str(write_vtab_folder(tmp_path / "vtab-1k"))]
    argv += ["--model", str(model), "--output-dir", str(output), "--lr", "0.001", "0.1", *TINY]
    first = _launch(argv)
    assert "find_unused_parameters=True" not in first.stderr
    search = output / "kitti" / "search"
    assert sorted(path.parent.name for path in search.glob("*/search.json")) == ["0", "1"]
    (search / "1" / "search.json").unlink()  # as if the run had stopped during the second search run

    second = _launch(argv)
    assert second.stdout.count("from an earlier run") == 1  # run 0 reused, said once (by the main process)
    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["search"] == rows[1]["search"] and rows[0]["selected"] == rows[1]["selected"]
