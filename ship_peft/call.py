# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""State that belongs to one call, never to a module.

* :class:`ShipCall`: what one ``PeftModel`` call tells SHIP's blocks (the per-sample ``adapter_names``) and what it
  gets back (the matching loss). :class:`~ship_peft.ShipModel` opens one around every ``PeftModel`` call;
  :func:`record_matching_loss` opens one around user code.
* :class:`BlockPass`: the tensors that flow from one block to the next during one forward through the blocks
  (carried prompts, attribute prompts, the top-ranked tokens, the shared path). The first block opens it, the last
  block closes it.

Both live behind ``contextvars.ContextVar``: every thread (and asyncio task) sees its own, so two threads running
forwards on one model never see each other's state, and a deep copy or pickle of the model carries none of it.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclasses.dataclass
class ShipCall:
    """One call of a SHIP model.

    Attributes:
        adapter_names: one adapter name per sample (mixed-adapter batches), or None: the active adapter for all.
        adds_to_output: whether the matching loss joins the model's output (a ``PeftModel`` call), or is only
            recorded (:func:`record_matching_loss`).
        has_labels: whether the call was given labels (the matching loss then joins the model's loss).
        loss_share: the factor that puts the matching loss on the footing of the Trainer's ``num_items_in_batch``.
        matching_loss: the unweighted matching loss of the forward (``docs/method.md`` §4), set by the last block in
            training; None in eval or with ``matching_loss_weight=0``.
        summary_scores: where the blocks record the image summary's scores over the image tokens, per layer
            (``[B, N]``), for :func:`ship_peft.explain`; None (the default) records nothing.
    """

    adapter_names: Optional[list[str]] = None
    adds_to_output: bool = False
    has_labels: bool = False
    loss_share: float = 1.0
    matching_loss: Optional[torch.Tensor] = None
    summary_scores: Optional[dict[int, torch.Tensor]] = None


class TraceableContextVar:
    """A ``ContextVar`` that ``torch.compile`` can trace: dynamo cannot trace ``ContextVar.get``, so while it traces
    a plain attribute stands in (transformers' ``CompileableContextVar`` does the same). Tracing runs the Python code
    once, in one thread; the compiled graph holds no such state."""

    def __init__(self, name: str):
        self._var: ContextVar[Any] = ContextVar(name, default=None)
        self._traced: Any = None

    def get(self) -> Any:
        return self._traced if torch.compiler.is_compiling() else self._var.get()

    def set(self, value: Any) -> Any:
        if torch.compiler.is_compiling():
            self._traced = value
            return None
        return self._var.set(value)

    def reset(self, token: Any) -> None:
        if token is None:
            self._traced = None
        else:
            self._var.reset(token)


_CALL = TraceableContextVar("ship_peft_call")
_PASS = TraceableContextVar("ship_peft_block_pass")


def current_call() -> Optional[ShipCall]:
    """The innermost open :class:`ShipCall` of this thread or task, or None."""
    return _CALL.get()


@contextmanager
def ship_call(**values: Any) -> Iterator[ShipCall]:
    """Open a :class:`ShipCall` (with ``values``) for the code inside; an enclosing call receives its matching
    loss when it closes, and lends it its ``summary_scores`` record. No block pass outlives it."""
    outer = _CALL.get()
    if outer is not None:
        values.setdefault("summary_scores", outer.summary_scores)
    call = ShipCall(**values)
    call_token, pass_token = _CALL.set(call), _PASS.set(None)
    try:
        yield call
    finally:
        _PASS.reset(pass_token)
        _CALL.reset(call_token)
        if outer is not None and call.matching_loss is not None:
            outer.matching_loss = call.matching_loss


@contextmanager
def record_matching_loss() -> Iterator[ShipCall]:
    """Collect the matching loss of the SHIP forward run inside, for models that return logits only (timm)::

        with ship_peft.record_matching_loss() as call:
            logits = model(pixel_values)
        loss = F.cross_entropy(logits, labels) + config.matching_loss_weight * call.matching_loss

    ``call.matching_loss`` is None outside training or with ``matching_loss_weight=0``. transformers models need
    none of this: their output's ``loss`` already includes it (and ``matching_loss`` is a field of the output).
    """
    with ship_call() as call:
        yield call


