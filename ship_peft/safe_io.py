# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Atomic adapter saves and a clear error for a damaged adapter file, installed into PEFT by ``register()``.

PEFT 0.21 writes ``adapter_model.safetensors`` and ``adapter_config.json`` straight onto their final names, so an
interrupted or failing ``save_pretrained`` into an existing folder leaves a half-written adapter. It has no hook
for this, so :func:`install` wraps three names that PEFT looks up at call time:

* ``peft.peft_model.safe_save_file`` (safetensors' ``save_file``): the tensors are written to a temporary file in
  the same folder (``.adapter_model.safetensors.<random>.tmp``), which is fsynced and then ``os.replace``-d onto
  the final name.
* ``peft.config.PeftConfigMixin.save_pretrained``: PEFT's own method writes the config into a temporary folder
  inside the target folder (``.adapter_config.<random>.tmp/``); its file is fsynced and ``os.replace``-d into
  the target folder.
* ``peft.utils.save_and_load.safe_load_file`` (safetensors' ``load_file``): a file whose header cannot be read
  (truncated or corrupted) raises :class:`CorruptAdapterFileError`, naming the file and the fix, instead of
  safetensors' bare "Error while deserializing header".

On any exception, ``KeyboardInterrupt`` included, the temporary file or folder is removed and the exception is
re-raised, so the previous file stays intact. Each file is replaced atomically on its own; the two files of one
``save_pretrained`` are not replaced together. The wrappers write the same bytes as PEFT, and only for SHIP
adapters: every other PEFT method in the process (LoRA, ...) goes straight to PEFT's own function, untouched. A SHIP
adapter is recognised by its tensors' names (``ship_prompts``), its config's ``peft_type``, or, for a file that
cannot be read, the ``adapter_config.json`` beside it. ``safe_serialization=False`` (PEFT calls ``torch.save`` on
``adapter_model.bin``) is not covered: wrapping it would mean patching ``torch.save`` for everyone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from safetensors import SafetensorError

from .constants import SHIP_PREFIX, ShipPeftType

_T = TypeVar("_T")

#: Attribute set on every wrapper installed here; :func:`install` checks it so that wrapping twice is a no-op.
WRAPPED_MARK = "_ship_peft_safe_io"


class CorruptAdapterFileError(ValueError, SafetensorError):
    """An adapter's safetensors file is truncated or corrupted; the safetensors error is its ``__cause__``.

    Also a ``SafetensorError``, so code that caught safetensors' error before keeps working.
    """


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; best effort, as not every file system supports it)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(folder or os.curdir, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], _T]) -> _T:
    """Call ``write(temporary)`` for a temporary path next to ``path``, then fsync it and move it onto ``path``.

    The temporary file (``.<name>.<random>.tmp`` in the same folder, so the move is a rename) is created by
    ``write`` itself, with the same permissions as a direct write. If ``write``, the fsync or the move raises
    (``KeyboardInterrupt`` included), the temporary file is removed, ``path`` is left as it was and the exception
    propagates.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        result = write(temporary)
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_folder(folder)
    return result


def atomic_save_file(save_file: Callable[..., _T]) -> Callable[..., _T]:
    """Wrap safetensors' ``save_file(tensors, filename, metadata=None)`` so that it writes atomically."""

    @functools.wraps(save_file)
    def wrapper(tensors: Any, filename: str | os.PathLike[str], *args: Any, **kwargs: Any) -> _T:
        if not any(SHIP_PREFIX in key for key in tensors):
            return save_file(tensors, filename, *args, **kwargs)  # another PEFT method: PEFT's own save
        return write_atomically(filename, lambda temporary: save_file(tensors, temporary, *args, **kwargs))

    return wrapper


def atomic_config_save(save_pretrained: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``PeftConfigMixin.save_pretrained`` so that every file it writes replaces the old one atomically."""

    @functools.wraps(save_pretrained)
    def wrapper(self: Any, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        if getattr(self, "peft_type", None) != ShipPeftType.SHIP or os.path.isfile(save_directory):
            # another PEFT method's config, or PEFT's own error for a file in the way
            return save_pretrained(self, save_directory, **kwargs)
        os.makedirs(save_directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".adapter_config.", suffix=".tmp", dir=save_directory)
        try:
            save_pretrained(self, staging, **kwargs)
            for name in sorted(os.listdir(staging)):
                _fsync_file(os.path.join(staging, name))
                os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _fsync_folder(os.fspath(save_directory))

    return wrapper


def explained_load_file(load_file: Callable[..., _T]) -> Callable[..., _T]:
    """Wrap safetensors' ``load_file(filename, ...)``: an unreadable header raises :class:`CorruptAdapterFileError`."""

    @functools.wraps(load_file)
    def wrapper(filename: str | os.PathLike[str], *args: Any, **kwargs: Any) -> _T:
        try:
            return load_file(filename, *args, **kwargs)
        except SafetensorError as error:
            if "deserializing header" not in str(error) or not _beside_a_ship_config(filename):
                raise
            raise CorruptAdapterFileError(
                f"{os.fspath(filename)} is truncated or corrupted: it is not a valid safetensors file ({error}). "
                "Save the adapter again with `save_pretrained`, or, if it came from the Hugging Face Hub, download "
                "it again with `PeftModel.from_pretrained(model, model_id, force_download=True)`."
            ) from error

    return wrapper


def _beside_a_ship_config(filename: str | os.PathLike[str]) -> bool:
    """Whether the ``adapter_config.json`` next to ``filename`` is a SHIP adapter's."""
    path = os.path.join(os.path.dirname(os.fspath(filename)), "adapter_config.json")
    try:
        with open(path) as handle:
            return json.load(handle).get("peft_type") == ShipPeftType.SHIP.value
    except (OSError, ValueError, AttributeError):
        return False


def _wrap(owner: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    current = getattr(owner, name)
    if getattr(inspect.unwrap(current, stop=lambda f: hasattr(f, WRAPPED_MARK)), WRAPPED_MARK, False):
        return  # already wrapped by us (possibly under someone else's wrapper)
    wrapper = make_wrapper(current)
    setattr(wrapper, WRAPPED_MARK, True)
    setattr(owner, name, wrapper)


def install() -> None:
    """Wrap PEFT's adapter writers and its safetensors reader as described above (idempotent)."""
    import peft.config
    import peft.peft_model
    import peft.utils.save_and_load

    _wrap(peft.peft_model, "safe_save_file", atomic_save_file)
    _wrap(peft.config.PeftConfigMixin, "save_pretrained", atomic_config_save)
    _wrap(peft.utils.save_and_load, "safe_load_file", explained_load_file)
