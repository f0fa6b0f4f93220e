# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""One training step of a SHIP model under FSDP2 (``fully_shard`` on every SHIP block, then the model), run by
``tests/test_fsdp.py`` with ``torchrun`` on 2 CPU processes (gloo). Every rank compares its loss, every trainable
gradient and every weight after an AdamW step (gathered whole) with the same step of the unsharded model; rank 0
saves the adapter from the gathered full state dict into ``argv[1]``, where the test loads it. Each rank prints
``OK <rank>``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ship_peft  # noqa: E402
from utils import pixels, tiny_ship_model  # noqa: E402

LABELS = torch.tensor([0, 1, 2, 0])


def step(model):
    model.train()
    outputs = model(pixel_values=pixels(), labels=LABELS)
    outputs.loss.backward()
    grads = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            grad = parameter.grad
            grads[name] = whole(grad)
    return outputs.loss.detach(), outputs.matching_loss.detach(), grads


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def updated(model) -> dict[str, torch.Tensor]:
    """Every trainable weight after one AdamW step on the model's gradients, whole."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    torch.optim.AdamW(trainable, lr=1e-2).step()
    return {name: whole(p.detach()).clone() for name, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    dist.init_process_group("gloo")
    sharded, plain = tiny_ship_model(seed=4).double(), tiny_ship_model(seed=4).double()
    for block in sharded.base_model.model.vit.layers:
        assert isinstance(block, ship_peft.ShipBlock)
        fully_shard(block)  # the unit FSDP's default route picks (the model's _no_split_modules)
    fully_shard(sharded)
    loss, matching, grads = step(sharded)
    expected_loss, expected_matching, expected = step(plain)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(matching, expected_matching, rtol=1e-12, atol=1e-12)
    assert grads.keys() == expected.keys() and any("ship_prompts" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    weights, expected_weights = updated(sharded), updated(plain)
    for name, weight in weights.items():
        torch.testing.assert_close(weight, expected_weights[name], rtol=1e-10, atol=1e-12, msg=name)
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:  # the prompts, prototypes and head, whole
        sharded.save_pretrained(sys.argv[1], state_dict=full)
        torch.save(plain.eval()(pixel_values=pixels()).logits.detach(), Path(sys.argv[1]) / "expected_logits.pt")
    dist.barrier()
    print(f"OK {dist.get_rank()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
