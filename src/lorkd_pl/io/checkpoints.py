"""Checkpoint files: written atomically, read with ``weights_only=True`` and errors that name the fix.

:class:`AtomicCheckpointIO` is the Lightning checkpoint plugin every ``lorkd-pl`` run uses (the CLI
installs it; in Python pass ``Trainer(plugins=[AtomicCheckpointIO()])``):

* a checkpoint is written to a temporary file in the same folder, flushed to disk and renamed onto its
  final name, so a crash (or SIGKILL) during the write leaves the previous ``last.ckpt`` intact and no
  half-written file behind (Lightning's own writer goes through a temporary file in the system's
  ``/tmp``, which on clusters is often another file system: the final move is then a copy);
* every load (resume with ``--ckpt_path``, ``validate``/``test``/``predict``) uses
  :func:`load_checkpoint_file`: ``torch.load(weights_only=True)``, so a file carrying a pickled code
  payload is refused instead of run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lorkd_pl.io.atomic import atomic_file


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be loaded; names the file and the fix."""


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with a clear error for missing, corrupt or unsafe files
    (``mmap``: tensors are mapped from the file, not read, for a caller that reads only plain values).

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or holds pickled objects other than
            tensors and plain containers (which could run code when unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"refused to load {path}: it holds pickled objects other than tensors and plain values, "
            f"which could run code (weights_only=True: {reason}). Load only checkpoints written by "
            "lorkd-pl/Lightning; if you made this file and trust it, re-save just its state dict "
            "(torch.save(model.state_dict(), path))"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); use an "
            "intact copy (lorkd-pl writes checkpoints atomically: last.ckpt is either old or complete)"
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin: atomic same-folder writes, ``weights_only=True`` loads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to a temporary file beside ``path``, fsync it and rename it onto ``path``."""
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as temporary:
            torch.save(checkpoint, temporary)
        return None

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load with ``weights_only=True`` whatever the caller asks (see :func:`load_checkpoint_file`)."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_file(path, map_location if map_location is not None else "cpu")
