# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The model card of a trained SHIP adapter, and pushing the adapter to the Hugging Face Hub."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import CommitOperationAdd, HfApi
from peft import PeftModel

from ..assets import BUNDLED_BACKBONE
from ..config import ShipConfig
from .data import DIGITS

CARD_TAGS = ["ship-peft", "ship", "peft", "prompt-tuning", "vision", "image-classification"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class AdapterCard:
    """What the card of a SHIP adapter says.

    Attributes:
        config: the adapter's configuration (after calibration: its ``prompt_layers`` are the levels).
        base_model: the backbone, as given to ``--model`` (a Hub id, a folder, or the bundled backbone's name).
        dataset: the data set, as given to ``--dataset``, and a sentence describing its splits.
        label_names: the classes, in the order of the head.
        test_accuracy, validation_accuracy: top-1 at the end of training.
        trainable_parameters: prompts, prototypes excluded, and head.
        training: the training hyper-parameters (name -> value).
        comparison: other methods' test accuracy on the same data and budget (title -> accuracy).
        levels_calibrated: whether the levels were found by calibration (else given with ``prompt_layers``).
        repo_id: where the adapter is pushed (used in the loading example), if it is.
        bare_backbone: whether the backbone has no classifier of its own (DINOv3): the adapter then carries a linear
            head on its pooled feature (:class:`ship_peft.ImageClassifier`).
    """

    config: ShipConfig
    base_model: str
    dataset: str
    dataset_description: str
    label_names: list[str]
    test_accuracy: float
    validation_accuracy: Optional[float]
    trainable_parameters: int
    training: dict[str, object] = field(default_factory=dict)
    comparison: dict[str, float] = field(default_factory=dict)
    levels_calibrated: bool = True
    repo_id: Optional[str] = None
    bare_backbone: bool = False


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repository id (not a local path, not the bundled backbone)."""
    return name != BUNDLED_BACKBONE and not Path(name).expanduser().exists() and bool(_HUB_ID.match(name))


def _metadata(card: AdapterCard) -> str:
    lines = ["---", "library_name: peft", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {tag}" for tag in CARD_TAGS]
    if is_hub_id(card.base_model):
        lines.append(f"base_model: {card.base_model}")
    if card.dataset != DIGITS and is_hub_id(card.dataset):
        lines += ["datasets:", f"- {card.dataset}"]
    lines += ["metrics:", "- accuracy", "---"]
    return "\n".join(lines)


def _loading_code(card: AdapterCard) -> str:
    adapter = card.repo_id or "path/to/adapter"
    if card.base_model == BUNDLED_BACKBONE:
        imports = "from ship_peft.assets import bundled_backbone_path\n"
        base = "bundled_backbone_path()"
    else:
        imports, base = "", repr(card.base_model)
    return f"""```python
import ship_peft  # registers SHIP with PEFT: import it before loading
from peft import PeftModel
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
{imports}
config = AutoConfig.from_pretrained({adapter!r})  # the backbone's config with this adapter's label names
{_base_code(card, base)}
model = PeftModel.from_pretrained(base, {adapter!r}).eval()
processor = AutoImageProcessor.from_pretrained({adapter!r})  # the preprocessing used in training
classify = pipeline("image-classification", model=model, image_processor=processor)  # SHIP runs unmerged
```

or, on a dataset: `ship-peft evaluate {adapter} --dataset DATASET`."""


def _base_code(card: AdapterCard, base: str) -> str:
    """The line that builds the classifier the adapter loads onto."""
    if card.bare_backbone:  # the head is ship_peft.ImageClassifier's, saved with the adapter
        labels = "list(config.id2label.values())"
        return f"base = ship_peft.ImageClassifier(AutoModel.from_pretrained({base}), config.num_labels, {labels})"
    loading = "config=config, ignore_mismatched_sizes=True"
    return f"base = AutoModelForImageClassification.from_pretrained({base}, {loading})"


def model_card(card: AdapterCard) -> str:
    """The README.md of a SHIP adapter: what it is, its levels and accuracy, and how to load it."""
    config = card.config
    levels = config.prompt_layers or []
    how_found = (
        f"found by calibration with share_threshold α = {config.share_threshold}" if card.levels_calibrated else "given"
    )
    comparison = "".join(f"| {title} | {accuracy:.4f} |\n" for title, accuracy in card.comparison.items())
    validation = f"{card.validation_accuracy:.4f}" if card.validation_accuracy is not None else "—"
    names = ", ".join(card.label_names[:20]) + (", ..." if len(card.label_names) > 20 else "")
    training = ", ".join(f"{key} {value}" for key, value in card.training.items())
    prompts = (
        f"K = {config.num_prompts} per level, S = {config.num_shared_prompts} shared, A = "
        f"{config.num_attribute_prompts} attribute, M = {config.num_prototypes} prototypes, λ = "
        f"{config.prompt_attention_weight}, β = {config.attribute_mix}, matching loss weight "
        f"{config.matching_loss_weight}, stochastic depth {config.drop_path_rate}"
    )
    return f"""{_metadata(card)}

# SHIP adapter: {card.base_model} on {card.dataset}

A [SHIP](https://arxiv.org/abs/2412.16956) (Semantic Hierarchical Prompt tuning, Zhu et al., ICASSP 2025) adapter,
trained with ship-peft, which makes SHIP a PEFT method for transformers ViTs: the backbone stays frozen; prompt
tokens per semantic level, shared and attribute prompts and the classification head are trained.

| | |
|---|---|
| base model | `{card.base_model}` (frozen) |
| dataset | `{card.dataset}`: {card.dataset_description} |
| classes | {len(card.label_names)}: {names} |
| semantic levels | {len(levels)}, starting at layers `{levels}` ({how_found}) |
| attribute layers | `{config.attribute_layers()}` |
| prompts | {prompts} |
| trainable parameters | {card.trainable_parameters:,} |
| training | {training} |

## Accuracy

Top-1 at the end of training; nothing was selected on the test split.

| method | test accuracy |
|---|---|
| SHIP (this adapter) | {card.test_accuracy:.4f} |
{comparison}
Validation accuracy of this adapter: {validation}.

## How to load

{_loading_code(card)}
"""


def write_model_card(folder: Path, card: AdapterCard) -> Path:
    """Write the card as ``folder/README.md`` (replacing PEFT's generic one)."""
    path = Path(folder) / "README.md"
    path.write_text(model_card(card), encoding="utf-8")
    return path


def push_adapter(
    model: PeftModel, repo_id: str, folder: Path, private: Optional[bool] = None, token: Optional[str] = None
) -> str:
    """Push the adapter with PEFT's own ``push_to_hub``, with the card and image processor saved in ``folder``.

    These two files are committed first: ``push_to_hub`` uploads only what ``save_pretrained`` writes, and it keeps
    (and tags) the card it finds in the repository, which would otherwise be an empty one. Returns the commit URL.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    extras = [name for name in ("README.md", "preprocessor_config.json") if (Path(folder) / name).is_file()]
    api.create_commit(
        repo_id,
        operations=[CommitOperationAdd(name, str(Path(folder) / name)) for name in extras],
        commit_message="SHIP model card and image processor",
    )
    return model.push_to_hub(repo_id, private=private, token=token, tags=CARD_TAGS, commit_message="SHIP adapter")
