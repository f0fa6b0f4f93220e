# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""FSDP2 shards a SHIP model by its blocks: each SHIP block reads its host block's weights inside its own call, so
a sharded training step gives the unsharded loss and gradients (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel

from utils import pixels, tiny_vit

SCRIPT = Path(__file__).resolve().parent / "utils" / "fsdp_step.py"


def test_fsdp2_sharded_step_equals_the_unsharded_step_and_saves_a_whole_adapter(tmp_path):
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    command.append(str(tmp_path))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The two ranks share one stdout, so their lines may interleave: look for each rank's mark anywhere.
    assert sorted(re.findall(r"OK (\d)", result.stdout)) == ["0", "1"], result.stdout[-3000:]
    # the adapter saved from the sharded model's gathered state loads into a fresh backbone: the trained model
    model = PeftModel.from_pretrained(tiny_vit(4).double(), tmp_path).eval()
    torch.testing.assert_close(model(pixel_values=pixels().double()).logits, torch.load(tmp_path / "expected_logits.pt"))
