"""Up-front checks of a task's records, so bad data fails before the first training step.

Every error names the record's source (manifest file and row, or npz entry), the field and the fix.
Checks: files exist and decode; 3D images are 3D; image and label have the same size and geometry
(spacing, origin, direction); label values lie in the task's class list; no NaN/inf voxels;
classification labels are integers in range; a split used for training is not empty.

At scale (a thousand CTs: about a second each to read and check) the records are checked by several
threads, and a record that passed is remembered (:class:`PassedRecords`) by its files' identity, so a
second fit, a sweep's next trial or another process of a DDP run skips it until a file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from lightning.pytorch.utilities import rank_zero_warn

from lorkd_pl.data.readers import ImageReadError, read_image
from lorkd_pl.io.atomic import write_json_atomic
from lorkd_pl.io.hashing import sha256sum
from lorkd_pl.registry import TaskSpec

GEOMETRY_TOLERANCE = 1e-3  # mm / direction cosines
#: Raised whenever a check is added or changed: records that passed the earlier checks are checked again.
CHECKS_VERSION = 1


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


#: Image formats held in one file (a ``.mhd``, ``.hdr`` or ``.nhdr`` header names its data in another
#: file, which a header's own size and time would not follow: such records are checked every time).
SELF_CONTAINED_SUFFIXES = (
    ".nii",
    ".nii.gz",
    ".mha",
    ".nrrd",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
)


def _stat(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _files_identity(path: Path) -> list[Any] | None:
    """What identifies an image's bytes without reading them: its file's resolved path, size,
    modification time and inode; for a folder (a DICOM series) every file directly in it. ``None``
    for a file in a format whose data may lie in another file, or a path that cannot be read."""
    try:
        if path.is_dir():
            return [_stat(path), *(_stat(entry) for entry in sorted(path.iterdir()) if entry.is_file())]
        if path.name.lower().endswith(SELF_CONTAINED_SUFFIXES):
            return _stat(path)
    except OSError:
        return None
    return None


def validation_threads(most: int = 8) -> int:
    """Threads that check records at once: the cores this process may use, at most ``most``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(most, cores))


def cache_folder() -> Path:
    """lorkd-pl's cache folder: ``$LORKD_PL_CACHE``, else ``$XDG_CACHE_HOME/lorkd-pl``, else
    ``~/.cache/lorkd-pl``."""
    if os.environ.get("LORKD_PL_CACHE"):
        return Path(os.environ["LORKD_PL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorkd-pl"


class PassedRecords:
    """The records of one task that passed the checks, remembered across processes and runs.

    A record is known by its task (name, kind, number of classes), :data:`CHECKS_VERSION` and each of
    its files' resolved path, size, modification time (ns) and inode (a DICOM folder's by every file
    in it; a label given as a number, and an image held in memory, by their values): a file written,
    replaced or moved since, or a changed class list, makes it a new record, checked again. A record
    with a file in a two-file format (``.mhd``/``.raw``, ``.hdr``/``.img``, ``.nhdr``) is never
    remembered. Only passes are kept; a record that failed is
    checked every time. The memo is a cache: one JSON file per task in ``folder`` (default
    ``<cache_folder()>/validated``), written atomically; an unreadable one counts as empty, an
    unwritable folder is warned about once and training goes on.
    """

    def __init__(self, task: TaskSpec, folder: str | Path | None = None) -> None:
        self.task = task
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task.name)[:64]
        digest = hashlib.sha256(task.name.encode()).hexdigest()[:12]
        self.path = Path(folder or cache_folder() / "validated") / f"{safe}-{digest}.json"
        self.known: set[str] = set()
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("version") == CHECKS_VERSION:
                self.known = {str(key) for key in stored.get("passed", [])}
        except (OSError, ValueError, AttributeError):
            pass
        self.added: set[str] = set()

    def key(self, record: Mapping[str, Any]) -> str | None:
        """The record's identity (None: not rememberable, e.g. a file that cannot be stat'ed)."""
        parts: list[Any] = [CHECKS_VERSION, self.task.name, self.task.kind, self.task.num_classes]
        for field in ("image", "label"):
            value = record.get(field)
            if isinstance(value, (str, Path)):
                identity = _files_identity(Path(value))
                if identity is None:
                    return None
                parts.append(identity)
            elif isinstance(value, np.ndarray):
                parts.append(
                    hashlib.sha256(str((value.dtype.str, value.shape)).encode() + value.tobytes()).hexdigest()
                )
            elif isinstance(value, (bool, int, float, np.integer, np.floating)) or value is None:
                parts.append(repr(value))
            else:
                return None
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def passed(self, key: str | None) -> bool:
        """Whether the record of ``key`` passed before."""
        return key is not None and key in self.known

    def add(self, key: str | None) -> None:
        """Remember that the record of ``key`` passed (kept by :meth:`save`)."""
        if key is not None and key not in self.known:
            self.added.add(key)

    def save(self) -> None:
        """Write the memo (the passes read at start, those of other writers since, and the new ones)."""
        if not self.added:
            return
        try:
            latest = json.loads(self.path.read_text()) if self.path.is_file() else {}
            if latest.get("version") == CHECKS_VERSION:
                self.known |= {str(key) for key in latest.get("passed", [])}
        except (OSError, ValueError, AttributeError):
            pass
        self.known |= self.added
        self.added = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"version": CHECKS_VERSION, "passed": sorted(self.known)})
        except OSError as error:
            rank_zero_warn(
                f"lorkd-pl: cannot remember the checked records of task {self.task.name!r} in {self.path} "
                f"({error}); every fit checks them again (set LORKD_PL_CACHE to a writable folder)"
            )


def validate_task(
    task: TaskSpec, splits: Sequence[str], workers: int = 1, memo: PassedRecords | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Load and check every record of ``splits``; return them by split.

    Args:
        task: the task.
        splits: its splits to check.
        workers: threads that read and check records at once (reading a volume and numpy's checks
            release the GIL).
        memo: records that passed before are skipped, and those that pass now are remembered.

    Raises:
        DataValidationError: for the first bad record (in the records' order), or a split with no records.
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
        if memo is None:
            _check_all(task, check, records, workers, lambda index: None)
        else:
            pending = [(record, key) for record in records if not memo.passed(key := memo.key(record))]
            pending_keys = [key for _, key in pending]
            try:
                _check_all(
                    task,
                    check,
                    [r for r, _ in pending],
                    workers,
                    lambda i, keys=pending_keys: memo.add(keys[i]),
                )
            finally:  # the passes before a failure are kept too
                memo.save()
        out[split] = records
    return out


def _check_all(
    task: TaskSpec, check: Any, records: list[dict[str, Any]], workers: int, passed: Callable[[int], None]
) -> None:
    """``check(task, record)`` for every record, ``workers`` at a time, calling ``passed(index)`` for
    each that passes, in the records' order; the first failure in that order is raised (the records
    still waiting are not started)."""
    if workers <= 1 or len(records) <= 1:
        for index, record in enumerate(records):
            check(task, record)
            passed(index)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorkd-pl-validate")
    try:
        for index, _ in enumerate(pool.map(lambda record: check(task, record), records)):
            passed(index)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
