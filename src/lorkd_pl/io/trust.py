"""Which classes a file may name: construction only from trusted modules.

A checkpoint's hyper-parameters, an export's card and a MONAI bundle's config are data, yet they name
classes (``class_path``, ``_target_``) that lorkd-pl would import and call to rebuild a network. A
crafted file could name any callable (``subprocess.Popen``…), so every such name read from a file is
checked here BEFORE anything is imported: it must lie in a trusted module —
:data:`TRUSTED_MODULES`, the modules in ``$LORKD_PL_TRUSTED_MODULES`` (comma-separated), or a class the
user's own config names. Names in the user's own YAML configs are the user's choice and are not checked.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

#: Modules whose classes a file may name: torch's and MONAI's networks, and lorkd-pl itself. Others
#: (torchvision, timm, your own) only through ``$LORKD_PL_TRUSTED_MODULES``.
TRUSTED_MODULES: tuple[str, ...] = ("torch.nn", "monai.networks", "lorkd_pl")
#: Constructor arguments that make a network fetch weights from the internet (a file must not).
DOWNLOAD_ARGUMENTS: tuple[str, ...] = ("pretrained", "url", "download")
ENV_TRUSTED_MODULES = "LORKD_PL_TRUSTED_MODULES"
#: Set to 1 to let a MONAI bundle's network definition run its ``$`` expressions (off by default).
ENV_TRUST_BUNDLE_CODE = "LORKD_PL_TRUST_BUNDLE_CODE"
CLASS_KEYS: tuple[str, ...] = ("class_path", "_target_")


class UntrustedFileError(ValueError):
    """A file names a class outside the trusted modules (or holds code); names the file and the fix."""


def trusted_modules(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """:data:`TRUSTED_MODULES`, ``$LORKD_PL_TRUSTED_MODULES`` and ``extra``."""
    from_env = [m.strip() for m in os.environ.get(ENV_TRUSTED_MODULES, "").split(",") if m.strip()]
    return (*TRUSTED_MODULES, *from_env, *extra)


def is_trusted(name: str, extra: Iterable[str] = ()) -> bool:
    """Whether ``name`` (``package.module.Class``) is one of ``extra`` or lies in a trusted module."""
    extra = tuple(extra)
    if name in extra:
        return True
    return any(name.startswith(f"{module}.") for module in trusted_modules() if module)


def named_classes(data: Any) -> Iterator[str]:
    """Every ``class_path`` / ``_target_`` value in nested dicts and lists."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in CLASS_KEYS:
                yield str(value)
            yield from named_classes(value)
    elif isinstance(data, (list, tuple)):
        for item in data:
            yield from named_classes(item)


def bundle_code_trusted() -> bool:
    """Whether the user allowed MONAI bundle expressions (``$LORKD_PL_TRUST_BUNDLE_CODE=1``)."""
    return os.environ.get(ENV_TRUST_BUNDLE_CODE, "") == "1"


def check_trusted(data: Any, source: str, extra: Iterable[str] = ()) -> None:
    """Refuse ``data`` read from ``source`` if it names a class outside the trusted modules, or asks a
    network to download weights.

    Args:
        data: plain data read from a file (hyper-parameters, an expert card's backbone, a bundle config).
        source: the file, for the message.
        extra: further trusted class names (e.g. those the user's config names).

    Raises:
        UntrustedFileError: naming the file, the class and how to trust it.
    """
    extra = tuple(extra)
    for name in named_classes(data):
        if not is_trusted(name, extra):
            raise UntrustedFileError(
                f"{source} names the class {name!r}, which lorkd-pl will not import from a file: classes "
                f"named by checkpoints, exports and bundles must come from {', '.join(trusted_modules())}. "
                f"If you trust this file, add the module to ${ENV_TRUSTED_MODULES} "
                f"(e.g. export {ENV_TRUSTED_MODULES}={name.rpartition('.')[0] or name})"
            )
    check_downloads(data, source)


def check_downloads(data: Any, source: str) -> None:
    """Refuse constructor arguments in ``data`` that make a network fetch weights (``pretrained``,
    ``*url*``, ``download``) when truthy.

    Raises:
        UntrustedFileError: naming the file and the argument.
    """
    for key, value in _arguments(data):
        if any(word in key.lower() for word in DOWNLOAD_ARGUMENTS) and value:
            raise UntrustedFileError(
                f"{source} asks a network to fetch weights ({key}={value!r}); lorkd-pl downloads nothing "
                "named by a file: give the weights in the file, or build the network from your own config"
            )


