"""Atomic writes: a folder or file appears complete or not at all, and a crash keeps the old one.

Temporary siblings are named ``.<name>.tmp-<host>-<pid>-…`` (folders) or ``.tmp-<host>-<pid>-….<name>``
(files): the next write of the same target removes those a dead process of this host left behind (a
crash or SIGKILL mid-write), and never touches a live writer's. What is written follows the umask (the
temporary files Python creates are private, 0600/0700; shared group folders on clusters need better).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal


def _tag() -> str:
    return f"tmp-{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


def _dead_writer(name: str) -> bool:
    """Whether a temporary name (holding ``tmp-<host>-<pid>-``) belongs to a dead process of this host."""
    try:
        host, pid = name.split("tmp-", 1)[1].split("-")[:2]
        if host != socket.gethostname().replace("-", "_"):
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, IndexError, PermissionError, OSError):
        return False
    return False


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` that a dead writer of this host left; return them."""
    removed = []
    patterns = (f".{target.name}.tmp-*", f".{target.name}.old.tmp-*", f".tmp-*.{target.name}")
    for pattern in patterns:
        for path in target.parent.glob(pattern):
            if not _dead_writer(path.name):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path) -> None:
    """Give a new file or folder the permissions the umask allows (not Python's private temp modes)."""
    mask = _umask()
    if path.is_dir():
        for folder, _, files in os.walk(path):
            os.chmod(folder, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def holds_only(folder: Path, names: Iterable[str]) -> bool:
    """Whether ``folder`` is a folder whose entries all carry one of ``names`` (an earlier output of a
    command that writes exactly those names: replacing it loses nothing of anyone else's)."""
    allowed = set(names)
    return folder.is_dir() and not folder.is_symlink() and all(p.name in allowed for p in folder.iterdir())


@contextmanager
def atomic_folder(
    out: str | Path,
    overwrite: bool = False,
    error: type[Exception] = FileExistsError,
    owned: Callable[[Path], bool] | None = None,
    what: str = "",
) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success it replaces ``out``, on failure it is removed.

    Args:
        out: the final folder.
        overwrite: replace an existing ``out`` (otherwise ``error`` is raised before anything is written).
        error: exception type raised for an existing ``out``.
        owned: with ``overwrite``, an existing ``out`` is replaced only if ``owned(out)`` says it is an
            earlier output of the same command (e.g. :func:`holds_only` its file names); anything else
            (a user's file or folder, a run folder, scans) is refused: ``--overwrite`` never deletes
            what the command did not write.
        what: the command's output, for that message (e.g. ``"an export of lorkd-pl export"``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise error(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and owned is not None and not owned(out):
        raise error(
            f"{out} exists and is not {what or 'an earlier output of this command'}; --overwrite replaces "
            "only that, never other files: choose another --out (or remove it yourself)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_tag()}", dir=out.parent))
    try:
        yield work
        _follow_umask(work)
        backup = None
        if out.exists():  # move the old folder aside first: `out` is never half-written
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.{_tag()}", dir=out.parent))
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
    temporary file. The temporary name (``.tmp-<host>-<pid>-XXXX.<name>``) ends with ``path``'s whole
    name, so writers that pick a format from the suffixes (SimpleITK's ``.nii.gz``, ``savefig``) behave
    as for ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    handle, name = tempfile.mkstemp(prefix=f".{_tag()}", suffix=f".{path.name}", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as stream:  # data on disk before the rename makes it visible
            os.fsync(stream.fileno())
        _follow_umask(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def finite_json(value: Any) -> Any:
    """``value`` with every NaN/inf float as ``None``, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def write_json_atomic(path: str | Path, value: Any, nan: Literal["null", "keep"] = "null") -> Path:
    """Write ``value`` as JSON to ``path`` atomically: readers never see half a file, a crash keeps the
    old one.

    Args:
        path: the file.
        value: plain data (dicts, lists, numbers, strings).
        nan: ``"null"``: strict JSON, NaN/inf written as ``null`` (:func:`finite_json`; what other tools
            read); ``"keep"``: Python's ``NaN``/``Infinity`` literals (nnU-Net-style ``summary.json``,
            where NaN marks a metric that is undefined for a case, e.g. Dice of an empty ground truth).
    """
    if nan not in ("null", "keep"):
        raise ValueError(f"nan must be 'null' or 'keep', got {nan!r}")
    text = (
        json.dumps(value, indent=2, allow_nan=True)
        if nan == "keep"
        else json.dumps(finite_json(value), indent=2)
    )
    return write_text_atomic(path, text + "\n")
