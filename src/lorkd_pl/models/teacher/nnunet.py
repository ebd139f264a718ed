"""Teachers from nnU-Net v2 trained-model folders, run the way nnU-Net's own predictor runs them.

An nnU-Net v2 results folder (``<results>/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/``, e.g.
TotalSegmentator's) holds ``plans.json``, ``dataset.json`` (class names under ``labels``) and
``fold_<k>/checkpoint_final.pth`` (weights under ``network_weights``). lorkd-pl reads it without nnU-Net
and without running code from it:

* the **checkpoint** with ``torch.load(weights_only=True)``, allowing only NumPy's plain scalars and
  dtypes besides tensors and containers (nnU-Net stores its training log as NumPy floats), and keeps
  ``network_weights`` and ``inference_allowed_mirroring_axes``;
* the **network** from the plans' ``architecture`` (or the older plans' ``UNet_class_name`` keys,
  converted as nnU-Net converts them): the class must be one of :data:`NETWORK_CLASSES` of
  ``dynamic_network_architectures`` (the optional extra ``lorkd-pl[nnunet]``) and every operation one of
  :data:`OPERATIONS` (looked up in a table, never imported by the name the file gives);
* the **preprocessing** of nnU-Net's default preprocessor, in its order: the file's voxel order
  reversed (SimpleITK's array order) and ``transpose_forward``; a crop to the non-zero box (holes
  filled); each channel's normalisation scheme of the plans (``CTNormalization`` with the dataset's
  percentiles, mean and std; ``ZScoreNormalization``, inside the non-zero mask where
  ``use_mask_for_norm``; ``NoNormalization``; ``RescaleTo01Normalization``; ``RGBTo01Normalization``);
  resampling to the configuration's spacing (cubic spline, per slice and nearest across slices when the
  spacing is anisotropic — :func:`resample_to_shape`);
* the **inference** of nnU-Net's predictor: sliding windows of the plans' patch, step 0.5 of it
  (``overlap``), Gaussian weighting (σ = patch/8), padding to the patch, mirroring over the axes the
  checkpoint allows (``mirroring: false`` turns it off, as nnU-Net's ``--disable_tta``), the folds'
  logits averaged;
* the **export**: logits resampled back to the cropped box (linear), softmax, background outside the
  box, axes restored: probabilities ``(K, X, Y, Z)`` in the image file's own grid.

Differences from nnU-Net's predictor, all numerical: logits are accumulated in float32 (nnU-Net
accumulates in float16 on the GPU); tiles are run one at a time.
"""

from __future__ import annotations

import importlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from lorkd_pl.models.teacher.errors import TeacherError

PLANS, DATASET = "plans.json", "dataset.json"
CHECKPOINTS: dict[str, str] = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
#: The network classes lorkd-pl builds from a plans file: module path → class, by name.
NETWORK_CLASSES: dict[str, str] = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
    # the older plans' name of the residual encoder (nnU-Net finds it in architectures.unet now)
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": "ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.unet.ResidualUNet": "ResidualUNet",
}
NETWORK_MODULE = "dynamic_network_architectures.architectures.unet"


def _operations() -> dict[str, type[nn.Module]]:
    table: dict[str, type[nn.Module]] = {}
    groups = {
        "conv": ("Conv1d", "Conv2d", "Conv3d"),
        "instancenorm": ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
        "batchnorm": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"),
        "dropout": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d"),
        "activation": ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SiLU"),
    }
    for module, names in groups.items():
        for name in names:
            table[f"torch.nn.modules.{module}.{name}"] = table[f"torch.nn.{name}"] = getattr(nn, name)
    return table


#: The operations (convolution, normalisation, dropout, non-linearity) a plans file may name.
OPERATIONS: dict[str, type[nn.Module]] = _operations()
NORMALIZATIONS: tuple[str, ...] = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)
RESAMPLING = "resample_data_or_seg_to_shape"
#: nnU-Net's threshold: a spacing whose largest/smallest ratio exceeds it is resampled per slice.
ANISOTROPY_THRESHOLD = 3.0
GAUSSIAN_SIGMA_SCALE, GAUSSIAN_PEAK = 1.0 / 8, 10.0
#: A configuration name from the folder name ``<Trainer>__<Plans>__<configuration>``.
FOLDER_NAME = re.compile(r"^(?P<trainer>[^_].*?)__(?P<plans>.+?)__(?P<configuration>[^_].*)$")


class NnUNetError(TeacherError):
    """An nnU-Net folder lorkd-pl cannot read or run; names the file and the fix."""


