"""The ``lorkd-pl`` command line.

The Lightning subcommands (fit/validate/test/predict) and the project's own commands (tasks,
demo-data, export) are added by the distillation and deployment issues; this entry point keeps the
console script importable and versioned meanwhile.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lorkd_pl import __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level argument parser."""
    parser = argparse.ArgumentParser(
        prog="lorkd-pl",
        description="Decompose a medical foundation model into lightweight per-region experts (LoRKD).",
    )
    parser.add_argument("--version", action="version", version=f"lorkd-pl {__version__}")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run the command line with ``args`` (default: ``sys.argv[1:]``) and return an exit code."""
    parser = build_parser()
    parser.parse_args(args)
    parser.print_help()
    return 0
