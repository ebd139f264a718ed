"""File-backed tasks: a YAML/JSON task spec names its data, region, kind and classes — no Python.

```yaml
name: liver_ct            # unique task name
region: abdomen           # a registered region (selects the expert)
kind: seg3d               # seg3d | cls2d
classes: [background, liver, tumour]
manifest: data/manifest.jsonl    # or: dataset_json: Task03_Liver/dataset.json | npz: organamnist.npz
modality: CT              # CT | MR | other (intensity normalisation)
spacing: [1.5, 1.5, 3.0]  # seg3d: target spacing (mm)
patch_size: [96, 96, 48]  # seg3d: training crop; cls2d: image size
teacher_classes: {liver: 1, tumour: 2}   # optional: task class -> teacher channel/class ([..]: a merge)
class_aliases: {liver: liver}   # optional: generalist channel shared with other tasks' `liver` alias
flip_axes: [0]            # optional, seg3d: training flips (RAS axes; default none)
mirror_pairs: [[kidney_left, kidney_right]]   # classes swapped by a left-right flip (needed for axis 0)
augment: mild              # optional, seg3d: random intensity/spatial augmentations (a preset or a mapping)
nsd_tolerance: 2.0        # optional, seg3d: normalised surface Dice tolerance (mm)
```

Relative paths are resolved against the spec file's folder. A manifest may hold several tasks: rows
whose ``task`` field equals the spec's ``name`` are used (all rows when the manifest has no ``task``
field).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lorkd_pl.data.formats import DatasetFormatError, read_decathlon, read_manifest, read_medmnist
from lorkd_pl.registry import DEFAULT_NSD_TOLERANCE, TaskSpec

DATA_KEYS: tuple[str, ...] = ("manifest", "dataset_json", "npz")
KNOWN_KEYS: frozenset[str] = frozenset(
    {
        "name",
        "region",
        "kind",
        "classes",
        "modality",
        "spacing",
        "patch_size",
        "metrics",
        "nsd_tolerance",
        "teacher_classes",
        "class_aliases",
        "flip_axes",
        "mirror_pairs",
        "augment",
        *DATA_KEYS,
    }
)


def load_task_spec(path: str | Path) -> TaskSpec:
    """Read a YAML/JSON task-spec file into a :class:`~lorkd_pl.registry.TaskSpec`.

    Raises:
        DatasetFormatError: naming the file and field for a missing/unknown field or bad value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise DatasetFormatError(f"cannot read task spec {path}: {error}") from None
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"task spec {path}: expected a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise DatasetFormatError(
            f"task spec {path}: unknown field(s) {unknown}; allowed: {sorted(KNOWN_KEYS)}"
        )
    for key in ("name", "region", "kind"):
        if key not in raw:
            raise DatasetFormatError(f"task spec {path}: missing field {key!r}")
    sources = [key for key in DATA_KEYS if key in raw]
    if len(sources) != 1:
        raise DatasetFormatError(
            f"task spec {path}: give exactly one of {list(DATA_KEYS)}, got {sources or 'none'}"
        )
    key = sources[0]
    data_path = (path.parent / raw[key]).resolve()
    classes, modality = raw.get("classes"), raw.get("modality")
    if key == "dataset_json":
        info = read_decathlon(data_path)
        classes, modality = classes or info["classes"], modality or info["modality"]
        records = _by_split(info["records"])
    elif key == "npz":
        records = functools.cache(lambda: read_medmnist(data_path))
    else:
        records = functools.cache(
            lambda: _by_split(
                _check_rows(_task_rows(read_manifest(data_path), raw["name"], data_path), raw, modality)
            )
        )
    if not classes:
        raise DatasetFormatError(f"task spec {path}: missing field 'classes' (list the class names)")
    if not all(isinstance(c, str) for c in classes):
        raise DatasetFormatError(
            f"task spec {path}: field 'classes' must list names (strings), got {classes!r}; quote names "
            "such as 'no', 'yes', 'on', 'off' or numbers, which YAML reads as booleans or numbers"
        )
    try:
        return TaskSpec(
            name=str(raw["name"]),
            region=str(raw["region"]),
            kind=raw["kind"],
            classes=tuple(str(c) for c in classes),
            records=_split_getter(records),
            modality=str(modality or "other"),
            spacing=_field(raw, path, "spacing", _numbers, "a list of numbers (mm)"),
            patch_size=_field(raw, path, "patch_size", _integers, "a list of integers"),
            metrics=tuple(raw.get("metrics") or ()),
            nsd_tolerance=_field(
                raw, path, "nsd_tolerance", lambda v: _numbers([v])[0], "a number (mm)", DEFAULT_NSD_TOLERANCE
            ),
            teacher_classes=raw.get("teacher_classes"),
            class_aliases=_field(
                raw, path, "class_aliases", lambda v: {str(k): v[k] for k in v}, "a mapping"
            ),
            flip_axes=_field(raw, path, "flip_axes", _axes, "a list of axes (integers 0, 1, 2)", ()),
            mirror_pairs=_field(
                raw,
                path,
                "mirror_pairs",
                lambda v: tuple(tuple(map(str, p)) for p in v),
                "a list of pairs",
                (),
            ),
            augment=raw.get("augment"),
            source=str(path),
        )
    except (ValueError, KeyError) as error:
        raise DatasetFormatError(f"task spec {path}: {error}") from None


