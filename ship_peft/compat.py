# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The one place where ship-peft reads a private API of torch.

transformers 5 records ``output_hidden_states`` with forward hooks that it installs on the instances of the model's
block class (``_can_record_outputs``, keyed by class). Inside a SHIP block the host's block does not run its own
forward when an adapter is active (SHIP runs the block's parts with the prompts appended), so those hooks would not
fire. :func:`run_forward_hooks` shows them the image tokens SHIP ran through the block. Hooks on the SHIP block
itself, the module in the host's list, need none of this: they fire as on any module.
"""

from __future__ import annotations

import torch
from torch import nn


def run_forward_hooks(block: nn.Module, block_input: torch.Tensor, block_output: torch.Tensor) -> None:
    """Call ``block``'s forward hooks as if ``block(block_input)`` had returned ``block_output``."""
    for hook_id, hook in list(block._forward_hooks.items()):
        if hook_id in block._forward_hooks_with_kwargs:
            hook(block, (block_input,), {}, block_output)
        else:
            hook(block, (block_input,), block_output)
