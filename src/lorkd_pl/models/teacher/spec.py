"""The teacher description of a config: where the teacher is, what it outputs, and its own pipeline.

``model.init_args.teacher`` is a path (the teacher runs on the student's crops in the student's
preprocessing and outputs logits, as before) or a mapping::

    teacher:
      path: brain_fm.pt          # generalist .ckpt | TorchScript | MONAI bundle folder | weights file
      model: null                # {class_path, init_args} of a plain weights file's network
      output: probabilities      # logits | probabilities | log_probabilities | sigmoid | sigmoid_logits
      sigmoid_kd: binary         # sigmoid teachers: binary (per-class) KD, or exclusive (converted)
      classes: {background: 0, brain: 1}   # the teacher's class names → output channel(s)
      orientation: RAS           # the voxel order it expects (RAS, LPS, ...; none: the file's own)
      spacing: [1.0, 1.0, 1.0]   # the teacher's own voxel spacing (mm)
      intensity: {window: [0, 4000], normalize: zscore, scale: 1.0, shift: 0.0}   # or a preset name
      roi_size: [128, 128, 128]  # sliding-window size (seg3d) / input image size (cls2d)
      divisible: 32              # whole-volume input padded to a multiple of this
      overlap: 0.5               # sliding-window overlap
      cache: runs/teacher_targets  # precomputed targets; null = the live teacher on the training crops
      cache_dtype: float16
      cache_top_k: null           # keep only each voxel's k most likely classes (e.g. 4; null: all)

An nnU-Net v2 trained-model folder as ``path`` brings its own pipeline, classes and inference
(:mod:`lorkd_pl.models.teacher.nnunet`); it takes four more fields::

      fold: 0                    # 0 | all (fold_all) | [0, 1, 2, 3, 4]; default: every fold present
      checkpoint: final          # final | best (checkpoint_final.pth | checkpoint_best.pth)
      configuration: 3d_fullres  # default: the folder name's <Trainer>__<Plans>__<configuration>
      mirroring: true            # test-time mirroring over the axes the checkpoint allows

Every field is checked here, before anything is loaded; a bad one is a :class:`TeacherSpecError`
naming ``model.init_args.teacher.<field>`` and the fix.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from lorkd_pl.checks import MAX_SPACING, MIN_SPACING

OUTPUTS: tuple[str, ...] = ("logits", "probabilities", "log_probabilities", "sigmoid", "sigmoid_logits")
SIGMOID_OUTPUTS: tuple[str, ...] = ("sigmoid", "sigmoid_logits")
SIGMOID_KD: tuple[str, ...] = ("binary", "exclusive")
NORMALIZE: tuple[str, ...] = ("zscore", "minmax", "none")
CACHE_DTYPES: tuple[str, ...] = ("float16", "float32")
#: Named intensity pipelines: the student's own presets, by name, and "none" (raw values).
INTENSITY_PRESETS: dict[str, dict[str, Any]] = {
    "ct_window": {"window": [-500.0, 1000.0], "normalize": "zscore"},
    "mr_percentile": {"percentiles": [0.5, 99.5], "normalize": "zscore"},
    "none": {"normalize": "none"},
}
INTENSITY_FIELDS: tuple[str, ...] = ("window", "percentiles", "normalize", "scale", "shift")
PIPELINE_FIELDS: tuple[str, ...] = ("orientation", "spacing", "intensity", "roi_size", "divisible")
AXES: tuple[str, ...] = ("LR", "PA", "IS")
WHERE = "model.init_args.teacher"


class TeacherSpecError(ValueError):
    """A teacher description with an unknown field or a value out of range."""


@dataclass(frozen=True)
class Intensity:
    """The teacher's intensity pipeline: ``clip`` (window, or percentiles) → ``normalize`` → ``x·scale
    + shift``.

    Attributes:
        window: clip to these raw values (e.g. CT HU), or ``None``.
        percentiles: clip to these per-volume percentiles, or ``None``.
        normalize: ``"zscore"`` (per volume), ``"minmax"`` (to [0, 1]) or ``"none"``.
        scale, shift: applied last.
    """

    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] | None = None
    normalize: str = "zscore"
    scale: float = 1.0
    shift: float = 0.0

    def describe(self) -> dict[str, Any]:
        """A plain description (part of the cache key)."""
        return {
            "window": list(self.window) if self.window else None,
            "percentiles": list(self.percentiles) if self.percentiles else None,
            "normalize": self.normalize,
            "scale": self.scale,
            "shift": self.shift,
        }


#: Bounds of a teacher's own pipeline (beyond them: a typo that would allocate a huge volume).
MAX_DIVISIBLE, MAX_ROI = 512, 1024

#: A plain config value. Teacher descriptions are typed with it (not ``Any``): jsonargparse instantiates a
#: ``{class_path, init_args}`` mapping found under ``Any``, which would turn ``teacher.model`` into a
#: network object instead of the description lorkd-pl builds (and records) itself.
PlainValue = Union[str, int, float, bool, None, list, dict]  # noqa: UP007 (jsonargparse reads it)


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher description (see the module docstring); pipeline fields ``None`` = the
    student's own (its spacing, its intensity preset, the whole input in one forward)."""

    path: str
    model: dict[str, Any] | None = None
    output: str = "logits"
    sigmoid_kd: str = "binary"
    classes: dict[str, tuple[int, ...]] | None = None
    orientation: str | None = "RAS"
    spacing: tuple[float, ...] | None = None
    intensity: Intensity | None = None
    roi_size: tuple[int, ...] | None = None
    divisible: int = 1
    overlap: float = 0.5
    cache: str | None = None
    cache_dtype: str = "float16"
    cache_top_k: int | None = None
    sw_batch_size: int = 1
    fold: int | str | tuple[int | str, ...] | None = None
    checkpoint: str | None = None
    configuration: str | None = None
    mirroring: bool | None = None

    @property
    def nnunet_fields(self) -> list[str]:
        """The nnU-Net-folder fields this description sets."""
        return [name for name in NNUNET_FIELDS if getattr(self, name) is not None]

    @property
    def own_pipeline(self) -> bool:
        """Whether the teacher declares a pipeline of its own (then it needs cached targets)."""
        return self.orientation != "RAS" or any(
            getattr(self, name) not in (None, 1) for name in ("spacing", "intensity", "roi_size", "divisible")
        )

    @property
    def target_kind(self) -> str:
        """``"log_odds"`` (per-class binary KD of a sigmoid teacher) or ``"log_probs"`` (everything else)."""
        return "log_odds" if self.output in SIGMOID_OUTPUTS and self.sigmoid_kd == "binary" else "log_probs"

    def pipeline(self) -> dict[str, Any]:
        """The teacher's pipeline and output convention as plain data (part of the cache key)."""
        return {
            "model": self.model,
            "output": self.output,
            "target_kind": self.target_kind,
            "orientation": self.orientation,
            "spacing": list(self.spacing) if self.spacing else None,
            "intensity": self.intensity.describe() if self.intensity else None,
            "roi_size": list(self.roi_size) if self.roi_size else None,
            "divisible": self.divisible,
            "overlap": self.overlap if self.roi_size else None,
        }


