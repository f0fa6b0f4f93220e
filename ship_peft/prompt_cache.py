# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The eval memo of the shared prompt path (``docs/method.md`` §5): one object that the prompt cache, mixed-adapter
batches and export share.

With decoupled attention, the semantic and shared prompts' keys and values in every layer are the same for every
input. In eval they can be kept from one call to the next: a pass that finds none for its adapter collects them
block by block and stores them at the last block; later passes read them. A memo is used only while its key
matches: the prompts' and blocks' tensors (their storage and in-place version counters, host-side values, no
device read), the dtype, the device and autocast. Edits through ``tensor.data`` bump no version counter: call
:meth:`refresh` (``ShipModel.refresh_prompt_cache``) after them.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

#: One pair of keys and values ``[1, H, K+S, d]`` per layer.
PromptPath = list[tuple[torch.Tensor, torch.Tensor]]


class PromptCache:
    """Memoised shared prompt paths, by adapter name; and paths fixed for export, which win over the memo."""

    def __init__(self) -> None:
        self.enabled = False
        self._memo: dict[str, tuple[tuple, PromptPath]] = {}
        self._fixed: dict[str, PromptPath] = {}

    @staticmethod
    def key(tensors: Iterable[torch.Tensor], reference: torch.Tensor) -> tuple:
        """What a memo depends on: every tensor's storage and version, and ``reference``'s dtype, device and
        autocast state (host-side values only)."""
        device_type = reference.device.type
        return (
            reference.dtype,
            reference.device,
            torch.is_autocast_enabled(device_type),
            tuple((tensor.data_ptr(), tensor._version) for tensor in tensors),
        )

    def lookup(self, adapter_name: str, key: Optional[tuple]) -> Optional[PromptPath]:
        """The fixed path of ``adapter_name``, else its memo when the cache is on and ``key`` matches, else None."""
        if adapter_name in self._fixed:
            return self._fixed[adapter_name]
        memo = self._memo.get(adapter_name)
        return memo[1] if memo is not None and memo[0] == key else None

    def store(self, adapter_name: str, key: tuple, path: PromptPath) -> None:
        self._memo[adapter_name] = (key, [(k.detach(), v.detach()) for k, v in path])

    def has_memo(self, adapter_name: str) -> bool:
        return adapter_name in self._memo

    def lookup_memo(self, adapter_name: str) -> PromptPath:
        """``adapter_name``'s memoised path, whatever its key (export fixes it while the weights stay put)."""
        return self._memo[adapter_name][1]

    def refresh(self) -> None:
        """Drop every memo: the next eval forward of each adapter runs its shared path afresh."""
        self._memo = {}

    def fix(self, adapter_name: str, path: PromptPath) -> None:
        """Use ``path`` for ``adapter_name`` in eval until :meth:`unfix` (export traces it as constants)."""
        self._fixed[adapter_name] = path

    def unfix(self, adapter_name: str) -> None:
        self._fixed.pop(adapter_name, None)

    def forget(self, adapter_name: str) -> None:
        """Drop what is kept for a deleted adapter."""
        self._memo.pop(adapter_name, None)
        self._fixed.pop(adapter_name, None)
