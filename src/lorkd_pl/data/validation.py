"""Up-front checks of a task's records, so bad data fails before the first training step.

Every error names the record's source (manifest file and row, or npz entry), the field and the fix.
Checks: files exist and decode; 3D images are 3D; image and label have the same size and geometry
(spacing, origin, direction); label values lie in the task's class list; no NaN/inf voxels;
classification labels are integers in range; a split used for training is not empty.

At scale (a thousand CTs: about a second each to read and check) the records are checked by several
threads, and a record that passed is remembered (:class:`PassedRecords`) by its files' identity, so a
later fit or a sweep's next trial skips it until a file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
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


def array_digest(array: np.ndarray) -> str:
    """sha256 of an in-memory image: its dtype, shape and bytes."""
    return hashlib.sha256(str((array.dtype.str, array.shape)).encode() + array.tobytes()).hexdigest()


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
                _same_content(task, contents, array_digest(image), where)
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


#: Image formats whose data normally lie in the file itself; ``.mha`` and ``.nrrd`` headers may still
#: name a data file elsewhere (checked in the header). A ``.mhd``, ``.hdr`` or ``.nhdr`` header names its
#: data in another file, which the header's own identity would not follow: never remembered.
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
#: A file changed this recently (ns) before the checks began is not remembered: on file systems whose
#: clock ticks coarsely (1-10 ms before Linux 6.13; 1-2 s on ext3, FAT, some network shares) a second
#: change within the same tick would leave its times as they were ("racy git").
RECENT_CHANGE_NS = 3 * 10**9


def _stat(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _header_names_other_data(path: Path) -> bool:
    """Whether a ``.mha``/``.nrrd`` header names a data file other than itself (read from its first
    64 KiB; a header that does not end there counts as naming one)."""
    suffix = path.name.lower()
    if not suffix.endswith((".mha", ".nrrd")):
        return False
    with path.open("rb") as file:
        head = file.read(65536)
    if suffix.endswith(".mha"):  # MetaImage: "ElementDataFile = LOCAL" is its last header line
        match = re.search(rb"^\s*ElementDataFile\s*=\s*(\S+)", head, re.MULTILINE)
        return match is None or match.group(1) != b"LOCAL"
    end = head.find(b"\n\n")  # NRRD: the header ends at its first blank line
    if end < 0:
        return True
    return re.search(rb"^\s*data\s?file\s*:", head[:end], re.MULTILINE | re.IGNORECASE) is not None


def _files_identity(path: Path) -> list[Any] | None:
    """What identifies an image's bytes without reading them: its file's resolved path, device, inode,
    size, modification and change times (the change time moves on every write, and no user tool sets
    it back, unlike ``cp -p`` or ``tar`` the modification time); for a folder (a DICOM series) every file
    directly in it. ``None`` for a file whose data may lie in another file, or a path that cannot be
    read."""
    try:
        if path.is_dir():
            return [_stat(path), *(_stat(entry) for entry in sorted(path.iterdir()) if entry.is_file())]
        if path.name.lower().endswith(SELF_CONTAINED_SUFFIXES) and not _header_names_other_data(path):
            return _stat(path)
    except (OSError, ValueError):
        return None
    return None


def _newest_change_ns(identity: list[Any]) -> int:
    """The latest modification or change time in an identity of :func:`_files_identity`."""
    stats = identity if identity and isinstance(identity[0], list) else [identity]
    return max(max(stat[4], stat[5]) for stat in stats)


def validation_threads(most: int = 8) -> int:
    """Threads that check records at once in this process: the cores it may use, at most ``most`` per
    machine, shared by the processes a DDP run starts on it (``LOCAL_WORLD_SIZE``): each thread holds
    one case's image and label."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    return max(1, min(most, cores) // local_processes)


