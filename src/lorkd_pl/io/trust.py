"""Which classes a file may name: construction only from trusted modules.

A checkpoint's hyper-parameters, an export's card and a MONAI bundle's config are data, yet they name
classes (``class_path``, ``_target_``) that lorkd-pl would import and call to rebuild a network. A
crafted file could name any callable (``subprocess.Popen``…), so every such name read from a file is
checked here BEFORE anything is imported: it must lie in a trusted module —
:data:`TRUSTED_MODULES`, the modules in ``$LORKD_PL_TRUSTED_MODULES`` (comma-separated), or a class the
user's own config names. Names in the user's own YAML configs are the user's choice and are not checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

#: Modules whose classes a file may name: network libraries, and lorkd-pl itself.
TRUSTED_MODULES: tuple[str, ...] = ("torch.nn", "monai.networks", "torchvision.models", "timm", "lorkd_pl")
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
    """Refuse ``data`` read from ``source`` if it names a class outside the trusted modules.

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
