"""Evaluation summaries: Dice rule vs MONAI and torchmetrics, NSD vs its definition, HD95, classification."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from scipy import ndimage
from torchmetrics.segmentation import DiceScore

from lorkd_pl.evaluation.summaries import (
    classification_summary,
    dice_per_class,
    hd95_per_class,
    nsd_per_class,
    segmentation_summary,
)
from lorkd_pl.io.atomic import write_json_atomic


def one_hot(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(x, k).movedim(-1, 0)[None]


def test_dice_rule_against_monai_and_torchmetrics() -> None:
    label = torch.zeros(6, 6, 6, dtype=torch.long)
    label[1:4, 1:4, 1:4] = 1  # class 2 absent from the ground truth, class 3 too
    prediction = label.clone()
    prediction[0, 0, 0] = 2  # class 2: predicted although absent (a false positive)
    prediction[1, 1, 1] = 0
    ours = dice_per_class(prediction, label, 4)
    monai_kept = compute_dice(
        one_hot(prediction, 4), one_hot(label, 4), include_background=False, ignore_empty=False
    )
    monai_ignored = compute_dice(
        one_hot(prediction, 4), one_hot(label, 4), include_background=False, ignore_empty=True
    )
    metric = DiceScore(num_classes=4, include_background=False, average="none", input_format="index")
    metric.update(prediction[None], label[None])
    torchmetrics = metric.compute()
    assert math.isclose(ours[0], float(monai_kept[0, 0]), rel_tol=1e-6)  # present class: all agree
    assert math.isclose(ours[0], float(torchmetrics[0]), rel_tol=1e-6)
    assert ours[1] == 0.0 == float(monai_kept[0, 1]) == float(torchmetrics[1])  # only predicted: 0
    assert math.isnan(float(monai_ignored[0, 1]))  # MONAI ignore_empty would hide the false positive
    assert math.isnan(ours[2]) and math.isnan(float(torchmetrics[2]))  # absent from both: NaN
    assert float(monai_kept[0, 2]) == 1.0  # MONAI ignore_empty=False would count it as perfect


def test_hd95_and_segmentation_summary(tmp_path) -> None:
    label = torch.zeros(12, 12, 12, dtype=torch.long)
    label[2:6, 2:6, 2:6] = 1
    prediction = torch.zeros_like(label)
    prediction[3:7, 2:6, 2:6] = 1
    hd = hd95_per_class(prediction, label, 3, [2.0, 1.0, 1.0])
    assert hd[0] == 2.0 and math.isnan(hd[1])  # shifted by one voxel along x (2 mm); class 2 empty
    task = {"name": "t", "region": "brain", "kind": "seg3d", "classes": ["background", "a", "b"]}
    nsd = nsd_per_class(prediction, label, 3, [2.0, 1.0, 1.0], 2.0)
    cases = [{"case": "c1", "dice": dice_per_class(prediction, label, 3), "nsd": nsd, "hd95": hd}]
    summary = segmentation_summary(task, cases)
    assert summary["per_class"]["a"]["dice"] == 0.75 and summary["mean"]["dice"] == 0.75
    assert summary["per_class"]["a"]["nsd"] == 1.0 and summary["nsd_tolerance_mm"] == 2.0
    path = write_json_atomic(tmp_path / "summary" / "t.json", summary, nan="keep")
    assert json.loads(path.read_text())["cases"][0]["dice_a"] == 0.75


def _surface_dice_oracle(pred: np.ndarray, gt: np.ndarray, spacing: list[float], tolerance: float) -> float:
    """Normalised surface Dice from its definition: boundary voxels by erosion, distances by EDT."""
    surface_pred = pred ^ ndimage.binary_erosion(pred)
    surface_gt = gt ^ ndimage.binary_erosion(gt)
    to_gt = ndimage.distance_transform_edt(~surface_gt, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)
    close = (to_gt[surface_pred] <= tolerance).sum() + (to_pred[surface_gt] <= tolerance).sum()
    return float(close / (surface_pred.sum() + surface_gt.sum()))


@pytest.mark.parametrize("tolerance", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_nsd_matches_definition(tolerance: float) -> None:
    label = torch.zeros(12, 12, 12, dtype=torch.long)
    label[2:6, 2:6, 2:6] = 1
    label[7:11, 6:10, 1:8] = 2
    prediction = torch.zeros_like(label)
    prediction[3:7, 2:6, 2:6] = 1
    prediction[7:10, 7:10, 2:8] = 2
    spacing = [2.0, 1.0, 1.0]
    ours = nsd_per_class(prediction, label, 4, spacing, tolerance)  # class 3: absent from both
    for c in (1, 2):
        expected = _surface_dice_oracle((prediction == c).numpy(), (label == c).numpy(), spacing, tolerance)
        assert math.isclose(ours[c - 1], expected, rel_tol=1e-6)
    assert math.isnan(ours[2])
    only_predicted = prediction.clone()
    only_predicted[0:2, 0:2, 0:2] = 3
    assert nsd_per_class(only_predicted, label, 4, spacing, tolerance)[2] == 0.0


def test_classification_summary_by_hand() -> None:
    task = {"name": "c", "region": "spine", "kind": "cls2d", "classes": ["n", "x", "y"]}
    probabilities = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 2])
    summary = classification_summary(task, probabilities, labels, ["a", "b", "c", "d"])
    assert summary["accuracy"] == 0.75
    assert summary["confusion_matrix"]["counts"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert summary["per_class"]["x"] == {"recall": 0.5, "support": 2}
    assert summary["cases"][2]["prediction"] == "n"
