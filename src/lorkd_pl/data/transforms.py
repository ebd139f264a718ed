"""MONAI dictionary-transform pipelines for 3D segmentation and 2D classification samples.

3D (keys ``image``, ``label``): load with :class:`SimpleITKReader` → channel first → orientation RAS →
resample to the task's spacing (bilinear image, nearest label) → intensity by modality (CT: window
[-500, 1000] HU then z-score; MR: clip to the 0.5–99.5 percentiles then z-score; other: z-score) →
training only: pad to the patch, a foreground-aware random crop (positive:negative 1:1) and flips.
Validation/test keep whole volumes (sliding-window inference in the model).

2D (``image`` an array ``(H, W[, 3])`` or a file, ``label`` an int): channel first → the requested
number of channels → scale to [0, 1] → resize to the task's size → z-score → training only: flips
and small affine jitter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai import transforms as mt

from lorkd_pl.data.readers import SimpleITKReader
from lorkd_pl.data.teacher_targets import INDEX_KEY, KEY, TARGET_KEYS

CT_WINDOW: tuple[float, float] = (-500.0, 1000.0)
MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)


#: A preprocessing step as data: a MONAI transform's class name in ``monai.transforms`` and its
#: arguments. lorkd-pl builds its pipelines from these lists, and ``export --format bundle`` writes the
#: same lists into a MONAI bundle's ``inference.json``: one description, two consumers.
Step = tuple[str, dict[str, Any]]


def intensity_steps(modality: str) -> list[Step]:
    """Normalisation of ``image`` by modality: CT window then z-score; MR percentile clip then z-score."""
    modality = modality.upper()
    steps: list[Step] = []
    if modality == "CT":
        low, high = CT_WINDOW
        window = {"a_min": low, "a_max": high, "b_min": low, "b_max": high, "clip": True}
        steps.append(("ScaleIntensityRanged", {"keys": "image", **window}))
    elif modality == "MR":
        lower, upper = MR_PERCENTILES
        steps.append(("ClipIntensityPercentilesd", {"keys": "image", "lower": lower, "upper": upper}))
    steps.append(("NormalizeIntensityd", {"keys": "image"}))
    return steps


def build_steps(steps: Sequence[Step], **extra: dict[str, Any]) -> list[mt.Transform]:
    """The MONAI transforms of ``steps``; ``extra[name]`` adds arguments to the steps of that class
    (objects that cannot be written as data, e.g. a reader instance)."""
    return [getattr(mt, name)(**arguments, **extra.get(name, {})) for name, arguments in steps]


def intensity_transforms(modality: str) -> list[mt.MapTransform]:
    """The transforms of :func:`intensity_steps`."""
    return build_steps(intensity_steps(modality))


def seg3d_steps(
    keys: Sequence[str], modality: str, spacing: Sequence[float] | None, axcodes: str | None = "RAS"
) -> list[Step]:
    """The steps of :func:`seg3d_preprocessing`: geometry, then the modality's intensity steps (the
    reader is added when they are built)."""
    return geometry_steps(keys, spacing, axcodes) + intensity_steps(modality or "other")


def geometry_steps(keys: Sequence[str], spacing: Sequence[float] | None, axcodes: str | None) -> list[Step]:
    """Load, channel first, orientation ``axcodes`` (if any), resampling to ``spacing`` (if any)."""
    keys = list(keys)
    steps: list[Step] = [
        ("LoadImaged", {"keys": keys, "image_only": True}),
        ("EnsureChannelFirstd", {"keys": keys}),
    ]
    if axcodes:
        steps.append(("Orientationd", {"keys": keys, "axcodes": axcodes, "labels": None}))
    if spacing:
        modes = ["bilinear" if key == "image" else "nearest" for key in keys]
        steps.append(("Spacingd", {"keys": keys, "pixdim": [float(v) for v in spacing], "mode": modes}))
    return steps


def seg3d_preprocessing(
    keys: Sequence[str],
    modality: str,
    spacing: Sequence[float] | None,
    intensity: Sequence[mt.MapTransform] | None = None,
    axcodes: str | None = "RAS",
) -> list[mt.Transform]:
    """The one 3D preprocessing of training, validation, test and ``lorkd-pl predict``.

    Load with :class:`SimpleITKReader` → channel first → RAS → resample to ``spacing`` (bilinear
    ``image``, nearest for every other key) → intensity by modality (:func:`intensity_transforms`).

    Args:
        keys: ``["image"]`` or ``["image", "label"]``.
        modality: ``"CT"``, ``"MR"`` or ``"other"``.
        spacing: target spacing (mm, x y z) or ``None`` to keep the file's.
        intensity: other intensity steps instead of the modality's (a teacher's own pipeline).
        axcodes: the orientation to bring the volume to; ``None`` keeps the file's voxel order (a
            teacher's own pipeline).
    """
    geometry = build_steps(geometry_steps(keys, spacing, axcodes), LoadImaged={"reader": SimpleITKReader()})
    return geometry + list(intensity if intensity is not None else intensity_transforms(modality or "other"))


def describe_intensity(kind: str, modality: str | None) -> str:
    """The intensity preprocessing in words (for exported expert cards)."""
    if kind != "seg3d":
        return "scale to [0, 1], resize to patch_size, z-score"
    if (modality or "").upper() == "CT":
        return f"clip to [{CT_WINDOW[0]:g}, {CT_WINDOW[1]:g}] HU, then z-score"
    if (modality or "").upper() == "MR":
        return f"clip to the {MR_PERCENTILES[0]:g}-{MR_PERCENTILES[1]:g} percentiles, then z-score"
    return "z-score"


class MirrorFlipd(mt.RandomizableTransform, mt.MapTransform):
    """Flip ``image`` and ``label`` (and a cached ``teacher`` target) left↔right (axis 0 of a RAS
    volume) with probability ``prob`` and swap the label values of every mirror pair, so a flipped left
    lung is labelled ``lung_right`` (the target's channels of a pair trade places too).

    Args:
        prob: flip probability.
        pairs: label-value pairs ``(a, b)`` that trade places under the flip.
    """

    def __init__(self, prob: float, pairs: Sequence[tuple[int, int]]) -> None:
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, ["image", "label", *TARGET_KEYS], allow_missing_keys=True)
        self.flip = mt.Flipd(["image", "label", *TARGET_KEYS], spatial_axis=0, allow_missing_keys=True)
        self.pairs = [tuple(pair) for pair in pairs]

    def __call__(self, data):
        self.randomize(None)
        if not self._do_transform:
            return data
        sample = self.flip(dict(data))
        label = sample["label"]
        swapped = label.clone()
        for a, b in self.pairs:
            swapped[label == a] = b
            swapped[label == b] = a
        sample["label"] = swapped
        if self.pairs and (KEY in sample or INDEX_KEY in sample):
            order = list(range(max(max(pair) for pair in self.pairs) + 1))
            for a, b in self.pairs:
                order[a], order[b] = order[b], order[a]
            if KEY in sample:  # dense: the pair's channels trade places
                order += range(len(order), sample[KEY].shape[0])
                sample[KEY] = sample[KEY][order]
            else:  # top-k: the stored class indices are renamed
                index = sample[INDEX_KEY]
                renamed = torch.arange(256, dtype=index.dtype)
                renamed[: len(order)] = torch.tensor(order, dtype=index.dtype)
                sample[INDEX_KEY] = renamed[index.long()]
        return sample


def seg3d_augmentations(augment: Mapping[str, Any]) -> list[mt.MapTransform]:
    """The random training augmentations of a task's checked ``augment`` mapping
    (:func:`lorkd_pl.checks.check_augment`), as MONAI transforms, each with probability ``prob``.

    Spatial (``rotate``, ``scale``): one affine of ``image`` (bilinear), ``label`` (nearest) and a cached
    ``teacher`` target (bilinear), border-padded. Intensity (on ``image``): bias field, gamma (on the
    [0, 1]-rescaled image, then back to its range), scale, shift and noise.
    """
    prob = float(augment.get("prob", 0.2))
    steps: list[mt.MapTransform] = []
    if "rotate" in augment or "scale" in augment:
        angle = math.radians(float(augment.get("rotate", 0.0)))
        zoom = float(augment.get("scale", 0.0))
        steps.append(
            mt.RandAffined(
                ["image", "label", "teacher"],
                prob=prob,
                rotate_range=(angle, angle, angle) if angle else None,
                scale_range=(zoom, zoom, zoom) if zoom else None,
                mode=("bilinear", "nearest", "bilinear"),
                padding_mode="border",
                allow_missing_keys=True,
            )
        )
    if "bias_field" in augment:
        steps.append(mt.RandBiasFieldd("image", prob=prob, coeff_range=(0.0, float(augment["bias_field"]))))
    if "gamma" in augment:
        steps.append(mt.RandAdjustContrastd("image", prob=prob, gamma=tuple(augment["gamma"])))
    if "scale_intensity" in augment:
        steps.append(mt.RandScaleIntensityd("image", prob=prob, factors=float(augment["scale_intensity"])))
    if "shift_intensity" in augment:
        steps.append(mt.RandShiftIntensityd("image", prob=prob, offsets=float(augment["shift_intensity"])))
    if "noise" in augment:
        steps.append(mt.RandGaussianNoised("image", prob=prob, std=float(augment["noise"])))
    return steps


def seg3d_transforms(
    train: bool,
    modality: str,
    spacing: Sequence[float] | None,
    patch_size: Sequence[int],
    flip_prob: float = 0.5,
    flip_axes: Sequence[int] = (),
    mirror_pairs: Sequence[tuple[int, int]] = (),
    targets: Callable[[dict], dict] | None = None,
    augment: Mapping[str, Any] | None = None,
) -> mt.Compose:
    """Pipeline for one 3D segmentation sample ``{"image": path, "label": path}``.

    Produces ``image`` float32 ``(1, X, Y, Z)`` and ``label`` int64 ``(1, X, Y, Z)`` (training:
    ``patch_size``; validation/test: the resampled whole volume) as MetaTensors with their affine.
    Training flips only the task's ``flip_axes`` (RAS: 0 left↔right, 1, 2), each with ``flip_prob``; a
    left↔right flip swaps the ``mirror_pairs`` label values (see :func:`lorkd_pl.checks.check_flips`).
    ``targets`` (:class:`~lorkd_pl.data.teacher_targets.AttachTeacherTargets`) adds a cached teacher
    target: in training right after the crop (it reads the crop's box only; then flipped with the
    image), in evaluation after the preprocessing (the whole volume).
    ``augment`` adds the task's random augmentations (:func:`seg3d_augmentations`) to
    the training crops, after the flips.
    """
    keys = ["image", "label"]
    steps: list = seg3d_preprocessing(keys, modality, spacing)
    if targets is not None and not train:
        steps.append(targets)
    every = ["image", "label", *TARGET_KEYS]
    if train:
        steps += [
            mt.SpatialPadd(keys, spatial_size=tuple(patch_size)),
            mt.RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=tuple(patch_size), pos=1, neg=1, num_samples=1
            ),
            *([targets] if targets is not None else []),  # reads the crop's box only
            *[
                MirrorFlipd(flip_prob, mirror_pairs)
                if axis == 0
                else mt.RandFlipd(every, prob=flip_prob, spatial_axis=axis, allow_missing_keys=True)
                for axis in flip_axes
            ],
            *seg3d_augmentations(augment or {}),
        ]
    steps += [
        mt.EnsureTyped(["image", KEY], dtype=torch.float32, allow_missing_keys=True),
        mt.EnsureTyped("label", dtype=torch.long),
    ]
    return mt.Compose(steps)


class ToChannels(mt.MapTransform):
    """``image`` ``(C, H, W)`` → ``channels`` channels (RGB→grey by mean, grey→RGB by repeat)."""

    def __init__(self, channels: int) -> None:
        super().__init__(["image"])
        self.channels = channels

    def __call__(self, data):
        sample = dict(data)
        image = sample["image"]
        if image.shape[0] != self.channels:
            if self.channels == 1:
                image = image.mean(0, keepdims=True)
            elif image.shape[0] == 1:
                image = image.repeat(self.channels, *[1] * (image.ndim - 1))
            else:
                raise ValueError(
                    f"cannot turn a {image.shape[0]}-channel image into {self.channels} channels"
                )
        sample["image"] = image
        return sample


def cls2d_transforms(
    train: bool,
    image_size: Sequence[int],
    channels: int = 1,
    targets: Callable[[dict], dict] | None = None,
) -> mt.Compose:
    """Pipeline for one 2D classification sample ``{"image": array | path, "label": int}``.

    Produces ``image`` float32 ``(channels, H, W)`` with ``(H, W) = image_size`` and ``label`` int64
    ``()``; ``targets`` may add a cached teacher target ``teacher`` ``(K,)`` at the end.
    """
    steps: list[mt.Transform] = [
        LoadArrayOrFile(),
        ToChannels(channels),
        mt.ScaleIntensityd("image"),
        mt.Resized("image", spatial_size=tuple(image_size), mode="bilinear", anti_aliasing=False),
        mt.NormalizeIntensityd("image"),
    ]
    if train:
        steps += [
            mt.RandFlipd("image", prob=0.5, spatial_axis=1),
            mt.RandAffined("image", prob=0.5, rotate_range=0.15, scale_range=0.1, padding_mode="border"),
        ]
    steps += [
        mt.EnsureTyped("image", dtype=torch.float32, track_meta=False),
        mt.EnsureTyped("label", dtype=torch.long, track_meta=False),
    ]
    return mt.Compose(steps + ([targets] if targets is not None else []))


class LoadArrayOrFile(mt.MapTransform):
    """``image`` as an in-memory ``(H, W[, C])`` array (MedMNIST) or a 2D image file → ``(C, H, W)``."""

    def __init__(self) -> None:
        super().__init__(["image"])
        self.loader = mt.LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)

    def __call__(self, data):
        sample = dict(data)
        image = sample["image"]
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            array = self.loader(image)  # (C, x, y[, 1]): ITK's x-fastest order
            if array.ndim == 4 and array.shape[-1] == 1:  # a single-slice volume (e.g. a 2D DICOM)
                array = array[..., 0]
            # rows × columns, as an in-memory (H, W) array (MedMNIST) holds the same picture: a file
            # written from such an array reads back identically
            array = torch.as_tensor(array).transpose(-1, -2)
        else:
            array = torch.as_tensor(np.asarray(image, dtype=np.float32))
            array = array.unsqueeze(0) if array.ndim == 2 else array.movedim(-1, 0)
        sample["image"] = array.float()
        return sample
