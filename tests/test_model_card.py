# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""ship_peft.app.model_card: what the card says, that its loading code works, and the folder ``push_adapter`` uploads
(the Hub itself is replaced by a recorder: nothing can reach it here)."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel, get_peft_model
from transformers import ViTForImageClassification, ViTImageProcessorPil

import ship_peft
from ship_peft.assets import BUNDLED_BACKBONE
from ship_peft.app.model_card import CARD_TAGS, AdapterCard, model_card, push_adapter, write_model_card

from utils import fill_prototypes, pixels, tiny_vit


def card_for(config, base_model: str, dataset: str = "someone/flowers", repo_id=None, **overrides) -> AdapterCard:
    values = dict(
        config=config,
        base_model=base_model,
        dataset=dataset,
        dataset_description="12 train / 3 validation / 3 test images, 3 classes",
        label_names=["a", "b", "c"],
        test_accuracy=0.8125,
        validation_accuracy=0.75,
        trainable_parameters=1234,
        training={"learning_rate": 0.01, "epochs": 3},
        comparison={"VPT-deep": 0.5, "linear probe": 0.25},
        repo_id=repo_id,
    )
    values.update(overrides)
    return AdapterCard(**values)


@pytest.fixture
def saved_adapter(tmp_path):
    """A tiny base model folder (with an image processor) and a SHIP adapter on it, saved with its card."""
    base = tmp_path / "base"
    tiny_vit(seed=3).save_pretrained(base)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        base
    )
    config = ship_peft.ShipConfig(num_prompts=2, prompt_layers=[0, 2, 3], num_prototypes=4)
    model = get_peft_model(ViTForImageClassification.from_pretrained(base), config)
    fill_prototypes(model, seed=4)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    model.get_base_model().config.save_pretrained(adapter)  # the label names, as `ship-peft train` saves them
    shutil.copy(base / "preprocessor_config.json", adapter)
    write_model_card(adapter, card_for(model.peft_config["default"], str(base), repo_id=str(adapter)))
    return base, adapter, model.eval()


def metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def test_card_says_what_the_adapter_is():
    config = ship_peft.ShipConfig(
        num_prompts=7, prompt_layers=[0, 2, 4, 6, 8, 11], share_threshold=0.93, drop_path_rate=0.1
    )
    text = model_card(card_for(config, "google/vit-base-patch16-224-in21k", repo_id="me/ship-flowers"))
    assert "# SHIP adapter: google/vit-base-patch16-224-in21k on someone/flowers" in text
    assert "6, starting at layers `[0, 2, 4, 6, 8, 11]` (found by calibration with share_threshold α = 0.93)" in text
    assert "attribute layers | `[8, 11]`" in text and "K = 7 per level" in text and "stochastic depth 0.1 |" in text
    assert (
        "| SHIP (this adapter) | 0.8125 |" in text
        and "| VPT-deep | 0.5000 |" in text
        and "| linear probe | 0.2500 |" in text
    )
    assert "Validation accuracy of this adapter: 0.7500." in text and "nothing was selected on the test split" in text
    assert "import ship_peft" in text and "PeftModel.from_pretrained(base, 'me/ship-flowers')" in text
    assert "AutoConfig.from_pretrained('me/ship-flowers')" in text
    assert "from_pretrained('google/vit-base-patch16-224-in21k', config=config, ignore_mismatched_sizes=True)" in text
    meta = metadata(text)
    assert meta["library_name"] == "peft" and meta["base_model"] == "google/vit-base-patch16-224-in21k"
    assert meta["datasets"] == ["someone/flowers"] and set(CARD_TAGS) <= set(meta["tags"])
    given = model_card(card_for(config, "google/vit-base-patch16-224-in21k", levels_calibrated=False))
    assert "`[0, 2, 4, 6, 8, 11]` (given)" in given


def test_local_and_bundled_bases_and_bundled_data_are_not_hub_metadata(tmp_path):
    config = ship_peft.ShipConfig(prompt_layers=[0, 3])
    local = metadata(model_card(card_for(config, str(tmp_path), dataset=str(tmp_path))))
    assert "base_model" not in local and "datasets" not in local
    bundled = model_card(card_for(config, BUNDLED_BACKBONE, dataset="digits"))
    assert "base_model" not in metadata(bundled) and "datasets" not in metadata(bundled)
    assert "from ship_peft.assets import bundled_backbone_path" in bundled
    assert "AutoModelForImageClassification.from_pretrained(bundled_backbone_path(), config=config" in bundled


def test_the_cards_loading_code_runs_and_gives_the_trained_logits(saved_adapter):
    base, adapter, model = saved_adapter
    text = (adapter / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)
    assert isinstance(namespace["model"], PeftModel)
    assert namespace["classify"].model is namespace["model"]  # the pipeline runs the unmerged SHIP model
    torch.testing.assert_close(namespace["model"](pixel_values=pixels()).logits, model(pixel_values=pixels()).logits)
    assert namespace["processor"].size == {"height": 16, "width": 16}


def test_push_uploads_card_processor_and_adapter_through_peft(saved_adapter, tmp_path, monkeypatch):
    base, adapter, model = saved_adapter
    hub: dict = {"commits": []}

    def create_repo(self, repo_id, **kwargs):
        hub["created"] = (repo_id, kwargs.get("private"))
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        hub["files"] = {op.path_in_repo: open(op.path_or_fileobj, encoding="utf-8").read() for op in operations}
        return SimpleNamespace(commit_url="https://hub/commit/1")

    def load_card(repo_id, **kwargs):  # the Hub answers with the card committed before
        return ModelCard(hub["files"]["README.md"])

    def upload_folder(self, working_dir, repo_id, files_timestamps, **kwargs):
        shutil.copytree(working_dir, tmp_path / "pushed")
        return "https://hub/commit/2"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", load_card)
    monkeypatch.setattr(PeftModel, "_upload_modified_files", upload_folder)
    assert push_adapter(model, "me/ship-tiny", adapter, private=True) == "https://hub/commit/2"
    assert hub["created"] == ("me/ship-tiny", True)
    assert set(hub["files"]) == {"README.md", "preprocessor_config.json"}
    pushed = tmp_path / "pushed"
    assert {p.name for p in pushed.iterdir()} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    card = (pushed / "README.md").read_text()
    assert "# SHIP adapter:" in card and "PeftModel.from_pretrained" in card  # ours, not PEFT's generic card
    assert set(CARD_TAGS) <= set(metadata(card)["tags"])
    reloaded = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(base), pushed).eval()
    torch.testing.assert_close(reloaded(pixel_values=pixels()).logits, model(pixel_values=pixels()).logits)
