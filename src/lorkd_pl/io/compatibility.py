"""The one rule for which checkpoint fits which run, used before anything is built and again on load.

A checkpoint fits a run when its tasks (names, regions, class lists in order, class aliases) and its
region order equal the run's. The command line applies the rule to ``--ckpt_path`` before the data is
validated;
:meth:`lorkd_pl.models.base.TaskModule.on_load_checkpoint` applies it again to whatever Lightning loads
(``last``/``best`` included). Both raise the same :class:`~lorkd_pl.io.checkpoints.CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorkd_pl.io.checkpoints import CheckpointError


def _signature(tasks: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[str], list[tuple[str, str]]]]:
    # class aliases shape a generalist's union label space, so they are part of what must match
    return [
        (
            str(t["name"]),
            str(t["region"]),
            [str(c) for c in t["classes"]],
            sorted((str(k), str(v)) for k, v in (t.get("class_aliases") or {}).items()),
        )
        for t in tasks
    ]


def check_compatible(
    source: str,
    saved: Mapping[str, Any],
    tasks: Sequence[Mapping[str, Any]],
    regions: Sequence[str],
) -> None:
    """Refuse a checkpoint whose tasks or regions differ from the run's.

    Args:
        source: the checkpoint, for the message (a path, or "the checkpoint").
        saved: the checkpoint's hyper-parameters (``task_info``, ``regions``); a checkpoint without
            them (not made by lorkd-pl) is not checked.
        tasks: the run's task descriptions (``name``, ``region``, ``classes``), in order.
        regions: the run's region names in expert order.

    Raises:
        CheckpointError: naming both task and region lists and the fix.
    """
    saved_tasks = _signature(saved.get("task_info") or [])
    saved_regions = [str(r) for r in saved.get("regions") or []]
    mine = _signature(tasks)
    if (saved_tasks and saved_tasks != mine) or (saved_regions and saved_regions != list(regions)):
        differing = next(
            (
                f" (task {a[0]!r}: the checkpoint's classes {a[2]}, aliases {dict(a[3])}; this run's "
                f"classes {b[2]}, aliases {dict(b[3])})"
                for a, b in zip(saved_tasks, mine, strict=False)
                if a[0] == b[0] and a != b
            ),
            "",
        )
        raise CheckpointError(
            f"{source} was trained for tasks {[t[0] for t in saved_tasks]} (regions {saved_regions}), but "
            f"this run's data.tasks are {[t[0] for t in mine]} (regions {list(regions)}); names, regions, "
            f"class lists and class aliases must match{differing}: use the training run's data.tasks "
            "with this checkpoint, or `lorkd-pl export` the region you need"
        )
