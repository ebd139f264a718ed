"""Content digests of files and folders (provenance of teachers, checkpoints and exports)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256sum(path: str | Path) -> str:
    """Hex sha256 of a file, or of a folder's files in sorted order (their relative paths included)."""
    path = Path(path)
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if item.is_file():
            digest.update(item.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            with item.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
