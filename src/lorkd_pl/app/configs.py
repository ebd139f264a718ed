"""The configs shipped inside the package (``lorkd_pl/configs``), addressable from any folder.

``--config demo/teacher_seg`` (or ``demo/teacher_seg.yaml``) names a packaged config when no such file
exists in the working folder; ``lorkd-pl config`` lists them, prints one, or copies them out to edit.
In a source checkout the top-level ``configs/`` folder is the same files.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

SUFFIXES: tuple[str, ...] = (".yaml", ".yml")


def config_root() -> Path:
    """The folder of the packaged configs."""
    return Path(str(files("lorkd_pl") / "configs"))


def packaged_configs() -> list[str]:
    """Names of the packaged configs, e.g. ``demo/teacher_seg`` (no suffix), sorted."""
    root = config_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def packaged_config(name: str) -> Path | None:
    """The packaged config called ``name`` (``demo/teacher_seg``, with or without ``.yaml``), if any."""
    root = config_root().resolve()
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = (root / f"{stem}.yaml").resolve()
    return path if path.is_file() and path.is_relative_to(root) else None


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config``/``-c`` value that is not a file replaced by a packaged config.

    Raises:
        LookupError: for a value that is neither an existing file nor a packaged config's name.
    """
    out: list[str] = []
    expecting = False
    for item in args:
        if expecting:
            item = _resolve(item)
            expecting = False
        elif item in ("--config", "-c"):
            expecting = True
        elif item.startswith("--config="):
            item = "--config=" + _resolve(item.split("=", 1)[1])
        out.append(item)
    return out


def _resolve(value: str) -> str:
    if Path(value).exists() or value.lstrip().startswith(("{", "[")):  # a file, or inline YAML/JSON
        return value
    packaged = packaged_config(value)
    if packaged is None:
        raise LookupError(
            f"config {value!r} is neither a file nor a packaged config; `lorkd-pl config` lists the "
            "packaged ones (e.g. demo/teacher_seg)"
        )
    return str(packaged)


def copy_configs(names: Sequence[str], out: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy packaged configs into ``out`` (keeping their sub-folders) for editing; return the copies.

    Raises:
        FileExistsError: if a target exists and ``overwrite`` is false (nothing is copied then).
        LookupError: for an unknown name, listing the packaged ones.
    """
    sources = {}
    for name in names or packaged_configs():
        path = packaged_config(name)
        if path is None:
            raise LookupError(f"no packaged config {name!r}; `lorkd-pl config` lists them")
        sources[path.relative_to(config_root().resolve())] = path
    targets = {relative: Path(out) / relative for relative in sources}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist(s); pass --overwrite to replace")
    for relative, source in sources.items():
        targets[relative].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, targets[relative])
    return list(targets.values())