def _fail(name: str, message: str) -> TeacherSpecError:
    return TeacherSpecError(f"{WHERE}.{name}: {message}")


def _numbers(name: str, value: Any, count: int | None, positive: bool, integer: bool = False) -> tuple:
    kind = "integers" if integer else "numbers"
    if not isinstance(value, (list, tuple)) or (count is not None and len(value) != count) or not value:
        size = f"{count} " if count else ""
        raise _fail(name, f"must be a list of {size}{kind}, got {value!r}")
    for item in value:
        ok = isinstance(item, int) if integer else isinstance(item, (int, float))
        if isinstance(item, bool) or not ok or not math.isfinite(item) or (positive and item <= 0):
            raise _fail(name, f"must be a list of {'positive ' if positive else ''}{kind}, got {value!r}")
    return tuple(int(v) if integer else float(v) for v in value)


def parse_intensity(value: Any) -> Intensity:
    """A preset name or an ``{window|percentiles, normalize, scale, shift}`` mapping → :class:`Intensity`."""
    name = "intensity"
    if isinstance(value, str):
        if value not in INTENSITY_PRESETS:
            raise _fail(
                name, f"unknown preset {value!r}; use one of {sorted(INTENSITY_PRESETS)} or a mapping"
            )
        value = INTENSITY_PRESETS[value]
    if not isinstance(value, Mapping):
        raise _fail(name, f"must be a preset name or a mapping of {list(INTENSITY_FIELDS)}, got {value!r}")
    unknown = sorted(set(value) - set(INTENSITY_FIELDS))
    if unknown:
        raise _fail(name, f"unknown keys {unknown}; it takes {list(INTENSITY_FIELDS)}")
    if value.get("window") is not None and value.get("percentiles") is not None:
        raise _fail(name, "give window (raw values) or percentiles, not both")
    clips = {}
    for key in ("window", "percentiles"):
        if value.get(key) is not None:
            low, high = _numbers(f"{name}.{key}", value[key], 2, positive=False)
            if not low < high or (key == "percentiles" and not 0 <= low < high <= 100):
                raise _fail(f"{name}.{key}", f"must be [low, high] with low < high, got {value[key]!r}")
            clips[key] = (low, high)
    normalize = value.get("normalize", "zscore")
    if normalize not in NORMALIZE:
        raise _fail(f"{name}.normalize", f"must be one of {list(NORMALIZE)}, got {normalize!r}")
    scale, shift = value.get("scale", 1.0), value.get("shift", 0.0)
    for key, number in (("scale", scale), ("shift", shift)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise _fail(f"{name}.{key}", f"must be a number, got {number!r}")
    if scale == 0:
        raise _fail(f"{name}.scale", "must not be 0")
    return Intensity(normalize=normalize, scale=float(scale), shift=float(shift), **clips)


def _classes(value: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping) or not value:
        raise _fail("classes", f"must map the teacher's class names to output channels, got {value!r}")
    out = {}
    for name, channels in value.items():
        items = list(channels) if isinstance(channels, (list, tuple)) else [channels]
        if not items or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in items):
            raise _fail(f"classes.{name}", f"must be a channel >= 0 or a list of them, got {channels!r}")
        out[str(name)] = tuple(items)
    return out


