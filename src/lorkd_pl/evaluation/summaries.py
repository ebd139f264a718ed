"""nnU-Net-style evaluation summaries per task (``summary.json``), written atomically.

Dice rule for an empty ground truth (the torchmetrics ``DiceScore`` convention, used everywhere in
lorkd-pl): a class absent from both ground truth and prediction gives NaN and is left out of means;
a class absent from the ground truth but predicted gives 0 (false positives count). MONAI's
``compute_dice`` gives NaN for any empty ground truth with ``ignore_empty=True`` and 1 for "both
empty" with ``ignore_empty=False``; ``tests/test_reports.py`` checks the rule against both.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from torch import Tensor
from torchmetrics.functional.classification import multiclass_auroc, multiclass_confusion_matrix
from torchmetrics.functional.segmentation import dice_score

from lorkd_pl.registry import DEFAULT_NSD_TOLERANCE


def dice_per_class(prediction: Tensor, label: Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class (1..K-1) for one case (torchmetrics ``dice_score``, the same metric
    as validation's ``DiceScore``), with lorkd-pl's empty-ground-truth rule.

    Args:
        prediction: ``(*S)`` int64 class indices.
        label: ``(*S)`` int64 class indices.
        num_classes: K (background included).
    """
    scores = dice_score(
        prediction[None].long(),
        label[None].long(),
        num_classes=num_classes,
        include_background=False,
        average="none",
        input_format="index",
    )
    return [float(v) for v in scores.reshape(-1).tolist()]


