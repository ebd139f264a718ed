"""Task losses and knowledge distillation, computed in fp32 under autocast."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def supervision_levels(output: Tensor, images: Tensor) -> list[tuple[float, Tensor]]:
    """Deep supervision: the outputs to supervise and their weights.

    A backbone with deep supervision (MONAI's ``DynUNet(deep_supervision=True)``) returns in training
    its outputs stacked as ``(N, L, F, *S)``, every level upsampled to the output size; each level is
    supervised with weight ``2^-l``, normalised to sum 1 (nnU-Net's). In eval, and for other
    backbones, the one output gets weight 1.

    Args:
        output: the backbone's output, ``(N, F, *S)`` or stacked ``(N, L, F, *S)``.
        images: its input ``(N, C, *S)`` (tells one from the other by the number of dimensions).

    Returns:
        ``[(weight, features (N, F, *S)), ...]``, the main output first.
    """
    if output.ndim != images.ndim + 1:
        return [(1.0, output)]
    weights = [0.5**level for level in range(output.shape[1])]
    return [(w / sum(weights), output[:, level]) for level, w in enumerate(weights)]


def _check_shapes(student_logits: Tensor, targets: Tensor) -> None:
    if student_logits.shape != targets.shape:
        raise ValueError(
            f"KD needs teacher targets of the student's shape {tuple(student_logits.shape)}, got "
            f"{tuple(targets.shape)}; check the task's teacher class mapping"
        )


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) · τ²``, averaged over samples (and voxels).

    Args:
        student_logits: ``(N, K, *S)`` (or ``(N, K)``).
        teacher_logits: same shape as ``student_logits``; no gradient flows into it.
        temperature: τ > 0.

    Returns:
        A scalar: the mean over ``N·prod(S)`` positions of the class-wise KL sum, times τ².
    """
    _check_shapes(student_logits, teacher_logits)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        t = F.log_softmax(teacher_logits.detach().to(_loss_dtype(student_logits)) / temperature, dim=1)
        return _DistillationKL.apply(student_logits, temperature, t.exp(), t, None)


class TaskLoss(nn.Module):
    """Segmentation: Dice + cross-entropy (MONAI ``DiceCELoss``); classification: cross-entropy.

    Shapes:
        seg3d: logits ``(N, K, *S)``, label ``(N, 1, *S)`` int64 class indices.
        cls2d: logits ``(N, K)``, label ``(N,)`` int64.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True) if kind == "seg3d" else None

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        """Scalar loss in fp32: ``logits`` ``(N, K, *S)`` + ``label`` ``(N, 1, *S)`` (seg3d, Dice + CE) or
        ``logits`` ``(N, K)`` + ``label`` ``(N,)`` (cls2d, CE)."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if self.dice_ce is not None:
                return self.dice_ce(logits.float(), label)
            return F.cross_entropy(logits.float(), label)


#: A top-k slot whose log-probability is below this is empty (``teacher_targets.EMPTY_SLOT``).
EMPTY_BELOW = -1e4
#: The smallest remainder mass of the classes outside the top k (keeps every log finite).
TINY_MASS = 1e-12
#: Farther below (and above) any log-probability: hides the stored classes from the bucket's maximum.
_FAR = 1e30
#: The smallest log-ratio to the bucket's largest probability that the bucket's sum sees (e^-80 is a
#: normal number in fp32; smaller ones would send exp() down its slow path on CPU).
_SMALLEST_LOG_RATIO = -80.0


def kd_kl_top_k(student_logits: Tensor, index: Tensor, log_probs: Tensor, temperature: float) -> Tensor:
    """KD against a top-k teacher target: the KL over the stored classes and ONE bucket of the rest.

    The teacher keeps its top-k classes with their probabilities ``q_i`` and the remainder
    ``r = 1 − Σ q_i`` as one more outcome, "any other class"; the student's distribution is coarsened the
    same way (its own stored-class probabilities and the sum of its probabilities over the other
    classes, per voxel). The loss is the KL between these two ``k + 1``-outcome distributions::

        Σ_i q_i (log q_i − log p_i) + r (log r − log Σ_{j ∉ top-k} p_j),   times τ²

    So the teacher is a minimiser (0 at ``p = q``, and ``≥ 0`` always: coarsening never increases a KL),
    and the student's shape among the other classes is left to it; only their total mass is distilled.
    It differs from dense :func:`kd_kl` by the term dense KD adds for the shape of the teacher's tail
    (``r · KL(q_tail/r ‖ p_tail/p_rest)``, the part the store did not keep). With every class stored
    (``k >= K``) it is dense KD exactly. A voxel with no stored class (a padded crop) carries no teacher
    information: its loss is 0. Tempering (τ ≠ 1) treats the unknown tail as uniform, ``q_τ ∝ q^{1/τ}``
    with the remainder spread evenly over the ``K − k`` classes, then coarsened; at τ = 1 nothing is
    assumed. Slots whose log-probability is at or below :data:`EMPTY_BELOW` are empty (a task with fewer
    classes than ``k``).

    Args:
        student_logits: ``(N, K, *S)`` (or ``(N, K)``).
        index: ``(N, k, *S)`` (or ``(N, k)``) the stored classes (any integer dtype).
        log_probs: same shape: their log-probabilities; no gradient flows into them.
        temperature: τ > 0.

    Returns:
        A scalar: the mean over ``N·prod(S)`` positions of the KL, times τ².
    """
    if index.shape != log_probs.shape or index.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"KD needs top-k targets of one shape with the student's batch {tuple(student_logits.shape)}, "
            f"got {tuple(index.shape)} and {tuple(log_probs.shape)}"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        classes = student_logits.shape[1]
        # copies (the caller's tensors stay as they are), then changed in place
        index = index.to(torch.long, copy=True).clamp_(0, classes - 1)
        # an empty slot (any value ≤ EMPTY_BELOW, −∞ included) becomes a finite one that exp() sends to 0
        stored = log_probs.detach().to(_loss_dtype(student_logits), copy=True).clamp_min_(2 * EMPTY_BELOW)
        valid = stored > EMPTY_BELOW
        probs = stored.exp()
        stored_classes = valid.sum(1, keepdim=True)
        bucket = stored_classes < classes  # some class is outside the stored ones
        remainder = (1 - probs.sum(1, keepdim=True)).clamp_min_(TINY_MASS)
        # the tempered teacher over (stored classes, bucket), as unnormalised log-masses; at τ = 1: q_i, r
        if temperature == 1:
            log_top, log_rest = stored, remainder.log()
        else:  # shifted by the largest log-mass: no underflow of a flat teacher at a small τ
            count = (classes - stored_classes).clamp_min_(1).to(stored.dtype)
            log_top = stored / temperature
            log_rest = (remainder / count).log_().div_(temperature).add_(count.log())
            shift = torch.maximum(log_top.amax(1, keepdim=True), log_rest.masked_fill(~bucket, -torch.inf))
            log_top, log_rest = log_top - shift, log_rest - shift
            probs = log_top.exp() * valid
        rest = log_rest.exp() * bucket
        inverse_total = (probs.sum(1, keepdim=True) + rest).reciprocal_()
        log_inverse_total = inverse_total.log()
        target = _TopK(
            index=index,
            weight=probs.mul_(inverse_total),
            log_weight=log_top.add_(log_inverse_total),  # (at τ = 1 in ``stored``: no longer needed)
            rest=rest * inverse_total,
            log_rest=log_rest + log_inverse_total,
            stored=valid,
        )
        return _DistillationKL.apply(student_logits, temperature, None, None, target)


def _per_position(value: float, positions: int) -> float:
    """``value / positions``; NaN for an empty batch (as a mean over no position)."""
    return value / positions if positions else math.nan


def _loss_dtype(logits: Tensor) -> torch.dtype:
    """KD runs in fp32 (fp64 for fp64 logits: exact gradient checks)."""
    return torch.promote_types(logits.dtype, torch.float32)


class _TopK(NamedTuple):
    """A top-k teacher target coarsened to ``k + 1`` outcomes, per position (see :func:`kd_kl_top_k`).

    ``index``/``weight``/``log_weight`` ``(N, k, *S)``: the stored classes, their tempered teacher
    probabilities (0 for an empty slot) and log-probabilities; ``rest``/``log_rest`` ``(N, 1, *S)``:
    the bucket's probability (0 without a bucket) and its log (finite); ``stored`` ``(N, k, *S)``:
    True for a stored class, False for an empty slot (whose index may name any class).
    """

    index: Tensor
    weight: Tensor
    log_weight: Tensor
    rest: Tensor
    log_rest: Tensor
    stored: Tensor


class _DistillationKL(torch.autograd.Function):
    """``KL(q ‖ softmax(z/τ)) · τ²`` averaged over positions, dense or coarsened to a top-k target,
    with its closed-form gradient.

    The gradient of the mean KL with respect to the logits ``z`` is ``τ (p − q̃) / M`` (``M`` positions,
    ``p = softmax(z/τ)``): ``q̃ = q`` for a dense target; for a top-k target ``q̃`` is the teacher's
    probability on a stored class and, on any other class, the bucket's probability shared in the
    student's own proportions ``r · p_j / Σ_{l ∉ top-k} p_l``. The student's log-mass outside its
    stored classes is a log-sum-exp over them, shifted by their maximum: exact however small that
    mass. Besides the log-probabilities and the saved share it holds one transient full-size tensor
    (the batch's KD runs in one call for tasks of one logit shape, so its temporaries scale with the
    batch). Autograd through the same formulas would keep more full-size tensors and run several more
    passes over them (and bool-mask ops are slow on CPU). Not twice differentiable
    (``once_differentiable``: a second-order gradient raises).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        temperature: float,
        target: Tensor | None,
        log_target: Tensor | None,
        top: _TopK | None,
    ) -> Tensor:
        """The loss.

        Args:
            ctx: autograd's context.
            logits: the student's ``(N, K, *S)`` (or ``(N, K)``), any float dtype.
            temperature: τ > 0.
            target: dense: the tempered teacher's probabilities ``q``, ``logits``' shape in the loss
                dtype; ``None`` for a top-k target.
            log_target: dense: ``log q``, same shape; ``None`` for a top-k target.
            top: the coarsened top-k target (:class:`_TopK`), or ``None`` for a dense one.

        Returns:
            A scalar in the loss dtype (fp32, or fp64 for fp64 logits).
        """
        s = logits.to(_loss_dtype(logits))
        s = F.log_softmax(s / temperature if temperature != 1 else s, dim=1)
        positions = s.numel() // s.shape[1]
        ctx.temperature, ctx.positions, ctx.logits_dtype = temperature, positions, logits.dtype
        if top is None:
            kl = (log_target - s).mul_(target).sum()
            ctx.save_for_backward(s, target)
            ctx.index = ctx.weight = None
            return kl * _per_position(temperature**2, positions)
        # the student's log-probabilities with the stored classes sent below every other (a min with
        # −_FAR; an empty slot's min with +_FAR leaves whatever class it names as it is) ...
        hidden = top.stored.to(s.dtype).mul_(-2 * _FAR).add_(_FAR)
        share = s.scatter_reduce(1, top.index, hidden, "amin")
        shift = share.amax(1, keepdim=True)  # ... and their maximum: the bucket's largest log-probability
        # p_j / max_rest p on the bucket's classes (the clamp keeps exp() out of its slow range: a ratio
        # below e^-80 counts as e^-80, in the sum and in the class's gradient, an absolute error of at
        # most r·1.8e-35 per class), then exactly 0 on the stored classes: a min with 0 (an empty slot's
        # with 1; every share is ≤ 1). A min, not a product: scatter's "prod" is not deterministic on CUDA
        share.sub_(shift).clamp_min_(_SMALLEST_LOG_RATIO).exp_()
        share.scatter_reduce_(1, top.index, hidden.clamp_(0, 1), "amin")
        del hidden
        total = share.sum(1, keepdim=True).clamp_min_(torch.finfo(s.dtype).tiny)  # > 0: s_rest finite
        s_rest = total.log().add_(shift)
        kl = (top.log_weight - s.gather(1, top.index)).mul_(top.weight).sum()
        kl = kl + (top.log_rest - s_rest).mul_(top.rest).sum()  # 0 without a bucket (rest = 0)
        # for backward: the bucket's share of the teacher's mass, r · p_j / Σ_rest p
        ctx.save_for_backward(s, share.mul_(top.rest / total))
        ctx.index, ctx.weight = top.index, top.weight
        return kl * _per_position(temperature**2, positions)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        """``τ (p − q̃) / M`` times ``grad_output`` (a scalar): the gradient of the logits, in their dtype."""
        s, target = ctx.saved_tensors  # dense: q; top-k: the bucket's share
        grad = s.exp().sub_(target)
        if ctx.index is not None:
            grad.scatter_add_(1, ctx.index, -ctx.weight)
        grad.mul_(grad_output * _per_position(ctx.temperature, ctx.positions))
        return grad.to(ctx.logits_dtype), None, None, None, None


def kd_binary(student_logits: Tensor, teacher_log_odds: Tensor, temperature: float) -> Tensor:
    """Per-class binary KD from a multi-label (sigmoid) teacher: ``Σ_k KL(Bern(t_k) ‖ Bern(s_k)) · τ²``.

    Each class is a Bernoulli, tempered on its log-odds: the teacher's ``t_k = sigmoid(l_k / τ)``, the
    student's ``s_k = sigmoid(m_k / τ)`` with ``m_k = log p_k − log(1 − p_k)``, ``p = softmax(z_s)``
    (its marginal probability of that mutually exclusive class). A student whose marginals equal the
    teacher's probabilities pays 0 at every τ.

    Args:
        student_logits: ``(N, K, *S)`` (or ``(N, K)``).
        teacher_log_odds: same shape: the teacher's per-class log-odds; no gradient flows into it.
        temperature: τ > 0.

    Returns:
        A scalar: the mean over ``N·prod(S)`` positions of the class-wise sum, times τ².
    """
    _check_shapes(student_logits, teacher_log_odds)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_logits.float(), dim=1)
        student_odds = (log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))) / temperature
        log_s, log_not_s = F.logsigmoid(student_odds), F.logsigmoid(-student_odds)
        odds = teacher_log_odds.detach().float() / temperature
        log_t, log_not_t = F.logsigmoid(odds), F.logsigmoid(-odds)
        kl = log_t.exp() * (log_t - log_s) + log_not_t.exp() * (log_not_t - log_not_s)
    return kl.sum(dim=1).mean() * temperature**2


def kd_loss(student_logits: Tensor, targets: Tensor, kind: str, temperature: float) -> Tensor:
    """KD of one task: :func:`kd_kl` for ``"log_probs"`` targets, :func:`kd_binary` for ``"log_odds"``."""
    if kind == "log_odds":
        return kd_binary(student_logits, targets, temperature)
    return kd_kl(student_logits, targets, temperature)