def check_default_downloads(cls: type, arguments: Mapping[str, Any], source: str) -> None:
    """Refuse a network class whose constructor downloads weights BY DEFAULT (a truthy default of
    ``pretrained``/``*url*``/``download``, as MONAI's EfficientNetBN has) unless ``arguments`` turn it off.

    Raises:
        UntrustedFileError: naming the file, the class, the argument and the fix.
    """
    import inspect

    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    for name, parameter in parameters.items():
        default = parameter.default
        if not any(word in name.lower() for word in DOWNLOAD_ARGUMENTS) or default is inspect.Parameter.empty:
            continue
        if isinstance(default, str) and "url" in name.lower():  # a URL to fetch from, not a switch
            default = False
        if default and not (name in arguments and not arguments[name]):
            raise UntrustedFileError(
                f"{source} builds {cls.__name__}, which fetches weights by default ({name}={default!r}); "
                f"lorkd-pl downloads nothing named by a file: set {name}: false in the file"
            )


def _arguments(data: Any) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every constructor argument in ``data``: ``init_args`` entries and the
    siblings of a bundle's ``_target_``."""
    if isinstance(data, dict):
        if isinstance(data.get("init_args"), dict):
            yield from data["init_args"].items()
        if "_target_" in data:
            yield from ((k, v) for k, v in data.items() if not k.startswith("_"))
        for value in data.values():
            yield from _arguments(value)
    elif isinstance(data, (list, tuple)):
        for item in data:
            yield from _arguments(item)


def import_attribute(name: str) -> Any:
    """``package.module.Name``: import the module part and read ONE attribute (no attribute walk).

    Returns:
        The attribute, or ``None`` for a name without a module part.

    Raises:
        ImportError, AttributeError, ValueError: the module or the attribute does not exist.
    """
    module_name, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute) if module_name else None


def is_training_module(cls: type) -> bool:
    """Whether ``cls`` is a Lightning training module (it could load a teacher, log, write files)."""
    return any(base.__name__ == "LightningModule" for base in cls.__mro__)


def check_file_network(
    data: Any, source: str, network: Mapping[str, Any] | None, extra: Iterable[str] = ()
) -> None:
    """Everything a file asks lorkd-pl to build: the classes it names (:func:`check_trusted`) and the
    network it describes (``network``'s ``class_path``, :func:`resolve_network_class`).

    Args:
        data: plain data read from a file (checkpoint hyper-parameters, an expert card's backbone).
        source: the file, for the message.
        network: the ``{"class_path", "init_args"}`` that will be built (``None``: none).
        extra: further trusted class names (those the user's own config names).

    Raises:
        UntrustedFileError: naming the file, the class and why.
    """
    extra = tuple(extra)
    check_trusted(data, source, extra)
    if isinstance(network, Mapping) and "class_path" in network:
        resolve_network_class(str(network["class_path"]), source, extra)


def resolve_network_class(name: str, source: str, extra: Iterable[str] = ()) -> type:
    """The network class ``name`` names, resolved without walking attributes.

    ``name`` must lie in a trusted module; its module part is imported and ONE attribute is read (a
    path such as ``torch.nn.modules.module.torch.os.system`` resolves to nothing), which must be a
    ``torch.nn.Module`` subclass defined in a trusted module, and not a LightningModule (a training
    module could load a teacher from a path of the file's choosing).

    Raises:
        UntrustedFileError: naming the file, the name and why.
    """
    import torch

    check_trusted({"class_path": name}, source, extra)
    attribute = name.rpartition(".")[2]
    try:
        target = import_attribute(name)
    except (ImportError, AttributeError, ValueError):
        target = None
    defined_in = getattr(target, "__module__", "") or ""
    if not (isinstance(target, type) and issubclass(target, torch.nn.Module)) or not (
        is_trusted(f"{defined_in}.{attribute}") or name in tuple(extra)
    ):
        raise UntrustedFileError(
            f"{source} names {name!r}, which is not a network class of a trusted module "
            f"({', '.join(trusted_modules())}); name the class by its module and class name"
        )
    if is_training_module(target):
        raise UntrustedFileError(
            f"{source} names the training module {name!r} as a network; a file may name networks only"
        )
    return target
