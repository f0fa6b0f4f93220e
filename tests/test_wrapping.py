# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""SHIP wraps each block and patches nothing (docs/design.md): the host keeps its shape, state lives in the call, and
what users do to PyTorch/PEFT models works on a SHIP model as on a LoRA model."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

import ship_peft
from ship_peft.layer import ShipBlock
from utils import pixels, tensors_with_history, tiny_ship_model, tiny_vit

LABELS = torch.tensor([0, 1, 2, 1])


def training_step(model, x=None, labels=LABELS):
    model.train()
    outputs = model(pixel_values=pixels(len(labels)) if x is None else x, labels=labels)
    outputs.loss.backward()
    return outputs


def test_the_block_list_keeps_its_shape():
    model = tiny_ship_model()
    plain = tiny_vit()
    blocks = model.base_model.model.vit.layers
    assert type(blocks) is type(plain.vit.layers) and len(blocks) == len(plain.vit.layers) == 4
    assert all(isinstance(block, ShipBlock) and block.layer_index == i for i, block in enumerate(blocks))
    assert [type(block.base_layer) for block in blocks] == [type(block) for block in plain.vit.layers]
    assert blocks[-1] is list(blocks)[3] and len(blocks[1:3]) == 2
    unloaded = model.unload()
    assert [type(block) for block in unloaded.vit.layers] == [type(block) for block in plain.vit.layers]
    assert not hasattr(unloaded.vit, "ship")


def test_hooks_on_blocks_see_the_image_tokens_of_the_adapted_forward():
    model = tiny_ship_model().eval()
    seen = []
    handle = model.base_model.model.vit.layers[2].register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        model(pixel_values=pixels())
        with model.disable_adapter():
            model(pixel_values=pixels())
    handle.remove()
    assert [tuple(out.shape) for out in seen] == [(4, 17, 32)] * 2  # image tokens only, once per forward
    assert not torch.allclose(seen[0], seen[1])  # the first ran SHIP's prompts, the second the plain block


def test_deepcopy_and_pickle_at_any_point_of_training():
    model = tiny_ship_model()
    training_step(model)  # the loss's graph is alive: the model must not hold any of it
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.eval()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(clone(pixel_values=pixels()).logits, model(pixel_values=pixels()).logits)
        assert clone.base_model.model.vit.layers[0].bank is clone.base_model.model.vit.ship  # not the original's
    buffer = io.BytesIO()
    torch.save(model, buffer)
    averaged = torch.optim.swa_utils.AveragedModel(model)  # deep-copies the model
    assert averaged.module.base_model.model.vit.layers[0].bank is averaged.module.base_model.model.vit.ship


def test_the_matching_loss_reaches_the_output_and_leaves_nothing_on_the_model():
    model = tiny_ship_model()
    outputs = training_step(model)
    assert outputs.matching_loss is not None and outputs.matching_loss.grad_fn is not None
    torch.testing.assert_close(outputs.loss, outputs.classification_loss + 0.5 * outputs.matching_loss)
    for module in model.modules():
        for value in vars(module).values():
            assert not (torch.is_tensor(value) and value.grad_fn is not None), type(module).__name__
    with ship_peft.record_matching_loss() as call:  # models that return logits only get it this way
        model(pixel_values=pixels())
    torch.testing.assert_close(call.matching_loss, outputs.matching_loss)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.1])
def test_training_steps_leave_no_activations_alive(drop_path_rate):
    """Once a step's loss is gone, nothing of its graph is: no training step keeps the last one's activations."""
    model = tiny_ship_model(drop_path_rate=drop_path_rate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    before = len(tensors_with_history())
    for _ in range(3):
        training_step(model)
        optimizer.step()
        optimizer.zero_grad()
    assert len(tensors_with_history()) == before


def test_threads_running_forwards_on_one_model_get_their_own_losses():
    model = tiny_ship_model(seed=3).double()
    inputs = [pixels(4, seed=seed).double() for seed in range(6)]
    model.train()
    with torch.no_grad():
        expected = [model(pixel_values=x, labels=LABELS) for x in inputs]
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(inputs))

    def run(index):
        barrier.wait()
        with torch.no_grad():
            for _ in range(5):
                results[index] = model(pixel_values=inputs[index], labels=LABELS)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, outputs in enumerate(expected):
        torch.testing.assert_close(results[index].matching_loss, outputs.matching_loss)
        torch.testing.assert_close(results[index].logits, outputs.logits)


