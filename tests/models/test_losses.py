"""KD and task losses against hand computations and MONAI/PyTorch references."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorkd_pl.models.losses import TaskLoss, kd_kl


def test_kd_equals_a_hand_computation() -> None:
    student = torch.randn(3, 4, 2, 2)
    teacher = torch.randn(3, 4, 2, 2)
    tau = 2.5
    total = 0.0
    for n in range(3):
        for i in range(2):
            for j in range(2):
                zs = [float(v) / tau for v in student[n, :, i, j]]
                zt = [float(v) / tau for v in teacher[n, :, i, j]]
                ls = [z - math.log(sum(math.exp(u) for u in zs)) for z in zs]
                lt = [z - math.log(sum(math.exp(u) for u in zt)) for z in zt]
                total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))
    expected = total / 12 * tau**2
    assert math.isclose(float(kd_kl(student, teacher, tau)), expected, rel_tol=1e-5)


def test_kd_is_zero_for_equal_logits_and_gives_no_teacher_gradient() -> None:
    logits = torch.randn(5, 3, requires_grad=True)
    teacher = logits.detach().clone().requires_grad_(True)
    assert float(kd_kl(logits, teacher, 4.0)) < 1e-6
    kd_kl(logits * 2, teacher, 4.0).backward()
    assert teacher.grad is None


def test_kd_runs_in_fp32_under_autocast() -> None:
    student = torch.randn(4, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = kd_kl(student, torch.randn(4, 3), 1.0)
    assert value.dtype == torch.float32


def test_task_losses_match_references() -> None:
    logits, label = torch.randn(6, 4), torch.randint(0, 4, (6,))
    torch.testing.assert_close(TaskLoss("cls2d")(logits, label), F.cross_entropy(logits, label))
    seg_logits, seg_label = torch.randn(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 1, 4, 4, 4))
    from monai.losses import DiceCELoss

    expected = DiceCELoss(to_onehot_y=True, softmax=True)(seg_logits, seg_label)
    torch.testing.assert_close(TaskLoss("seg3d")(seg_logits, seg_label), expected)
