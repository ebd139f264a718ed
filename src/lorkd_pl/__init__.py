"""lorkd-pl: decompose a medical foundation model into lightweight per-region expert models."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("lorkd-pl")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__", "lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) that import a public name's module on first
    use: ``lorkd-pl --help`` and ``lorkd-pl tasks`` do not pay for torch or MONAI, and the modules of a
    package import each other by their own names, never through its ``__init__``.

    Args:
        package: the package's ``__name__`` (for the error message).
        exports: ``{public name: module that defines it}``.
    """

    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def dir_() -> list[str]:
        return sorted(exports)

    return getattr_, dir_