def is_nnunet_folder(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 trained-model folder (``plans.json`` and ``dataset.json``)."""
    path = Path(path)
    return path.is_dir() and (path / PLANS).is_file() and (path / DATASET).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise NnUNetError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    if not isinstance(data, dict):
        raise NnUNetError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


@dataclass(frozen=True)
class NnUNetFolder:
    """What an nnU-Net folder's JSON files say (no weights).

    Attributes:
        folder: the trained-model folder.
        plans, dataset: its ``plans.json`` and ``dataset.json``.
        configuration_name: e.g. ``3d_fullres``.
        configuration: that configuration of the plans, ``inherits_from`` resolved.
        folds: the folds used (``"0"``, ``"all"``, ...).
        checkpoint: the checkpoint file name in each ``fold_<k>``.
        mirroring: test-time mirroring over the axes the checkpoint allows.
        step: the sliding window's step as a fraction of the patch (``1 - overlap``).
    """

    folder: Path
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration_name: str
    configuration: dict[str, Any]
    folds: tuple[str, ...]
    checkpoint: str
    mirroring: bool = True
    step: float = 0.5
    architecture: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, int]:
        """Class name → output channel (the label value; ``ignore`` has no channel)."""
        return {name: int(value) for name, value in self.dataset["labels"].items() if name != "ignore"}

    @property
    def input_channels(self) -> int:
        """The number of image channels the network reads."""
        names = self.dataset.get("channel_names", self.dataset.get("modality"))
        return len(names)

    @property
    def transpose_forward(self) -> list[int]:
        return [int(a) for a in self.plans.get("transpose_forward", [0, 1, 2])]

    @property
    def transpose_backward(self) -> list[int]:
        """The inverse of :attr:`transpose_forward` (derived, not read: the two cannot disagree)."""
        return [int(a) for a in np.argsort(self.transpose_forward)]

    @property
    def spacing(self) -> list[float]:
        """The configuration's spacing, in nnU-Net's (transposed) axis order."""
        return [float(s) for s in self.configuration["spacing"]]

    @property
    def patch_size(self) -> list[int]:
        return [int(s) for s in self.configuration["patch_size"]]

    def fold_file(self, fold: str) -> Path:
        """``fold_<k>/<checkpoint>``."""
        return self.folder / f"fold_{fold}" / self.checkpoint

    def describe(self) -> dict[str, Any]:
        """The resolved pipeline as plain data (printed at fit start; part of the targets' key)."""
        config = self.configuration
        intensity = self.plans.get(
            "foreground_intensity_properties_per_channel",
            self.plans.get("foreground_intensity_properties_by_modality", {}),
        )
        return {
            "format": "nnU-Net v2",
            "configuration": self.configuration_name,
            "folds": list(self.folds),
            "checkpoint": self.checkpoint,
            "network": self.architecture.get("network_class_name"),
            "channels": self.input_channels,
            "classes": len(self.labels),
            "transpose_forward": self.transpose_forward,
            "spacing": self.spacing,
            "patch_size": self.patch_size,
            "normalization": list(config["normalization_schemes"]),
            "use_mask_for_norm": [bool(v) for v in config.get("use_mask_for_norm", [])],
            "intensity_properties": {
                str(c): {
                    k: intensity[str(c)][k] for k in ("mean", "std", "percentile_00_5", "percentile_99_5")
                }
                for c, scheme in enumerate(config["normalization_schemes"])
                if scheme == "CTNormalization"
            },
            "resampling_data": dict(config.get("resampling_fn_data_kwargs", {})),
            "resampling_probabilities": dict(config.get("resampling_fn_probabilities_kwargs", {})),
            "step": self.step,
            "gaussian": True,
            "mirroring": self.mirroring,
        }


def _configuration(plans: Mapping[str, Any], name: str, source: Path) -> dict[str, Any]:
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping):
        raise NnUNetError(f"{source} has no 'configurations': not an nnU-Net v2 plans file")
    chain, resolved = [], {}
    while name is not None:
        if name not in configurations:
            raise NnUNetError(
                f"{source} has no configuration {name!r}; it has {sorted(configurations)}: set "
                "model.init_args.teacher.configuration to one of them"
            )
        if name in chain:
            raise NnUNetError(f"{source}: configuration {name!r} inherits from itself ({' -> '.join(chain)})")
        chain.append(name)
        if not isinstance(configurations[name], Mapping):
            raise NnUNetError(f"{source}: configuration {name!r} is not a mapping")
        name = configurations[name].get("inherits_from")
    for link in reversed(chain):  # the parent first, each child overriding
        resolved.update({k: v for k, v in configurations[link].items() if k != "inherits_from"})
    return resolved


def _architecture(config: Mapping[str, Any], source: Path, configuration: str) -> dict[str, Any]:
    """The plans' ``architecture`` entry; older plans' ``UNet_class_name`` keys converted the way
    nnU-Net converts them."""
    if "architecture" in config:
        architecture = config["architecture"]
        if not isinstance(architecture, Mapping) or not isinstance(architecture.get("arch_kwargs"), Mapping):
            raise NnUNetError(f"{source}: configuration {configuration!r} has a malformed 'architecture'")
        return dict(architecture)
    try:
        name = config["UNet_class_name"]
        if name not in ("PlainConvUNet", "ResidualEncoderUNet"):
            raise NnUNetError(
                f"{source}: configuration {configuration!r} names UNet_class_name {name!r}; nnU-Net's older "
                "plans convert PlainConvUNet and ResidualEncoderUNet only"
            )
        stages = len(config["n_conv_per_stage_encoder"])
        dims = len(config["patch_size"])
        kwargs = {
            "n_stages": stages,
            "features_per_stage": [
                min(int(config["UNet_base_num_features"]) * 2**i, int(config["unet_max_num_features"]))
                for i in range(stages)
            ],
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
            "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"],
            ("n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"): config[
                "n_conv_per_stage_encoder"
            ],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        }
    except (KeyError, TypeError, ValueError) as error:
        raise NnUNetError(
            f"{source}: configuration {configuration!r} has neither 'architecture' nor the older "
            f"UNet_class_name keys ({error})"
        ) from None
    return {
        "network_class_name": f"{NETWORK_MODULE}.{name}",
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _check_plans(
    plans: Mapping[str, Any], config: Mapping[str, Any], name: str, channels: int, source: Path
) -> None:
    """The plans' fields lorkd-pl computes with, type-checked (one line naming the field)."""

    def numbers(value: Any, integer: bool) -> bool:
        kind = int if integer else (int, float)
        return (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in value)
        )

    def order(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 5

    where = f"{source}: configuration {name!r}"
    if not numbers(config.get("patch_size"), True) or not numbers(config.get("spacing"), False):
        raise NnUNetError(
            f"{where}: patch_size {config.get('patch_size')!r} and spacing {config.get('spacing')!r} must be "
            "3 positive numbers each; lorkd-pl runs nnU-Net's 3D configurations (3d_fullres, 3d_lowres)"
        )
    forward = plans.get("transpose_forward", [0, 1, 2])
    if (
        not isinstance(forward, list)
        or not all(type(a) is int for a in forward)
        or sorted(forward) != [0, 1, 2]
    ):
        raise NnUNetError(f"{source}: transpose_forward must be a permutation of [0, 1, 2], got {forward!r}")
    mask = config.get("use_mask_for_norm", [False] * channels)
    if not isinstance(mask, list) or len(mask) != channels or not all(isinstance(m, bool) for m in mask):
        raise NnUNetError(
            f"{where}: use_mask_for_norm must hold one true/false per image channel, got {mask!r}"
        )
    for key in ("resampling_fn_data_kwargs", "resampling_fn_probabilities_kwargs"):
        kwargs = config.get(key, {})
        fine = (
            isinstance(kwargs, Mapping)
            and not set(kwargs) - {"is_seg", "order", "order_z", "force_separate_z"}
            and not kwargs.get("is_seg")
            and all(order(kwargs.get(k, 0)) for k in ("order", "order_z"))
            and kwargs.get("force_separate_z") in (None, True, False)
        )
        if not fine:
            raise NnUNetError(
                f"{where}: {key} must hold order/order_z (0-5) and force_separate_z, got {kwargs!r}"
            )
    properties = plans.get(
        "foreground_intensity_properties_per_channel",
        plans.get("foreground_intensity_properties_by_modality", {}),
    )
    if not isinstance(properties, Mapping) or not all(
        isinstance(entry, Mapping)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry.values())
        for entry in properties.values()
    ):
        raise NnUNetError(
            f"{source}: foreground_intensity_properties_per_channel must map channels to numbers"
        )
    for key, allowed in (("preprocessor_name", "DefaultPreprocessor"), ("label_manager", "LabelManager")):
        value = config.get(key, plans.get(key))
        if value is not None and value != allowed:
            raise NnUNetError(f"{where}: {key} is {value!r}; lorkd-pl reproduces nnU-Net's {allowed} only")


