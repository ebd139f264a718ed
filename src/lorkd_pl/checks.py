"""Value checks shared by the task specs (:mod:`lorkd_pl.registry`), the data module and the models:
option ranges, patch and spacing, class aliases, flips, and the augmentation presets a task may name.

Standard library only, like the registry: every layer may import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: The target spacings lorkd-pl resamples to, in mm (micro-CT to coarse whole-body; outside: a typo).
MIN_SPACING, MAX_SPACING = 0.01, 100.0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_patch_and_spacing(
    kind: str, patch_size: Sequence[int] | None, spacing: Sequence[float] | None, owner: str
) -> None:
    """Refuse a patch size that is not ``3`` (seg3d) or ``2`` (cls2d) integers >= 1, or a spacing that
    is not 3 numbers > 0.

    Args:
        kind: the task kind.
        patch_size: the training crop / image size, or ``None``.
        spacing: the target spacing in mm, or ``None``.
        owner: the message's start, naming where the values come from (e.g. ``"data.init_args."``).

    Raises:
        ValueError: naming ``owner``, the field, the value and what it must be.
    """
    dims = 3 if kind == "seg3d" else 2
    if patch_size is not None and (
        len(patch_size) != dims or not all(int(v) == v and v >= 1 for v in patch_size)
    ):
        raise ValueError(f"{owner}patch_size must be {dims} integers >= 1 for {kind}, got {list(patch_size)}")
    if spacing is not None and (len(spacing) != 3 or not all(_number(v) and v > 0 for v in spacing)):
        raise ValueError(f"{owner}spacing must be 3 numbers > 0 (mm, x y z), got {list(spacing)}")
    if spacing is not None and not all(MIN_SPACING <= v <= MAX_SPACING for v in spacing):
        raise ValueError(
            f"{owner}spacing must be between {MIN_SPACING} and {MAX_SPACING} mm per axis, got "
            f"{list(spacing)} (a target spacing far below the images' own makes a resampled volume too "
            "large for memory)"
        )


def check_ranges(
    values: Mapping[str, Any], owner: str, rules: Sequence[tuple[str, Callable[[Any], bool], str]]
) -> None:
    """Refuse an option outside its range (model and data options alike), before anything is built.

    Args:
        values: the options (a module's hyper-parameters).
        owner: the prefix of their config keys, e.g. ``"model.init_args."``.
        rules: ``(name, test, expected)``; options absent or ``None`` are skipped; a float must also
            be finite.

    Raises:
        ValueError: ``<owner><name> must be <expected>, got <value>``.
    """
    for name, test, expected in rules:
        if name not in values or values[name] is None:
            continue
        value = values[name]
        try:
            ok = bool(test(value)) and (not isinstance(value, float) or math.isfinite(value))
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{owner}{name} must be {expected}, got {value!r}")


def check_class_aliases(
    task: str, kind: str, classes: Sequence[str], aliases: Mapping[str, str] | None, where: str = ""
) -> None:
    """Refuse aliases of unknown classes, of the segmentation background (always shared), names with
    ``/`` (reserved for ``<task>/<class>``) or two classes of one task on one shared name.

    Raises:
        ValueError: naming the task, the field and the fix.
    """
    if not aliases:
        return
    owner = f"task {task!r}{where}: class_aliases"
    unknown = sorted(set(aliases) - set(classes))
    if unknown:
        raise ValueError(f"{owner} names {unknown}, which are not among its classes {list(classes)}")
    if kind == "seg3d" and classes[0] in aliases:
        raise ValueError(f"{owner} aliases the background {classes[0]!r}, which every task shares already")
    bad = [v for v in aliases.values() if not isinstance(v, str) or not v or "/" in v or v == "background"]
    if bad:
        raise ValueError(
            f"{owner} values must be non-empty names without '/' other than 'background', got {bad}"
        )
    if len(set(aliases.values())) != len(aliases):
        raise ValueError(f"{owner} puts two classes of one task on one shared name: {dict(aliases)}")


LATERAL_WORDS: tuple[str, ...] = ("left", "right")


#: Random training augmentations of seg3d tasks and what each value is (see :class:`TaskSpec`).
AUGMENT_FIELDS: dict[str, str] = {
    "gamma": "[low, high] gamma range (> 0), on intensities rescaled to [0, 1]",
    "bias_field": "the largest coefficient (> 0) of a smooth multiplicative field (MR)",
    "noise": "the largest std (> 0) of additive Gaussian noise, sampled in [0, std] (normalised units)",
    "scale_intensity": "a fraction f in (0, 1): intensities times (1 + U(-f, f))",
    "shift_intensity": "an offset (> 0): intensities plus U(-o, o) (normalised units)",
    "rotate": "the largest rotation in degrees (0 < r <= 30) about each axis",
    "scale": "a fraction s in (0, 0.5): zoom by (1 + U(-s, s))",
    "prob": "the probability (0 < p <= 1) of each augmentation (default 0.2)",
}


#: Named augmentation sets: ``mild``, nnU-Net's kind of intensity and spatial jitter, kept small.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "mild": {
        "gamma": [0.7, 1.5],
        "bias_field": 0.3,
        "noise": 0.1,
        "scale_intensity": 0.25,
        "rotate": 10,
        "scale": 0.1,
        "prob": 0.2,
    },
}


def check_augment(augment: str | Mapping[str, Any], owner: str) -> dict[str, Any]:
    """A task's ``augment`` (a preset name or a mapping of :data:`AUGMENT_FIELDS`) as a checked mapping.

    Raises:
        ValueError: naming ``owner``, the field and what it takes.
    """
    if isinstance(augment, str):
        if augment not in AUGMENT_PRESETS:
            raise ValueError(
                f"{owner}: unknown preset {augment!r}; use one of {sorted(AUGMENT_PRESETS)} or a mapping"
            )
        return dict(AUGMENT_PRESETS[augment])
    if not isinstance(augment, Mapping):
        raise ValueError(
            f"{owner}: must be a preset name or a mapping of {sorted(AUGMENT_FIELDS)}, got {augment!r}"
        )
    unknown = sorted(set(augment) - set(AUGMENT_FIELDS))
    if unknown:
        raise ValueError(f"{owner}: unknown keys {unknown}; it takes {sorted(AUGMENT_FIELDS)}")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    checks = {
        "gamma": lambda v: (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(number(x) and x > 0 for x in v)
            and v[0] < v[1]
        ),
        "bias_field": lambda v: number(v) and v > 0,
        "noise": lambda v: number(v) and v > 0,
        "scale_intensity": lambda v: number(v) and 0 < v < 1,
        "shift_intensity": lambda v: number(v) and v > 0,
        "rotate": lambda v: number(v) and 0 < v <= 30,
        "scale": lambda v: number(v) and 0 < v < 0.5,
        "prob": lambda v: number(v) and 0 < v <= 1,
    }
    for key, value in augment.items():
        if not checks[key](value):
            raise ValueError(f"{owner}.{key} must be {AUGMENT_FIELDS[key]}, got {value!r}")
    return {key: list(value) if isinstance(value, (list, tuple)) else value for key, value in augment.items()}


def check_flips(task: Any, where: str = "") -> None:
    """Refuse flips that would corrupt labels: axes outside 0..2, mirror pairs naming unknown classes,
    or a left↔right flip (axis 0) while a lateralized class (its name holds ``left``/``right``) has no
    mirror pair.

    Args:
        task: a :class:`~lorkd_pl.registry.TaskSpec` (its name, kind, classes, flip axes, mirror pairs).
        where: where the task comes from, for the message.

    Raises:
        ValueError: naming the task, the field and the fix.
    """
    owner = f"task {task.name!r}{where}"
    if task.flip_axes and task.kind != "seg3d":
        raise ValueError(f"{owner}: flip_axes applies to seg3d tasks")
    bad = [a for a in task.flip_axes if isinstance(a, bool) or not isinstance(a, int) or a not in (0, 1, 2)]
    if bad or len(set(task.flip_axes)) != len(task.flip_axes):
        raise ValueError(
            f"{owner}: flip_axes must be distinct axes among 0 (left-right), 1, 2 (integers); "
            f"got {list(task.flip_axes)}"
        )
    pairs = list(task.mirror_pairs)
    if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in pairs):
        raise ValueError(f"{owner}: mirror_pairs must be pairs of its classes, got {task.mirror_pairs}")
    paired = [name for pair in pairs for name in pair]
    unknown = sorted({str(n) for n in paired} - set(task.classes))
    if unknown or any(pair[0] == pair[1] for pair in pairs) or len(set(paired)) != len(paired):
        raise ValueError(
            f"{owner}: mirror_pairs must be pairs of two different classes of its own, each class in one "
            f"pair at most, got {task.mirror_pairs}"
        )
    if task.kind == "seg3d" and task.classes and task.classes[0] in paired:
        raise ValueError(
            f"{owner}: mirror_pairs pairs the background {task.classes[0]!r}, which has no side; pair only "
            "lateral classes (e.g. [[kidney_left, kidney_right]])"
        )
    lateral = [c for c in task.classes if any(w in c.lower() for w in LATERAL_WORDS) and c not in paired]
    if 0 in task.flip_axes and lateral:
        raise ValueError(
            f"{owner}: flipping left-right (flip_axes 0) would put {lateral} on the wrong side; declare "
            "mirror_pairs (e.g. [[lung_left, lung_right]]) or leave axis 0 out of flip_axes"
        )


#: Seeds every generator takes (numpy's, Lightning's seed_everything): 0 … 2³² − 1.
MAX_SEED = 2**32 - 1


def check_seed(value: Any, name: str) -> int:
    """``value`` as a seed, or one line naming the option.

    Raises:
        ValueError: ``<name> must be an integer in [0, 4294967295], got ...``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return value
