"""The generalist: one network trained on all regions pooled, in the union label space.

It is the demo's foundation model (the teacher lorkd-pl distils) and the paper's single-model
baseline. Segmentation classes of all tasks are pooled behind one shared background
(``["background", "<task>/<class>", …]``); classification classes are pooled as
``"<task>/<class>"``; a class with a declared alias (``class_aliases``) shares the alias's channel with
the other tasks that declare it. A task's prediction uses only its own classes' logits.

Training is partial-label: every dataset annotates only its own task's classes, so a sample is
supervised on its task's channels alone — softmax, cross-entropy and Dice restricted to them (the
shared background included). Another task's classes are neither positives nor negatives on it: their
channels get exactly zero gradient from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lorkd_pl.models.backbones import build_module, feature_channels, make_head
from lorkd_pl.models.base import StepLoss, TaskModule
from lorkd_pl.models.losses import TaskLoss, supervision_levels
from lorkd_pl.models.teacher.class_mapping import union_class_name

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
    """Pooled class names and, per task, the pooled index of each of its classes (in task order).

    Segmentation tasks share class 0 (``"background"``). Every other class is its own channel
    ``"<task>/<class>"``, unless the task's ``class_aliases`` give it a shared name: classes of
    different tasks with one shared name are one channel (named by it). Names never match by spelling.
    """
    names: list[str] = ["background"] if tasks[0]["kind"] == "seg3d" else []
    channels = []
    for task in tasks:
        aliases = task.get("class_aliases") or {}
        own = [0] if names and names[0] == "background" else []
        for name in task["classes"][len(own) :]:
            pooled = union_class_name(task["name"], name, aliases)
            if pooled not in names:
                names.append(pooled)
            own.append(names.index(pooled))
        channels.append(own)
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
        width = feature_channels(self.backbone, in_channels, self.tasks[0]["patch_size"])
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

    def partial_label_losses(self, logits: Tensor, label: Tensor, task: Tensor) -> dict[int, Tensor]:
        """The loss of each task present, on its own samples and its own channels only.

        Args:
            logits: ``(N, K_union, *S)`` or ``(N, K_union)`` union logits.
            label: ``(N, 1, *S)`` or ``(N,)`` task-local class indices.
            task: ``(N,)`` task index of every sample.

        Returns:
            ``{task index: scalar}``: Dice + CE (or CE) of the task's logits
            ``logits[rows][:, task_channels[t]]`` against its task-local labels.
        """
        losses = {}
        for t in task.unique().tolist():
            rows = (task == t).nonzero().squeeze(1)
            channels = torch.tensor(self.task_channels[t], device=logits.device)
            task_logits = logits.index_select(0, rows).index_select(1, channels)
            losses[t] = self.loss(task_logits, label.index_select(0, rows))
        return losses

    def compute_loss(self, batch: Mapping[str, Any]) -> StepLoss:
        """Partial-label loss: each task's loss on its samples and channels, weighted by its share of
        the batch (with deep supervision: summed over the levels, :func:`supervision_levels`)."""
        task = batch["task"]
        losses: dict[int, Tensor] = {}
        for weight, features in supervision_levels(self.backbone(batch["image"]), batch["image"]):
            for t, value in self.partial_label_losses(self.head(features), batch["label"], task).items():
                losses[t] = losses.get(t, 0.0) + weight * value
        total = sum(float((task == t).sum()) / task.numel() * value for t, value in losses.items())
        return StepLoss(total, {(t, "task_loss"): value for t, value in losses.items()})

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """:meth:`compute_loss`, checked for non-finite values (``guard_loss``) and logged; a scalar."""
        step = self.compute_loss(batch)
        loss = self.guard_loss(step.loss, batch, batch_idx, step.named_terms)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the checkpoint as a generalist (a teacher for LoRKD) and store its union classes."""
        checkpoint["lorkd_pl_model"] = type(self).__name__
        checkpoint["union_classes"] = list(self.union_classes)