def _fold(value: Any) -> int | str:
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise _fail(
        "fold", f"must be a fold number >= 0, 'all' (nnU-Net's fold_all) or a list of them, got {value!r}"
    )


def _nnunet_fields(value: Mapping[str, Any]) -> dict[str, Any]:
    """The nnU-Net folder fields of a teacher mapping, checked (absent ones ``None``)."""
    out: dict[str, Any] = {name: None for name in NNUNET_FIELDS}
    fold = value.get("fold")
    if fold is not None:
        folds = [_fold(f) for f in fold] if isinstance(fold, (list, tuple)) else None
        if folds is not None and (not folds or len(set(map(str, folds))) != len(folds)):
            raise _fail("fold", f"must list distinct folds, got {fold!r}")
        out["fold"] = tuple(folds) if folds is not None else _fold(fold)
    checkpoint = value.get("checkpoint")
    if checkpoint is not None and checkpoint not in ("final", "best"):
        raise _fail(
            "checkpoint",
            f"must be final or best (checkpoint_final.pth / checkpoint_best.pth), got {checkpoint!r}",
        )
    out["checkpoint"] = checkpoint
    configuration = value.get("configuration")
    if configuration is not None and (not isinstance(configuration, str) or not configuration):
        raise _fail(
            "configuration",
            f"must be the name of a plans configuration, e.g. 3d_fullres, got {configuration!r}",
        )
    out["configuration"] = configuration
    mirroring = value.get("mirroring")
    if mirroring is not None and not isinstance(mirroring, bool):
        raise _fail("mirroring", f"must be true or false, got {mirroring!r}")
    out["mirroring"] = mirroring
    return out


def _orientation(value: Any) -> str | None:
    """``"RAS"``-style axis codes (one letter of L/R, P/A, I/S each), or ``"none"``: the file's order."""
    if value == "none":
        return None
    letters = str(value).upper() if isinstance(value, str) else ""
    axes = sorted(next((i for i, pair in enumerate(AXES) if c in pair), -1) for c in letters)
    if len(letters) != 3 or axes != [0, 1, 2]:
        raise _fail(
            "orientation", f"must be axis codes such as RAS or LPS, or none (the file's), got {value!r}"
        )
    return letters


SPEC_FIELDS: tuple[str, ...] = (
    "path",
    "model",
    "output",
    "sigmoid_kd",
    "classes",
    "orientation",
    "spacing",
    "intensity",
    "roi_size",
    "divisible",
    "overlap",
    "sw_batch_size",
    "cache",
    "cache_dtype",
    "cache_top_k",
    "fold",
    "checkpoint",
    "configuration",
    "mirroring",
)
#: Fields of an nnU-Net v2 folder teacher only.
NNUNET_FIELDS: tuple[str, ...] = ("fold", "checkpoint", "configuration", "mirroring")


