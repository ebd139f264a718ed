"""Task losses and knowledge distillation, computed in fp32 under autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn


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
        s = F.log_softmax(student_logits.float() / temperature, dim=1)
        t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
        kl = (t.exp() * (t - s)).sum(dim=1)
    return kl.mean() * temperature**2


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
#: The student's log-probability given to the stored classes when it sums its remainder (exp() == 0).
_EXCLUDED = -1e4


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
    assumed. Slots whose log-probability is below :data:`EMPTY_BELOW` are empty (a task with fewer
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
        s = F.log_softmax(student_logits.float() / temperature, dim=1)
        index = index.long().clamp(0, classes - 1)
        stored = log_probs.detach().float()
        valid = stored > EMPTY_BELOW
        mass = (stored.exp() * valid).sum(1, keepdim=True)
        others = classes - valid.sum(1, keepdim=True)  # classes in the bucket
        bucket = others > 0
        count = others.clamp_min(1).float()
        remainder = (1 - mass).clamp_min(TINY_MASS)
        # the tempered teacher over (stored classes, bucket); at τ = 1: q_i and r
        a_top = torch.where(valid, stored / temperature, EMPTY_BELOW)
        a_rest = torch.where(bucket, (remainder.log() - count.log()) / temperature + count.log(), EMPTY_BELOW)
        log_z = torch.cat([a_top, a_rest], 1).logsumexp(1, keepdim=True)
        t_top, t_rest = a_top - log_z, a_rest - log_z
        # the student's log-mass outside its stored classes; an empty slot repeats the first slot (index
        # and validity), so every write to one class carries the same value and excludes nothing new
        slots, marks = torch.where(valid, index, index[:, :1]), valid | valid[:, :1]
        hit = torch.zeros_like(s, dtype=torch.bool).scatter_(1, slots, marks)
        s_rest = s.masked_fill(hit, _EXCLUDED).logsumexp(1, keepdim=True)
        kl_top = (t_top.exp() * valid * (t_top - s.gather(1, index))).sum(1, keepdim=True)
        kl_rest = torch.where(bucket, t_rest.exp() * (t_rest - s_rest), 0.0)
        kl = (kl_top + kl_rest).squeeze(1)
    return kl.mean() * temperature**2


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
