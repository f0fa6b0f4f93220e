# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""SHIP through PEFT's own entry points: registration, save/load, several adapters, Trainer, checkpointing."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, ViTModel

import ship_peft
from ship_peft import ShipConfig

from utils import base_state_dict, fill_prototypes, pixels, tiny_ship_model, tiny_vit

LABELS = torch.tensor([0, 1, 2, 1])


def backbone_state(model):
    return {name: tensor.clone() for name, tensor in base_state_dict(model.get_base_model().vit).items()}


def test_lora_and_other_methods_still_work_after_import(tmp_path):
    lora = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: lora_B starts at zero, so an untrained adapter would reload as a no-op
        for name, parameter in lora.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    lora.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    reloaded = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    expected = lora(pixel_values=pixels()).logits
    assert not torch.allclose(expected, tiny_vit()(pixel_values=pixels()).logits, atol=1e-3)
    torch.testing.assert_close(reloaded(pixel_values=pixels()).logits, expected)


def test_registration_is_idempotent_and_keeps_peft_tables_consistent():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    ship_peft.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SHIP"] is ShipConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SHIP"] is ship_peft.ShipModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SHIP"] == "ship_prompts"
    assert "LORA" in PEFT_TYPE_TO_CONFIG_MAPPING


def test_save_writes_only_prompts_prototypes_and_classifier(tmp_path):
    model = tiny_ship_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIP" and config["prompt_layers"] == [0, 2, 3]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {
        "base_model.model.vit.ship.ship_prompts.semantic_prompts.0",
        "base_model.model.vit.ship.ship_prompts.semantic_prompts.1",
        "base_model.model.vit.ship.ship_prompts.semantic_prompts.2",
        "base_model.model.vit.ship.ship_prompts.shared_prompts",
        "base_model.model.vit.ship.ship_prompts.attribute_prompts",
        "base_model.model.vit.ship.ship_prompts.prototypes",
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }


