"""Rebuilding a lorkd-pl module from a checkpoint's plain data (hyper-parameters + state dict).

The one place that turns a loaded checkpoint back into a :class:`~lorkd_pl.models.base.TaskModule`:
used for generalist teachers, ``lorkd-pl export`` and ``lorkd-pl predict``. The caller names the module
classes it can use; the checkpoint's own marker (``lorkd_pl_model``, the class name a module writes in
``on_save_checkpoint``) selects one of them, and every class the hyper-parameters name (the backbone's
``class_path``) must lie in a trusted module (:mod:`lorkd_pl.io.trust`) before anything is imported.
This module imports no concrete module class, so the teacher (which restores generalists) and the
student (which loads a teacher) never meet here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorkd_pl.io.checkpoints import CheckpointError
from lorkd_pl.io.trust import UntrustedFileError, check_file_network
from lorkd_pl.models.base import TaskModule

#: The checkpoint entry that names the module class that wrote it.
MODEL_MARKER = "lorkd_pl_model"
#: What a checkpoint of an unaccepted kind is called in messages.
KIND_DESCRIPTIONS: dict[str, str] = {"GeneralistModule": "generalist", "LoRKDModule": "LoRKD student"}


def model_kind(checkpoint: Mapping[str, Any]) -> str | None:
    """The module class name a lorkd-pl checkpoint was written by (``None``: no marker)."""
    kind = checkpoint.get(MODEL_MARKER) if isinstance(checkpoint, Mapping) else None
    return kind if isinstance(kind, str) and kind in KIND_DESCRIPTIONS else None


def upgrade_hyperparameters(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters in today's form.

    ``rank`` saved as a list (one rank per region, before ranks were given by name) becomes the mapping
    ``{region: rank}``: in a checkpoint the list's order is its own ``regions``, so the names are known.
    A student saved before transposed convolutions carried experts (no ``transposed_convs``) is rebuilt
    without them.
    """
    out = dict(hparams)
    if "rank" in out and "transposed_convs" not in out:  # a LoRKD student of an earlier version
        out["transposed_convs"] = False
    ranks, regions = out.get("rank"), out.get("regions")
    if isinstance(ranks, (list, tuple)) and isinstance(regions, (list, tuple)) and len(ranks) == len(regions):
        out["rank"] = dict(zip(regions, ranks, strict=True))
    return out


def restore_module(
    checkpoint: Mapping[str, Any], source: str | Path, classes: Sequence[type[TaskModule]]
) -> TaskModule:
    """The module saved in ``checkpoint`` (already loaded with ``weights_only=True``), in eval mode.

    Args:
        checkpoint: a Lightning checkpoint dict written by a lorkd-pl run.
        source: where it came from (for messages).
        classes: the module classes the caller can use; the checkpoint's marker picks one by name.
            A class's ``restore_overrides`` (arguments that would load a teacher or copy weights)
            replace the saved hyper-parameters.

    Raises:
        CheckpointError: if it is not a lorkd-pl checkpoint of an accepted kind.
    """
    kind = model_kind(checkpoint)
    by_name = {cls.__name__: cls for cls in classes}
    if kind not in by_name:
        found = f"it is a {KIND_DESCRIPTIONS[kind]} checkpoint" if kind else "no lorkd-pl model marker"
        wanted = " or ".join(KIND_DESCRIPTIONS.get(name, name) for name in by_name)
        raise CheckpointError(
            f"{source} is not a {wanted} checkpoint ({found}); "
            "train one with the packaged configs (`lorkd-pl config`)"
        )
    cls = by_name[kind]
    try:  # before anything named in the file is imported
        saved = checkpoint.get("hyper_parameters") or {}
        check_file_network(saved, str(source), saved.get("backbone"))
    except UntrustedFileError as error:
        raise CheckpointError(str(error)) from None
    accepted = inspect.signature(cls.__init__).parameters
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in accepted}
    hparams = upgrade_hyperparameters(hparams)
    hparams.update(cls.restore_overrides)
    module = cls(**hparams)
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("projection.")}
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(
            f"{source}: its weights do not match the network its hyper-parameters describe "
            f"({' '.join(first[:2])[:300]}); the file was altered or mixed from two runs"
        ) from None
    return module.eval()