@dataclasses.dataclass
class GroupState:
    """One adapter's samples in a block pass, and what flows between blocks for them.

    Attributes:
        adapter_name: the adapter (``"__base__"``: the plain blocks).
        rows: the group's rows of the batch (None: the whole batch).
        prompts: the adapter's :class:`~ship_peft.layer.ShipPrompts` (None for ``"__base__"``).
        shared: whether the semantic and shared prompts run once for the group (the shared prompt path,
            ``docs/method.md`` §5) instead of once per sample.
        want_matching: whether the last block computes the matching loss.
        cached_path: the memoised keys and values of the shared path, one pair per layer (eval prompt cache hit).
        collected_path: where this pass collects them for the cache (eval prompt cache miss), else None.
        carried: the shared path's semantic-prompt outputs entering the next layer ``[1 or groups, K, D]``.
        semantic: per-sample path: each sample's semantic-prompt outputs entering the next layer ``[B, K, D]``.
        attribute: each sample's attribute-prompt outputs entering the next layer ``[B, A, D]``.
        top_tokens: the previous layer's top-ranked image tokens, for the next attribute prompts ``[B, A, D]``.
        drops: SHIP's stochastic depth of this pass, per layer (training with ``drop_path_rate > 0``); on the shared
            path ``carried`` then holds one row per history group.
        recorded_scores: the call's ``summary_scores`` record, if any (a one-adapter batch).
        matching_loss: set by the last block in training.
    """

    adapter_name: str
    rows: Optional[torch.Tensor] = None
    prompts: Any = None
    shared: bool = False
    want_matching: bool = False
    cached_path: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
    collected_path: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
    cache_key: Any = None
    carried: Optional[torch.Tensor] = None
    semantic: Optional[torch.Tensor] = None
    attribute: Optional[torch.Tensor] = None
    top_tokens: Optional[torch.Tensor] = None
    drops: Optional[list] = None
    recorded_scores: Optional[dict[int, torch.Tensor]] = None
    matching_loss: Optional[torch.Tensor] = None


@dataclasses.dataclass
class BlockPass:
    """One forward through the blocks: the state of each adapter group, updated block by block."""

    groups: list[GroupState]

    def snapshot(self) -> "BlockPass":
        """A copy whose groups can be updated without touching this pass (for a recomputation)."""
        return BlockPass([dataclasses.replace(group) for group in self.groups])


def open_pass(block_pass: BlockPass) -> None:
    """Make ``block_pass`` the running pass of this thread or task (the first block calls this)."""
    _PASS.set(block_pass)


def running_pass() -> Optional[BlockPass]:
    return _PASS.get()


def close_pass() -> None:
    """End the running pass (the last block calls this): nothing of it outlives the forward."""
    _PASS.set(None)


#: Under a host's non-reentrant gradient checkpointing (timm's ``checkpoint_seq``), a block's call is run again in
#: backward with the same input tensor and no running pass. What each block read from its pass is kept here, keyed
#: by the identity of its input tensor and dropped with it, so the recomputation reads exactly what the forward read
#: and changes nothing.
_RECOMPUTE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _without_history(value: Any) -> Any:
    """A tensor's values as a leaf that requires grad as the tensor did; anything else as is."""
    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
        return value.detach().requires_grad_()
    return value


def remember_inputs(hidden_states: torch.Tensor, block_pass: BlockPass) -> None:
    """Keep what a block reads from ``block_pass`` for a recomputation of the call on ``hidden_states``.

    Kept without autograd history: a non-reentrant recomputation only refills the saved tensors of the graph the
    forward recorded (gradients flow through that graph), so it needs the values and whether they require grad, not
    their history. With the history, the record would hold the graph, the graph would hold ``hidden_states``, and
    the entry, weakly keyed by it, would never be dropped: every training step's activations would stay alive.
    """
    _RECOMPUTE[hidden_states] = BlockPass([
        dataclasses.replace(group, **{field.name: _without_history(getattr(group, field.name))
                                      for field in dataclasses.fields(group)})
        for group in block_pass.groups
    ])


def remembered_inputs(hidden_states: torch.Tensor) -> Optional[BlockPass]:
    """The pass state a block read when it was first called on ``hidden_states`` (a recomputation), else None."""
    remembered = _RECOMPUTE.get(hidden_states)
    return None if remembered is None else remembered.snapshot()
