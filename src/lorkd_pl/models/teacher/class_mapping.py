"""Which teacher output channels give each student class its distillation target: matched by NAME.

A student task's classes are mapped to the teacher's in one of two ways:

* declared, ``teacher_classes: {class: target}`` in the task spec: a target is a teacher output
  channel (int), a class name of a lorkd-pl generalist teacher (``"<task>/<class>"``, a shared alias
  or ``"background"``), or a LIST of those: a declared merge, whose probabilities add up (the merged
  logit is their ``logsumexp``). Every class of the task must be mapped.
* by name, for a generalist teacher that trained a task of the same name: each class is looked up
  among THAT task's class names, in any order (segmentation's class 0 is the shared background);
* by name, for an outside teacher whose class names the config gives (``teacher.classes: {name:
  channel}``): every class of the task must be among them (a task none of whose foreground classes
  the teacher has gets no logit KD). A multi-label (sigmoid) teacher may leave segmentation's
  background out: it is then derived as "no class present" (an empty channel tuple).

No teacher channel may feed two classes of one task (an undeclared many-to-one): such a mapping, a
class the teacher lacks, or an unknown teacher class name is an error naming the task and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

#: Per task name, one tuple of teacher channels per student class (several = a declared merge).
ClassChannels = dict[str, list[tuple[int, ...]]]


class ClassMappingError(ValueError):
    """A student task's classes cannot be mapped onto the teacher's."""


def union_class_name(task: str, class_name: str, aliases: Mapping[str, str] | None = None) -> str:
    """A class's name in a generalist's union label space: its declared alias, else ``"<task>/<class>"``."""
    return (aliases or {}).get(class_name) or f"{task}/{class_name}"


def map_task_classes(
    tasks: Sequence[Mapping[str, Any]],
    teacher: str,
    teacher_classes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
    teacher_tasks: Sequence[Mapping[str, Any]] | None = None,
    teacher_task_channels: Sequence[Sequence[int]] | None = None,
    derived_background: bool = False,
) -> ClassChannels:
    """The teacher channels of every student class, for the tasks that have a mapping.

    Args:
        tasks: the student's tasks (``name``, ``kind``, ``classes``, optional ``teacher_classes``).
        teacher: the teacher's source, for messages.
        teacher_classes: the teacher's output class names, by channel (a generalist's union classes)
            or as ``{name: channels}`` (an outside teacher's ``teacher.classes``); ``None`` when the
            teacher has no names.
        teacher_tasks: a generalist teacher's own tasks (``name``, ``classes``), for matching by name.
        teacher_task_channels: the union channel of each class of each of ``teacher_tasks``.
        derived_background: a segmentation task's background may be absent from ``teacher_classes``
            (multi-label teachers): its channels are then ``()``, "no class present".

    Returns:
        ``{task name: [channels of class 0, channels of class 1, ...]}``; tasks with no declared
        mapping and no same-named teacher task are absent (they get no logit KD).

    Raises:
        ClassMappingError: naming the task, the class and the fix.
    """
    by_name = {
        str(t["name"]): (t, list(c))
        for t, c in zip(teacher_tasks or [], teacher_task_channels or [], strict=True)
    }
    # "<task>/<class>" of a teacher class that trained under a shared alias → that alias (for hints)
    aliased = {
        union_class_name(t["name"], c): alias
        for t in teacher_tasks or []
        for c, alias in (t.get("class_aliases") or {}).items()
    }
    names = _names(teacher_classes)
    out: ClassChannels = {}
    for task in tasks:
        name, classes = str(task["name"]), [str(c) for c in task["classes"]]
        declared = task.get("teacher_classes")
        if declared:
            groups = _declared(name, classes, declared, teacher, names, aliased)
        elif name in by_name:
            their_task, their_channels = by_name[name]
            if their_task.get("kind", task["kind"]) != task["kind"]:
                raise ClassMappingError(
                    f"task {name!r} is {task['kind']}, but the teacher's task of that name is "
                    f"{their_task['kind']} ({teacher}); distil from a teacher of the same kind, or rename "
                    "the task"
                )
            groups = _by_name(task, list(their_task["classes"]), their_channels, teacher)
        elif isinstance(teacher_classes, Mapping):
            groups = _by_teacher_names(task, names or {}, teacher, derived_background)
            if groups is None:
                continue
        else:
            continue
        _check_one_to_one(name, classes, groups, teacher)
        out[name] = groups
    return out


def _names(
    teacher_classes: Sequence[str] | Mapping[str, Sequence[int]] | None,
) -> dict[str, tuple[int, ...]] | None:
    """The teacher's class names → their channels."""
    if teacher_classes is None:
        return None
    if isinstance(teacher_classes, Mapping):
        return {str(k): tuple(v) for k, v in teacher_classes.items()}
    return {str(name): (channel,) for channel, name in enumerate(teacher_classes)}


def _by_teacher_names(
    task: Mapping[str, Any], names: Mapping[str, tuple[int, ...]], teacher: str, derived_background: bool
) -> list[tuple[int, ...]] | None:
    classes = [str(c) for c in task["classes"]]
    background = task["kind"] == "seg3d"
    foreground = classes[1:] if background else classes
    if not any(c in names for c in foreground):
        return None  # a task of another region: no logit KD from this teacher
    optional = {classes[0]} if background and derived_background else set()
    lacking = [c for c in classes if c not in names and c not in optional]
    if lacking:
        close = {c: difflib.get_close_matches(c, list(names), n=1) for c in lacking}
        hints = ", ".join(f"{c!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for c, m in close.items())
        raise ClassMappingError(
            f"task {task['name']!r}: teacher {teacher} lacks the classes {hints} (its classes: "
            f"{list(names)}); name them in teacher.classes, or map them in the task spec's "
            "teacher_classes (a list of teacher classes declares a merge)"
        )
    return [names.get(c, ()) for c in classes]


def _declared(
    task: str,
    classes: list[str],
    declared: Mapping[str, Any],
    teacher: str,
    teacher_classes: Mapping[str, tuple[int, ...]] | None,
    aliased: Mapping[str, str],
) -> list[tuple[int, ...]]:
    missing = [c for c in classes if c not in declared]
    if missing:
        raise ClassMappingError(
            f"task {task!r}: teacher_classes has no teacher class for {missing}; map every class "
            "(a list of teacher classes declares a merge)"
        )
    groups = []
    for name in classes:
        targets = declared[name]
        targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
        if not targets:
            raise ClassMappingError(f"task {task!r}: teacher_classes maps {name!r} to an empty list")
        channels = [_channels(task, name, t, teacher, teacher_classes, aliased) for t in targets]
        groups.append(tuple(c for group in channels for c in group))
    return groups


def _channels(
    task: str,
    name: str,
    target: Any,
    teacher: str,
    teacher_classes: Mapping[str, tuple[int, ...]] | None,
    aliased: Mapping[str, str],
) -> tuple[int, ...]:
    if isinstance(target, int) and not isinstance(target, bool):
        if target < 0:
            raise ClassMappingError(f"task {task!r}: teacher_classes maps {name!r} to channel {target} (< 0)")
        return (target,)
    if not isinstance(target, str):
        raise ClassMappingError(
            f"task {task!r}: teacher_classes maps {name!r} to {target!r}; give a channel number, a "
            "teacher class name or a list of them"
        )
    if teacher_classes is None:
        raise ClassMappingError(
            f"task {task!r}: teacher_classes maps {name!r} to the class name {target!r}, but teacher "
            f"{teacher} has no class names; give its output channel number"
        )
    if target not in teacher_classes:
        close = difflib.get_close_matches(target, list(teacher_classes), n=3)
        hint = f" (did you mean {close}?)" if close else f"; its classes: {list(teacher_classes)}"
        if target in aliased:
            hint = f": that class trained as the shared class {aliased[target]!r}; name it so"
        raise ClassMappingError(
            f"task {task!r}: teacher_classes maps {name!r} to {target!r}, which teacher {teacher} does "
            f"not have{hint}"
        )
    return teacher_classes[target]


def _by_name(
    task: Mapping[str, Any], their_classes: list[str], their_channels: list[int], teacher: str
) -> list[tuple[int, ...]]:
    classes = [str(c) for c in task["classes"]]
    background = task["kind"] == "seg3d"
    groups = [(their_channels[0],)] if background else []  # class 0 is the shared background
    lookup = dict(zip(their_classes, their_channels, strict=True))
    lacking = [c for c in classes[len(groups) :] if c not in lookup]
    if lacking:
        raise ClassMappingError(
            f"task {task['name']!r}: classes {lacking} are not among the classes "
            f"{their_classes[1:] if background else their_classes} of the teacher's task of that name "
            f"({teacher}); map them in the task spec, e.g. teacher_classes: {{{lacking[0]}: "
            f"<teacher class or channel>}} (a list of teacher classes declares a merge)"
        )
    return groups + [(lookup[c],) for c in classes[len(groups) :]]


def _check_one_to_one(task: str, classes: list[str], groups: list[tuple[int, ...]], teacher: str) -> None:
    owners: dict[int, str] = {}
    for name, group in zip(classes, groups, strict=True):
        for channel in group:
            if channel in owners:
                raise ClassMappingError(
                    f"task {task!r}: classes {owners[channel]!r} and {name!r} both take teacher {teacher}'s "
                    f"channel {channel}; one teacher class feeds one student class (several teacher "
                    "classes may feed one student class: list them, a declared merge)"
                )
            owners[channel] = name


def select_classes(logits: Tensor, groups: Sequence[tuple[int, ...]]) -> Tensor:
    """The teacher's logits of one task's classes, merged groups as ``logsumexp``.

    Args:
        logits: ``(N, K_teacher, *S)`` or ``(N, K_teacher)`` teacher logits.
        groups: one tuple of teacher channels per student class.

    Returns:
        ``(N, K_task, *S)`` or ``(N, K_task)``: channel ``k`` is ``logits[:, g_k]`` for a single
        channel, ``logsumexp(logits[:, g_k], 1)`` for a merge (so softmax probabilities add up).
    """
    if all(len(g) == 1 for g in groups):
        return logits.index_select(1, torch.tensor([g[0] for g in groups], device=logits.device))
    return torch.stack([logits[:, list(g)].logsumexp(1) for g in groups], 1)


def flat_channels(groups: Sequence[tuple[int, ...]]) -> list[int]:
    """Every teacher channel of one task's mapping, in class order."""
    return [c for g in groups for c in g]
