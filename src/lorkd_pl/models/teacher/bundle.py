"""A MONAI bundle teacher in its own pipeline: preprocessing, inferer and channel names from its configs.

A model-zoo bundle describes how it runs: ``configs/inference.json`` (or ``.yaml``) holds its
``preprocessing`` (a ``Compose`` of MONAI transforms: reader, orientation, spacing, intensity), its
``inferer`` (e.g. ``SlidingWindowInferer``) and its ``postprocessing`` (an ``Activationsd`` with
``softmax`` or ``sigmoid``); ``configs/metadata.json`` names its output channels
(``network_data_format.outputs.<output>.channel_def``). lorkd-pl reads the class names from the metadata
(plain JSON) and, for cached targets, runs the bundle's own preprocessing and inferer on whole volumes;
its output is then resampled into the student's grid like any teacher's.

What runs: the bundle's ``$`` expressions only behind ``$LORKD_PL_TRUST_BUNDLE_CODE=1`` (the whole
config is refused otherwise, naming the expression: MONAI runs every expression of a config it parses).
Without that switch, the preprocessing and the inferer may name only the MONAI transforms and inferers of
:data:`TRANSFORMS` and :data:`INFERERS`, readers by their MONAI names, and references to plain values
(``"@image_key"``); the config handed to MONAI then holds just those entries.

Teacher fields the user sets override the bundle: ``classes`` its channel names, ``output`` its
activation, and any pipeline field (``spacing``, ``intensity``, ``orientation``, ``roi_size``,
``divisible``) replaces the bundle's whole pipeline with lorkd-pl's, described by those fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorkd_pl.io.trust import ENV_TRUST_BUNDLE_CODE, bundle_code_trusted
from lorkd_pl.models.teacher.errors import TeacherError

CONFIG_NAMES: tuple[str, ...] = ("inference.json", "inference.yaml", "inference.yml")
#: MONAI transforms a bundle's preprocessing may name without the trust switch (short or full names).
TRANSFORMS: frozenset[str] = frozenset(
    {
        "Compose",
        "LoadImaged",
        "EnsureChannelFirstd",
        "Orientationd",
        "Spacingd",
        "ScaleIntensityRanged",
        "ScaleIntensityRangePercentilesd",
        "ScaleIntensityd",
        "NormalizeIntensityd",
        "ClipIntensityPercentilesd",
        "ThresholdIntensityd",
        "CropForegroundd",
        "DivisiblePadd",
        "SpatialPadd",
        "Resized",
        "EnsureTyped",
        "CastToTyped",
        "ToTensord",
    }
)
INFERERS: frozenset[str] = frozenset({"SlidingWindowInferer", "SimpleInferer"})
#: Image readers a ``LoadImaged`` may name (MONAI looks a reader name up as a class to build).
READERS: frozenset[str] = frozenset(
    {"ITKReader", "NibabelReader", "NumpyReader", "PILReader", "PydicomReader", "NrrdReader"}
)


#: The ``LoadImaged`` arguments an untrusted bundle may set (others reach the reader, e.g. ``allow_pickle``).
LOAD_IMAGE_ARGUMENTS: frozenset[str] = frozenset(
    {
        "_target_",
        "keys",
        "reader",
        "image_only",
        "dtype",
        "ensure_channel_first",
        "simple_keys",
        "allow_missing_keys",
    }
)


def bundle_config_file(folder: Path) -> Path | None:
    """``configs/inference.json|yaml|yml`` of a bundle folder, or ``None``."""
    return next((folder / "configs" / n for n in CONFIG_NAMES if (folder / "configs" / n).is_file()), None)


def bundle_channel_names(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """The bundle's output class names → channels, from ``configs/metadata.json``
    (``network_data_format.outputs``: ``pred``, else its only output); ``None`` when it names none.

    Raises:
        TeacherError: a metadata file that is not JSON, or a ``channel_def`` that is not ``{index: name}``.
    """

    path = folder / "configs" / "metadata.json"
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TeacherError(f"MONAI bundle metadata {path} cannot be read: {error}") from None
    formats = metadata.get("network_data_format") if isinstance(metadata, dict) else None
    outputs = formats.get("outputs") if isinstance(formats, Mapping) else None
    if not isinstance(outputs, Mapping) or not outputs:
        return None
    output = outputs.get("pred", next(iter(outputs.values())) if len(outputs) == 1 else None)
    channels = output.get("channel_def") if isinstance(output, Mapping) else None
    if channels is None:
        return None
    if not isinstance(channels, Mapping) or not all(
        str(k).isdigit() and isinstance(v, str) and v for k, v in channels.items()
    ):
        raise TeacherError(
            f"MONAI bundle metadata {path}: network_data_format.outputs channel_def must map output "
            f'channels to class names ({{"0": "background", ...}}), got {channels!r}'
        )
    if len({int(k) for k in channels}) != len(channels):
        raise TeacherError(f"MONAI bundle metadata {path}: channel_def names a channel twice: {channels!r}")
    names: dict[str, tuple[int, ...]] = {}
    for index, name in sorted(channels.items(), key=lambda item: int(item[0])):
        names[name] = (*names.get(name, ()), int(index))  # a name on several channels: a merge
    return names


@dataclass
class BundlePipeline:
    """A bundle's own preprocessing and inferer, built from its config.

    Attributes:
        preprocessing: maps ``{image_key: path}`` to a dict whose ``image_key`` is ``(C, *S)`` with an affine.
        inferer: ``inferer(images (1, C, *S), network)`` → raw output ``(1, K, *S)``.
        image_key: the key the preprocessing reads and writes.
        activation: ``"softmax"``, ``"sigmoid"`` or ``None`` (its postprocessing's ``Activationsd``).
        description: the configs of both, plain data (printed at fit start; part of the targets' key).
    """

    preprocessing: Callable[[dict[str, Any]], dict[str, Any]]
    inferer: Callable[..., Any]
    image_key: str
    activation: str | None
    description: dict[str, Any]


def _short(target: Any) -> str:
    name = str(target)
    return name.rpartition(".")[2] if name.startswith("monai.") else name


def _check_untrusted(node: Any, where: str, config: Mapping[str, Any], path: Path, plain: set[str]) -> None:
    """Refuse, in an untrusted bundle's pipeline entries, what the allow-lists do not name."""

    trust = f"set {ENV_TRUST_BUNDLE_CODE}=1 if you trust the bundle, or set the teacher fields yourself"
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None:
            allowed = TRANSFORMS | INFERERS
            short = target.rpartition(".")[2] if isinstance(target, str) else None
            module = "monai.inferers" if short in INFERERS else "monai.transforms"
            if short not in allowed or target not in (short, f"{module}.{short}"):
                raise TeacherError(
                    f"MONAI bundle config {path}: {where} is {target!r}, which lorkd-pl does not run from an "
                    f"untrusted bundle (it runs {sorted(allowed)}, by their short or monai.transforms/"
                    f"monai.inferers names); {trust}"
                )
            node["_target_"] = f"{module}.{short}"  # MONAI's lookup cannot walk elsewhere from it
            if short == "LoadImaged" and set(node) - LOAD_IMAGE_ARGUMENTS:
                extra = sorted(set(node) - LOAD_IMAGE_ARGUMENTS)
                raise TeacherError(
                    f"MONAI bundle config {path}: {where} passes {extra} to its reader; an untrusted bundle "
                    f"may set {sorted(LOAD_IMAGE_ARGUMENTS - {'_target_'})}; {trust}"
                )
            if short == "LoadImaged" and node.get("reader") is not None:
                readers = node["reader"] if isinstance(node["reader"], list) else [node["reader"]]
                if not all(isinstance(r, str) and r in READERS for r in readers):
                    raise TeacherError(
                        f"MONAI bundle config {path}: {where}::reader is {node['reader']!r}; an untrusted "
                        f"bundle may name the readers {sorted(READERS)}; {trust}"
                    )
        for key, value in node.items():
            if key in ("_requires_", "_disabled_", "_mode_", "_desc_"):
                raise TeacherError(f"MONAI bundle config {path}: {where} uses {key}; remove it, or {trust}")
            _check_untrusted(value, f"{where}::{key}", config, path, plain)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _check_untrusted(item, f"{where}::{index}", config, path, plain)
    elif isinstance(node, str) and node.startswith("@"):
        name = node[1:]
        value = config.get(name)
        if name not in config or not _is_plain(value):
            raise TeacherError(
                f"MONAI bundle config {path}: {where} refers to {node!r}; an untrusted bundle's pipeline may "
                f"refer only to plain values of the config's top level; {trust}"
            )
        plain.add(name)


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return (
        value is None
        or isinstance(value, (bool, int, float))
        or (isinstance(value, str) and not value.startswith(("$", "@", "%")))
    )


def activation_of(config: Mapping[str, Any]) -> str | None:
    """``softmax``/``sigmoid`` of the postprocessing's ``Activationsd`` (read, not run)."""
    stack = [config.get("postprocessing")]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if _short(node.get("_target_", "")) in ("Activationsd", "Activations"):
                if node.get("softmax") is True:
                    return "softmax"
                if node.get("sigmoid") is True:
                    return "sigmoid"
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def read_bundle_pipeline(folder: Path) -> BundlePipeline | None:
    """The bundle's own preprocessing and inferer, or ``None`` when its config lacks either.

    Raises:
        TeacherError: a config MONAI cannot read, an expression without the trust switch (named), an entry
            the allow-lists do not name, or entries MONAI cannot build.
    """
    from monai.bundle import ConfigParser

    path = bundle_config_file(folder)
    if path is None:
        return None
    parser = ConfigParser()
    try:
        parser.read_config(str(path))
    except Exception as error:  # malformed JSON/YAML: the parser's own message names the place
        raise TeacherError(
            f"MONAI bundle config {path} cannot be read: {' '.join(str(error).split())[:300]}"
        ) from None
    config = parser.config
    if not isinstance(config, dict) or not all(k in config for k in ("preprocessing", "inferer")):
        return None
    check_bundle_config(config, path)  # `$` anywhere only with the trust switch (MONAI runs all of it)
    image_key = config.get("image_key", "image")
    if not isinstance(image_key, str):
        image_key = "image"
    if not bundle_code_trusted():
        plain: set[str] = set()
        for entry in ("preprocessing", "inferer"):
            _check_untrusted(config[entry], entry, config, path, plain)
        parser = ConfigParser({k: config[k] for k in ("preprocessing", "inferer", *sorted(plain))})
    try:
        preprocessing = parser.get_parsed_content("preprocessing")
        inferer = parser.get_parsed_content("inferer")
    except Exception as error:
        reason = " ".join(str(error.__cause__ or error).split())[:300]
        raise TeacherError(
            f"MONAI bundle config {path}: its preprocessing or inferer cannot be built: {reason}"
        ) from None
    if not callable(preprocessing) or not callable(inferer):
        raise TeacherError(
            f"MONAI bundle config {path}: preprocessing and inferer must build a transform and an inferer, "
            f"got {type(preprocessing).__name__} and {type(inferer).__name__}"
        )
    description = {
        "format": "MONAI bundle",
        "config": str(path),
        "image_key": image_key,
        "preprocessing": json.loads(json.dumps(config["preprocessing"], default=str)),
        "inferer": json.loads(json.dumps(config["inferer"], default=str)),
        "activation": activation_of(config),
    }
    return BundlePipeline(preprocessing, inferer, image_key, description["activation"], description)


def check_bundle_config(data: Any, config: Path) -> None:
    """Refuse what MONAI would run or misread ANYWHERE in a bundle config, referenced or not: ``$``
    expressions (MONAI imports every ``$import``/``$from`` of the config before resolving anything;
    allowed only with ``$LORKD_PL_TRUST_BUNDLE_CODE=1``), ``%`` macros (they read other files), keys
    that are not plain names (non-strings, or holding MONAI's id separators ``::``/``#``, which make two
    entries share one id) and one container reached from two places (a YAML alias: MONAI rewrites its
    relative references in place, once).

    Raises:
        TeacherError: naming the config file, the entry and the fix.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, (dict, list)):
            if id(node) in seen:
                raise TeacherError(
                    f"MONAI bundle config {config}: {where or 'the config'} is reached from two places "
                    "(a YAML alias); write each entry out once"
                )
            seen.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                if isinstance(node, dict) and (not isinstance(key, str) or "::" in key or "#" in key):
                    raise TeacherError(
                        f"MONAI bundle config {config}: the key {key!r} under {where or 'the top level'} is "
                        "not a plain name (MONAI joins keys with '::' and '#' into ids, so this one could "
                        "stand for another entry); rename it"
                    )
                stack.append((value, f"{where}::{key}" if where else str(key)))
        elif isinstance(node, str) and node.startswith("$") and not bundle_code_trusted():
            raise TeacherError(
                f"MONAI bundle config {config}: {where} is the expression {node[:80]!r}; MONAI runs (and "
                "imports for) every expression of a config it parses, referenced or not: lorkd-pl runs no "
                f"code from a bundle unless you trust it: set {ENV_TRUST_BUNDLE_CODE}=1, or remove the entry"
            )
        elif isinstance(node, str) and node.startswith("%"):
            raise TeacherError(
                f"MONAI bundle config {config}: {where} loads another file ({node[:80]!r}); write the entry "
                "into the bundle's own inference config"
            )
