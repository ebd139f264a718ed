"""Precomputed teacher targets on disk: one chunked file per case, read box by box by the data pipeline.

A target is the teacher's KD target of one case's task, in the STUDENT's preprocessed grid (seg3d:
``(K_task, X, Y, Z)``; cls2d: ``(K_task,)``), made once by :mod:`lorkd_pl.models.teacher.pipeline`.
It is stored as ``<cache>/<task>/<case>.lkc`` (:mod:`lorkd_pl.data.chunked`: 32³ chunks, each
compressed on its own) together with its key: the sha256 of the teacher file's digest, the teacher's
pipeline and output convention, the task's class mapping, the student's preprocessing, the stored form
and the image's content digest. An entry whose key differs, or that is damaged, is rebuilt, never
reused. Writes are atomic (a crash leaves the old entry or none).

Two stored forms:

* dense (``teacher.cache_top_k: null``): every class's log-probability (or log-odds), ``cache_dtype``;
  a sample carries ``teacher`` ``(K_max, *S)`` (padded with zeros to the run's largest class count);
* top-k (``teacher.cache_top_k: k``, softmax teachers): per voxel the k most likely classes (``uint8``
  indices) and their log-probabilities (``cache_dtype``); a sample carries ``teacher_index`` and
  ``teacher_log_probs`` ``(k, *S)``, and KD (:func:`lorkd_pl.models.losses.kd_kl_top_k`) distils the
  stored classes and the remaining probability mass as one bucket of the other classes. With
  ``k >= K_task`` it is exact.

The data pipeline reads targets with :class:`AttachTeacherTargets` (a plain callable, so MONAI's
caching datasets cache everything before it and never the targets). Training crops read only their
own box: the attach step runs right after the random crop and reads the box the crop took (from the
image's MONAI trace), so a 128³ crop of a CT-sized case decompresses a few MiB, not the case.
Validation reads whole volumes. The flips that follow the crop flip the target with the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorkd_pl.data.chunked import DEFAULT_CHUNK, ChunkedFileError, read_box, read_header, write_chunked
from lorkd_pl.io.hashing import sha256sum

KEY = "teacher"  # the sample / batch key of a dense target
INDEX_KEY = "teacher_index"  # top-k: the classes (uint8) ...
LOG_PROBS_KEY = "teacher_log_probs"  # ... and their log-probabilities
TARGET_KEYS: tuple[str, ...] = (KEY, INDEX_KEY, LOG_PROBS_KEY)
#: The log-probability of an unused top-k slot (a task with fewer classes than k): exp() is exactly 0.
EMPTY_SLOT = -30000.0
FORMAT_VERSION = 2
SUFFIX = ".lkc"


class TeacherTargetError(ValueError):
    """A cached teacher target is missing, stale or does not fit its case."""


def _file_name(case: str) -> str:
    """``<task>/<case id>`` → a safe relative path ``<task>/<case id>.lkc``."""
    task, _, case_id = case.partition("/")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id) or "case"
    digest = hashlib.sha256(case_id.encode()).hexdigest()[:8]  # ids that differ only in unsafe characters
    return f"{task}/{safe}-{digest}{SUFFIX}"


def image_digest(image: Any, entry: Mapping[str, Any] | None = None) -> tuple[str, list[int]]:
    """The content digest of a record's image, and the ``[size, mtime_ns]`` it was taken at.

    A file whose size and modification time are those stored in ``entry`` reuses the stored digest
    (as ``make`` and ``rsync`` do); anything else is read and hashed. In-memory arrays are hashed.
    """
    if isinstance(image, (str, os.PathLike)) and Path(image).is_file():
        stat = Path(image).stat()
        seen = [int(stat.st_size), int(stat.st_mtime_ns)]
        if entry is not None and list(entry.get("image_stat", [])) == seen:
            return str(entry["image_sha256"]), seen
        return sha256sum(image), seen
    if isinstance(image, (str, os.PathLike)):  # a DICOM series folder
        return sha256sum(image), [-1, -1]
    array = np.ascontiguousarray(np.asarray(image))
    digest = hashlib.sha256(str((array.dtype.str, array.shape)).encode() + array.tobytes()).hexdigest()
    return digest, [-1, -1]


class TeacherTargetStore:
    """The cache folder of one teacher's targets.

    Args:
        folder: ``teacher.cache``.
        dtype: ``"float16"`` or ``"float32"`` (stored precision; read back as float32 / dense).
        channels: the run's largest task class count: dense targets are padded to it with zeros so a
            mixed batch stacks (each task reads only its own ``K_task`` channels).
        top_k: keep each voxel's ``top_k`` most likely classes (``None``: every class, dense).
    """

    def __init__(
        self, folder: str | Path, dtype: str = "float16", channels: int = 1, top_k: int | None = None
    ) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise TeacherTargetError(
                f"model.init_args.teacher.cache: {self.folder} is a file, not a folder; name a folder"
            )
        self.dtype = np.dtype(dtype)
        self.channels = int(channels)
        self.top_k = None if top_k is None else int(top_k)
        #: case → the key its entry must have (set by the build): a target is never read under another
        #: teacher, pipeline or image, even when another run rewrote the shared folder meanwhile
        self.expected: dict[str, str] = {}
        #: tasks the teacher distils (others get an all-zero target that KD never reads)
        self.tasks: set[str] = set()

    @property
    def form(self) -> dict[str, Any]:
        """How targets are stored (part of every key): precision, top-k, format version."""
        return {"dtype": str(self.dtype), "top_k": self.top_k, "format": FORMAT_VERSION}

    @staticmethod
    def key(parts: Mapping[str, Any], image_sha256: str) -> str:
        """The sha256 of everything a target depends on (plain data) and the image's digest."""
        text = json.dumps({"version": FORMAT_VERSION, **parts, "image": image_sha256}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, case: str) -> Path:
        """The file of case ``<task>/<case id>``."""
        return self.folder / _file_name(case)

    def entry(self, case: str) -> dict[str, Any] | None:
        """A case's stored description (``key``, ``image_stat``, ``image_sha256``), or ``None`` when it
        is missing or damaged (then it is rebuilt)."""
        path = self.path(case)
        if not path.is_file():
            return None
        try:
            header = read_header(path)
            self._check_form(header, path, None)
            meta = header.get("meta")
        except (OSError, ChunkedFileError, KeyError, TypeError, ValueError, OverflowError, RecursionError):
            return None
        return meta if isinstance(meta, dict) and "key" in meta else None

    def write(
        self,
        case: str,
        key: str,
        targets: torch.Tensor,
        image_sha256: str,
        image_stat: list[int],
        kind: str = "log_probs",
    ) -> Path:
        """Store ``targets`` ``(K_task, *S)`` (log-probabilities, or log-odds for ``kind="log_odds"``)
        of ``case`` atomically; returns the file."""
        path = self.path(case)
        path.parent.mkdir(parents=True, exist_ok=True)
        values = targets.detach().float().cpu()
        meta = {
            "key": key,
            "image_sha256": image_sha256,
            "image_stat": list(image_stat),
            "classes": len(values),
        }
        if self.top_k is not None and kind == "log_probs":
            k = min(self.top_k, len(values))
            index = np.empty((k, *values.shape[1:]), np.uint8)
            log_probs = np.empty((k, *values.shape[1:]), self.dtype)
            step = DEFAULT_CHUNK  # slab by slab along the last axis: int64 indices of one slab only
            for begin in range(0, values.shape[-1] if values.ndim > 1 else 1, step):
                where = (slice(None), ..., slice(begin, begin + step)) if values.ndim > 1 else (slice(None),)
                top, slab = values[where].topk(k, dim=0)
                index[where], log_probs[where] = slab.numpy(), top.numpy()
            arrays = {"index": index, "log_probs": log_probs}
        else:
            arrays = {"targets": values.numpy().astype(self.dtype)}
        return write_chunked(path, arrays, meta)

    def load(
        self,
        case: str,
        key: str | None = None,
        start: Sequence[int] | None = None,
        stop: Sequence[int] | None = None,
        grid: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The target of ``case`` (a box ``start..stop`` of its grid, or all of it), as sample entries:
        ``{"teacher": (channels, *box)}`` float32 (dense), or ``{"teacher_index": (top_k, *box)}``
        uint8 and ``{"teacher_log_probs": (top_k, *box)}`` in the stored precision (top-k; KD computes in
        float32; a task with fewer classes
        than k fills its spare slots with :data:`EMPTY_SLOT`). Voxels outside the grid are 0.

        Args:
            case: ``<task>/<case id>``.
            key: the key the entry must have (``None``: any).
            start, stop: the box (default: the whole grid); it may reach outside the grid.
            grid: the case's grid as the data pipeline made it: a stored voxel target of another grid
                is refused (the student's preprocessing changed without the key noticing).

        Raises:
            TeacherTargetError: the entry is missing, damaged, stale (``key``) or of another grid,
                naming the case and the fix.
        """
        path = self.path(case)

        def check(header: dict[str, Any]) -> None:  # on the header read_box reads: one read per crop
            if key is not None and header["meta"].get("key") != key:
                raise TeacherTargetError(
                    f"teacher target {path} of case {case} was rewritten for another teacher, pipeline "
                    "or image during this run (another run shares the folder?); give each teacher "
                    "description its own teacher.cache folder and restart the fit"
                )
            self._check_form(header, path, start)
            stored_grid = list(header["spatial"])  # [] for a vector (a 2D image's class target)
            if grid is not None and stored_grid and stored_grid != [int(v) for v in grid]:
                raise TeacherTargetError(
                    f"teacher target of case {case} ({path}) has grid {tuple(stored_grid)}, the case's "
                    f"image {tuple(grid)}; the student's preprocessing changed without the key noticing: "
                    "delete that file and restart the fit"
                )

        try:
            # outside the grid (a padded crop): no stored class, no teacher information (KD 0 there;
            # the dense target's zeros are uniform log-probabilities)
            arrays = read_box(path, start, stop, fill={"log_probs": EMPTY_SLOT}, check=check)
        except FileNotFoundError:
            raise TeacherTargetError(
                f"no teacher target for case {case} in {self.folder} (deleted during the run?); restart the "
                "fit: missing targets are rebuilt at fit start (or with `lorkd-pl teacher-targets --config "
                "CONFIG`); keep the cache folder unchanged while a fit runs"
            ) from None
        except (
            ChunkedFileError,
            OSError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            OverflowError,
        ) as error:
            if isinstance(error, TeacherTargetError):
                raise
            raise TeacherTargetError(
                f"teacher target of case {case} is damaged ({error}); delete {path} and restart: it is "
                "rebuilt at fit start"
            ) from None
        if "targets" in arrays:
            return {KEY: _pad_channels(torch.from_numpy(arrays["targets"].astype(np.float32)), self.channels)}
        index = torch.from_numpy(arrays["index"])
        log_probs = torch.from_numpy(arrays["log_probs"])  # stored precision: half a sample's bytes in fp16
        spare = (self.top_k or len(index)) - len(index)
        if spare > 0:  # a task with fewer classes than k: empty slots that hold no probability
            index = torch.cat([index, index.new_zeros(spare, *index.shape[1:])])
            log_probs = torch.cat([log_probs, log_probs.new_full((spare, *log_probs.shape[1:]), EMPTY_SLOT)])
        return {INDEX_KEY: index, LOG_PROBS_KEY: log_probs}

    def _check_form(self, header: Mapping[str, Any], path: Path, start: Sequence[int] | None) -> None:
        """Refuse an entry that is not what this store writes (arrays, dtypes, channels, dimensions)
        before anything is read or allocated from it.

        Raises:
            ChunkedFileError: naming what does not fit.
        """
        arrays, meta = header["arrays"], header.get("meta")
        dense = {"targets": ("float16", "float32")}
        sparse = {"index": ("uint8",), "log_probs": ("float16", "float32")}
        form = dense if self.top_k is None else sparse
        fits = (
            isinstance(meta, dict)
            and set(arrays) in (set(dense), set(sparse))
            and all(np.dtype(spec["dtype"]).name in form.get(name, ()) for name, spec in arrays.items())
            and all(np.dtype(spec["dtype"]).isnative for spec in arrays.values())
            and (start is None or len(start) == len(header["spatial"]))
        )
        if fits and self.top_k is None:
            fits = arrays["targets"]["channels"] <= self.channels
        elif fits:
            fits = arrays["index"]["channels"] == arrays["log_probs"]["channels"] <= self.top_k
        if not fits:
            kind = f"top-{self.top_k}" if self.top_k else "dense"
            raise ChunkedFileError(
                f"{path} is not a target this store writes ({kind}, at most {self.channels} classes, the "
                "case's dimensions)"
            )

    def placeholder(self, spatial: Sequence[int]) -> dict[str, torch.Tensor]:
        """The target of a case the teacher does not distil: zeros that stack with the others (KD never
        reads it)."""
        if self.top_k is None:
            return {KEY: torch.zeros(self.channels, *spatial)}
        return {
            INDEX_KEY: torch.zeros(self.top_k, *spatial, dtype=torch.uint8),
            LOG_PROBS_KEY: torch.full((self.top_k, *spatial), EMPTY_SLOT, dtype=_torch_dtype(self.dtype)),
        }

    def size_on_disk(self, cases: list[str]) -> int:
        """Bytes of the entries of ``cases`` that exist."""
        return sum(self.path(c).stat().st_size for c in cases if self.path(c).is_file())


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if dtype == np.float16 else torch.float32


def _pad_channels(target: torch.Tensor, channels: int) -> torch.Tensor:
    if target.shape[0] >= channels:
        return target
    return torch.cat([target, target.new_zeros(channels - target.shape[0], *target.shape[1:])])


def crop_box(image: Any) -> tuple[list[int], list[int], list[int]]:
    """The box of the whole (preprocessed) volume that a training crop took: ``(start, stop, grid)``
    per spatial axis (``grid``: the volume's size before padding), read from the image's MONAI trace
    (its last crop, and the padding before it).

    Raises:
        TeacherTargetError: if the image carries no crop in its trace.
    """
    from monai.utils import TraceKeys

    operations = list(getattr(image, "applied_operations", []) or [])
    for position in range(len(operations) - 1, -1, -1):
        info = operations[position].get(TraceKeys.EXTRA_INFO, {})
        while isinstance(info, Mapping) and "cropped" not in info and TraceKeys.EXTRA_INFO in info:
            info = info[TraceKeys.EXTRA_INFO]  # RandCropByPosNegLabel records its SpatialCrop inside
        if isinstance(info, Mapping) and "cropped" in info:
            cropped = [int(v) for v in info["cropped"]]
            size = [int(v) for v in operations[position][TraceKeys.ORIG_SIZE]]
            before, grid = [0] * len(size), list(size)
            previous = operations[position - 1] if position > 0 else {}
            padded = previous.get(TraceKeys.EXTRA_INFO, {}).get("padded")
            if padded is not None:  # a SpatialPad right before the crop (a volume smaller than the patch)
                before = [int(p[0]) for p in list(padded)[-len(size) :]]
                grid = [int(v) for v in previous[TraceKeys.ORIG_SIZE]]
            start = [cropped[2 * i] - before[i] for i in range(len(size))]
            stop = [size[i] - cropped[2 * i + 1] - before[i] for i in range(len(size))]
            return start, stop, grid
    raise TeacherTargetError("a training crop carries no crop in its MONAI trace; cannot place its target")


class TeacherTargetSlot:
    """Where the data pipeline finds the store once a fit has built the targets (``None`` before)."""

    def __init__(self) -> None:
        self.store: TeacherTargetStore | None = None


class AttachTeacherTargets:
    """Adds a case's cached target to its sample (``teacher``, or ``teacher_index`` and
    ``teacher_log_probs``: :meth:`TeacherTargetStore.load`) when a store is attached.

    Deliberately not a MONAI ``Transform``: caching datasets cache only the transforms before the first
    non-``Transform``, so targets are read lazily, per draw, and never cached in memory.

    Args:
        slot: the data module's :class:`TeacherTargetSlot`.
        after_crop: the step runs right after a training crop and reads only the crop's box
            (:func:`crop_box`); otherwise it reads the whole target (validation, 2D images).
    """

    def __init__(self, slot: TeacherTargetSlot, after_crop: bool = False) -> None:
        self.slot = slot
        self.after_crop = after_crop

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        sample = dict(data)
        store = self.slot.store
        if store is None:
            return sample
        image = sample["image"]
        spatial = tuple(image.shape[1:]) if isinstance(image, torch.Tensor) and image.ndim > 2 else ()
        case = sample["case"]
        if case.partition("/")[0] not in store.tasks:  # not distilled: a placeholder that stacks
            targets = store.placeholder(spatial)
        elif self.after_crop:
            start, stop, grid = crop_box(image)
            targets = store.load(case, store.expected.get(case), start, stop, grid)
        else:
            header_grid = spatial if spatial else None
            targets = store.load(case, store.expected.get(case), grid=header_grid)
        for name, target in targets.items():
            if target.ndim > 1 and tuple(target.shape[1:]) != spatial:
                raise TeacherTargetError(
                    f"teacher target of case {case} ({store.path(case)}) has grid {tuple(target.shape[1:])}, "
                    f"the case's image {spatial}; the student's preprocessing changed without the key "
                    "noticing: delete that file and restart the fit"
                )
            if hasattr(image, "affine") and target.ndim > 1:  # a MetaTensor in the image's grid
                from monai.data import MetaTensor

                target = MetaTensor(target, affine=image.affine)
            sample[name] = target
        return sample
