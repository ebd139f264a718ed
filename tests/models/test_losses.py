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


def coarse_top_k_kd(student: torch.Tensor, index: torch.Tensor, log_probs: torch.Tensor, tau: float) -> float:
    """The oracle, voxel by voxel in float64: both distributions coarsened to the stored classes plus one
    bucket of the others (the teacher's remainder spread evenly over them before tempering), then KL·τ²."""
    classes = student.shape[1]
    z = student.detach().double().movedim(1, -1).reshape(-1, classes)
    slots = index.movedim(1, -1).reshape(-1, index.shape[1]).tolist()
    stored = log_probs.double().movedim(1, -1).reshape(-1, index.shape[1]).tolist()
    total = 0.0
    for logits, voxel_slots, voxel_log_probs in zip(z, slots, stored, strict=True):
        kept = {c: math.exp(v) for c, v in zip(voxel_slots, voxel_log_probs, strict=True) if v > -1e4}
        rest = [c for c in range(classes) if c not in kept]
        remainder = max(1 - sum(kept.values()), 1e-12)
        teacher = [kept.get(c, remainder / len(rest) if rest else 0.0) for c in range(classes)]
        tempered = [q ** (1 / tau) for q in teacher]
        teacher_t = [q / sum(tempered) for q in tempered]
        p = torch.softmax(logits / tau, 0).tolist()
        bins_t = [teacher_t[c] for c in kept] + ([sum(teacher_t[c] for c in rest)] if rest else [])
        bins_s = [p[c] for c in kept] + ([sum(p[c] for c in rest)] if rest else [])
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(bins_t, bins_s, strict=True) if a > 0)
    return total / len(slots) * tau**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_kd_is_the_kl_of_the_coarsened_distributions(k, temperature) -> None:
    from lorkd_pl.models.losses import kd_kl_top_k

    torch.manual_seed(k)
    classes = 5
    teacher = torch.randn(2, classes, 3, 4, 2).mul(3).log_softmax(1)
    log_probs, index = teacher.topk(k, dim=1)
    student = torch.randn(2, classes, 3, 4, 2, requires_grad=True)
    got = kd_kl_top_k(student, index.to(torch.uint8), log_probs, temperature)
    assert float(got) == pytest.approx(coarse_top_k_kd(student, index, log_probs, temperature), rel=1e-5)
    if k == classes:  # every class stored: the dense KD itself
        torch.testing.assert_close(got, kd_kl(student, teacher, temperature), atol=1e-5, rtol=1e-5)
    # the gradient at τ = 1, by hand: p − (q_i on a stored class; r · p_j / Σ_rest p on another)
    if temperature == 1.0:
        (grad,) = torch.autograd.grad(got, student)
        p = student.detach().softmax(1)
        stored = torch.zeros_like(p, dtype=torch.bool).scatter(1, index, True)
        r = 1 - log_probs.exp().sum(1, keepdim=True)
        p_rest = (p * ~stored).sum(1, keepdim=True)
        target = torch.where(stored, teacher.exp(), r * p / p_rest.clamp_min(1e-30))
        torch.testing.assert_close(grad, (p - target) / p[:, :1].numel(), atol=1e-7, rtol=1e-4)


def test_top_k_kd_of_a_student_far_more_confident_than_its_bucket() -> None:
    """A student whose other classes lie far below its stored ones (log-probabilities 13,000 apart in
    float64): the bucket's log-mass is still its exact log-sum-exp, and the gradient the closed form
    (a maximum found by lifting the bucket by 1e4 got half the gradient wrong here)."""
    from lorkd_pl.models.losses import kd_kl_top_k

    student = torch.tensor(
        [[1000.0, 0.0, -12000.0, -12020.0, -12400.0]], dtype=torch.float64, requires_grad=True
    )
    teacher = torch.tensor([[0.9, 0.05, 0.03, 0.01, 0.01]], dtype=torch.float64).log()
    log_probs, index = teacher.topk(2, dim=1)
    got = kd_kl_top_k(student, index, log_probs, 1.0)
    z = student.detach()[0]  # by hand, in log space (the bucket's probabilities underflow in float64)
    log_p = z - z.logsumexp(0)
    log_p_rest = z[2:].logsumexp(0) - z.logsumexp(0)
    q = teacher.exp()[0]
    expected = q[0] * (q[0].log() - log_p[0]) + q[1] * (q[1].log() - log_p[1])
    expected = expected + 0.05 * (math.log(0.05) - log_p_rest)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    (grad,) = torch.autograd.grad(got, student)
    p = student.detach().softmax(1)  # the bucket's own proportions: 1, e^-20, e^-400 (relative)
    bucket = torch.tensor([-12000.0, -12020.0, -12400.0], dtype=torch.float64).softmax(0)
    target = torch.cat([teacher.exp()[:, :2], 0.05 * bucket[None]], dim=1)
    # a bucket class below e^-80 of the bucket's largest counts as e^-80: ≤ r·1.8e-35 off (class 4)
    torch.testing.assert_close(grad, p - target, rtol=1e-10, atol=0.05 * math.exp(-80))