def test_adapter_loads_in_a_fresh_process_with_identical_logits(tmp_path):
    model = tiny_ship_model(seed=1)
    torch.save(tiny_vit(seed=1).state_dict(), tmp_path / "base.pt")
    model.save_pretrained(tmp_path / "adapter")
    expected = model(pixel_values=pixels()).logits
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path.parent)!r})
        import ship_peft
        from peft import PeftConfig, PeftModel
        from transformers import ViTForImageClassification
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from utils import tiny_vit_config, pixels
        base = ViTForImageClassification(tiny_vit_config())
        base.load_state_dict(torch.load({str(tmp_path / 'base.pt')!r}))
        assert type(PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})).__name__ == "ShipConfig"
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
        torch.save(model(pixel_values=pixels()).logits, {str(tmp_path / 'logits.pt')!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_several_adapters_switch_and_disable():
    model = tiny_ship_model(seed=2)
    model.add_adapter("other", ShipConfig(num_prompts=5, prompt_layers=[0, 1], num_prototypes=4))
    fill_prototypes(model, seed=3)
    x = pixels()
    default_logits = model(pixel_values=x).logits
    model.set_adapter("other")
    other_logits = model(pixel_values=x).logits
    assert not torch.allclose(default_logits, other_logits)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    model.set_adapter("default")
    torch.testing.assert_close(model(pixel_values=x).logits, default_logits)
    base_logits = tiny_vit(seed=2)(pixel_values=x).logits
    with model.disable_adapter():
        plain = model(pixel_values=x).logits
    # the classifier copy is trained, so compare the backbone's features via the original head
    assert torch.equal(plain, base_logits)


def test_print_trainable_parameters_counts_prompts_and_classifier(capsys):
    model = tiny_ship_model()
    model.print_trainable_parameters()
    expected = 3 * 3 * 32 + 10 * 32 + 2 * 4 * 32 + (32 * 3 + 3)  # SIP x3 levels, SSP, AP at layers 2 and 3, head
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_ship_model(seed=4).train()
        calls = []
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            for layer in ship_peft.get_prompt_bank(model).base_blocks():
                checkpoint = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, f=checkpoint: calls.append(1) or f(*a)
        model(pixel_values=pixels(), labels=LABELS).loss.backward()
        assert len(calls) == (4 if checkpointing else 0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_bf16_autocast_trains_without_nan():
    model = tiny_ship_model(seed=5).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(pixel_values=pixels(), labels=LABELS)
    outputs.loss.backward()
    assert torch.isfinite(outputs.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_trainer_trains_prompts_and_head_only(tmp_path):
    model = tiny_ship_model(seed=6)
    before = backbone_state(model)
    prompts_before = model.get_base_model().vit.ship.ship_prompts["default"].shared_prompts.detach().clone()
    data = Dataset.from_dict({"pixel_values": pixels(16, seed=7).numpy(), "labels": [i % 3 for i in range(16)]})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.with_format("torch"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    after = backbone_state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not torch.equal(prompts_before, model.get_base_model().vit.ship.ship_prompts["default"].shared_prompts)


def test_unload_restores_the_plain_backbone_and_merge_is_a_clear_error():
    model = tiny_ship_model(seed=8)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert type(base.vit) is ViTModel
    assert torch.equal(base(pixel_values=pixels()).logits, tiny_vit(seed=8)(pixel_values=pixels()).logits)


def test_forward_before_calibration_says_what_to_call():
    model = get_peft_model(tiny_vit(), ShipConfig(num_prompts=2))
    with pytest.raises(RuntimeError, match=r"initialize_ship_weights\(model, dataloader\)"):
        model(pixel_values=pixels())


def test_missing_prototypes_say_what_to_call():
    model = get_peft_model(tiny_vit(), ShipConfig(num_prompts=2, prompt_layers=[0, 2]))
    with pytest.raises(RuntimeError, match="no prototypes"):
        model(pixel_values=pixels())


def test_other_models_are_clear_errors():
    with pytest.raises(TypeError, match="holds no Vision Transformer of a supported family. Supported: transformers ViT"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), ShipConfig())


def test_low_cpu_mem_usage_loading_and_delete_adapter(tmp_path):
    model = tiny_ship_model(seed=9)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_vit(seed=9), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(reloaded(pixel_values=pixels()).logits, model(pixel_values=pixels()).logits)
    model.add_adapter("extra", ShipConfig(num_prompts=2, prompt_layers=[0, 1], num_attribute_layers=0))
    model.delete_adapter("extra")
    assert list(model.get_base_model().vit.ship.ship_prompts) == ["default"] and list(model.peft_config) == ["default"]


def test_inject_adapter_in_model_from_a_state_dict():
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    model = tiny_ship_model(seed=10)
    state_dict = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    injected = inject_adapter_in_model(model.peft_config["default"], tiny_vit(seed=10), state_dict=state_dict)
    assert all(isinstance(block, ship_peft.ShipBlock) for block in injected.vit.layers)
    assert isinstance(injected.vit.ship, ship_peft.ShipPromptBank)


def test_feature_extraction_path_for_users_of_a_bare_vit_model():
    model = tiny_ship_model(seed=12, vit_overrides={"num_labels": 0}, modules_to_save=None)
    outputs = model(pixel_values=pixels(), output_hidden_states=True)
    assert outputs.logits.shape == (4, 32)  # the final CLS features (classifier is Identity)
    assert len(outputs.hidden_states) == 5 and all(h.shape == (4, 17, 32) for h in outputs.hidden_states)
    vit = model.get_base_model().vit
    torch.testing.assert_close(outputs.logits, vit.layernorm(outputs.hidden_states[-1])[:, 0])
    plain = tiny_vit(seed=12, num_labels=0).vit(pixels(), output_hidden_states=True).hidden_states
    assert torch.equal(outputs.hidden_states[0], plain[0])  # the embeddings: no prompts yet
    assert not torch.allclose(outputs.hidden_states[-1], plain[-1])  # the prompts changed the image tokens
