"""What a teacher's output means, and the distillation target of one task made from it.

A teacher returns one of (``teacher.output``):

* ``logits``: softmax logits; ``probabilities``: softmax probabilities (channels sum to 1);
  ``log_probabilities``: their logarithms (e.g. a network ending in ``LogSoftmax``);
* ``sigmoid``: independent per-class probabilities (multi-label / universal segmenters);
  ``sigmoid_logits``: their logits.

The target of a task is computed in fp32 from the channels its classes map to (``groups``: one tuple
of teacher channels per task class; see :mod:`lorkd_pl.models.teacher.class_mapping`), as one of two kinds:

* ``"log_probs"`` ``(N, K_task, *S)``: normalised log-probabilities over the task's classes. Softmax
  outputs are renormalised over the task's classes (a merge adds probabilities); a sigmoid teacher
  with ``sigmoid_kd: exclusive`` is converted to mutually exclusive classes by reading each class's
  logit as its log-odds against background (background logit 0 when the teacher has no background
  channel): for one foreground class this is exactly the sigmoid. KD: ``KL`` of the tempered softmaxes.
* ``"log_odds"`` ``(N, K_task, *S)`` (``sigmoid_kd: binary``, the default for sigmoid teachers): the
  log-odds of each task class on its own; a merge is "any of them" (``1 - Π(1 - p)``), a missing
  background is "none of the task's classes" (``Π(1 - p_k)``). KD: per-class binary KL between the
  teacher's Bernoulli and the student's softmax marginal, both tempered on their log-odds
  (:func:`lorkd_pl.models.losses.kd_binary`).

A student whose logits equal the teacher's (softmax kinds), or whose softmax marginals equal the
teacher's per-class probabilities (binary), pays KD 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lorkd_pl.models.teacher.class_mapping import select_classes

#: Probabilities are clamped to this before a logarithm (fp32); log-probability targets to its log.
TINY: float = 1e-12
LOG_TINY: float = -27.631021115928547  # log(1e-12)
SIGMOID_EPS: float = 1e-6
PROBE_TOLERANCE: float = 1e-3


def target_kind(output: str, sigmoid_kd: str = "binary") -> str:
    """``"log_odds"`` for a sigmoid teacher distilled per class, else ``"log_probs"``."""
    return "log_odds" if output.startswith("sigmoid") and sigmoid_kd == "binary" else "log_probs"


def _log_odds(raw: Tensor, output: str) -> Tensor:
    """Per-channel logits of a sigmoid teacher's output."""
    if output == "sigmoid":
        return torch.logit(raw.clamp(SIGMOID_EPS, 1 - SIGMOID_EPS))
    return raw


def _log_not(log_odds: Tensor) -> Tensor:
    """``log(1 - p)`` of ``p = sigmoid(log_odds)``."""
    return F.logsigmoid(-log_odds)


def _odds_from_log_not(log_not: Tensor) -> Tensor:
    """Log-odds of ``p`` from ``log(1 - p)``: ``log p - log(1 - p)`` with ``p = 1 - exp(log_not)``."""
    log_not = log_not.clamp(max=-TINY)
    return torch.log(-torch.expm1(log_not)) - log_not


def task_targets(
    raw: Tensor, groups: Sequence[tuple[int, ...]], output: str, sigmoid_kd: str = "binary"
) -> Tensor:
    """The KD target of one task from the teacher's raw output (see the module docstring).

    Args:
        raw: ``(N, K_teacher, *S)`` or ``(N, K_teacher)`` what the teacher returned.
        groups: one tuple of teacher channels per task class (``()``: a derived background).
        output: what ``raw`` is (``teacher.output``).
        sigmoid_kd: ``"binary"`` or ``"exclusive"`` (sigmoid teachers only).

    Returns:
        ``(N, K_task, *S)`` / ``(N, K_task)`` fp32 log-probabilities (``"log_probs"``) or per-class
        log-odds (``"log_odds"``), as :func:`target_kind` says.
    """
    raw = raw.float()
    kind = target_kind(output, sigmoid_kd)
    if not output.startswith("sigmoid"):
        if output == "probabilities":
            raw = raw.clamp_min(TINY).log()
        return (
            select_classes(raw, groups).log_softmax(1).clamp_min(LOG_TINY)
        )  # a -inf target would make KD 0·inf = NaN
    z = _log_odds(raw, output)
    if kind == "log_probs":  # each class's log-odds against background; background 0 unless mapped
        columns = [z[:, list(g)].logsumexp(1) if g else torch.zeros_like(z[:, 0]) for g in groups]
        return torch.stack(columns, 1).log_softmax(1).clamp_min(LOG_TINY)
    log_not = {g: _log_not(z[:, list(g)]).sum(1) for g in groups if g}  # log(1 - P(any of g))
    columns = []
    for g in groups:
        if g:
            columns.append(z[:, g[0]] if len(g) == 1 else _odds_from_log_not(log_not[g]))
        else:  # P(no class of the task) = prod(1 - P_k): log-odds = log P - log(1 - P)
            none = sum(log_not[h] for h in groups if h).clamp(max=-TINY)
            columns.append(none - torch.log(-torch.expm1(none)))
    return torch.stack(columns, 1)


