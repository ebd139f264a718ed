"""What the generalist teacher and the LoRKD student share: tasks, evaluation, metrics, optimiser.

Both are trained on the batches of :class:`~lorkd_pl.data.datamodule.MultiRegionDataModule` and
evaluated per task: segmentation by sliding-window inference on whole volumes (Gaussian weighting)
and Dice per class (torchmetrics ``DiceScore``, background excluded); classification by accuracy and
macro AUROC. Metrics are logged as ``<stage>/<task>/<metric>``, their means over tasks as
``<stage>/mean_<metric>``, and ``<stage>/score`` (mean Dice or mean accuracy) for checkpointing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from monai.inferers import sliding_window_inference
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC
from torchmetrics.segmentation import DiceScore

from lorkd_pl.checks import check_class_aliases, check_ranges
from lorkd_pl.evaluation.summaries import segmentation_case, task_summary
from lorkd_pl.io.atomic import write_json_atomic
from lorkd_pl.io.compatibility import check_compatible
from lorkd_pl.registry import DEFAULT_METRICS


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf training loss; the message names the step, task, region and loss term."""


TASK_FIELDS: tuple[str, ...] = ("name", "region", "kind", "classes", "patch_size")
OPTIONAL_TASK_FIELDS: tuple[str, ...] = (
    "teacher_classes",
    "class_aliases",
    "modality",
    "spacing",
    "nsd_tolerance",
    "metrics",
)


def check_tasks(
    tasks: Sequence[Mapping[str, Any]] | None, regions: Sequence[str] | None
) -> tuple[list[dict], list[str]]:
    """Validate the run description linked from the data module (plain dicts, as in hparams)."""
    if not tasks or not regions:
        raise ValueError(
            "the model needs `tasks` and `regions`; with the CLI they come from the data module "
            "(data.tasks); in Python pass data.task_info and data.regions"
        )
    out = []
    for task in tasks:
        missing = [f for f in TASK_FIELDS if f not in task]
        if missing:
            raise ValueError(f"task description {task} lacks {missing}")
        if task["region"] not in regions:
            raise ValueError(
                f"task {task['name']!r} has region {task['region']!r}, not among regions {list(regions)}"
            )
        check_class_aliases(task["name"], task["kind"], task["classes"], task.get("class_aliases"))
        out.append({k: task[k] for k in TASK_FIELDS + OPTIONAL_TASK_FIELDS if k in task})
    kinds = {t["kind"] for t in out}
    if len(kinds) != 1:
        raise ValueError(f"one model trains one task kind, got {sorted(kinds)}")
    return out, list(regions)


def task_metrics(task: Mapping[str, Any]) -> MetricCollection:
    """Metrics of one task: Dice per foreground class (seg3d) or accuracy and macro AUROC (cls2d).

    Only the task's ``metrics`` (default: all of its kind) are built; the kind's first metric (its
    score) always is.
    """
    classes = len(task["classes"])
    available = DEFAULT_METRICS[task["kind"]]
    wanted = {available[0], *(task.get("metrics") or available)}
    builders = {
        "dice": lambda: DiceScore(
            num_classes=classes, include_background=False, average="none", input_format="index"
        ),
        "accuracy": lambda: MulticlassAccuracy(num_classes=classes, average="micro"),
        "auroc": lambda: MulticlassAUROC(num_classes=classes, average="macro"),
    }
    return MetricCollection({name: builders[name]() for name in available if name in wanted})


@dataclass
class StepLoss:
    """A training batch's loss and its parts, computed without side effects (no logging, no state).

    Attributes:
        loss: the scalar to minimise.
        terms: ``{(task index, term name): scalar}``: each task's terms, to name a non-finite culprit.
        logged: ``{metric name: scalar}``: the parts a training step logs.
        deferred_terms: more terms, computed only when asked for (:meth:`named_terms`): terms the
            loss computed for several tasks at once (KD), recomputed per task to name a culprit.
    """

    loss: Tensor
    terms: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    logged: dict[str, Tensor] = field(default_factory=dict)
    deferred_terms: Callable[[], dict[tuple[int, str], Tensor]] | None = None

    def named_terms(self) -> dict[tuple[int, str], Tensor]:
        """:attr:`terms` and the deferred ones (computed now, without gradient)."""
        if self.deferred_terms is None:
            return self.terms
        with torch.no_grad():
            return self.terms | self.deferred_terms()


