"""Up-front checks of a task's records, so bad data fails before the first training step.

Every error names the record's source (manifest file and row, or npz entry), the field and the fix.
Checks: files exist and decode; 3D images are 3D; image and label have the same size and geometry
(spacing, origin, direction); label values lie in the task's class list; no NaN/inf voxels;
classification labels are integers in range; a split used for training is not empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lorkd_pl.data.readers import ImageReadError, read_image
from lorkd_pl.io.hashing import sha256sum
from lorkd_pl.registry import TaskSpec

GEOMETRY_TOLERANCE = 1e-3  # mm / direction cosines


class DataValidationError(ValueError):
    """A record of a task fails a check; the message names file, field and fix."""


def _where(task: TaskSpec, record: Mapping[str, Any]) -> str:
    return f"task {task.name!r}, {record.get('source', record.get('case', 'record'))}"


def _load(task: TaskSpec, record: Mapping[str, Any], field: str) -> sitk.Image:
    value = record[field]
    try:
        return read_image(value, check=True)
    except ImageReadError as error:
        raise DataValidationError(f"{_where(task, record)}: field {field!r}: {error}") from None


def validate_seg3d_record(task: TaskSpec, record: Mapping[str, Any]) -> None:
    """Check one 3D segmentation record (reads image and label)."""
    where = _where(task, record)
    image, label = _load(task, record, "image"), _load(task, record, "label")
    for field, item in (("image", image), ("label", label)):
        if item.GetDimension() != 3:
            raise DataValidationError(
                f"{where}: field {field!r} ({record[field]}) is {item.GetDimension()}D; "
                "a seg3d task needs 3D "
                "volumes (use a cls2d task for 2D images)"
            )
        if item.GetNumberOfComponentsPerPixel() != 1:
            raise DataValidationError(
                f"{where}: field {field!r} ({record[field]}) has {item.GetNumberOfComponentsPerPixel()} "
                "components per voxel (RGB or a vector image); a seg3d task needs one value per voxel "
                "(convert it to a scalar volume)"
            )
    if image.GetSize() != label.GetSize():
        raise DataValidationError(
            f"{where}: image {record['image']} has size {image.GetSize()} but label {record['label']} has "
            f"{label.GetSize()}; resample the label onto the image grid"
        )
    for name, a, b in (
        ("spacing", image.GetSpacing(), label.GetSpacing()),
        ("origin", image.GetOrigin(), label.GetOrigin()),
        ("direction", image.GetDirection(), label.GetDirection()),
    ):
        if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE):
            raise DataValidationError(
                f"{where}: image and label disagree on {name} ({_fmt(a)} vs {_fmt(b)}); the label must share "
                "the image's geometry (resample it with the image as reference)"
            )
    voxels = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(voxels).all():
        raise DataValidationError(
            f"{where}: field 'image' ({record['image']}) contains NaN or infinite voxels; "
            "fix or drop the scan"
        )
    values = np.unique(sitk.GetArrayViewFromImage(label))
    bad = [int(v) for v in values if v < 0 or v >= task.num_classes or v != int(v)]
    if bad:
        raise DataValidationError(
            f"{where}: field 'label' ({record['label']}) has values {bad} outside the task's classes "
            f"0..{task.num_classes - 1} {list(task.classes)}; fix the label map or the task's class list"
        )


def validate_cls2d_record(task: TaskSpec, record: Mapping[str, Any]) -> None:
    """Check one 2D classification record."""
    where = _where(task, record)
    label = record["label"]
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise DataValidationError(f"{where}: field 'label' is {label!r}; give the class index (an integer)")
    if not 0 <= int(label) < task.num_classes:
        raise DataValidationError(
            f"{where}: field 'label' is {label}, outside the task's classes 0..{task.num_classes - 1} "
            f"{list(task.classes)}"
        )
    image = record["image"]
    if isinstance(image, np.ndarray):
        array = image
    else:
        loaded = _load(task, record, "image")
        array = sitk.GetArrayViewFromImage(loaded)
        if loaded.GetDimension() != 2 and not (loaded.GetDimension() == 3 and loaded.GetSize()[2] == 1):
            raise DataValidationError(
                f"{where}: field 'image' ({image}) is {loaded.GetDimension()}D; cls2d needs 2D"
            )
    if array.ndim not in (2, 3) or (
        array.ndim == 3 and array.shape[-1] not in (1, 3) and array.shape[0] != 1
    ):
        raise DataValidationError(
            f"{where}: field 'image' has shape {array.shape}; expected (H, W) or (H, W, 3)"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataValidationError(f"{where}: field 'image' contains NaN or infinite values")


def check_duplicates(task: TaskSpec) -> None:
    """Refuse a case id used twice, the same image file in two records (e.g. in train and test), or
    two records whose images are byte-identical copies under other names.

    All splits are read (records, and the bytes of image files whose sizes coincide), so a test case
    that leaks into training is found whichever splits a run uses.

    Raises:
        DataValidationError: naming both records and the option for deliberate reuse.
    """
    cases: dict[str, str] = {}
    images: dict[str, str] = {}
    by_size: dict[int, list[tuple[Path, str]]] = {}
    contents: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for record in task.records(split):
            where = f"{record.get('source', record.get('case'))} ({split})"
            case = str(record.get("case", ""))
            image = record.get("image")
            key = str(Path(image).resolve()) if isinstance(image, (str, Path)) else None
            for table, value, what in ((cases, case, "case id"), (images, key, "image")):
                if value and value in table:
                    _duplicate(task, what, repr(value), table[value], where)
                if value:
                    table[value] = where
            if isinstance(image, (str, Path)) and Path(image).is_file():
                by_size.setdefault(Path(image).stat().st_size, []).append((Path(image), where))
            elif isinstance(image, np.ndarray):
                digest = hashlib.sha256(str((image.dtype.str, image.shape)).encode() + image.tobytes())
                _same_content(task, contents, digest.hexdigest(), where)
    for group in by_size.values():  # only files of one size can be copies: hash those alone
        for path, where in group if len(group) > 1 else ():
            _same_content(task, contents, sha256sum(path), where)


def _same_content(task: TaskSpec, seen: dict[str, str], digest: str, where: str) -> None:
    if digest in seen:
        _duplicate(task, "image content", "(byte-identical copies)", seen[digest], where)
    seen[digest] = where


def _duplicate(task: TaskSpec, what: str, value: str, first: str, second: str) -> None:
    raise DataValidationError(
        f"task {task.name!r}: {what} {value} appears twice: {first} and {second}; a case in two places "
        "(worst: in train and test) makes the metrics lie — fix the data, or set "
        "data.init_args.allow_duplicates=true if the reuse is deliberate"
    )


def validate_task(task: TaskSpec, splits: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Load and check every record of ``splits``; return them by split.

    Raises:
        DataValidationError: for the first bad record, or a split with no records.
    """
    check = validate_seg3d_record if task.kind == "seg3d" else validate_cls2d_record
    out = {}
    for split in splits:
        records = [dict(r) for r in task.records(split)]
        if not records:
            raise DataValidationError(
                f"task {task.name!r} (from {task.source or 'code'}) has no {split!r} samples; add rows with "
                f"split={split!r} to its data or drop the task"
            )
        for record in records:
            for field in ("image", "label"):
                if field not in record:
                    raise DataValidationError(f"{_where(task, record)}: missing field {field!r}")
            check(task, record)
        out[split] = records
    return out


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