def target_probabilities(targets: Tensor, kind: str) -> Tensor:
    """Targets as probabilities (for resampling between grids): ``exp`` or ``sigmoid``, same shape."""
    return targets.exp() if kind == "log_probs" else torch.sigmoid(targets)


def targets_from_probabilities(probabilities: Tensor, kind: str) -> Tensor:
    """The inverse of :func:`target_probabilities` (log-probabilities renormalised; log-odds clamped)."""
    if kind == "log_probs":
        return probabilities.clamp_min(TINY).log().log_softmax(1).clamp_min(LOG_TINY)
    return torch.logit(probabilities.clamp(SIGMOID_EPS, 1 - SIGMOID_EPS))


def check_output(raw: Tensor, output: str, source: str) -> str | None:
    """Check a teacher's output on a probe against its declared ``output``.

    Args:
        raw: ``(N, K_teacher, *S)`` / ``(N, K_teacher)`` the teacher's output on a real input.
        output: the declared ``teacher.output``.
        source: the teacher's path, for messages.

    Returns:
        A warning for a ``logits`` teacher whose outputs look like probabilities, else ``None``.

    Raises:
        ValueError: a ``probabilities`` teacher whose channels do not sum to 1, a
            ``log_probabilities`` teacher whose exponentials do not, a ``sigmoid`` teacher with values
            outside [0, 1], or any non-finite output.
    """
    raw = raw.detach().float()
    if not torch.isfinite(raw).all():
        raise ValueError(
            f"teacher {source} returned NaN/inf on a probe input; check the teacher and its pipeline"
        )
    low, high = float(raw.min()), float(raw.max())
    in_unit = low >= -PROBE_TOLERANCE and high <= 1 + PROBE_TOLERANCE
    sums = raw.sum(1) if raw.shape[1] > 1 else None
    sums_to_one = sums is not None and float((sums - 1).abs().max()) <= PROBE_TOLERANCE
    if output == "probabilities" and not (in_unit and sums_to_one):
        span = f"{float(sums.min()):.3g}..{float(sums.max()):.3g}" if sums is not None else "one channel"
        raise ValueError(
            f"teacher {source} is declared output: probabilities, but on a probe its channels sum to {span} "
            f"(values {low:.3g}..{high:.3g}), not 1; declare what it returns: output: logits, or sigmoid "
            "for independent per-class probabilities"
        )
    if output == "log_probabilities" and float((raw.logsumexp(1)).abs().max()) > PROBE_TOLERANCE:
        raise ValueError(
            f"teacher {source} is declared output: log_probabilities, but on a probe its exponentials do "
            "not sum to 1; declare output: logits"
        )
    if output == "sigmoid" and not in_unit:
        raise ValueError(
            f"teacher {source} is declared output: sigmoid, but on a probe it returns values "
            f"{low:.3g}..{high:.3g} outside [0, 1]; declare output: sigmoid_logits"
        )
    if output == "logits" and in_unit and sums_to_one:
        return (
            f"teacher {source} is declared output: logits, but its outputs look like probabilities (in "
            "[0, 1], summing to 1 over channels): softmaxing them again flattens every KD target; "
            "declare output: probabilities if so"
        )
    return None
