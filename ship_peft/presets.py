# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""SHIP, its ablations and the baselines it is compared with, each defined once.

The command line, the training recipes and both benchmarks build their methods here::

    config = ship_peft.presets.adapter_config("vpt-deep", num_layers=12, num_prompts=60)

A SHIP-family preset is a set of ``ShipConfig`` overrides on top of the caller's SHIP hyper-parameters (so the
prompt count of VPT is the caller's ``num_prompts``: the CLI compares VPT-deep with K prompts per layer, the speed
benchmark with K + S, as many tokens as SHIP). ``lora`` is PEFT's LoRA; ``linear`` and ``full`` have no adapter
(:func:`adapter_config` returns None): the linear probe trains the head alone, full fine-tuning every weight.
"""

from __future__ import annotations

from typing import Any, Optional

from peft import LoraConfig, PeftConfig

from .config import ShipConfig

#: Stands for "every layer of the backbone" in a preset's ``prompt_layers``.
EVERY_LAYER = "every layer"

#: What makes a prompt method plain VPT: no shared or attribute prompts, one joint softmax, no matching loss.
VPT = dict(num_shared_prompts=0, num_attribute_layers=0, decoupled_attention=False, matching_loss_weight=0.0)

#: SHIP-family presets: ``ShipConfig`` overrides (docs/method.md §5: the ablations are config switches).
SHIP_PRESETS: dict[str, dict[str, Any]] = {
    "ship": {},
    "vpt-deep": dict(VPT, prompt_layers=EVERY_LAYER),  # fresh prompts at every layer
    "vpt-shallow": dict(VPT, prompt_layers=[0]),  # prompts inserted at layer 0 and carried through
    "ship-no-levels": dict(prompt_layers=EVERY_LAYER, share_threshold=1.0),  # every layer its own level
    "ship-no-shared": dict(num_shared_prompts=0),
    "ship-no-attribute": dict(num_attribute_layers=0),
    "ship-no-matching": dict(matching_loss_weight=0.0),
    "ship-no-decoupled": dict(decoupled_attention=False),
}

#: Every preset and its title in tables.
TITLES: dict[str, str] = {
    "ship": "SHIP",
    "vpt-deep": "VPT-deep",
    "vpt-shallow": "VPT-shallow",
    "ship-no-levels": "SHIP without levels",
    "ship-no-shared": "SHIP without shared prompts",
    "ship-no-attribute": "SHIP without attribute prompts",
    "ship-no-matching": "SHIP without matching loss",
    "ship-no-decoupled": "SHIP without decoupled attention",
    "lora": "LoRA r=8",
    "linear": "linear probe",
    "full": "full fine-tuning",
}
PRESETS = tuple(TITLES)

#: PEFT LoRA as the benchmarks run it: rank 8, alpha 16, no dropout, on the query and value projections.
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def adapter_config(
    name: str, num_layers: int, modules_to_save: Optional[list[str]] = None, **ship_values: Any
) -> Optional[PeftConfig]:
    """The PEFT config of preset ``name`` for a backbone of ``num_layers`` blocks (None: ``linear``, ``full``).

    ``ship_values`` are ``ShipConfig`` fields the SHIP-family presets start from (the preset's overrides win);
    ``modules_to_save`` goes to LoRA (SHIP finds the classifier itself).
    """
    if name not in TITLES:
        raise ValueError(f"Unknown method preset {name!r}; choose from {', '.join(PRESETS)}.")
    if name in ("linear", "full"):
        return None
    if name == "lora":
        return LoraConfig(**LORA, modules_to_save=modules_to_save)
    values = {**ship_values, **SHIP_PRESETS[name]}
    if values.get("prompt_layers") == EVERY_LAYER:
        values["prompt_layers"] = list(range(num_layers))
    return ShipConfig(**values)


__all__ = ["EVERY_LAYER", "LORA", "PRESETS", "SHIP_PRESETS", "TITLES", "VPT", "adapter_config"]