@pytest.mark.parametrize("target_modules", [["layers"], ["vit.layers"], "layers", r"vit\.lay.*"])
def test_target_modules_follow_peft_s_rules(target_modules):
    model = tiny_ship_model(target_modules=target_modules)
    assert model.peft_config["default"].target_modules == ["vit.layers"]
    assert isinstance(model.base_model.model.vit.layers[0], ShipBlock)


@pytest.mark.parametrize("target_modules", [["encoder"], "layers.*x", ["attention"]])
def test_target_modules_that_name_no_block_sequence_are_clear_errors(target_modules):
    with pytest.raises(ValueError, match=r"matches none of the block sequences .*\['vit.layers'\]"):
        tiny_ship_model(target_modules=target_modules)


def test_prompt_cache_follows_every_weight_change_and_refresh_covers_data_edits():
    model = tiny_ship_model().eval()
    model.enable_prompt_cache()
    x = pixels()
    with torch.no_grad():
        before = model(pixel_values=x).logits
        bank = ship_peft.get_prompt_bank(model)
        shared = bank.ship_prompts["default"].shared_prompts
        shared.data.copy_(torch.randn_like(shared))  # bumps no version counter: the memo cannot notice it
        stale = model(pixel_values=x).logits
        model.refresh_prompt_cache()
        fresh = model(pixel_values=x).logits
        model.disable_prompt_cache()
        uncached = model(pixel_values=x).logits
    torch.testing.assert_close(stale, before)
    assert not torch.allclose(fresh, before)
    torch.testing.assert_close(fresh, uncached)


def test_import_patches_nothing_and_imports_no_timm():
    code = """
import sys, types
import peft, peft.config, peft.peft_model, peft.utils.save_and_load, peft.tuners.tuners_utils, safetensors.torch
import transformers, transformers.modeling_utils, torch.nn
def snapshot():
    found = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("peft", "transformers", "safetensors", "torch") and isinstance(module, types.ModuleType):
            for attribute, value in list(vars(module).items()):
                if callable(value):
                    found[(name, attribute)] = value
                    if isinstance(value, type):
                        for member, inner in list(vars(value).items()):
                            found[(name, attribute, member)] = inner
    return found
before = snapshot()
import ship_peft
after = snapshot()
changed = sorted(str(key) for key, value in before.items() if key in after and after[key] is not value)
print(changed)
print("timm" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    changed, timm_imported = result.stdout.strip().splitlines()
    assert changed == "[]"
    assert timm_imported == "False"


def test_lora_on_the_same_model_behaves_alike():
    """What the tests above do to a SHIP model works on a PEFT LoRA model too (the bar)."""
    lora = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier"]))
    training_step(lora)
    copy.deepcopy(lora)
    pickle.loads(pickle.dumps(lora))
    assert len(lora.base_model.model.vit.layers) == 4


def test_fsdp_s_default_route_wraps_ship_blocks_as_units():
    """Accelerate and the Trainer shard the classes in the model's ``_no_split_modules`` (read through the
    PeftModel): the SHIP block, which runs its host block's parts, must be the unit, not the host block inside it."""
    from peft.utils.other import fsdp_auto_wrap_policy

    model = tiny_ship_model()
    assert "ShipBlock" in model._no_split_modules and "ViTLayer" not in model._no_split_modules
    policy = fsdp_auto_wrap_policy(model)
    block = model.base_model.model.vit.layers[0]
    assert policy(block, recurse=False, nonwrapped_numel=0)
    assert not policy(block.base_layer, recurse=False, nonwrapped_numel=0)
    plain = model.unload()
    assert "ViTLayer" in plain._no_split_modules and "ShipBlock" not in plain._no_split_modules


@pytest.mark.parametrize("name", ["deit_teacher", "dinov2_registers", "clip", "vit_bare"])
def test_every_family_keeps_its_block_list_and_deep_copies_after_a_training_step(name):
    from test_backbones import outputs_of, plain_model, ship_on

    plain = plain_model(name)
    model = ship_on(plain).train()
    blocks = model.base_model.model.get_submodule(model.peft_config["default"].target_modules[0])
    plain_blocks = plain.get_submodule(model.peft_config["default"].target_modules[0])
    assert len(blocks) == len(plain_blocks) and all(isinstance(block, ShipBlock) for block in blocks)
    seen = []
    handle = blocks[-1].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with ship_peft.record_matching_loss() as call:
        first = outputs_of(model(pixels()))[0]
    (first.square().mean() + call.matching_loss).backward()
    handle.remove()
    assert seen and seen[0][1] == plain(pixels(), output_hidden_states=True).hidden_states[-1].shape[1]  # image tokens
    clone = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs_of(clone(pixels()))[0], outputs_of(model(pixels()))[0])
