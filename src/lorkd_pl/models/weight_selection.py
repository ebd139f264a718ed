"""Weight selection: a smaller student of the teacher's family starts from a subset of the teacher's
weights (Xu et al., ICLR 2024, *Initializing Models with Larger Ones*).

The rule, per tensor of the student's state dict with the same name in the teacher's:

* every channel dimension (a conv's output and input channels, a linear's rows and columns, a
  norm's or bias's vector) keeps the teacher's **uniformly spaced** indices: for a teacher size ``T``
  and a student size ``S``, ``round(i · T / S)`` for ``i < S`` (``i · T/S`` exactly when ``S`` divides
  ``T``). The indices depend only on ``(T, S)``, so every layer reading or writing one channel space
  selects the same channels (consistency, which the paper finds essential), and a concatenation of
  spaces of one width ratio (a U-Net's skip + upsampled features) selects within each part;
* the spatial dimensions of a conv kernel (``dim ≥ 2`` of a tensor with ≥ 3 dims) keep the teacher's
  **centre** (a student kernel of the teacher's size takes it whole);
* a tensor of the teacher's shape is copied whole.

A student tensor with no teacher counterpart (a layer the teacher lacks) keeps its own initialisation
and is reported; teacher tensors without a student counterpart (deeper teachers) are not used. A
student tensor larger than the teacher's in any dimension, or of another number of dimensions, is an
error: the networks do not correspond.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


class WeightSelectionError(ValueError):
    """The student's and the teacher's tensors cannot correspond (the message names the tensor)."""


@dataclass
class SelectionReport:
    """What :func:`select_weights` did.

    Attributes:
        copied: tensors of the teacher's shape, copied whole.
        selected: tensors taken as a subset of the teacher's.
        kept: student tensors without a teacher counterpart (their own initialisation kept).
    """

    copied: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def uniform_indices(teacher_size: int, student_size: int) -> Tensor:
    """The ``student_size`` uniformly spaced indices of ``range(teacher_size)``: ``round(i·T/S)``."""
    if student_size > teacher_size:
        raise WeightSelectionError(f"a student size {student_size} above the teacher's {teacher_size}")
    if student_size == 0:
        return torch.zeros(0, dtype=torch.long)
    # round(i·T/S) in integers (half up): exact i·T/S when S divides T
    return torch.tensor(
        [(2 * i * teacher_size + student_size) // (2 * student_size) for i in range(student_size)]
    )


def select_tensor(teacher: Tensor, shape: torch.Size | tuple[int, ...], name: str = "tensor") -> Tensor:
    """The student's ``shape`` of ``teacher`` by the module's rule.

    Args:
        teacher: ``(T0, T1, *K)`` (conv), ``(T0, T1)`` (linear), ``(T0,)`` (vector) or ``()``.
        shape: the student tensor's shape, each dimension ≤ the teacher's.
        name: the tensor's name, for errors.
    """
    if teacher.dim() != len(shape):
        raise WeightSelectionError(
            f"{name}: the student's tensor has {len(shape)} dimensions {tuple(shape)}, the teacher's "
            f"{teacher.dim()} {tuple(teacher.shape)}: the networks do not correspond"
        )
    if any(s > t for s, t in zip(shape, teacher.shape, strict=True)):
        raise WeightSelectionError(
            f"{name}: the student's tensor {tuple(shape)} is larger than the teacher's "
            f"{tuple(teacher.shape)} in a dimension: weight selection takes a smaller student"
        )
    out = teacher
    spatial_from = 2 if teacher.dim() >= 3 else teacher.dim()
    for dim, (t, s) in enumerate(zip(teacher.shape, shape, strict=True)):
        if t == s:
            continue
        if dim < spatial_from:
            out = out.index_select(dim, uniform_indices(t, s).to(teacher.device))
        else:  # a kernel's spatial extent: its centre
            start = (t - s) // 2
            out = out.narrow(dim, start, s)
    return out.clone()


def select_weights(
    student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], SelectionReport]:
    """The student's state dict filled from the teacher's by weight selection.

    Args:
        student: the student network's state dict (names and shapes; kept where the teacher has none).
        teacher: the teacher network's state dict, the same family (the same names).

    Returns:
        The new state dict (every key of ``student``) and what was copied, selected and kept.

    Raises:
        WeightSelectionError: a tensor that cannot correspond, or no tensor in common at all.
    """
    out, report = {}, SelectionReport()
    for name, value in student.items():
        source = teacher.get(name)
        if source is None:
            out[name] = value.clone()
            report.kept.append(name)
            continue
        if tuple(source.shape) == tuple(value.shape):
            out[name] = source.detach().clone().to(value.dtype)
            report.copied.append(name)
        else:
            out[name] = select_tensor(source.detach(), value.shape, name).to(value.dtype)
            report.selected.append(name)
    if not report.copied and not report.selected:
        raise WeightSelectionError(
            "the student and the teacher have no tensor name in common: weight selection needs a student "
            "of the teacher's family (the same backbone class with fewer channels)"
        )
    return out, report
