"""Rebuilding a lorkd-pl module from a checkpoint's plain data (hyper-parameters + state dict).

The one place that turns a loaded checkpoint back into a :class:`~lorkd_pl.models.base.TaskModule`:
used for generalist teachers, ``lorkd-pl export`` and ``lorkd-pl predict``. The checkpoint's own
marker (``lorkd_pl_model``) selects the class from a fixed table, and every class the hyper-parameters
name (the backbone's ``class_path``) must lie in a trusted module (:mod:`lorkd_pl.io.trust`) before
anything is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorkd_pl.io.checkpoints import CheckpointError
from lorkd_pl.io.trust import UntrustedFileError, check_file_network
from lorkd_pl.models.base import TaskModule
from lorkd_pl.models.generalist import GeneralistModule
from lorkd_pl.models.lorkd import LoRKDModule

MODEL_CLASSES: dict[str, type[TaskModule]] = {
    "GeneralistModule": GeneralistModule,
    "LoRKDModule": LoRKDModule,
}
DESCRIPTIONS: dict[str, str] = {"GeneralistModule": "generalist", "LoRKDModule": "LoRKD student"}
#: Arguments that would load a teacher or copy weights: never wanted when restoring trained weights.
STUDENT_OVERRIDES: dict[str, Any] = {"teacher": None, "kd": "none", "init_from_teacher": False}


def model_kind(checkpoint: Mapping[str, Any]) -> str | None:
    """``"GeneralistModule"``, ``"LoRKDModule"`` or ``None`` (not a lorkd-pl model checkpoint)."""
    kind = checkpoint.get("lorkd_pl_model") if isinstance(checkpoint, Mapping) else None
    return kind if kind in MODEL_CLASSES else None


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
    checkpoint: Mapping[str, Any], source: str | Path, accept: Sequence[str] = tuple(MODEL_CLASSES)
) -> TaskModule:
    """The module saved in ``checkpoint`` (already loaded with ``weights_only=True``), in eval mode.

    Args:
        checkpoint: a Lightning checkpoint dict written by a lorkd-pl run.
        source: where it came from (for messages).
        accept: the model kinds the caller can use.

    Raises:
        CheckpointError: if it is not a lorkd-pl checkpoint of an accepted kind.
    """
    kind = model_kind(checkpoint)
    if kind not in accept:
        found = f"it is a {DESCRIPTIONS[kind]} checkpoint" if kind else "no lorkd-pl model marker"
        raise CheckpointError(
            f"{source} is not a {' or '.join(DESCRIPTIONS[k] for k in accept)} checkpoint ({found}); "
            "train one with the packaged configs (`lorkd-pl config`)"
        )
    cls = MODEL_CLASSES[kind]
    try:  # before anything named in the file is imported
        saved = checkpoint.get("hyper_parameters") or {}
        check_file_network(saved, str(source), saved.get("backbone"))
    except UntrustedFileError as error:
        raise CheckpointError(str(error)) from None
    accepted = inspect.signature(cls.__init__).parameters
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in accepted}
    hparams = upgrade_hyperparameters(hparams)
    if kind == "LoRKDModule":
        hparams.update(STUDENT_OVERRIDES)
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