def available_folds(folder: Path, checkpoint: str, numbered: bool = False) -> list[str]:
    """The folds of ``folder`` with the checkpoint file (numbers, then ``all``); ``numbered``: the
    numbered ones only (nnU-Net's default ensemble leaves ``fold_all`` out)."""
    found = [p.parent.name[len("fold_") :] for p in folder.glob(f"fold_*/{checkpoint}") if p.is_file()]
    found = [f for f in found if f.isdigit() or (f == "all" and not numbered)]
    return sorted(found, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def read_folder(
    path: str | Path,
    fold: int | str | Sequence[int | str] | None = None,
    checkpoint: str = "final",
    configuration: str | None = None,
    mirroring: bool = True,
    step: float = 0.5,
) -> NnUNetFolder:
    """Read and check an nnU-Net v2 trained-model folder's JSON files and find its folds.

    Args:
        path: the trained-model folder.
        fold: one fold (``0``, ``"all"``: nnU-Net's ``fold_all``), a list of them, or ``None``: every
            fold with the checkpoint (nnU-Net's default).
        checkpoint: ``final`` or ``best``.
        configuration: the plans' configuration; ``None``: the folder name's third part.
        mirroring: test-time mirroring as the checkpoint allows.
        step: sliding-window step, a fraction of the patch.

    Raises:
        NnUNetError: naming the file or field and the fix.
    """
    folder = Path(path)
    where = "model.init_args.teacher"
    plans, dataset = _read_json(folder / PLANS), _read_json(folder / DATASET)
    if checkpoint not in CHECKPOINTS:
        raise NnUNetError(f"{where}.checkpoint must be one of {sorted(CHECKPOINTS)}, got {checkpoint!r}")
    name = CHECKPOINTS[checkpoint]
    if configuration is None:
        match = FOLDER_NAME.match(folder.resolve().name)
        if match is None:
            raise NnUNetError(
                f"{folder}: the folder name is not nnU-Net's <Trainer>__<Plans>__<configuration>; set "
                f"{where}.configuration (one of {sorted(plans.get('configurations', {}))})"
            )
        configuration = match["configuration"]
    config = _configuration(plans, configuration, folder / PLANS)
    if config.get("previous_stage") or configuration.endswith("cascade_fullres"):
        raise NnUNetError(
            f"{folder}: configuration {configuration!r} is a cascade stage that reads the previous "
            "stage's segmentation; lorkd-pl runs single-stage configurations (3d_fullres, 3d_lowres)"
        )
    labels = dataset.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise NnUNetError(f"{folder / DATASET} has no 'labels' (class name -> label value)")
    regions = [n for n, v in labels.items() if isinstance(v, (list, tuple))]
    if regions:
        raise NnUNetError(
            f"{folder / DATASET} declares region-based labels ({', '.join(map(str, regions[:3]))}: "
            "overlapping sigmoid outputs); lorkd-pl distils nnU-Net teachers with one softmax over "
            "exclusive classes"
        )
    bad = {n: v for n, v in labels.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise NnUNetError(f"{folder / DATASET}: label values must be integers >= 0, got {bad}")
    values = sorted(int(v) for n, v in labels.items() if n != "ignore")
    if values != list(range(len(values))):
        raise NnUNetError(f"{folder / DATASET}: label values must be 0..K-1 (nnU-Net's rule), got {values}")
    channel_names = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channel_names, Mapping) or not channel_names:
        raise NnUNetError(f"{folder / DATASET} has no 'channel_names' (image channel -> name)")
    _check_plans(plans, config, configuration, len(channel_names), folder / PLANS)
    schemes = list(config.get("normalization_schemes", []))
    unknown = [s for s in schemes if not isinstance(s, str) or s not in NORMALIZATIONS]
    if unknown or len(schemes) != len(dataset.get("channel_names", dataset.get("modality"))):
        raise NnUNetError(
            f"{folder / PLANS}: normalization_schemes {schemes} must name one of {list(NORMALIZATIONS)} per "
            "image channel"
        )
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key, RESAMPLING) != RESAMPLING:
            raise NnUNetError(
                f"{folder / PLANS}: {key} is {config.get(key)!r}; lorkd-pl runs nnU-Net's default "
                f"{RESAMPLING}"
            )
    if "CTNormalization" in schemes:
        properties = plans.get(
            "foreground_intensity_properties_per_channel",
            plans.get("foreground_intensity_properties_by_modality"),
        )
        for c, scheme in enumerate(schemes):
            entry = (properties or {}).get(str(c)) if scheme == "CTNormalization" else {}
            if scheme == "CTNormalization" and not all(
                k in (entry or {}) for k in ("mean", "std", "percentile_00_5", "percentile_99_5")
            ):
                raise NnUNetError(
                    f"{folder / PLANS}: channel {c} uses CTNormalization but "
                    "foreground_intensity_properties_per_channel lacks its mean/std/percentiles"
                )
    overrides = dataset.get("overwrite_image_reader_writer", plans.get("image_reader_writer"))
    if overrides not in (None, "SimpleITKIO", "NibabelIO"):
        raise NnUNetError(
            f"{folder / DATASET}: overwrite_image_reader_writer {overrides!r} reorients or reads images in "
            "a way lorkd-pl does not reproduce (it reads the file's own voxel order, as SimpleITKIO does)"
        )
    found = available_folds(folder, name)
    if fold is None:  # nnU-Net's default ensemble: the numbered folds
        folds = available_folds(folder, name, numbered=True)
    else:
        folds = [str(f) for f in (fold if isinstance(fold, (list, tuple)) else [fold])]
    if not folds:
        raise NnUNetError(f"{folder} has no fold_<k>/{name}: nothing to load (checkpoint: {checkpoint})")
    missing = [f for f in folds if f not in found]
    if missing:
        raise NnUNetError(
            f"{folder / f'fold_{missing[0]}' / name} not found; the folder has folds {found or 'none'} with "
            f"{name}: set {where}.fold to them (or leave it out: every fold)"
        )
    architecture = _architecture(config, folder / PLANS, configuration)
    return NnUNetFolder(
        folder, plans, dataset, configuration, config, tuple(folds), name, mirroring, step, architecture
    )


