"""KD and task losses against hand computations and MONAI/PyTorch references."""

from __future__ import annotations

import math

import pytest
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


def dense_from_top_k(index: torch.Tensor, log_probs: torch.Tensor, classes: int) -> torch.Tensor:
    """The oracle's teacher: the top-k probabilities where stored, the remainder spread evenly over the
    other classes, as dense log-probabilities ``(N, K, *S)`` (written out voxel by voxel)."""
    probs = log_probs.exp()
    flat_index = index.movedim(1, -1).reshape(-1, index.shape[1])
    flat_probs = probs.movedim(1, -1).reshape(-1, probs.shape[1])
    rows = []
    for slots, p in zip(flat_index.tolist(), flat_probs.tolist(), strict=True):
        real = [(c, q) for c, q in zip(slots, p, strict=True) if q > 0]
        remainder = max(1 - sum(q for _, q in real), 1e-12)
        others = classes - len(real)
        row = [remainder / others if others else 0.0] * classes
        for c, q in real:
            row[c] = q
        rows.append(row)
    dense = torch.tensor(rows, dtype=torch.float64).reshape(*index.movedim(1, -1).shape[:-1], classes)
    return dense.movedim(-1, 1).clamp_min(1e-30).log().float()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_kd_equals_kd_of_the_spread_out_dense_target(k, temperature) -> None:
    from lorkd_pl.models.losses import kd_kl_top_k

    torch.manual_seed(k)
    classes = 5
    teacher = torch.randn(2, classes, 3, 4, 2).mul(3).log_softmax(1)
    log_probs, index = teacher.topk(k, dim=1)
    student = torch.randn(2, classes, 3, 4, 2, requires_grad=True)
    oracle = kd_kl(student, dense_from_top_k(index, log_probs, classes), temperature)
    got = kd_kl_top_k(student, index.to(torch.uint8), log_probs, temperature)
    torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got, student)
    (g_oracle,) = torch.autograd.grad(oracle, student)
    torch.testing.assert_close(g_got, g_oracle, atol=1e-6, rtol=1e-4)
    if k == classes:  # every class stored: the dense KD itself
        torch.testing.assert_close(got, kd_kl(student, teacher, temperature), atol=1e-5, rtol=1e-5)


def test_top_k_kd_with_empty_slots_and_a_student_equal_to_the_teacher() -> None:
    from lorkd_pl.data.teacher_targets import EMPTY_SLOT
    from lorkd_pl.models.losses import kd_kl_top_k

    teacher = torch.randn(3, 3, 8).log_softmax(1)  # a task of 3 classes in a store of k = 5
    log_probs, index = teacher.topk(3, dim=1)
    index = torch.cat([index, torch.zeros(3, 2, 8, dtype=torch.long)], 1)
    log_probs = torch.cat([log_probs, torch.full((3, 2, 8), EMPTY_SLOT)], 1)
    for temperature in (1.0, 4.0):
        assert float(kd_kl_top_k(teacher.clone(), index, log_probs, temperature)) == pytest.approx(
            0, abs=1e-6
        )
        student = torch.randn(3, 3, 8)
        torch.testing.assert_close(
            kd_kl_top_k(student, index, log_probs, temperature), kd_kl(student, teacher, temperature)
        )
