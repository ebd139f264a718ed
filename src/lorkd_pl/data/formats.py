"""Dataset formats → sample records (plain dicts), split into train/val/test.

Supported:

* a manifest, JSONL (one object per line) or CSV (header row), with the fields ``image``, ``label``,
  ``region`` and optionally ``task``, ``modality``, ``split`` (train/val/test) and ``case``; relative
  paths are resolved against the manifest's folder;
* the Medical Segmentation Decathlon / nnU-Net (v1 and v2) ``dataset.json`` layout;
* MedMNIST-style ``.npz`` files (``train_images``, ``train_labels``, ``val_…``, ``test_…``);
* a CSV of 2D image files with a class label per row (a manifest without ``region``).

A record is ``{"image": path | array, "label": path | int | None, "case": str, ...}``. Rows without a
``split`` are split deterministically by a hash of their case id.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
REQUIRED_FIELDS: tuple[str, ...] = ("image", "label")
KNOWN_FIELDS: tuple[str, ...] = ("image", "label", "split", "case", "region", "task", "modality")


class DatasetFormatError(ValueError):
    """A dataset file is malformed: names the file, the row/field and the fix."""


def assign_split(case: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """Deterministic split of a case id (stable across runs, machines and dataset orderings)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    value = int(hashlib.sha256(case.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if value < fractions[0]:
        return "train"
    return "val" if value < fractions[0] + fractions[1] else "test"


def read_manifest(path: str | Path, require_label: bool = True) -> list[dict[str, Any]]:
    """Rows of a JSONL or CSV manifest, with paths resolved and ``split``/``case`` filled in.

    Args:
        path: the manifest (``.jsonl``/``.ndjson`` or ``.csv``, UTF-8 with or without a byte-order mark).
        require_label: rows need a ``label`` (training); ``False`` for inputs to predict.

    Raises:
        DatasetFormatError: if the file is missing, empty, unparsable, or a row lacks ``image`` or
            ``label`` or has an unknown ``split``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(
            f"manifest not found: {path} (write it with `lorkd-pl demo-data` or by hand)"
        )
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a byte-order mark
            rows = [dict(row) for row in csv.DictReader(handle)]
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DatasetFormatError(f"{path}, line {number}: expected a JSON object per line")
            rows.append(row)
    else:
        raise DatasetFormatError(f"manifest {path}: unknown format {path.suffix!r}; use .jsonl or .csv")
    if not rows:
        raise DatasetFormatError(
            f"manifest {path} has no rows; add one row per image (fields: image, label, region)"
        )
    _check_columns(path, {key for row in rows for key in row})
    required = REQUIRED_FIELDS if require_label else ("image",)
    return [_normalise_row(row, index, path, required) for index, row in enumerate(rows)]


def _check_columns(path: Path, columns: set[str]) -> None:
    """Refuse a column that nearly names a known field (``Split``, ``imgae``): it would be ignored."""
    for column in sorted(columns - set(KNOWN_FIELDS)):
        close = difflib.get_close_matches(column.lower(), KNOWN_FIELDS, n=1, cutoff=0.8)
        if column.lower() in KNOWN_FIELDS or close:
            field = column.lower() if column.lower() in KNOWN_FIELDS else close[0]
            raise DatasetFormatError(
                f"manifest {path}: column {column!r} looks like the field {field!r} (names are lower-case "
                f"and exact; as written it would be ignored); rename it to {field!r}"
            )


def _normalise_row(
    row: Mapping[str, Any], index: int, manifest: Path, required: Sequence[str] = REQUIRED_FIELDS
) -> dict[str, Any]:
    where = f"{manifest}, row {index + 1}"
    record = {k: v for k, v in row.items() if v not in ("", None)}
    for key in required:
        if key not in record:
            raise DatasetFormatError(f"{where}: missing field {key!r} (each row needs {list(required)})")
    if not isinstance(record["image"], str):
        raise DatasetFormatError(
            f"{where}: field 'image' is {record['image']!r}; give the image's path (a string)"
        )
    label = record.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DatasetFormatError(
            f"{where}: field 'label' is {record['label']!r}; give a label map's path or a class index"
        )
    for key in ("image", "label"):
        if key not in record:
            continue
        value = record[key]
        if isinstance(value, str) and not _is_int(value):
            record[key] = str((manifest.parent / value).resolve()) if not Path(value).is_absolute() else value
        elif isinstance(value, str):
            record[key] = int(value)
    record.setdefault(
        "case", Path(str(record["image"])).name.split(".")[0] if isinstance(row["image"], str) else str(index)
    )
    split = record.get("split", assign_split(str(record["case"])))
    if split not in SPLITS:
        raise DatasetFormatError(f"{where}: field 'split' is {split!r}; use one of {SPLITS}")
    record["split"] = split
    record["source"] = where
    return record


def _is_int(value: str) -> bool:
    return value.strip().lstrip("-").isdigit()


def read_decathlon(path: str | Path, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, Any]:
    """An MSD / nnU-Net ``dataset.json``: class names, modality and records.

    Returns:
        ``{"classes": [...], "modality": "CT" | "MR" | ..., "records": [...]}``; labelled training
        cases are split into train/val/test by ``fractions``; unlabelled ``test`` entries are not
        returned (they have no ground truth).

    Raises:
        DatasetFormatError: for a missing file or missing ``labels``/``training`` information.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"dataset.json not found: {path}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}: not valid JSON ({error.msg})") from None
    labels = info.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetFormatError(f"{path}: field 'labels' is missing; give {{'0': 'background', '1': ...}}")
    if all(_is_int(str(k)) for k in labels):  # MSD: {"0": "background"}
        by_index = {int(k): str(v) for k, v in labels.items()}
    else:  # nnU-Net v2: {"background": 0}
        by_index = {int(v): str(k) for k, v in labels.items() if not isinstance(v, list)}
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetFormatError(
            f"{path}: 'labels' must number classes 0..K-1 without gaps, got {sorted(by_index)}"
        )
    channels = info.get("modality") or info.get("channel_names") or {"0": "other"}
    modality = str(channels.get("0", "other"))
    root = path.parent
    if "training" in info:
        pairs = [(entry["image"], entry["label"]) for entry in info["training"]]
    else:  # nnU-Net v2 folder layout
        ending = info.get("file_ending", ".nii.gz")
        labels_dir = root / "labelsTr"
        if not labels_dir.is_dir():
            raise DatasetFormatError(f"{path}: no 'training' list and no labelsTr/ folder beside it")
        pairs = [
            (f"imagesTr/{label.name[: -len(ending)]}_0000{ending}", f"labelsTr/{label.name}")
            for label in sorted(labels_dir.glob(f"*{ending}"))
        ]
    if not pairs:
        raise DatasetFormatError(f"{path}: no training cases listed")
    records = []
    for image, label in pairs:
        image_path, label_path = (root / image).resolve(), (root / label).resolve()
        case = label_path.name.split(".")[0]
        records.append(
            {
                "image": str(image_path),
                "label": str(label_path),
                "case": case,
                "split": assign_split(case, fractions),
                "source": f"{path} (case {case})",
            }
        )
    return {"classes": [by_index[i] for i in range(len(by_index))], "modality": modality, "records": records}


def read_medmnist(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Records of a MedMNIST-style ``.npz``: per split, ``{"image": (H, W[, 3]) array, "label": int}``.

    Raises:
        DatasetFormatError: for a missing file, missing ``<split>_images``/``<split>_labels`` arrays
            or mismatched lengths.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"npz file not found: {path}")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetFormatError(f"cannot read {path} as .npz ({error})") from None
    out: dict[str, list[dict[str, Any]]] = {}
    with arrays:
        for split in SPLITS:
            if f"{split}_images" not in arrays.files or f"{split}_labels" not in arrays.files:
                raise DatasetFormatError(
                    f"{path}: missing arrays '{split}_images'/'{split}_labels' (MedMNIST layout: "
                    "train_/val_/test_ images (N, H, W[, 3]) and labels (N,) or (N, 1))"
                )
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
            fractional = np.flatnonzero(labels != np.round(labels)) if labels.dtype.kind == "f" else []
            if len(fractional):
                index = int(fractional[0])
                raise DatasetFormatError(
                    f"{path}: {split}_labels[{index}] is {labels[index]}, not a class index; labels must be "
                    f"whole numbers ({len(fractional)} are not): fix the file (they would be truncated)"
                )
            if len(images) != len(labels):
                raise DatasetFormatError(
                    f"{path}: {split}_images has {len(images)} entries but {split}_labels has {len(labels)}"
                )
            out[split] = [
                {
                    "image": images[i],
                    "label": int(labels[i]),
                    "case": f"{split}_{i}",
                    "split": split,
                    "source": f"{path} ({split} #{i})",
                }
                for i in range(len(images))
            ]
    return out