def test_the_teacher_is_a_minimiser_of_top_k_kd() -> None:
    """A student equal to the teacher pays 0 and gets no gradient although 3 of 7 classes are stored
    (a remainder spread evenly would pull its tail flat); any other student pays more."""
    from lorkd_pl.models.losses import kd_kl_top_k

    torch.manual_seed(0)
    teacher = torch.randn(4, 7, 6).mul(2).log_softmax(1)
    log_probs, index = teacher.topk(3, dim=1)
    student = teacher.clone().requires_grad_(True)
    loss = kd_kl_top_k(student, index, log_probs, 1.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(float(loss)) < 1e-6 and float(grad.abs().max()) < 1e-7
    for _ in range(5):
        other = teacher + torch.randn_like(teacher)
        assert float(kd_kl_top_k(other, index, log_probs, 1.0)) > 1e-4


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


def _top_k_targets(classes: int, k: int, empty: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-``k`` store's entries ``(2, k + empty, 3, 2)`` (float64) of a ``classes``-class teacher, with
    ``empty`` empty slots per position and, if ``padded``, one position with no stored class at all."""
    from lorkd_pl.data.teacher_targets import EMPTY_SLOT

    teacher = torch.randn(2, classes, 3, 2, dtype=torch.float64).mul(2).log_softmax(1)
    log_probs, index = teacher.topk(k, dim=1)
    index = torch.cat([index, torch.zeros(2, empty, 3, 2, dtype=torch.long)], 1)
    log_probs = torch.cat([log_probs, torch.full((2, empty, 3, 2), EMPTY_SLOT, dtype=torch.float64)], 1)
    if padded:
        log_probs[1, :, 2, 1] = EMPTY_SLOT
    return index, log_probs


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(
    ("classes", "k", "empty", "padded"),
    [(6, 2, 0, False), (6, 1, 2, True), (4, 4, 0, False), (3, 3, 2, True), (5, 4, 1, True)],
)
def test_top_k_kd_gradient_matches_finite_differences(classes, k, empty, padded, temperature) -> None:
    """The hand-written backward of top-k KD (bucket or none, empty slots, a padded position) against
    numerical differentiation in float64."""
    from lorkd_pl.models.losses import kd_kl_top_k

    torch.manual_seed(classes * 10 + k)
    index, log_probs = _top_k_targets(classes, k, empty, padded)
    student = torch.randn(2, classes, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: kd_kl_top_k(z, index, log_probs, temperature), (student,))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 2, 3)])
def test_dense_kd_gradient_matches_finite_differences(shape, temperature) -> None:
    torch.manual_seed(len(shape))
    teacher = torch.randn(shape, dtype=torch.float64)
    student = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: kd_kl(z, teacher, temperature), (student,))


def test_kd_gradient_keeps_the_logits_dtype_and_scales_with_the_upstream_gradient() -> None:
    from lorkd_pl.models.losses import kd_kl_top_k

    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 4).log_softmax(1)
    log_probs, index = teacher.topk(2, dim=1)
    for loss in (
        lambda z: kd_kl(z, teacher, 2.0),
        lambda z: kd_kl_top_k(z, index.to(torch.uint8), log_probs.half(), 2.0),
    ):
        student = torch.randn(2, 5, 4).bfloat16().requires_grad_(True)
        value = loss(student)
        assert value.dtype == torch.float32
        (grad,) = torch.autograd.grad(3 * value, student)
        assert grad.dtype == torch.bfloat16
        (single,) = torch.autograd.grad(loss(student), student)
        torch.testing.assert_close(grad.float(), 3 * single.float(), rtol=1e-2, atol=1e-6)


def test_top_k_kd_edge_inputs() -> None:
    """−∞ empty slots, a flat teacher at a small τ, the caller's int64 index, an empty batch and a
    second-order gradient (found by an independent review of the closed-form KD)."""
    from lorkd_pl.data.teacher_targets import EMPTY_SLOT
    from lorkd_pl.models.losses import kd_kl_top_k

    torch.manual_seed(0)
    student = torch.randn(2, 5, 3)
    index = torch.tensor([0, 1, 0]).view(1, 3, 1).expand(2, 3, 3).contiguous()
    log_probs = torch.tensor([math.log(0.6), math.log(0.3), EMPTY_SLOT]).view(1, 3, 1).expand(2, 3, 3).clone()
    reference = kd_kl_top_k(student, index, log_probs, 1.0)
    log_probs[:, 2] = -math.inf  # another way to say "empty"
    torch.testing.assert_close(kd_kl_top_k(student, index, log_probs, 1.0), reference)
    assert float(reference) == pytest.approx(coarse_top_k_kd(student, index, log_probs, 1.0), rel=1e-5)

    classes, tau = 200, 0.05  # a flat teacher: its tempered masses underflow unless normalised in logs
    flat = torch.full((1, classes, 2), -math.log(classes)) + 0.01 * torch.randn(1, classes, 2)
    stored, top = flat.log_softmax(1).topk(4, dim=1)
    wide = torch.randn(1, classes, 2, requires_grad=True)
    loss = kd_kl_top_k(wide, top, stored, tau)
    (grad,) = torch.autograd.grad(loss, wide)
    assert torch.isfinite(grad).all()
    assert float(loss) == pytest.approx(coarse_top_k_kd(wide, top, stored, tau), rel=1e-4)

    original = torch.tensor([2, 0, 9]).view(1, 3, 1)
    kd_kl_top_k(torch.randn(1, 4, 1), original, torch.log(torch.tensor([0.5, 0.3, 0.1])).view(1, 3, 1), 1.0)
    assert original.flatten().tolist() == [2, 0, 9]  # clamped in a copy, not in the caller's tensor

    assert math.isnan(float(kd_kl_top_k(torch.randn(0, 5, 3), index[:0], log_probs[:0], 1.0)))
    assert math.isnan(float(kd_kl(torch.randn(0, 5), torch.randn(0, 5), 1.0)))

    twice = torch.randn(2, 5, 3, requires_grad=True)
    (first,) = torch.autograd.grad(kd_kl_top_k(twice, index, log_probs, 1.0), twice, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(first.sum(), twice)
