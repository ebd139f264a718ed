"""Precomputed teacher targets on disk: one file per case, read lazily by the data pipeline.

A target is the teacher's KD target of one case's task, in the STUDENT's preprocessed grid (seg3d:
``(K_task, X, Y, Z)``; cls2d: ``(K_task,)``), made once by :mod:`lorkd_pl.models.teacher.pipeline`.
It is stored as ``<cache>/<task>/<case>.npz`` (compressed; fp16 by default) together with its key: the
sha256 of the teacher file's digest, the teacher's pipeline and output convention, the task's class
mapping, the student's preprocessing and the image's content digest. An entry whose key differs is
stale: it is rebuilt, never reused. Writes are atomic (a crash leaves the old entry or none).

The data pipeline reads a case's target with :class:`AttachTeacherTargets` (a plain callable, so MONAI's
caching datasets cache everything before it and never the targets), after the deterministic
preprocessing and before the random crop and flips, which then cut image, label and target together.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorkd_pl.io.atomic import atomic_file
from lorkd_pl.io.hashing import sha256sum

KEY = "teacher"  # the sample / batch key of the target
FORMAT_VERSION = 1


class TeacherTargetError(ValueError):
    """A cached teacher target is missing, stale or does not fit its case."""


def _file_name(case: str) -> str:
    """``<task>/<case id>`` → a safe relative path ``<task>/<case id>.npz``."""
    task, _, case_id = case.partition("/")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id) or "case"
    digest = hashlib.sha256(case_id.encode()).hexdigest()[:8]  # ids that differ only in unsafe characters
    return f"{task}/{safe}-{digest}.npz"


def image_digest(image: Any, entry: Mapping[str, np.ndarray] | None = None) -> tuple[str, list[int]]:
    """The content digest of a record's image, and the ``[size, mtime_ns]`` it was taken at.

    A file whose size and modification time are those stored in ``entry`` reuses the stored digest
    (as ``make`` and ``rsync`` do); anything else is read and hashed. In-memory arrays are hashed.
    """
    if isinstance(image, (str, os.PathLike)) and Path(image).is_file():
        stat = Path(image).stat()
        seen = [int(stat.st_size), int(stat.st_mtime_ns)]
        if entry is not None and "image_stat" in entry and entry["image_stat"].tolist() == seen:
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
        dtype: ``"float16"`` or ``"float32"`` (stored precision; read back as float32).
        channels: the run's largest task class count: targets are padded to it with zeros so a mixed
            batch stacks (each task reads only its own ``K_task`` channels).
    """

    def __init__(self, folder: str | Path, dtype: str = "float16", channels: int = 1) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise TeacherTargetError(
                f"model.init_args.teacher.cache: {self.folder} is a file, not a folder; name a folder"
            )
        self.dtype = np.dtype(dtype)
        self.channels = int(channels)
        #: case → the key its entry must have (set by the build): a target is never read under another
        #: teacher, pipeline or image, even when another run rewrote the shared folder meanwhile
        self.expected: dict[str, str] = {}
        #: tasks the teacher distils (others get an all-zero target that KD never reads)
        self.tasks: set[str] = set()

    @staticmethod
    def key(parts: Mapping[str, Any], image_sha256: str) -> str:
        """The sha256 of everything a target depends on (plain data) and the image's digest."""
        text = json.dumps({"version": FORMAT_VERSION, **parts, "image": image_sha256}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, case: str) -> Path:
        """The file of case ``<task>/<case id>``."""
        return self.folder / _file_name(case)

    def entry(self, case: str) -> dict[str, np.ndarray] | None:
        """A case's stored arrays without the target (``key``, ``image_stat``, ``image_sha256``), or None."""
        path = self.path(case)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in ("key", "image_stat", "image_sha256") if name in data}
        except (OSError, ValueError, KeyError):  # a damaged file: rebuilt
            return None

    def write(
        self, case: str, key: str, targets: torch.Tensor, image_sha256: str, image_stat: list[int]
    ) -> Path:
        """Store ``targets`` ``(K_task, *S)`` of ``case`` atomically; returns the file."""
        path = self.path(case)
        path.parent.mkdir(parents=True, exist_ok=True)
        array = targets.detach().float().cpu().numpy().astype(self.dtype)
        with atomic_file(path) as partial, open(partial, "wb") as handle:
            np.savez_compressed(
                handle,
                targets=array,
                key=np.array(key),
                image_sha256=np.array(image_sha256),
                image_stat=np.array(image_stat, dtype=np.int64),
            )
        return path

    def load(self, case: str, key: str | None = None) -> torch.Tensor:
        """The float32 target of ``case``, padded to :attr:`channels` channels.

        Raises:
            TeacherTargetError: the entry is missing or (``key`` given) stale.
        """
        path = self.path(case)
        try:
            with np.load(path, allow_pickle=False) as data:
                if key is not None and str(data["key"]) != key:
                    raise TeacherTargetError(
                        f"teacher target {path} of case {case} was rewritten for another teacher, pipeline "
                        "or image during this run (another run shares the folder?); give each teacher "
                        "description its own teacher.cache folder and restart the fit"
                    )
                array = data["targets"]
        except FileNotFoundError:
            raise TeacherTargetError(
                f"no teacher target for case {case} in {self.folder}; they are built at fit start (or with "
                "`lorkd-pl teacher-targets --config CONFIG`): was the cache folder changed during the run?"
            ) from None
        target = torch.from_numpy(array.astype(np.float32))
        if target.shape[0] < self.channels:
            padding = target.new_zeros(self.channels - target.shape[0], *target.shape[1:])
            target = torch.cat([target, padding])
        return target

    def size_on_disk(self, cases: list[str]) -> int:
        """Bytes of the entries of ``cases`` that exist."""
        return sum(self.path(c).stat().st_size for c in cases if self.path(c).is_file())


class TeacherTargetSlot:
    """Where the data pipeline finds the store once a fit has built the targets (``None`` before)."""

    def __init__(self) -> None:
        self.store: TeacherTargetStore | None = None


class AttachTeacherTargets:
    """Adds ``sample["teacher"]`` (the case's cached target) when a store is attached.

    Deliberately not a MONAI ``Transform``: caching datasets cache only the transforms before the first
    non-``Transform``, so targets are read lazily, per draw, and never cached in memory.

    Args:
        slot: the data module's :class:`TeacherTargetSlot`.
    """

    def __init__(self, slot: TeacherTargetSlot) -> None:
        self.slot = slot

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        sample = dict(data)
        store = self.slot.store
        if store is None:
            return sample
        image = sample["image"]
        if sample["case"].partition("/")[0] not in store.tasks:  # not distilled: a placeholder that stacks
            spatial = tuple(image.shape[1:]) if isinstance(image, torch.Tensor) and image.ndim > 2 else ()
            target = torch.zeros(store.channels, *spatial)
        else:
            target = store.load(sample["case"], store.expected.get(sample["case"]))
        if target.ndim > 1 and tuple(target.shape[1:]) != tuple(image.shape[1:]):
            raise TeacherTargetError(
                f"teacher target of case {sample['case']} ({store.path(sample['case'])}) has grid "
                f"{tuple(target.shape[1:])}, the case's image {tuple(image.shape[1:])}; the student's "
                "preprocessing changed without the key noticing: delete that file and restart the fit"
            )
        if hasattr(image, "affine") and target.ndim > 1:  # a MetaTensor in the image's grid
            from monai.data import MetaTensor

            target = MetaTensor(target, affine=image.affine)
        sample[KEY] = target
        return sample
