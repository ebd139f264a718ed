"""Discovery of task plugins: Python files and task-spec files in tasks folders, and entry points.

Sources, in order:

1. the folders given with ``--tasks-dir``, else those in ``$LORKD_PL_TASKS_DIR``
   (``os.pathsep``-separated); nothing else is scanned (never the working folder by default);
2. installed packages exposing the entry-point group ``lorkd_pl.tasks`` (an entry point names a
   module, or a callable that registers tasks), so a separate pip package can add regions and tasks.
   lorkd-pl registers its own demo tasks this way (``demo = lorkd_pl.data.demo_tasks:register``), so
   they exist in any installation, editable or from a wheel.

In a folder, every ``*.py`` not starting with ``_`` is imported (it registers tasks with
``lorkd_pl.registry``) and every ``*.yaml``/``*.yml``/``*.json`` is loaded as a task spec. Only these
sources are imported. A broken plugin raises :class:`PluginError` naming the file and the exception.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from lorkd_pl.registry import register_task

ENTRY_POINT_GROUP = "lorkd_pl.tasks"
ENV_TASKS_DIR = "LORKD_PL_TASKS_DIR"
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_LOADED: set[str] = set()


class PluginError(RuntimeError):
    """A task plugin (file or entry point) failed to load."""


def default_tasks_dirs() -> list[Path]:
    """The folders in ``$LORKD_PL_TASKS_DIR`` (none when it is unset)."""
    value = os.environ.get(ENV_TASKS_DIR)
    return [Path(part) for part in value.split(os.pathsep) if part] if value else []


def load_plugins(tasks_dirs: Iterable[str | Path] | None = None, use_entry_points: bool = True) -> list[str]:
    """Import task plugins once each; return the sources loaded by this call.

    Args:
        tasks_dirs: folders to scan; ``None`` uses :func:`default_tasks_dirs`.
        use_entry_points: also load the ``lorkd_pl.tasks`` entry points.

    Raises:
        PluginError: for a missing folder or a plugin that raises, naming it.
    """
    loaded = []
    for folder in [Path(d) for d in (default_tasks_dirs() if tasks_dirs is None else tasks_dirs)]:
        if not folder.is_dir():
            raise PluginError(f"tasks folder {folder} does not exist (check --tasks-dir / ${ENV_TASKS_DIR})")
        for path in sorted(folder.iterdir()):
            try:
                key = str(path.resolve(strict=path.is_symlink()))
            except (OSError, RuntimeError) as error:  # a broken link or a symlink loop
                raise PluginError(
                    f"tasks folder entry {path} cannot be resolved ({error}); remove or fix the link"
                ) from None
            if key in _LOADED or path.name.startswith(("_", ".")) or not path.is_file():
                continue
            if path.suffix == ".py":
                _import_file(path)
            elif path.suffix.lower() in SPEC_SUFFIXES:
                from lorkd_pl.data.taskspec import load_task_spec  # numpy/yaml only when needed

                _guard(path, lambda p=path: register_task(load_task_spec(p)))
            else:
                continue
            _LOADED.add(key)
            loaded.append(str(path))
    if use_entry_points:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            key = f"entry point {entry.name} = {entry.value}"
            if key in _LOADED:
                continue
            target = _guard(key, entry.load)
            if callable(target):
                _guard(key, target)
            _LOADED.add(key)
            loaded.append(key)
    return loaded


def _import_file(path: Path) -> None:
    name = f"lorkd_pl_tasks.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"task plugin {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        _guard(path, lambda: spec.loader.exec_module(module))
    except PluginError:
        sys.modules.pop(name, None)
        raise


def _guard(source, action):
    try:
        return action()
    except Exception as error:
        raise PluginError(f"task plugin {source} failed: {type(error).__name__}: {error}") from error
