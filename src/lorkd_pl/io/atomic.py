"""Atomic writes: a folder or file appears complete or not at all, and a crash keeps the old one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(
    out: str | Path, overwrite: bool = False, error: type[Exception] = FileExistsError
) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success it replaces ``out``, on failure it is removed.

    Args:
        out: the final folder.
        overwrite: replace an existing ``out`` (otherwise ``error`` is raised before anything is written).
        error: exception type raised for an existing ``out``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise error(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield work
        backup = None
        if out.exists():  # move the old folder aside first: `out` is never half-written
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, backup / out.name)
        os.replace(work, out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A crash (or an exception) before the rename leaves the previous ``path`` untouched and removes the
    temporary file. The temporary name (``.tmpXXXX.<name>``) ends with ``path``'s whole name, so writers
    that pick a format from the suffixes (SimpleITK's ``.nii.gz``, ``savefig``) behave as for ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".tmp", suffix=f".{path.name}", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as stream:  # data on disk before the rename makes it visible
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)
