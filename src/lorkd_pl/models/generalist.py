"""The generalist: one network trained on all regions pooled, in the union label space.

It is the demo's foundation model (the teacher lorkd-pl distils) and the paper's single-model
baseline. Segmentation classes of all tasks are pooled behind one shared background
(``["background", "<task>/<class>", …]``); classification classes are pooled as
``"<task>/<class>"``. A task's prediction uses only its own classes' logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lorkd_pl.models.backbones import build_module, feature_channels, make_head
from lorkd_pl.models.base import TaskModule
from lorkd_pl.models.losses import TaskLoss

DEFAULT_SEG_BACKBONE: dict[str, Any] = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 16,
        "channels": [16, 32, 64],
        "strides": [2, 2],
    },
}


def union_label_space(tasks: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[int]]]:
    """Pooled class names and, per task, the pooled index of each of its classes.

    Segmentation tasks share class 0 (background); classification tasks keep all their classes.
    """
    if tasks[0]["kind"] == "seg3d":
        names, channels = ["background"], []
        for task in tasks:
            channels.append([0, *range(len(names), len(names) + len(task["classes"]) - 1)])
            names += [f"{task['name']}/{c}" for c in task["classes"][1:]]
        return names, channels
    names, channels = [], []
    for task in tasks:
        channels.append(list(range(len(names), len(names) + len(task["classes"]))))
        names += [f"{task['name']}/{c}" for c in task["classes"]]
    return names, channels


class GeneralistModule(TaskModule):
    """Backbone + one head over the union of all tasks' classes.

    Args:
        task_info: task descriptions (linked from the data module's ``task_info``).
        regions: region names (linked from the data module; unused by the network, kept for reports).
        backbone: ``{"class_path", "init_args"}`` of the backbone (features ``F``).
        in_channels: image channels (for probing the feature width).
        optimizer, lr, weight_decay, warmup_steps, sw_overlap, sw_batch_size, nonfinite_loss: see
            :class:`TaskModule`.
    """

    def __init__(
        self,
        task_info: list[dict[str, Any]] | None = None,
        regions: list[str] | None = None,
        backbone: dict[str, Any] | None = None,
        in_channels: int = 1,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 4,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        self.backbone = build_module(backbone or DEFAULT_SEG_BACKBONE)
        width = feature_channels(self.backbone, self.kind, in_channels)
        self.union_classes, self.task_channels = union_label_space(self.tasks)
        self.head = make_head(self.kind, width, len(self.union_classes))
        self.loss = TaskLoss(self.kind)

    def features(self, images: Tensor) -> Tensor:
        """Backbone features ``(N, F, *S)`` or ``(N, F)`` of images ``(N, C, *S)``."""
        return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        """Union logits ``(N, K_union, *S)`` / ``(N, K_union)`` of images ``(N, C, *S)``."""
        return self.head(self.backbone(images))

    def task_logits(self, images: Tensor, task: int) -> Tensor:
        """The task's channels of the union logits: ``(N, C, *S)`` → ``(N, K_task, *S)`` / ``(N, K_task)``."""
        return self(images)[:, self.task_channels[task]]

    def union_labels(self, label: Tensor, task: Tensor) -> Tensor:
        """Task-local labels → union labels, per sample.

        Args:
            label: ``(N, 1, *S)`` or ``(N,)`` task-local class indices.
            task: ``(N,)`` task index of every sample.
        """
        out = torch.empty_like(label)
        for t in task.unique().tolist():
            lookup = torch.tensor(self.task_channels[t], device=label.device)
            rows = task == t
            out[rows] = lookup[label[rows]]
        return out

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Loss on the union label space (task-local labels mapped to union channels); a scalar."""
        logits = self(batch["image"])
        labels = self.union_labels(batch["label"], batch["task"])
        loss = self.guard_loss(
            self.loss(logits, labels),
            batch,
            batch_idx,
            lambda: self._task_losses(logits, labels, batch["task"]),
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    @torch.no_grad()
    def _task_losses(self, logits: Tensor, labels: Tensor, task: Tensor) -> dict[tuple[int, str], Tensor]:
        """The union loss of each task's samples alone (only computed to name a non-finite culprit)."""
        return {
            (t, "task_loss"): self.loss(logits[task == t], labels[task == t]) for t in task.unique().tolist()
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the checkpoint as a generalist (a teacher for LoRKD) and store its union classes."""
        checkpoint["lorkd_pl_model"] = type(self).__name__
        checkpoint["union_classes"] = list(self.union_classes)
