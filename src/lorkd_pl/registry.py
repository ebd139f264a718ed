"""Regions and tasks: what lorkd-pl can train, and in which order experts are indexed.

A *region* is an anatomical region with one low-rank expert. The global region order below (extended
by :func:`register_region`) fixes names; a run uses the ordered subset of regions its tasks need, and
the expert index of a region is its position in that run's list, which every checkpoint stores by
name. A *task* is a dataset of one region with one task kind and its own class list and head.

This module imports only the standard library: plugins (``tasks/``, entry points, task-spec files)
register tasks into it, and the data and model packages read from it. A task's fields are checked
when it is made (:mod:`lorkd_pl.checks`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lorkd_pl.checks import check_augment, check_class_aliases, check_flips, check_patch_and_spacing

TaskKind = Literal["seg3d", "cls2d"]
TASK_KINDS: tuple[str, ...] = ("seg3d", "cls2d")
#: Metrics each kind can log per task during validation/test; the first is the task's score.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {"seg3d": ("dice",), "cls2d": ("accuracy", "auroc")}

#: The method's eight body regions, in expert order.
DEFAULT_REGIONS: tuple[str, ...] = (
    "abdomen",
    "brain",
    "head_neck",
    "lower_limb",
    "pelvis",
    "spine",
    "thorax",
    "upper_limb",
)
_REGIONS: list[str] = list(DEFAULT_REGIONS)
_TASKS: dict[str, TaskSpec] = {}
_DEFAULTS: set[str] = set()  # names registered as fallbacks (see register_task)


class RegistryError(KeyError):
    """An unknown or conflicting region or task name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


DEFAULT_NSD_TOLERANCE: float = 2.0  # mm: boundary tolerance of the normalised surface Dice


@dataclass(frozen=True)
class TaskSpec:
    """One task: a dataset of one region, its kind, classes, data and metrics.

    Attributes:
        name: unique task name, e.g. ``"brain_seg"``.
        region: a registered region name; selects the expert.
        kind: ``"seg3d"`` (3D segmentation) or ``"cls2d"`` (2D classification).
        classes: class names; for segmentation index 0 is the background.
        records: the datamodule factory: ``records(split)`` returns the sample records (dicts with
            ``image`` and ``label``, paths or arrays) of ``split`` ∈ {"train", "val", "test"}.
        modality: ``"CT"``, ``"MR"`` or ``"other"``: selects intensity normalisation.
        spacing: target voxel spacing in mm (x, y, z) for 3D resampling; ``None`` keeps it.
        patch_size: training crop (3D) or image size (2D) in voxels/pixels.
        metrics: metrics logged per task in validation/test, among the kind's
            (:data:`DEFAULT_METRICS`; default all of them); the kind's first metric is always
            computed (it is the task's score). Test summaries always hold every metric.
        nsd_tolerance: seg3d: surface tolerance of the normalised surface Dice, in mm (voxels when
            ``spacing`` is ``None``).
        teacher_classes: map from this task's class names to the teacher's classes, for logit
            distillation: a teacher output channel (int), a class name of a lorkd-pl generalist
            teacher (``"<task>/<class>"`` or a shared name), or a list of those: a declared merge (the
            teacher's probabilities of the listed classes add up). ``None``: a generalist teacher
            that trained a task of this name is matched by class NAME; others give no logit KD.
        class_aliases: map from this task's class names to a shared name: in a generalist's union
            label space, classes of different tasks with the same shared name are ONE channel,
            supervised by every such task (e.g. ``{"liver": "liver"}`` in two liver datasets). Without
            an alias a class is ``"<task>/<class>"``, its own channel, never matched by spelling.
        flip_axes: seg3d: training flips, by axis of the RAS-oriented volume (0 left↔right,
            1 posterior↔anterior, 2 inferior↔superior); default none: a flip removes the location cues
            anatomy models use and, left↔right, corrupts lateralized classes.
        mirror_pairs: seg3d: class pairs that swap under a left↔right flip (``[["lung_left",
            "lung_right"]]``); axis 0 may be flipped only when every lateralized class is paired.
        augment: seg3d: random training augmentations for small data sets, on top of the crop and
            flips: a preset name (``"mild"``: :data:`~lorkd_pl.checks.AUGMENT_PRESETS`) or a
            mapping of :data:`~lorkd_pl.checks.AUGMENT_FIELDS` (intensity: ``gamma`` range,
            ``bias_field`` coefficient, ``noise`` std, ``scale_intensity``/``shift_intensity``
            fractions; spatial: ``rotate`` degrees, ``scale`` fraction; ``prob`` of each); default none.
        source: where the task came from (plugin file, spec file, entry point).
        extras: free-form plain values for plugins.
    """

    name: str
    region: str
    kind: TaskKind
    classes: tuple[str, ...]
    records: Callable[[str], Sequence[Mapping[str, Any]]]
    modality: str = "CT"
    spacing: tuple[float, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    metrics: tuple[str, ...] = ()
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE
    teacher_classes: Mapping[str, int | str | Sequence[int | str]] | None = None
    class_aliases: Mapping[str, str] | None = None
    flip_axes: tuple[int, ...] = ()
    mirror_pairs: tuple[tuple[str, str], ...] = ()
    augment: str | Mapping[str, Any] | None = None
    source: str = ""
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f" (from {self.source})" if self.source else ""
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"task name {self.name!r}{where} must be letters, digits, '_' or '-'")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}{where}: kind {self.kind!r} is not one of {TASK_KINDS}")
        get_region_index(self.region)  # raises for an unknown region
        if len(self.classes) < 2:
            raise ValueError(f"task {self.name!r}{where}: needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name!r}{where}: class names repeat: {list(self.classes)}")
        check_patch_and_spacing(self.kind, self.patch_size, self.spacing, f"task {self.name!r}{where}: ")
        check_flips(self, where)
        if self.augment is not None:
            if self.kind != "seg3d":
                raise ValueError(f"task {self.name!r}{where}: augment applies to seg3d tasks")
            object.__setattr__(
                self, "augment", check_augment(self.augment, f"task {self.name!r}{where}: augment")
            )
        if not self.nsd_tolerance > 0:
            raise ValueError(
                f"task {self.name!r}{where}: nsd_tolerance must be > 0 (mm), got {self.nsd_tolerance}"
            )
        if not self.metrics:
            object.__setattr__(self, "metrics", DEFAULT_METRICS[self.kind])
        unknown_metrics = sorted(set(self.metrics) - set(DEFAULT_METRICS[self.kind]))
        if unknown_metrics:
            raise ValueError(
                f"task {self.name!r}{where}: metrics {unknown_metrics} are not {self.kind} metrics; "
                f"choose among {list(DEFAULT_METRICS[self.kind])}"
            )
        if self.teacher_classes is not None:
            unknown = sorted(set(self.teacher_classes) - set(self.classes))
            if unknown:
                raise ValueError(
                    f"task {self.name!r}{where}: teacher_classes names {unknown}, which are not among "
                    f"its classes {list(self.classes)}"
                )
        check_class_aliases(self.name, self.kind, self.classes, self.class_aliases, where)

    @property
    def num_classes(self) -> int:
        """Number of classes (background included for segmentation)."""
        return len(self.classes)