def cache_folder() -> Path | None:
    """lorkd-pl's cache folder: ``$LORKD_PL_CACHE``, else ``$XDG_CACHE_HOME/lorkd-pl``, else
    ``~/.cache/lorkd-pl``; ``None`` without any of them (no home directory)."""
    if os.environ.get("LORKD_PL_CACHE"):
        return Path(os.environ["LORKD_PL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "lorkd-pl"
    try:
        return Path.home() / ".cache" / "lorkd-pl"
    except RuntimeError:
        return None


def _read_passed(path: Path | None) -> set[str]:
    """The keys of a memo file; an empty set for a missing, damaged or foreign one."""
    if path is None:
        return set()
    try:
        stored = json.loads(path.read_text())
        passed = stored.get("passed") if isinstance(stored, dict) else None
        if stored.get("version") != CHECKS_VERSION or not isinstance(passed, list):
            return set()
        return {key for key in passed if isinstance(key, str)}
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return set()


class PassedRecords:
    """The records of one task that passed the checks, remembered across processes and runs.

    A record is known by its task (name, kind, number of classes: what the checks depend on),
    :data:`CHECKS_VERSION` and each of its files' resolved path, device, inode, size, modification
    and change times (a DICOM folder's by every file in it; a label given as a number, and an image
    held in memory, by their values): a file written, replaced (also by ``cp -p`` or ``tar``, which
    keep the modification time: the change time moves) or moved since makes it a new record, checked
    again. Never remembered: a record with a file whose data may lie in another file (``.mhd``,
    ``.hdr``, ``.nhdr``, and ``.mha``/``.nrrd`` headers that name a data file), a file changed less
    than :data:`RECENT_CHANGE_NS` before the checks began or during them, and a record that failed.
    The memo is a cache: one JSON file per task in ``folder`` (default ``<cache_folder()>/validated``),
    written atomically; a damaged one counts as empty, an unwritable folder (or none: no home
    directory) is warned about once and training goes on.
    """

    def __init__(self, task: TaskSpec, folder: str | Path | None = None) -> None:
        self.task = task
        self.started_ns = time.time_ns()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task.name)[:64]
        digest = hashlib.sha256(task.name.encode()).hexdigest()[:12]
        name = f"{safe}-{digest}.json"
        if folder is not None:
            self.path: Path | None = Path(folder) / name
        else:
            root = cache_folder()
            self.path = root / "validated" / name if root is not None else None
        self.known = _read_passed(self.path)
        self.added: set[str] = set()

    def key(self, record: Mapping[str, Any]) -> str | None:
        """The record's identity (None: not rememberable, e.g. a file that cannot be stat'ed)."""
        identity = self._identity(record)
        return None if identity is None else self._key_of(identity[0])

    def _key_of(self, parts: list[Any]) -> str:
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _identity(self, record: Mapping[str, Any]) -> tuple[list[Any], list[list[Any]]] | None:
        """``(parts of the key, identities of the record's files)``, or None (not rememberable)."""
        parts: list[Any] = [CHECKS_VERSION, self.task.name, self.task.kind, self.task.num_classes]
        files = []
        for field in ("image", "label"):
            value = record.get(field)
            if isinstance(value, (str, Path)):
                identity = _files_identity(Path(value))
                if identity is None:
                    return None
                parts.append(identity)
                files.append(identity)
            elif isinstance(value, np.ndarray):
                parts.append(array_digest(value))
            elif isinstance(value, (bool, int, float, np.integer, np.floating)) or value is None:
                parts.append(repr(value))
            else:
                return None
        return parts, files

    def passed(self, key: str | None) -> bool:
        """Whether the record of ``key`` passed before."""
        return key is not None and key in self.known

    def add(self, key: str | None, record: Mapping[str, Any]) -> None:
        """Remember that ``record`` (whose key was ``key`` before its check) passed, unless one of its
        files changed since, or shortly before the checks began (kept by :meth:`save`)."""
        if key is None or key in self.known:
            return
        identity = self._identity(record)  # once more, after the check
        if identity is None or self._key_of(identity[0]) != key:
            return
        if any(_newest_change_ns(f) >= self.started_ns - RECENT_CHANGE_NS for f in identity[1]):
            return
        self.added.add(key)

    def save(self) -> None:
        """Write the memo (the passes read at start, those of other writers since, and the new ones)."""
        if not self.added:
            return
        if self.path is None:
            self.added = set()
            rank_zero_warn(
                f"lorkd-pl: cannot remember the checked records of task {self.task.name!r}: no cache folder "
                "(no home directory); every fit checks them again (set LORKD_PL_CACHE to a writable folder)"
            )
            return
        self.known |= _read_passed(self.path) | self.added
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
    check_kind = validate_seg3d_record if task.kind == "seg3d" else validate_cls2d_record

    def check(task: TaskSpec, record: Mapping[str, Any]) -> None:
        for field in ("image", "label"):
            if field not in record:
                raise DataValidationError(f"{_where(task, record)}: missing field {field!r}")
        check_kind(task, record)

    out = {}
    for split in splits:
        records = [dict(r) for r in task.records(split)]
        if not records:
            raise DataValidationError(
                f"task {task.name!r} (from {task.source or 'code'}) has no {split!r} samples; add rows with "
                f"split={split!r} to its data or drop the task"
            )
        if memo is None:
            _check_all(task, check, records, workers, lambda index: None)
        else:
            pending = [(record, key) for record in records if not memo.passed(key := memo.key(record))]
            try:
                _check_all(
                    task,
                    check,
                    [record for record, _ in pending],
                    workers,
                    lambda i, pending=pending: memo.add(pending[i][1], pending[i][0]),
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
