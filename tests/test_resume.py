# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Nothing lost: a Trainer run interrupted at a checkpoint and resumed from it ends with exactly the adapter of an
uninterrupted run with the same seed.

The resumed run starts from a model whose prompts, attribute prompts, prototypes and classifier were initialised
differently, so everything the final adapter holds must come from the checkpoint (adapter weights and prototype
buffer, optimizer and scheduler state, RNG state for dropout and the shuffled data order, step counter).
"""

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import ship_peft

from utils import fill_prototypes, pixels, tiny_vit

CONFIG = dict(num_prompts=3, prompt_layers=[0, 2, 3], num_prototypes=5, num_attribute_prompts=4)
IMAGES = 20


def ship_model(init_seed: int):
    """The same frozen backbone (with dropout, so the RNG state matters); adapter tensors drawn from ``init_seed``."""
    base = tiny_vit(seed=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(init_seed)
    model = get_peft_model(base, ship_peft.ShipConfig(**CONFIG))
    fill_prototypes(model, seed=init_seed)
    return model


def dataset() -> Dataset:
    return Dataset.from_dict(
        {"pixel_values": pixels(IMAGES, seed=7).numpy(), "labels": [(i * 7) % 3 for i in range(IMAGES)]}
    ).with_format("torch")


class StopAfter(TrainerCallback):
    """Simulates a crash right after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def arguments(output_dir, accumulation: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=3,  # 5 steps per epoch, 15 in all
        learning_rate=5e-2,
        lr_scheduler_type="cosine",
        warmup_steps=3,
        weight_decay=0.01,
        seed=11,
        save_strategy="steps",
        save_steps=7 if accumulation == 1 else 5,  # mid-epoch / at an epoch boundary
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
    )


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if "ship_prompts" in name or "modules_to_save" in name
    }


@pytest.mark.parametrize("accumulation", [1, 2], ids=["mid-epoch", "accumulation-epoch-boundary"])
def test_resumed_training_ends_with_the_adapter_of_an_uninterrupted_run(tmp_path, accumulation):
    uninterrupted = ship_model(init_seed=1)
    Trainer(model=uninterrupted, args=arguments(tmp_path / "a", accumulation), train_dataset=dataset()).train()
    expected = adapter_state(uninterrupted)

    stop = 7 if accumulation == 1 else 5
    interrupted = ship_model(init_seed=1)
    trainer = Trainer(
        model=interrupted,
        args=arguments(tmp_path / "b", accumulation),
        train_dataset=dataset(),
        callbacks=[StopAfter(stop)],
    )
    trainer.train()
    assert trainer.state.global_step == stop
    checkpoint = tmp_path / "b" / f"checkpoint-{stop}"
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert "base_model.model.vit.ship.ship_prompts.prototypes" in saved

    resumed = ship_model(init_seed=2)  # nothing of its own adapter may survive the resume
    before = adapter_state(resumed)
    trainer = Trainer(model=resumed, args=arguments(tmp_path / "b", accumulation), train_dataset=dataset())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 15
    found = adapter_state(resumed)

    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=0, atol=1e-6, msg=name)
        # the check can fail: the resumed model started elsewhere, and training moved the trained tensors
        assert not torch.allclose(before[name], expected[name], atol=1e-3), name
    halfway = adapter_state(interrupted)
    assert any(not torch.allclose(halfway[name], expected[name], atol=1e-3) for name in expected)

    # the final adapter files are the same too
    trainer.save_model(str(tmp_path / "resumed"))
    uninterrupted.save_pretrained(tmp_path / "uninterrupted")
    files = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("resumed", "uninterrupted")]
    assert files[0].keys() == files[1].keys()
    for name in files[0]:
        torch.testing.assert_close(files[0][name], files[1][name], rtol=0, atol=1e-6, msg=name)


def test_resume_restores_calibrated_levels_and_prototypes(tmp_path):
    """A calibrated adapter (levels and prototypes found from data) resumes into a freshly calibrated model whose
    prototypes differ (calibrated on other images): the checkpoint's prototypes win."""

    def calibrated(images_seed: int):
        torch.manual_seed(images_seed)
        model = get_peft_model(tiny_vit(seed=0), ship_peft.ShipConfig(num_prompts=2, share_threshold=0.97, num_prototypes=4))
        ship_peft.initialize_ship_weights(model, [pixels(12, seed=images_seed)], show_progress=False)
        return model

    def args(output_dir):
        return TrainingArguments(
            output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-2, seed=3,
            save_strategy="steps", save_steps=3, use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True,
        )  # fmt: skip

    uninterrupted = calibrated(images_seed=30)
    Trainer(model=uninterrupted, args=args(tmp_path / "a"), train_dataset=dataset()).train()
    interrupted = calibrated(images_seed=30)
    Trainer(model=interrupted, args=args(tmp_path / "b"), train_dataset=dataset(), callbacks=[StopAfter(3)]).train()

    resumed = calibrated(images_seed=31)
    assert resumed.peft_config["default"].prompt_layers == uninterrupted.peft_config["default"].prompt_layers
    before = adapter_state(resumed)
    Trainer(model=resumed, args=args(tmp_path / "b"), train_dataset=dataset()).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3")
    )
    expected, found = adapter_state(uninterrupted), adapter_state(resumed)
    name = "base_model.model.vit.ship.ship_prompts.default.prototypes"
    assert not torch.allclose(before[name], expected[name], atol=1e-3)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=0, atol=1e-6, msg=name)
