# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Atomic adapter saves and a clear error for a damaged adapter file: explicit helpers, nothing of PEFT replaced.

PEFT 0.21 writes ``adapter_model.safetensors`` and ``adapter_config.json`` straight onto their final names, so an
interrupted or failing ``save_pretrained`` into an existing folder leaves a half-written adapter, and a truncated
file makes its loader fail with safetensors' bare "Error while deserializing header".

* :func:`save_adapter` runs the model's own ``save_pretrained`` into a temporary folder inside the target folder,
  then fsyncs every file it wrote and ``os.replace``-s it onto its final name. On any exception,
  ``KeyboardInterrupt`` included, the temporary folder is removed and the exception re-raised, so the previous files
  stay intact. Each file is replaced atomically on its own; the files of one save are not replaced together.
* :func:`load_adapter` checks that the adapter's safetensors files can be read, raising
  :class:`CorruptAdapterFileError` (naming the file and the fix) for a truncated or corrupted one, then loads it with
  ``PeftModel.from_pretrained``.

The ``ship-peft`` command line saves and loads through them; library users call them in place of
``save_pretrained`` / ``PeftModel.from_pretrained`` when they want the same. They work for any PEFT method.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from safetensors import SafetensorError
from safetensors.torch import load_file

_T = TypeVar("_T")

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


def save_adapter(model: Any, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory, **kwargs)``, each file replacing the previous one atomically."""
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory} is a file; save the adapter into a folder.")
    os.makedirs(save_directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".ship-peft-save.", suffix=".tmp", dir=save_directory)
    try:
        model.save_pretrained(staging, **kwargs)
        for folder, _, names in os.walk(staging):
            target = os.path.join(save_directory, os.path.relpath(folder, staging))
            os.makedirs(target, exist_ok=True)
            for name in sorted(names):
                _fsync_file(os.path.join(folder, name))
                os.replace(os.path.join(folder, name), os.path.join(target, name))
            _fsync_folder(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_adapter_files(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CorruptAdapterFileError` when a safetensors file of the local adapter folder ``path`` (or the
    file itself) cannot be read; a Hub id or a missing path is left to PEFT."""
    path = os.fspath(path)
    files = [path] if os.path.isfile(path) else glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True)
    for filename in files:
        try:
            load_file(filename)
        except SafetensorError as error:
            raise CorruptAdapterFileError(
                f"{filename} is truncated or corrupted: it is not a valid safetensors file ({error}). Save the adapter "
                "again with `save_pretrained`, or, if it came from the Hugging Face Hub, download it again with "
                "`PeftModel.from_pretrained(model, model_id, force_download=True)`."
            ) from error


def load_adapter(model: Any, path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained(model, path, **kwargs)`` after :func:`check_adapter_files`."""
    from peft import PeftModel

    check_adapter_files(path)
    return PeftModel.from_pretrained(model, path, **kwargs)