def _one_hot_pair(prediction: Tensor, label: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """``(1, K, *S)`` one-hot prediction and label, as MONAI's surface metrics expect."""
    pred = torch.nn.functional.one_hot(prediction.long(), num_classes).movedim(-1, 0)[None]
    gt = torch.nn.functional.one_hot(label.long(), num_classes).movedim(-1, 0)[None]
    return pred, gt


def hd95_per_class(
    prediction: Tensor, label: Tensor, num_classes: int, spacing: Sequence[float] | None
) -> list[float]:
    """95th-percentile Hausdorff distance per foreground class (MONAI); NaN where either side is empty.

    Args:
        prediction: ``(*S)`` int64 class indices.
        label: ``(*S)`` int64 class indices.
        num_classes: K (background included).
        spacing: voxel spacing per axis of ``S`` (mm); ``None`` measures in voxels.
    """
    with warnings.catch_warnings():  # empty classes are reported as NaN below
        warnings.simplefilter("ignore")
        distances = compute_hausdorff_distance(
            *_one_hot_pair(prediction, label, num_classes),
            include_background=False,
            percentile=95,
            spacing=spacing,
        )
    out = []
    for c, value in enumerate(distances[0].tolist(), start=1):
        empty = not bool((prediction == c).any()) or not bool((label == c).any())
        out.append(float("nan") if empty or math.isinf(value) else float(value))
    return out


def nsd_per_class(
    prediction: Tensor,
    label: Tensor,
    num_classes: int,
    spacing: Sequence[float] | None,
    tolerance: float,
) -> list[float]:
    """Normalised surface Dice per foreground class (MONAI ``compute_surface_dice``).

    The fraction of both boundaries lying within ``tolerance`` of the other boundary. Same empty rule
    as Dice: NaN when the class is absent from ground truth and prediction, 0 when only one has it.

    Args:
        prediction: ``(*S)`` int64 class indices.
        label: ``(*S)`` int64 class indices.
        num_classes: K (background included).
        spacing: voxel spacing per axis of ``S`` (mm); ``None`` measures in voxels.
        tolerance: boundary tolerance in mm (voxels without ``spacing``).
    """
    with warnings.catch_warnings():  # MONAI warns for empty classes; the rule above handles them
        warnings.simplefilter("ignore")
        values = compute_surface_dice(
            *_one_hot_pair(prediction, label, num_classes),
            class_thresholds=[float(tolerance)] * (num_classes - 1),
            include_background=False,
            spacing=list(spacing) if spacing else None,
        )
    return [float(v) for v in values[0].tolist()]


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def segmentation_summary(task: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-class means over cases and per-case rows.

    Args:
        task: the task description (``name``, ``region``, ``kind``, ``classes``, optional
            ``nsd_tolerance``).
        cases: ``{"case", "dice": [...], "nsd": [...], "hd95": [...]}`` per case, one value per
            foreground class.
    """
    classes = list(task["classes"][1:])
    per_class = {}
    for index, name in enumerate(classes):
        per_class[name] = {
            "dice": nanmean([case["dice"][index] for case in cases]),
            "nsd": nanmean([case["nsd"][index] for case in cases]),
            "hd95": nanmean([case["hd95"][index] for case in cases]),
        }
    return {
        "task": task["name"],
        "region": task["region"],
        "kind": task["kind"],
        "dice_rule": "NaN if the class is absent from ground truth and prediction; 0 if only predicted",
        "nsd_tolerance_mm": float(task.get("nsd_tolerance", DEFAULT_NSD_TOLERANCE)),
        "mean": {
            "dice": nanmean([v["dice"] for v in per_class.values()]),
            "nsd": nanmean([v["nsd"] for v in per_class.values()]),
            "hd95": nanmean([v["hd95"] for v in per_class.values()]),
        },
        "per_class": per_class,
        "cases": [
            {
                "case": c["case"],
                **{f"dice_{n}": c["dice"][i] for i, n in enumerate(classes)},
                **{f"nsd_{n}": c["nsd"][i] for i, n in enumerate(classes)},
                **{f"hd95_{n}": c["hd95"][i] for i, n in enumerate(classes)},
            }
            for c in cases
        ],
    }


def classification_summary(
    task: Mapping[str, Any], probabilities: Tensor, labels: Tensor, cases: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro AUROC, per-class recall, the confusion matrix and per-case rows.

    Args:
        probabilities: ``(N, K)`` class probabilities.
        labels: ``(N,)`` int64.
    """
    classes = list(task["classes"])
    k = len(classes)
    predicted = probabilities.argmax(1)
    confusion = multiclass_confusion_matrix(
        predicted, labels, num_classes=k
    )  # rows: truth, columns: prediction
    support = confusion.sum(1)
    recall = [float(confusion[i, i] / support[i]) if support[i] else float("nan") for i in range(k)]
    return {
        "task": task["name"],
        "region": task["region"],
        "kind": task["kind"],
        "accuracy": float((predicted == labels).float().mean()),
        "auroc_macro": float(multiclass_auroc(probabilities, labels, num_classes=k, average="macro")),
        "per_class": {
            name: {"recall": recall[i], "support": int(support[i])} for i, name in enumerate(classes)
        },
        "confusion_matrix": {"rows_truth_columns_prediction": classes, "counts": confusion.tolist()},
        "cases": [
            {
                "case": case,
                "label": classes[int(y)],
                "prediction": classes[int(p)],
                **{f"p_{n}": float(v) for n, v in zip(classes, row.tolist(), strict=True)},
            }
            for case, y, p, row in zip(cases, labels, predicted, probabilities, strict=True)
        ],
    }


def segmentation_case(
    case: str, prediction: Tensor, label: Tensor, task: Mapping[str, Any]
) -> dict[str, Any]:
    """One case's row of :func:`segmentation_summary`: Dice, NSD and HD95 per foreground class.

    Args:
        case: the case id.
        prediction: ``(*S)`` int64 class indices; ``label``: ``(*S)`` int64.
        task: the task description (``classes``, optional ``spacing``, ``nsd_tolerance``).
    """
    k, spacing = len(task["classes"]), task.get("spacing")
    tolerance = task.get("nsd_tolerance", DEFAULT_NSD_TOLERANCE)
    return {
        "case": case,
        "dice": dice_per_class(prediction, label, k),
        "nsd": nsd_per_class(prediction, label, k, spacing, tolerance),
        "hd95": hd95_per_class(prediction, label, k, spacing),
    }


def task_summary(task: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary of one task from its per-case rows: :func:`segmentation_case` rows (seg3d), or
    ``{"case", "probabilities" (K,), "label"}`` rows (cls2d)."""
    if task["kind"] == "seg3d":
        return segmentation_summary(task, rows)
    return classification_summary(
        task,
        torch.stack([torch.as_tensor(r["probabilities"]) for r in rows]),
        torch.tensor([int(r["label"]) for r in rows]),
        [r["case"] for r in rows],
    )