# ----------------------------------------------------------------------------------- weights, network
def _numpy_globals() -> list[Any]:
    """NumPy's plain scalar and dtype reconstructors (data only): what nnU-Net's logs pickle."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    # numpy 2 pickles numpy._core.multiarray.scalar, numpy 1 numpy.core.multiarray.scalar: the same function
    allowed: list[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return allowed


def load_fold(folder: NnUNetFolder, fold: str) -> tuple[dict[str, Tensor], tuple[int, ...] | None]:
    """One fold's ``network_weights`` and ``inference_allowed_mirroring_axes``, read weights-only.

    Raises:
        NnUNetError: the file is unreadable, holds code, or lacks the weights.
    """
    import pickle
    import zipfile

    path = folder.fold_file(fold)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        if "Unsupported global" not in str(error) and "Unsupported operand" not in str(error):
            raise NnUNetError(f"cannot read {path}: not a PyTorch checkpoint ({reason[:160]})") from None
        raise NnUNetError(
            f"refused to load {path}: it holds pickled objects other than tensors, plain values and NumPy "
            f"scalars, which could run code ({reason})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise NnUNetError(
            f"cannot read {path}: truncated or not a PyTorch checkpoint ({type(error).__name__})"
        ) from None
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, Mapping) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise NnUNetError(f"{path} has no 'network_weights' state dict: not an nnU-Net v2 checkpoint")
    init_args = checkpoint.get("init_args")
    trained = init_args.get("configuration") if isinstance(init_args, Mapping) else None
    if trained is not None and trained != folder.configuration_name:
        raise NnUNetError(
            f"{path} was trained as configuration {trained!r}, not {folder.configuration_name!r}: set "
            f"model.init_args.teacher.configuration to {trained!r}"
        )
    prefix = re.compile(r"^(_orig_mod\.|module\.)+")
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    if axes is not None and (
        not isinstance(axes, (list, tuple))
        or not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 3 for a in axes)
    ):
        raise NnUNetError(
            f"{path}: inference_allowed_mirroring_axes must list spatial axes 0-2, got {axes!r}"
        )
    axes = tuple(axes) if axes is not None else None
    return {prefix.sub("", k): v for k, v in weights.items()}, axes


def _network_class(name: str, source: Path) -> type[nn.Module]:
    if name not in NETWORK_CLASSES:
        raise NnUNetError(
            f"{source} names the network {name!r}; lorkd-pl builds nnU-Net networks of "
            f"{sorted(set(NETWORK_CLASSES.values()))} from dynamic_network_architectures only"
        )
    try:
        module = importlib.import_module(NETWORK_MODULE)
    except ImportError:
        raise NnUNetError(
            "an nnU-Net teacher needs dynamic_network_architectures: pip install 'lorkd-pl[nnunet]' (with "
            "a CPU-only torch: pip install --no-deps dynamic-network-architectures einops)"
        ) from None
    return getattr(module, NETWORK_CLASSES[name])


def build_network(folder: NnUNetFolder) -> nn.Module:
    """The configuration's network (no deep supervision), with its operations from :data:`OPERATIONS`."""
    source = folder.folder / PLANS
    architecture = folder.architecture
    cls = _network_class(str(architecture.get("network_class_name")), source)
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", ()):
        if kwargs.get(key) is None:
            continue
        if not isinstance(kwargs[key], str) or kwargs[key] not in OPERATIONS:
            raise NnUNetError(
                f"{source}: {key} {kwargs[key]!r} is not an operation lorkd-pl builds ({key} must be one of "
                f"the torch.nn classes {sorted({c.__name__ for c in OPERATIONS.values()})})"
            )
        kwargs[key] = OPERATIONS[kwargs[key]]
    kwargs["deep_supervision"] = False
    try:
        return cls(input_channels=folder.input_channels, num_classes=len(folder.labels), **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise NnUNetError(f"{source}: cannot build {cls.__name__} from its arch_kwargs ({error})") from None


class NnUNetEnsemble(nn.Module):
    """The folds' networks with nnU-Net's test-time mirroring: the mean over folds of the mean over
    every non-empty combination of the mirror axes (and none) of the flipped-back logits.

    Args:
        networks: one network per fold.
        mirror_axes: spatial axes (0-based) that may be mirrored, or ``None``.
    """

    def __init__(self, networks: Sequence[nn.Module], mirror_axes: Sequence[int] | None) -> None:
        super().__init__()
        self.folds = nn.ModuleList(networks)
        axes = [a + 2 for a in mirror_axes or ()]
        self.combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, K, *S)`` of ``images`` ``(N, C, *S)``."""
        total = None
        for network in self.folds:
            logits = network(images)
            for axes in self.combinations:
                logits = logits + torch.flip(network(torch.flip(images, axes)), axes)
            logits = logits / (len(self.combinations) + 1)
            total = logits if total is None else total + logits
        return total / len(self.folds)


def load_network(folder: NnUNetFolder) -> NnUNetEnsemble:
    """Every fold's network with its weights, mirrored as the checkpoint allows (and ``mirroring``)."""
    networks, mirror = [], None
    for index, fold in enumerate(folder.folds):
        weights, axes = load_fold(folder, fold)
        network = build_network(folder)
        try:
            network.load_state_dict(weights)
        except RuntimeError as error:
            first = " ".join(line.strip() for line in str(error).splitlines()[:2])[:300]
            raise NnUNetError(
                f"{folder.fold_file(fold)}: its weights do not fit the network plans.json describes ({first})"
            ) from None
        networks.append(network.eval())
        if index == 0:
            mirror = axes
    return NnUNetEnsemble(networks, mirror if folder.mirroring else None)


