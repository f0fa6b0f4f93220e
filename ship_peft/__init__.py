# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""ship-peft: SHIP (Semantic Hierarchical Prompt tuning, ICASSP 2025) as a Hugging Face PEFT method.

``import ship_peft`` registers SHIP with PEFT, so ``peft.get_peft_model``, ``PeftModel.from_pretrained`` and
``PeftConfig.from_pretrained`` handle SHIP adapters.
"""

from . import export, presets
from .calibration import CalibrationResult, initialize_ship_weights, kmeans, layer_affinity, semantic_levels
from .classifier import ImageClassifier
from .config import ShipConfig
from .explain import Explanation, explain
from .call import record_matching_loss
from .layer import ShipBlock, ShipPromptBank, ShipPrompts
from .model import ShipModel, get_prompt_bank
from .constants import ShipPeftType
from .registration import register
from .safe_io import CorruptAdapterFileError

__version__ = "0.1.0"

register()

__all__ = [
    "CalibrationResult",
    "CorruptAdapterFileError",
    "Explanation",
    "ImageClassifier",
    "ShipConfig",
    "ShipBlock",
    "ShipModel",
    "ShipPeftType",
    "ShipPromptBank",
    "ShipPrompts",
    "get_prompt_bank",
    "initialize_ship_weights",
    "kmeans",
    "layer_affinity",
    "explain",
    "export",
    "presets",
    "record_matching_loss",
    "semantic_levels",
]
