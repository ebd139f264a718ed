"""The deployable networks: what a trained module becomes for one region (or for routing).

:class:`ExpertNetwork` (a region's expert merged into ``W0``, with its tasks' heads),
:class:`GeneralistNetwork` (a generalist's chosen tasks), the router network (``W0`` and the region
classifier), the card of each (:mod:`lorkd_pl.deploy.card`), and rebuilding the training module from a
checkpoint (``weights_only=True``, through :func:`lorkd_pl.models.restore.restore_module`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lorkd_pl.deploy.card import CardError, ExpertCard, RouterCard, package_versions
from lorkd_pl.experts import merge_expert, strip_experts
from lorkd_pl.io.checkpoints import CheckpointError, load_checkpoint_file
from lorkd_pl.models.backbones import count_parameters
from lorkd_pl.models.base import TaskModule
from lorkd_pl.models.generalist import GeneralistModule
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.restore import restore_module
from lorkd_pl.models.router import RouterNetwork

#: The training modules a checkpoint may be deployed from.
DEPLOYABLE_MODULES: tuple[type[TaskModule], ...] = (LoRKDModule, GeneralistModule)


class ExportError(ValueError):
    """A checkpoint cannot be exported (wrong kind, unknown region, existing output)."""


class ExpertNetwork(nn.Module):
    """A merged backbone and the heads of one region's tasks.

    Shapes:
        ``(N, C, *S) → tuple`` of one ``(N, K_task, *S)`` (seg3d) or ``(N, K_task)`` (cls2d) per task.
    """

    def __init__(self, backbone: nn.Module, heads: list[nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """``images`` ``(N, C, *S)`` → one logits tensor per task."""
        features = self.backbone(images)
        return tuple(head(features) for head in self.heads)


class GeneralistNetwork(nn.Module):
    """A generalist's backbone and union head, answering with the chosen tasks' channels.

    Shapes:
        ``(N, C, *S) → tuple`` of one ``(N, K_task, *S)`` / ``(N, K_task)`` per chosen task.
    """

    def __init__(self, generalist: GeneralistModule, tasks: Sequence[int]) -> None:
        super().__init__()
        self.backbone, self.head = generalist.backbone, generalist.head
        self.channels = [list(generalist.task_channels[t]) for t in tasks]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """``images`` ``(N, C, *S)`` → one logits tensor per chosen task (one backbone forward)."""
        logits = self.head(self.backbone(images))
        return tuple(logits[:, channels] for channels in self.channels)


def load_module(
    checkpoint: str | Path, accept: Sequence[type[TaskModule]] = DEPLOYABLE_MODULES
) -> tuple[TaskModule, dict[str, Any]]:
    """Rebuild a generalist or LoRKD student from a checkpoint (``weights_only=True``; no teacher).

    Raises:
        ExportError: if the file is missing, unsafe, or not a lorkd-pl checkpoint of an accepted kind.
    """
    try:
        data = load_checkpoint_file(checkpoint)
        return restore_module(data, checkpoint, accept), data
    except CheckpointError as error:
        raise ExportError(str(error)) from None


def load_student(checkpoint: str | Path) -> tuple[LoRKDModule, dict[str, Any]]:
    """Rebuild a LoRKD student from a checkpoint (see :func:`load_module`)."""
    student, data = load_module(checkpoint, (LoRKDModule,))
    assert isinstance(student, LoRKDModule)
    return student, data


def region_tasks(module: TaskModule, region: str | None) -> list[int]:
    """Indices of ``region``'s tasks (all tasks for ``None``).

    Raises:
        ExportError: for a region the module was not trained for, listing its regions.
    """
    if region is not None and region not in module.regions:
        raise ExportError(f"unknown region {region!r}; this checkpoint's regions are {module.regions}")
    return [i for i, t in enumerate(module.tasks) if region is None or t["region"] == region]


def expert_network(student: LoRKDModule, region: str) -> tuple[ExpertNetwork, list[dict[str, Any]]]:
    """The plain network of ``region`` and the descriptions of its tasks (in output order): the region's
    expert merged into the shared weights, or for a plain-KD student (``experts: false``) its one
    backbone, which every region shares."""
    tasks = region_tasks(student, region)
    if student.hparams.get("experts", True):
        backbone = merge_expert(student.student, student.regions.index(region))
    else:
        backbone = copy.deepcopy(student.student)
    heads = [copy.deepcopy(student.heads[i]) for i in tasks]
    return ExpertNetwork(backbone, heads).eval(), [student.tasks[i] for i in tasks]


def router_network(student: LoRKDModule) -> RouterNetwork:
    """The student's region router as a plain network: the shared weights ``W0`` (every expert
    dropped) and the router, ``(N, C, *S) → (N, R)`` region logits, equal to
    :meth:`~lorkd_pl.models.lorkd.LoRKDModule.router_logits`.

    Raises:
        ExportError: if the student was trained without a router.
    """
    if student.router is None:
        raise ExportError(
            "this checkpoint has no region router; train with model.init_args.router_weight > 0 (e.g. 0.1) "
            "to route inputs by their content (--region auto)"
        )
    shared = strip_experts(student.student) if student.hparams.get("experts", True) else student.student
    return RouterNetwork(
        copy.deepcopy(shared), copy.deepcopy(student.router), student.router_taps, student.router_grid_taps
    ).eval()


def router_card(student: LoRKDModule, network: nn.Module, source: dict[str, Any] | None = None) -> RouterCard:
    """The card of :func:`router_network`: regions in output order and each region's input pipeline
    (its first task's, as in its expert's card)."""
    pipelines = {}
    for region in student.regions:
        task = student.tasks[region_tasks(student, region)[0]]
        card = ExpertCard.from_module(student, [task], region, 0)
        pipelines[region] = card.preprocessing
    return RouterCard(
        kind=student.kind,
        regions=list(student.regions),
        preprocessing=pipelines,
        backbone=dict(student.hparams.backbone) if student.hparams.get("backbone") else {},
        taps=list(student.router_taps),
        grid_taps=list(student.router_grid_taps),
        parameters=count_parameters(network),
        source_checkpoint=dict(source or {}),
        versions=package_versions(),
    )


def deployable(
    module: TaskModule, region: str | None, source: dict[str, Any] | None = None
) -> tuple[nn.Module, ExpertCard]:
    """The network to run for ``region`` and its card: a merged expert, or a generalist's tasks.

    Args:
        module: a LoRKD student (``region`` required) or a generalist (``region`` optional: its tasks).
        region: the region.
        source: ``{"path", "sha256"}`` of the checkpoint, for the card.

    Raises:
        ExportError: for a missing or unknown region.
    """
    if isinstance(module, LoRKDModule):
        if region is None:
            raise ExportError(
                f"a LoRKD checkpoint holds one expert per region {module.regions}: give --region"
            )
        network, tasks = expert_network(module, region)
    else:
        assert isinstance(module, GeneralistModule)
        indices = region_tasks(module, region)
        network, tasks = GeneralistNetwork(module, indices).eval(), [module.tasks[i] for i in indices]
    try:
        card = ExpertCard.from_module(module, tasks, region, count_parameters(network), source)
    except CardError as error:
        raise ExportError(str(error)) from None
    return network, card


def student_parameters(student: LoRKDModule) -> int:
    """Parameters of a LoRKD student's W0, experts and heads: the region router's classifier apart."""
    return count_parameters(student) - (count_parameters(student.router) if student.router is not None else 0)