def parse_teacher(
    value: str | Mapping[str, Any] | None, model: Mapping[str, Any] | None = None
) -> TeacherSpec | None:
    """Parse ``model.init_args.teacher`` (a path or a mapping) into a :class:`TeacherSpec`.

    Args:
        value: the configured teacher; ``None``: no teacher.
        model: the older ``model.init_args.teacher_model`` (used when the mapping has no ``model``).

    Raises:
        TeacherSpecError: naming the field and the fix.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return TeacherSpec(path=value, model=dict(model) if model else None)
    if not isinstance(value, Mapping):
        raise TeacherSpecError(f"{WHERE} must be a path or a mapping with `path`, got {value!r}")
    unknown = sorted(set(value) - set(SPEC_FIELDS))
    if unknown:
        hints = {u: difflib.get_close_matches(u, SPEC_FIELDS, n=1) for u in unknown}
        said = ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items())
        raise TeacherSpecError(f"{WHERE} has unknown keys {said}; it takes {list(SPEC_FIELDS)}")
    if not isinstance(value.get("path"), str) or not value["path"]:
        raise _fail("path", "is required: the teacher file or MONAI bundle folder")
    output = value.get("output", "logits")
    if output not in OUTPUTS:
        raise _fail("output", f"must be one of {list(OUTPUTS)} (what the network returns), got {output!r}")
    sigmoid_kd = value.get("sigmoid_kd", "binary")
    if sigmoid_kd not in SIGMOID_KD:
        raise _fail("sigmoid_kd", f"must be one of {list(SIGMOID_KD)}, got {sigmoid_kd!r}")
    spacing = _numbers("spacing", value["spacing"], None, True) if value.get("spacing") is not None else None
    orientation = _orientation(value.get("orientation") or "RAS")
    roi = value.get("roi_size")
    roi = _numbers("roi_size", roi, None, True, integer=True) if roi is not None else None
    if spacing and not all(MIN_SPACING <= v <= MAX_SPACING for v in spacing):
        raise _fail(
            "spacing", f"must be between {MIN_SPACING} and {MAX_SPACING} mm per axis, got {list(spacing)}"
        )
    if roi and max(roi) > MAX_ROI:
        raise _fail("roi_size", f"must be at most {MAX_ROI} per axis (a sliding window), got {list(roi)}")
    divisible = value.get("divisible", 1)
    if isinstance(divisible, bool) or not isinstance(divisible, int) or not 1 <= divisible <= MAX_DIVISIBLE:
        raise _fail(
            "divisible",
            f"must be an integer in [1, {MAX_DIVISIBLE}] (the network's total stride, e.g. 16 or 32), "
            f"got {divisible!r}",
        )
    if roi and any(size % divisible for size in roi):
        raise _fail("roi_size", f"{list(roi)} must be a multiple of divisible ({divisible}) on every axis")
    overlap = value.get("overlap", 0.5)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise _fail("overlap", f"must be in [0, 1), got {overlap!r}")
    sw_batch_size = value.get("sw_batch_size", 1)
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise _fail("sw_batch_size", f"must be an integer >= 1, got {sw_batch_size!r}")
    cache_dtype = value.get("cache_dtype", "float16")
    if cache_dtype not in CACHE_DTYPES:
        raise _fail("cache_dtype", f"must be one of {list(CACHE_DTYPES)}, got {cache_dtype!r}")
    top_k = value.get("cache_top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 255):
        raise _fail("cache_top_k", f"must be an integer in [1, 255] or null (every class), got {top_k!r}")
    cache = value.get("cache")
    if cache is not None and (not isinstance(cache, str) or not cache):
        raise _fail("cache", f"must be a folder path or null, got {cache!r}")
    nnunet = _nnunet_fields(value)
    network = value.get("model") or model
    if network is not None and (not isinstance(network, Mapping) or "class_path" not in network):
        raise _fail("model", f"must be {{class_path, init_args}} of the teacher's network, got {network!r}")
    spec = TeacherSpec(
        path=value["path"],
        model=dict(network) if network else None,
        output=output,
        sigmoid_kd=sigmoid_kd,
        classes=_classes(value["classes"]) if value.get("classes") is not None else None,
        orientation=orientation,
        spacing=spacing,
        intensity=parse_intensity(value["intensity"]) if value.get("intensity") is not None else None,
        roi_size=roi,
        divisible=divisible,
        overlap=float(overlap),
        sw_batch_size=sw_batch_size,
        cache=cache,
        cache_dtype=cache_dtype,
        cache_top_k=top_k,
        **nnunet,
    )
    if spec.cache_top_k is not None and spec.target_kind == "log_odds":
        raise _fail(
            "cache_top_k",
            "keeps the k most likely of mutually exclusive classes; a sigmoid teacher distilled per class "
            "(sigmoid_kd: binary) has no such ranking: remove cache_top_k, or set sigmoid_kd: exclusive",
        )
    if spec.own_pipeline and spec.cache is None:
        defaults = {"orientation": "RAS", "divisible": 1}
        declared = [n for n in PIPELINE_FIELDS if getattr(spec, n) not in (None, defaults.get(n))]
        raise _fail(
            "cache",
            f"the teacher declares its own pipeline ({', '.join(declared)}), which runs on whole volumes, "
            "once per case: set cache to a folder for its targets (live KD runs the teacher on the "
            "student's crops in the student's preprocessing)",
        )
    return spec
