"""Loading a frozen teacher (foundation model) for distillation.

Sources, chosen by what ``path`` is:

* a lorkd-pl :class:`~lorkd_pl.models.generalist.GeneralistModule` checkpoint (``.ckpt``): its union
  classes give every task's teacher channels by task name;
* a TorchScript file (``torch.jit.save``), loaded only from the path the user names;
* a MONAI bundle folder (``configs/inference.json|yaml`` with ``network_def``, ``models/model.pt``);
* any other checkpoint (a state dict, or a Lightning checkpoint's ``state_dict``) together with
  ``model: {class_path, init_args}`` describing the network.

Every load uses ``torch.load(weights_only=True)``. The teacher is frozen (``requires_grad_(False)``,
``eval()``), run under ``no_grad``, and never part of the student's checkpoint: its path and sha256 are
recorded instead. A student task's classes are mapped onto the teacher's channels BY NAME
(:mod:`lorkd_pl.models.class_mapping`): declared in the task's ``teacher_classes``, or for a generalist
teacher through its same-named task; tasks without a mapping get no logit KD.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorkd_pl.io.checkpoints import CheckpointError, load_checkpoint_file
from lorkd_pl.io.hashing import sha256sum
from lorkd_pl.io.trust import (
    ENV_TRUST_BUNDLE_CODE,
    UntrustedFileError,
    bundle_code_trusted,
    check_downloads,
    resolve_network_class,
)
from lorkd_pl.models.backbones import build_module
from lorkd_pl.models.class_mapping import (
    ClassChannels,
    ClassMappingError,
    flat_channels,
    map_task_classes,
    select_classes,
)


class TeacherError(ValueError):
    """A teacher cannot be loaded or does not fit the tasks."""


class Teacher(nn.Module):
    """A frozen network and, per task name, the teacher channels of each of that task's classes.

    Args:
        network: maps images ``(N, C, *S)`` to logits ``(N, K_teacher, *S)`` / ``(N, K_teacher)``.
        class_channels: task name → one tuple of teacher channels per class of the task, in the
            task's class order (several channels: a declared merge).
        source: where it was loaded from; ``sha256``: the file's digest.
        feature_width: the width of :meth:`features`, for teachers that expose features.
    """

    def __init__(
        self,
        network: nn.Module,
        class_channels: Mapping[str, Sequence[Sequence[int]]],
        source: str,
        sha256: str,
        feature_width: int | None = None,
    ) -> None:
        super().__init__()
        for parameter in network.parameters():  # (ScriptModules lack requires_grad_)
            parameter.requires_grad_(False)
        self.network = network.eval()
        self.class_channels: ClassChannels = {k: [tuple(g) for g in v] for k, v in class_channels.items()}
        self.source, self.sha256 = source, sha256
        self.feature_width = feature_width
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """A teacher always stays in eval mode (dropout off, norms frozen)."""
        return super().train(False)

    @torch.no_grad()
    def check_channels(self, example: Tensor) -> None:
        """Check the class mapping against the teacher's real output width (one probe forward).

        Args:
            example: ``(1, C, *S)`` an input of the tasks' shape (e.g. zeros of a training patch).

        Raises:
            TeacherError: naming the tasks whose mapped channels the teacher does not output.
        """
        width = int(self.network(example).shape[1])
        bad = {
            task: [c for c in flat_channels(groups) if not 0 <= c < width]
            for task, groups in self.class_channels.items()
        }
        bad = {task: channels for task, channels in bad.items() if channels}
        if bad:
            raise TeacherError(
                f"teacher {self.source} outputs {width} channels, but the class mapping points tasks to "
                f"channels it does not have: {bad}; fix teacher_classes in those tasks' specs "
                f"(class name -> teacher channel 0..{width - 1}, or a list of them: a merge)"
            )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Teacher logits ``(N, K_teacher, *S)`` / ``(N, K_teacher)`` of ``images`` ``(N, C, *S)``."""
        return self.network(images)

    def task_logits(self, logits: Tensor, task: str) -> Tensor:
        """The teacher's logits of one task's classes, in the task's class order.

        Args:
            logits: ``(N, K_teacher, *S)`` / ``(N, K_teacher)`` teacher logits.
            task: a task name with a class mapping.

        Returns:
            ``(N, K_task, *S)`` / ``(N, K_task)`` (merged classes as ``logsumexp``).
        """
        return select_classes(logits, self.class_channels[task])

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Teacher features ``(N, F, *S)`` / ``(N, F)`` of ``images`` ``(N, C, *S)`` (teachers that expose
        them, e.g. a generalist)."""
        if not hasattr(self.network, "features"):
            raise TeacherError(f"teacher {self.source} exposes no features; use kd='logits'")
        return self.network.features(images)


def _class_channels(tasks: Sequence[Mapping[str, Any]], source: Path, **teacher: Any) -> ClassChannels:
    try:
        return map_task_classes(tasks, str(source), **teacher)
    except ClassMappingError as error:
        raise TeacherError(f"teacher class mapping: {error}") from None


def _state_dict(path: Path) -> dict[str, Tensor]:
    try:
        loaded = load_checkpoint_file(path)
    except CheckpointError as error:  # pickle refusals, corrupt files
        raise TeacherError(f"teacher weights: {error}") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise TeacherError(f"teacher weights {path} hold a {type(loaded).__name__}, not a state dict")
    return dict(loaded)


def load_teacher(
    path: str | Path, tasks: Sequence[Mapping[str, Any]], model: Mapping[str, Any] | None = None
) -> Teacher:
    """Load a frozen teacher from ``path`` (see the module docstring) for ``tasks``.

    Raises:
        TeacherError: naming the file and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"teacher not found: {path} (set model.init_args.teacher to a checkpoint)")
    digest = sha256sum(path)
    if path.is_dir():
        network = _load_bundle(path)
        return Teacher(network, _class_channels(tasks, path), str(path), digest)
    if _is_torchscript(path):
        return Teacher(
            torch.jit.load(str(path), map_location="cpu"), _class_channels(tasks, path), str(path), digest
        )
    try:
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as error:
        raise TeacherError(f"teacher: {error}") from None
    from lorkd_pl.models.restore import model_kind, restore_module  # restore imports the student

    if model_kind(checkpoint) == "GeneralistModule":
        try:
            generalist = restore_module(checkpoint, path, accept=("GeneralistModule",))
        except CheckpointError as error:
            raise TeacherError(f"teacher: {error}") from None
        channels = _class_channels(
            tasks,
            path,
            teacher_classes=generalist.union_classes,
            teacher_tasks=generalist.tasks,
            teacher_task_channels=generalist.task_channels,
        )
        width = (
            generalist.head.in_channels
            if hasattr(generalist.head, "in_channels")
            else generalist.head.in_features
        )
        return Teacher(generalist, channels, str(path), digest, feature_width=width)
    if model is None:
        raise TeacherError(
            f"teacher {path} is a plain checkpoint: also give model.init_args.teacher_model "
            "{class_path, init_args} describing its network"
        )
    network = build_module(model)
    network.load_state_dict(_state_dict(path))
    return Teacher(network, _class_channels(tasks, path), str(path), digest)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _check_bundle_network(parser: Any, config: Path) -> None:
    """Refuse a bundle whose ``network_def`` (with everything it references) names anything but a
    trusted network class (``_target_``, resolved here without walking attributes and written back as
    its full name, so MONAI's own lookup cannot resolve it differently), holds a ``$`` expression (unless
    ``$LORKD_PL_TRUST_BUNDLE_CODE=1``), a ``%`` macro, ``_requires_`` or a ``_mode_`` other than default.

    Raises:
        TeacherError: naming the config file, the entry and the fix.
    """
    seen: set[str] = set()

    def visit(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, f"{where}::{key}")
            if "_requires_" in node or node.get("_mode_", "default") != "default":
                raise TeacherError(
                    f"MONAI bundle config {config}: {where} uses _requires_ or _mode_ "
                    f"({node.get('_mode_', '')!r}), which run code or a debugger; remove them"
                )
            target = node.get("_target_")
            if isinstance(target, str) and not target.startswith("$"):
                source = f"MONAI bundle config {config} ({where})"
                try:
                    check_downloads(node, source)
                    # MONAI's short names (``UNet``) are its networks
                    cls = resolve_network_class(
                        target if "." in target else f"monai.networks.nets.{target}", source
                    )
                    node["_target_"] = f"{cls.__module__}.{cls.__qualname__}"
                except UntrustedFileError as error:
                    raise TeacherError(str(error)) from None
        elif isinstance(node, (list, tuple)):
            for index, item in enumerate(node):
                visit(item, f"{where}::{index}")
        elif isinstance(node, str) and node.startswith("$") and not bundle_code_trusted():
            raise TeacherError(
                f"MONAI bundle config {config}: {where} is the expression {node!r}; lorkd-pl runs no code "
                f"from a bundle unless you trust it: set {ENV_TRUST_BUNDLE_CODE}=1"
            )
        elif isinstance(node, str) and node.startswith("%"):
            raise TeacherError(
                f"MONAI bundle config {config}: {where} loads another file ({node!r}); put the network "
                "definition in the bundle's own inference config"
            )
        elif isinstance(node, str) and node.startswith("@"):
            reference = node[1:].replace("#", "::")
            if reference not in seen:
                seen.add(reference)
                visit(parser.get(reference), reference)

    visit(parser.config["network_def"], "network_def")


def _load_bundle(folder: Path) -> nn.Module:
    from monai.bundle import ConfigParser

    configs = [folder / "configs" / f"inference.{ext}" for ext in ("json", "yaml", "yml")]
    config = next((c for c in configs if c.is_file()), None)
    weights = folder / "models" / "model.pt"
    if config is None or not weights.is_file():
        raise TeacherError(
            f"MONAI bundle {folder} needs configs/inference.json (or .yaml) with 'network_def' "
            "and models/model.pt"
        )
    parser = ConfigParser()
    parser.read_config(str(config))
    if "network_def" not in parser.config:
        raise TeacherError(f"MONAI bundle config {config} has no 'network_def'")
    _check_bundle_network(parser, config)  # before MONAI imports or evaluates anything of it
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(_state_dict(weights))
    return network