# ----------------------------------------------------------------------------------- preprocessing
def _resize(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """scikit-image's ``resize(mode="edge", anti_aliasing=False)`` (clipped to the input's range), which
    nnU-Net resamples with: a grid-mode spline zoom."""
    factors = [n / o for n, o in zip(shape, array.shape, strict=True)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    return np.clip(out, array.min(), array.max()) if order > 0 else out


def _separate_axis(current: Sequence[float], new: Sequence[float], force: bool | None) -> int | None:
    """nnU-Net's choice of the low-resolution axis resampled on its own (``None``: resample jointly)."""

    def lowres(spacing: Sequence[float]) -> list[int]:
        return [i for i, s in enumerate(spacing) if max(spacing) / s == 1]

    def anisotropic(spacing: Sequence[float]) -> bool:
        return max(spacing) / min(spacing) > ANISOTROPY_THRESHOLD

    if force is not None:
        axes = lowres(current) if force else []
    elif anisotropic(current):
        axes = lowres(current)
    elif anisotropic(new):
        axes = lowres(new)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def resample_to_shape(
    data: np.ndarray,
    shape: Sequence[int],
    current: Sequence[float],
    new: Sequence[float],
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = False,
    is_seg: bool = False,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images and logits.

    Jointly with a spline of ``order``; or, when one axis is the anisotropic one, each slice across it
    with ``order`` and then along it with ``order_z`` (a map of pixel centres, nearest at the border).

    Args:
        data: ``(C, *S)``.
        shape: the new ``S``.
        current, new: spacings (mm) of ``data`` and of the result, same axis order.

    Returns:
        ``(C, *shape)`` in ``data``'s dtype.
    """
    if is_seg:
        raise NnUNetError("resampling label maps is not part of a teacher's pipeline")
    shape = [int(n) for n in shape]
    if list(data.shape[1:]) == shape:
        return data
    axis = _separate_axis(current, new, force_separate_z)
    out = np.zeros((data.shape[0], *shape), dtype=data.dtype)
    for c in range(data.shape[0]):  # one channel at a time in float64 (K channels: K× less memory)
        source = data[c].astype(np.float64)
        if axis is None:
            out[c] = _resize(source, shape, order)
            continue
        inplane = [n for i, n in enumerate(shape) if i != axis]
        slices = np.stack([_resize(s, inplane, order) for s in np.moveaxis(source, axis, 0)])
        out[c] = _along_axis(np.moveaxis(slices, 0, axis), shape[axis], axis, order_z)
    return out


def _along_axis(array: np.ndarray, size: int, axis: int, order: int) -> np.ndarray:
    """``array`` resampled to ``size`` along ``axis`` alone, pixel centres mapped, nearest at the border:
    nnU-Net's ``map_coordinates(order=order_z, mode="nearest")`` on a grid that is the identity on every
    other axis (orders 0 and 1 as an index or a two-tap blend along the axis)."""
    length = array.shape[axis]
    if length == size:
        return array
    coords = length / size * (np.arange(size) + 0.5) - 0.5
    if order == 0:
        return np.take(array, np.clip(np.floor(coords + 0.5).astype(np.int64), 0, length - 1), axis=axis)
    if order == 1:
        low = np.floor(coords)
        weight = (coords - low).reshape([size if i == axis else 1 for i in range(array.ndim)])
        low = low.astype(np.int64)
        below = np.take(array, np.clip(low, 0, length - 1), axis=axis)
        above = np.take(array, np.clip(low + 1, 0, length - 1), axis=axis)
        return below * (1 - weight) + above * weight
    grid = np.mgrid[tuple(slice(0, n) for n in (*array.shape[:axis], size, *array.shape[axis + 1 :]))]
    grid = grid.astype(np.float64)
    grid[axis] = length / size * (grid[axis] + 0.5) - 0.5
    return ndimage.map_coordinates(array, grid, order=order, mode="nearest")


def _normalize(data: np.ndarray, mask: np.ndarray, folder: NnUNetFolder) -> np.ndarray:
    """Each channel by its scheme of the plans (nnU-Net's default normalisation classes)."""
    config, plans = folder.configuration, folder.plans
    properties = plans.get(
        "foreground_intensity_properties_per_channel",
        plans.get("foreground_intensity_properties_by_modality", {}),
    )
    use_mask = list(config.get("use_mask_for_norm", [False] * data.shape[0]))
    out = np.empty(data.shape, dtype=np.float32)
    for c, scheme in enumerate(config["normalization_schemes"]):
        image = data[c].astype(np.float32, copy=True)
        if scheme == "CTNormalization":
            entry = properties[str(c)]
            np.clip(image, entry["percentile_00_5"], entry["percentile_99_5"], out=image)
            image -= entry["mean"]
            image /= max(float(entry["std"]), 1e-8)
        elif scheme == "ZScoreNormalization":
            if use_mask[c]:
                inside = image[mask]
                mean, std = inside.mean(), inside.std()
                image[mask] = (inside - mean) / max(float(std), 1e-8)
            else:
                image -= image.mean()
                image /= max(float(image.std()), 1e-8)
        elif scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= max(float(image.max()), 1e-8)
        elif scheme == "RGBTo01Normalization":
            if image.min() < 0 or image.max() > 255:
                raise NnUNetError(
                    f"channel {c} uses RGBTo01Normalization (values 0..255) but the image holds values in "
                    f"[{image.min():g}, {image.max():g}]"
                )
            image /= 255.0
        out[c] = image
    return out


@dataclass(frozen=True)
class Preprocessed:
    """How a case was cut and resampled (to put the prediction back).

    Attributes:
        shape_before_cropping: nnU-Net's axes, after ``transpose_forward``.
        box: the crop (per axis ``[start, stop)``).
        shape_after_cropping: the cropped shape before resampling.
        spacing: the case's spacing in nnU-Net's axes.
    """

    shape_before_cropping: tuple[int, ...]
    box: tuple[tuple[int, int], ...]
    shape_after_cropping: tuple[int, ...]
    spacing: tuple[float, ...]


def preprocess(
    image: np.ndarray, spacing: Sequence[float], folder: NnUNetFolder
) -> tuple[np.ndarray, Preprocessed]:
    """nnU-Net's default preprocessing of one case.

    Args:
        image: ``(C, X, Y, Z)`` in the file's voxel order (as lorkd-pl reads it).
        spacing: its spacing (mm) along ``X, Y, Z``.
        folder: the model.

    Returns:
        The network's input ``(C, *S')`` (nnU-Net's axes, the configuration's spacing) and what
        :func:`restore` needs.
    """
    forward = folder.transpose_forward
    data = image.transpose(0, 3, 2, 1)  # SimpleITK's array order: what nnU-Net reads
    spacing_zyx = list(spacing)[::-1]
    data = data.transpose(0, *[a + 1 for a in forward])
    spacing_nn = tuple(float(spacing_zyx[a]) for a in forward)
    shape_before = tuple(int(n) for n in data.shape[1:])
    nonzero = ndimage.binary_fill_holes(np.any(data != 0, axis=0))
    if nonzero.any():
        where = np.nonzero(nonzero)
        box = tuple((int(w.min()), int(w.max()) + 1) for w in where)
    else:
        box = tuple((0, n) for n in shape_before)
    crop = tuple(slice(a, b) for a, b in box)
    data, mask = data[(slice(None), *crop)], nonzero[crop]
    shape_after = tuple(int(n) for n in data.shape[1:])
    new_shape = [round(s / t * n) for s, t, n in zip(spacing_nn, folder.spacing, shape_after, strict=True)]
    data = _normalize(data, mask, folder)
    kwargs = dict(folder.configuration.get("resampling_fn_data_kwargs", {"order": 3, "order_z": 0}))
    data = resample_to_shape(data, new_shape, spacing_nn, folder.spacing, **kwargs)
    return np.ascontiguousarray(data, dtype=np.float32), Preprocessed(
        shape_before, box, shape_after, spacing_nn
    )


# ----------------------------------------------------------------------------------- sliding window
def gaussian_weights(patch: Sequence[int]) -> Tensor:
    """nnU-Net's importance map: a unit impulse at the patch centre blurred with σ = patch/8, scaled to
    a peak of 10, zeros raised to the smallest non-zero value; ``patch``-shaped float32."""
    impulse = np.zeros(patch)
    impulse[tuple(n // 2 for n in patch)] = 1
    blurred = ndimage.gaussian_filter(
        impulse, [n * GAUSSIAN_SIGMA_SCALE for n in patch], 0, mode="constant", cval=0
    )
    blurred = blurred / (blurred.max() / GAUSSIAN_PEAK)
    weights = torch.from_numpy(blurred).float()
    weights[weights == 0] = weights[weights > 0].min()
    return weights


def window_starts(size: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    """nnU-Net's tile positions per axis: as many tiles as a step of ``step·patch`` needs, spread evenly
    from the first voxel to the last full patch."""
    starts = []
    for n, p in zip(size, patch, strict=True):
        count = int(np.ceil((n - p) / (p * step))) + 1
        stride = (n - p) / (count - 1) if count > 1 else 0
        starts.append([int(np.round(stride * i)) for i in range(count)])
    return starts


@torch.no_grad()
def sliding_window_logits(
    network: nn.Module, data: Tensor, patch: Sequence[int], step: float, device: torch.device | str = "cpu"
) -> Tensor:
    """nnU-Net's Gaussian-weighted sliding window on a whole preprocessed case.

    Args:
        network: maps ``(1, C, *patch)`` to logits ``(1, K, *patch)``.
        data: ``(C, *S)``, padded (zeros, split evenly) to at least ``patch`` here.
        patch: the tile size.
        step: the step, a fraction of the tile.
        device: where the network runs.

    Returns:
        Logits ``(K, *S)`` float32 on the CPU.
    """
    size = list(data.shape[1:])
    padded_size = [max(n, p) for n, p in zip(size, patch, strict=True)]
    below = [(q - n) // 2 for n, q in zip(size, padded_size, strict=True)]
    pad = []
    for n, q, b in reversed(list(zip(size, padded_size, below, strict=True))):
        pad += [b, q - n - b]
    padded = torch.nn.functional.pad(data.float(), pad)
    weights = gaussian_weights(patch)
    total = None
    count = torch.zeros(padded_size)
    for corner in itertools.product(*window_starts(padded_size, patch, step)):
        box = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
        logits = network(padded[(slice(None), *box)][None].to(device))[0].float().cpu()
        if total is None:
            total = torch.zeros((logits.shape[0], *padded_size))
        total[(slice(None), *box)] += logits * weights
        count[box] += weights
    total /= count
    keep = tuple(slice(b, b + n) for b, n in zip(below, size, strict=True))
    return total[(slice(None), *keep)]


def restore(logits: Tensor, case: Preprocessed, folder: NnUNetFolder) -> Tensor:
    """nnU-Net's export of the logits as probabilities: resampled back to the cropped box (the plans'
    probability resampling), softmax, the box put back (background 1 outside), ``transpose_backward``
    and the file's voxel order.

    Args:
        logits: ``(K, *S')`` from :func:`sliding_window_logits`.
        case: :func:`preprocess`'s record of the case.

    Returns:
        Probabilities ``(K, X, Y, Z)`` float32 in the image file's grid.
    """
    kwargs = dict(folder.configuration.get("resampling_fn_probabilities_kwargs", {"order": 1, "order_z": 0}))
    resampled = resample_to_shape(
        logits.numpy(), case.shape_after_cropping, folder.spacing, case.spacing, **kwargs
    )
    probabilities = torch.from_numpy(resampled).float()  # softmax in place: K volumes held once
    probabilities -= probabilities.amax(0, keepdim=True)
    probabilities.exp_()
    probabilities /= probabilities.sum(0, keepdim=True)
    if case.shape_after_cropping != case.shape_before_cropping:
        full = torch.zeros((probabilities.shape[0], *case.shape_before_cropping))
        full[0] = 1
        full[(slice(None), *(slice(a, b) for a, b in case.box))] = probabilities
        probabilities = full
    probabilities = probabilities.permute(0, *[a + 1 for a in folder.transpose_backward])
    return probabilities.permute(0, 3, 2, 1)  # a view: the callers select the channels they need


def folder_digest(folder: NnUNetFolder) -> str:
    """sha256 over the files the teacher reads: plans, dataset and the used folds' checkpoints."""
    from lorkd_pl.io.hashing import sha256sum

    parts = [folder.folder / PLANS, folder.folder / DATASET, *(folder.fold_file(f) for f in folder.folds)]
    import hashlib

    digest = hashlib.sha256()
    for path in parts:
        digest.update(path.relative_to(folder.folder).as_posix().encode())
        digest.update(sha256sum(path).encode())
    return digest.hexdigest()


def folder_of(spec: Any) -> NnUNetFolder:
    """The nnU-Net folder a teacher description names, with its fields checked.

    Args:
        spec: a :class:`~lorkd_pl.models.teacher.spec.TeacherSpec` whose ``path`` is an nnU-Net folder.

    Raises:
        NnUNetError: a field the folder defines itself, no cache, or a folder it cannot read.
    """
    where = "model.init_args.teacher"
    declared = [n for n in ("spacing", "intensity", "roi_size", "classes", "model") if getattr(spec, n)]
    declared += ["orientation"] if spec.orientation != "RAS" else []
    declared += ["divisible"] if spec.divisible != 1 else []
    declared += ["output"] if spec.output != "logits" else []
    if declared:
        raise NnUNetError(
            f"{where}: {spec.path} is an nnU-Net v2 folder, whose plans.json and dataset.json define its "
            f"pipeline, output and classes: remove {', '.join(declared)}"
        )
    if spec.cache is None:
        raise NnUNetError(
            f"{where}.cache: an nnU-Net teacher runs in its own pipeline on whole volumes, once per case: "
            "set cache to a folder for its targets (lorkd-pl teacher-targets builds them ahead)"
        )
    return read_folder(
        spec.path,
        spec.fold,
        spec.checkpoint or "final",
        spec.configuration,
        spec.mirroring is not False,
        1.0 - spec.overlap,
    )