class TaskModule(L.LightningModule):
    """Base of :class:`GeneralistModule` and :class:`LoRKDModule`.

    Subclasses implement :meth:`task_logits` (images of one task → that task's logits) and
    ``training_step``. Their ``__init__`` lists every argument below in its own signature (these are
    the config keys ``model.init_args.*``) and calls ``super().__init__()`` with nothing: the base
    records the hyper-parameters from the subclass's frame and reads them from ``self.hparams``.

    Args:
        task_info: task descriptions ``{"name", "region", "kind", "classes", "patch_size"}`` (linked
            from the data module's ``task_info``).
        regions: region names in expert order (linked from the data module).
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9, Nesterov off).
        lr: peak learning rate; ``weight_decay``: decoupled (AdamW) or L2 (SGD) weight decay.
        warmup_steps: linear warm-up steps, then cosine decay to 0 over the run.
        sw_overlap: sliding-window overlap for 3D evaluation; ``sw_batch_size``: windows per forward.
        nonfinite_loss: a NaN/inf training loss raises :class:`NonFiniteLossError` naming the step,
            region, task and loss term (``"raise"``), or the batch contributes zero gradient and
            ``train/nonfinite_skipped`` counts it (``"skip"``). All processes decide together.
    """

    #: Hyper-parameters replaced when a trained module is rebuilt from its checkpoint
    #: (:func:`~lorkd_pl.models.restore.restore_module`): none here.
    restore_overrides: Mapping[str, Any] = {}

    def __init__(self) -> None:
        super().__init__()
        # torchgeo's pattern: the subclass's own signature holds every argument (the config keys);
        # this call records all of them from the subclasses' frames, nothing is passed up by position
        self.save_hyperparameters()
        hparams = self.hparams
        if hparams.get("nonfinite_loss", "raise") not in ("raise", "skip"):
            raise ValueError(
                f"model.nonfinite_loss must be 'raise' or 'skip', got {hparams['nonfinite_loss']!r}"
            )
        check_ranges(
            hparams,
            "model.init_args.",
            [
                ("lr", lambda v: v > 0, "> 0 (0 trains nothing)"),
                ("weight_decay", lambda v: v >= 0, ">= 0"),
                ("warmup_steps", lambda v: v >= 0, "an integer >= 0"),
                ("sw_overlap", lambda v: 0 <= v < 1, "in [0, 1) (1 would never move the window)"),
                ("sw_batch_size", lambda v: v >= 1, "an integer >= 1 (windows per forward)"),
                ("in_channels", lambda v: v >= 1, "an integer >= 1"),
            ],
        )
        self.tasks, self.regions = check_tasks(hparams.get("task_info"), hparams.get("regions"))
        self.nonfinite_skipped = 0
        self.kind: str = self.tasks[0]["kind"]
        self.val_metrics = nn.ModuleList([task_metrics(t) for t in self.tasks])
        self.test_metrics = nn.ModuleList([task_metrics(t) for t in self.tasks])
        self._test_cases: list[list[dict[str, Any]]] = [[] for _ in self.tasks]

    # ------------------------------------------------------------------ to implement
    def task_logits(self, images: Tensor, task: int) -> Tensor:
        """Logits of task ``task`` for images of that task.

        Args:
            images: ``(N, C, *S)``.
            task: task index.

        Returns:
            ``(N, K_task, *S)`` (seg3d) or ``(N, K_task)`` (cls2d).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint made for other tasks/regions before its weights are loaded.

        Raises:
            CheckpointError: naming the checkpoint's tasks and regions and this run's.
        """
        check_compatible("the checkpoint", checkpoint.get("hyper_parameters") or {}, self.tasks, self.regions)

    def compute_loss(self, batch: Mapping[str, Any]) -> StepLoss:
        """The training loss of ``batch`` and its parts, with no side effect: what ``training_step``
        optimises and what a diagnostic (:mod:`lorkd_pl.models.conflicts`) differentiates.

        Args:
            batch: ``image`` ``(N, C, *S)``, ``label``, ``task`` ``(N,)``, ``region`` ``(N,)``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ non-finite losses
    def guard_loss(
        self,
        loss: Tensor,
        batch: Mapping[str, Any],
        batch_idx: int,
        terms: Callable[[], Mapping[tuple[int, str], Tensor]],
    ) -> Tensor:
        """Return ``loss`` if it is finite on every process; otherwise raise or skip (``nonfinite_loss``).

        One scalar check per step (and one all-reduce under DDP, so all processes raise or skip
        together instead of leaving the others waiting in the gradient all-reduce).

        Args:
            loss: the scalar training loss.
            batch: the training batch (``image`` ``(N, C, *S)``, ``label``, ``task`` ``(N,)``).
            batch_idx: index of the batch in the epoch.
            terms: called only on failure: ``{(task index, term name): scalar}``, to name the culprit.
        """
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bad.item():
            return loss
        culprits = [
            f"{term} of task {self.tasks[task]['name']!r} (region {self.tasks[task]['region']!r}) = "
            f"{float(value.detach())}"
            for (task, term), value in terms().items()
            if not torch.isfinite(value.detach()).all()
        ]
        inputs = sorted(
            {
                f"{self.tasks[int(t)]['name']!r} (region {self.tasks[int(t)]['region']!r})"
                for t, image in zip(batch["task"].tolist(), batch["image"], strict=True)
                if not torch.isfinite(image).all()
            }
        )
        message = (
            f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}): {'; '.join(culprits) or 'on another process'}"
            + (f". Images with NaN/inf voxels in this batch: tasks {', '.join(inputs)}" if inputs else "")
            + ". Fix: check the data (keep data.validate=true), lower model.init_args.lr or add "
            "warmup_steps, prefer bf16-mixed over 16-mixed; or set model.init_args.nonfinite_loss=skip"
        )
        if self.hparams.get("nonfinite_loss", "raise") == "raise":
            raise NonFiniteLossError(message)
        self.nonfinite_skipped += 1
        rank_zero_warn(f"lorkd-pl: skipped batch: {message}")
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=len(batch["task"]))
        # zero gradient for every trainable parameter: under DDP all of them still join the all-reduce
        return sum(0.0 * p.sum() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ inference
    def predict_logits(self, images: Tensor, task: int) -> Tensor:
        """Whole-input logits: sliding windows over volumes (seg3d) or a direct forward (cls2d).

        Args:
            images: ``(N, C, *S)`` whole volumes (any size ≥ 1 voxel) or 2D images.
            task: task index.

        Returns:
            ``(N, K_task, *S)`` (seg3d) or ``(N, K_task)`` (cls2d).
        """
        if self.kind != "seg3d":
            return self.task_logits(images, task)
        return sliding_window_inference(
            images,
            roi_size=tuple(self.tasks[task]["patch_size"]),
            sw_batch_size=self.hparams.sw_batch_size,
            predictor=lambda windows: self.task_logits(windows, task),
            overlap=self.hparams.sw_overlap,
            mode="gaussian",
        )

    def _evaluate(self, batch: Mapping[str, Any], task: int, metrics: nn.ModuleList) -> Tensor:
        logits = self.predict_logits(batch["image"], task)
        label = batch["label"]
        if self.kind == "seg3d":
            metrics[task].update(logits.argmax(1), label[:, 0])
        else:
            metrics[task].update(logits.float().softmax(1), label)
        return logits

    def _log_metrics(self, stage: str, metrics: nn.ModuleList) -> dict[str, float]:
        values: dict[str, float] = {}
        means: dict[str, list[float]] = {}
        for task, collection in zip(self.tasks, metrics, strict=True):
            for name, value in collection.compute().items():
                value = value.float()
                if value.ndim:  # per-class Dice: log each class and their mean
                    for class_name, v in zip(task["classes"][1:], value.tolist(), strict=True):
                        values[f"{stage}/{task['name']}/{name}_{class_name}"] = v
                    value = value.nanmean()
                values[f"{stage}/{task['name']}/{name}"] = float(value)
                means.setdefault(name, []).append(float(value))
            collection.reset()
        for name, items in means.items():
            values[f"{stage}/mean_{name}"] = sum(items) / len(items)
        primary = "dice" if self.kind == "seg3d" else "accuracy"
        values[f"{stage}/score"] = values[f"{stage}/mean_{primary}"]
        # torchmetrics already reduced across processes, so every rank holds the same values; the
        # all-reduce of identical values is a no-op that keeps Lightning's per-key DDP warning away
        self.log_dict(values, sync_dist=True)
        return values

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update the metrics of task ``dataloader_idx`` (one loader per task) with ``batch``."""
        self._evaluate(batch, dataloader_idx, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<task>/<metric>``, their means and ``val/score``."""
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update task ``dataloader_idx``'s metrics and keep per-case rows for the summaries."""
        logits = self._evaluate(batch, dataloader_idx, self.test_metrics)
        task = self.tasks[dataloader_idx]
        cases = batch.get("case") or [f"{batch_idx}_{i}" for i in range(len(logits))]
        if self.kind == "seg3d":
            prediction, label = logits.argmax(1).cpu(), batch["label"][:, 0].cpu()
            for i, case in enumerate(cases):
                self._test_cases[dataloader_idx].append(
                    segmentation_case(case, prediction[i], label[i], task)
                )
        else:
            probabilities = logits.float().softmax(1).cpu()
            for i, case in enumerate(cases):
                self._test_cases[dataloader_idx].append(
                    {"case": case, "probabilities": probabilities[i], "label": int(batch["label"][i])}
                )

    def on_test_epoch_start(self) -> None:
        """Forget the per-case rows of an earlier test run."""
        self._test_cases = [[] for _ in self.tasks]

    def on_test_epoch_end(self) -> None:
        """Log ``test/...`` metrics and write ``<log_dir>/summary/<task>.json``."""
        self._log_metrics("test", self.test_metrics)
        self._write_summaries()

    def _write_summaries(self) -> None:
        """``<log_dir>/summary/<task>.json`` per task (nnU-Net style), all processes' cases gathered."""
        cases = self._test_cases
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, cases)
            cases = [[row for part in gathered for row in part[t]] for t in range(len(self.tasks))]
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        if not self.trainer.is_global_zero or log_dir is None:
            return
        for task, rows in zip(self.tasks, cases, strict=True):
            write_json_atomic(
                Path(log_dir) / "summary" / f"{task['name']}.json", task_summary(task, rows), nan="keep"
            )

    # ------------------------------------------------------------------ optimisation
    def steady_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at the peak learning rate to the end (after the warm-up), outside the
        cosine decay: heads that must keep up with features that move until the last step (the region
        router of :class:`~lorkd_pl.models.lorkd.LoRKDModule`). None by default."""
        return []

    def steady_learning_rate(self) -> float:
        """The peak learning rate of :meth:`steady_parameters` (default: ``lr``)."""
        return float(self.hparams.lr)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW or SGD over the trainable parameters; linear warm-up then cosine decay, per step
        (:meth:`steady_parameters`: warm-up, then the peak rate)."""
        steady = [p for p in self.steady_parameters() if p.requires_grad]
        held = {id(p) for p in steady}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in held]}]
        if steady:
            groups.append({"params": steady, "lr": self.steady_learning_rate()})
        if self.hparams.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total - 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        def steady_schedule(step: int) -> float:
            return (step + 1) / (warmup + 1) if step < warmup else 1.0

        schedules = [schedule, steady_schedule][: len(groups)]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