# ----------------------------------------------------------------------------- regions
def list_regions() -> tuple[str, ...]:
    """All registered regions in global expert order."""
    return tuple(_REGIONS)


def register_region(name: str) -> int:
    """Add a region at the end of the global order (no-op if it exists); return its global index."""
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"region name {name!r} must be lower-case letters, digits or '_'")
    if name not in _REGIONS:
        _REGIONS.append(name)
    return _REGIONS.index(name)


def get_region_index(name: str) -> int:
    """Global index of a region.

    Raises:
        RegistryError: for an unknown region, listing close matches.
    """
    try:
        return _REGIONS.index(name)
    except ValueError:
        raise RegistryError(
            _unknown(
                "region",
                name,
                _REGIONS,
                f"known: {', '.join(_REGIONS)}; register a new one with register_region()",
            )
        ) from None


def order_regions(names: Iterable[str]) -> tuple[str, ...]:
    """The distinct regions among ``names`` in global order: a run's expert order."""
    return tuple(sorted(set(names), key=get_region_index))


# ----------------------------------------------------------------------------- tasks
def register_task(
    spec: TaskSpec | Callable[[], TaskSpec] | None = None, *, override: bool = False, default: bool = False
) -> Any:
    """Register a task, directly or as a decorator.

    ``register_task(TaskSpec(...))`` registers a spec and returns it. As a decorator on a zero-argument
    function returning a ``TaskSpec`` (``@register_task`` or ``@register_task(override=True)``), it
    registers the function's spec and returns the function.

    Args:
        spec: the task, or a function returning it.
        override: replace a task registered under the same name.
        default: a fallback (lorkd-pl's built-in demo tasks): it never replaces a registered task,
            and any later registration of the name replaces it without an error — so
            ``lorkd-pl demo-data --out X`` followed by ``--tasks-dir X/tasks`` uses X's copies.

    Raises:
        RegistryError: if the name is registered already (not as a default) and ``override`` is false.
        TypeError: if ``spec`` is neither a ``TaskSpec`` nor a function returning one.
    """
    if spec is None:
        return lambda function: register_task(function, override=override, default=default)
    task = spec if isinstance(spec, TaskSpec) else spec() if callable(spec) else None
    if not isinstance(task, TaskSpec):
        raise TypeError(f"register_task needs a TaskSpec or a function returning one, got {spec!r}")
    existing = _TASKS.get(task.name)
    if existing is not None and default:
        return spec  # a fallback never replaces a registered task
    if existing is not None and not override and task.name not in _DEFAULTS:
        raise RegistryError(
            f"task {task.name!r} is registered already (from {existing.source or 'code'}); "
            f"rename the task from {task.source or 'code'} or pass override=True"
        )
    _TASKS[task.name] = task
    if default:
        _DEFAULTS.add(task.name)
    else:
        _DEFAULTS.discard(task.name)
    return spec


def unregister_task(name: str) -> None:
    """Remove a task (for tests and interactive sessions)."""
    get_task(name)
    del _TASKS[name]
    _DEFAULTS.discard(name)


def get_task(name: str) -> TaskSpec:
    """The task called ``name``.

    Raises:
        RegistryError: for an unknown name, listing close matches.
    """
    try:
        return _TASKS[name]
    except KeyError:
        hint = "see `lorkd-pl tasks` for the registered tasks"
        raise RegistryError(_unknown("task", name, list(_TASKS), hint)) from None


def list_tasks(region: str | None = None, kind: str | None = None) -> list[TaskSpec]:
    """Registered tasks, optionally of one region and/or kind, sorted by region order then name."""
    if region is not None:
        get_region_index(region)
    if kind is not None and kind not in TASK_KINDS:
        raise RegistryError(f"unknown task kind {kind!r}; choose one of {TASK_KINDS}")
    tasks = [
        t
        for t in _TASKS.values()
        if (region is None or t.region == region) and (kind is None or t.kind == kind)
    ]
    return sorted(tasks, key=lambda t: (get_region_index(t.region), t.name))


def _unknown(what: str, name: str, known: Sequence[str], hint: str) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
    suggestion = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {name!r}{suggestion} ({hint})"
