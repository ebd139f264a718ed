"""lorkd-pl: decompose a medical foundation model into lightweight per-region expert models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorkd-pl")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