def _task_rows(rows: list[dict[str, Any]], name: str, manifest: Path) -> list[dict[str, Any]]:
    if not any("task" in row for row in rows):
        return rows
    lacking = [row.get("source", "a row") for row in rows if "task" not in row]
    if lacking:  # they would belong to no task and vanish without a word
        raise DatasetFormatError(
            f"{lacking[0]} has no 'task' while other rows of {manifest} do ({len(lacking)} row(s) lack it); "
            "give every row its task, or none (then every row belongs to the spec's task)"
        )
    mine = [row for row in rows if row.get("task") == name]
    if not mine:
        tasks = sorted({str(row.get("task")) for row in rows})
        raise DatasetFormatError(f"manifest {manifest} has no rows with task {name!r} (its tasks: {tasks})")
    return mine


def _check_rows(rows: list[dict[str, Any]], raw: Mapping[str, Any], modality: Any) -> list[dict[str, Any]]:
    """Refuse a manifest row whose ``region`` or ``modality`` disagrees with its task spec."""
    expected = {"region": str(raw["region"])}
    if modality:  # a spec without modality takes none from its rows either ("other")
        expected["modality"] = str(modality)
    for row in rows:
        for field_name, value in expected.items():
            given = row.get(field_name)
            if given is not None and str(given).lower() != value.lower():
                raise DatasetFormatError(
                    f"{row.get('source', 'manifest row')}: {field_name} {given!r} disagrees with task "
                    f"{raw['name']!r} ({field_name} {value!r}); fix the row or the task spec"
                )
    return rows


def _by_split(records: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for record in records:
        out[record["split"]].append(dict(record))
    return out


def _split_getter(records) -> Any:
    def get(split: str) -> list[dict[str, Any]]:
        table = records() if callable(records) else records
        return table[split]

    return get


def _field(
    raw: Mapping[str, Any],
    path: Path,
    key: str,
    convert: Callable[[Any], Any],
    expected: str,
    default: Any = None,
) -> Any:
    """``convert(raw[key])``, ``default`` when the field is absent, or an error naming file, field and type.

    An explicit ``null`` is accepted only for fields whose default is ``None``.
    """
    if key not in raw:
        return default
    value = raw[key]
    if value is None and default is None:
        return None
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise DatasetFormatError(
            f"task spec {path}: field {key!r} must be {expected}, got {value!r}"
        ) from None


def _numbers(value: Any) -> tuple[float, ...]:
    """A list of numbers as given (``true`` or ``"1.5"`` are refused, not converted)."""
    if not isinstance(value, (list, tuple)) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in value
    ):
        raise ValueError(f"must be a list of numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _integers(value: Any) -> tuple[int, ...]:
    """A list of integers as given (``8.5``, ``true`` or ``"8"`` are refused, not rounded)."""
    if not isinstance(value, (list, tuple)) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ValueError(f"must be a list of integers, got {value!r}")
    return tuple(value)


def _axes(value: Any) -> tuple[int, ...]:
    """``flip_axes`` as given: a list of integers (``0.5``, ``true`` or ``"0"`` are refused, not rounded)."""
    if not isinstance(value, (list, tuple)) or any(
        isinstance(a, bool) or not isinstance(a, int) for a in value
    ):
        raise ValueError(f"must be a list of integer axes, got {value!r}")
    return tuple(value)
