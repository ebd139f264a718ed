"""Loading a frozen teacher (foundation model) for distillation.

Sources, chosen by what ``path`` is:

* a lorkd-pl :class:`~lorkd_pl.models.generalist.GeneralistModule` checkpoint (``.ckpt``): its union
  classes give every task's teacher channels by task name;
* a TorchScript file (``torch.jit.save``), loaded only from the path the user names (``torch.export``
  archives, ``.pt2``, are refused: ``torch.export.load`` unpickles parts of them);
* a MONAI bundle folder (``configs/inference.json|yaml`` with ``network_def``, ``models/model.pt``);
* an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``, ``fold_<k>/checkpoint_*.pth``):
  its network, classes and pipeline from its own files (:mod:`lorkd_pl.models.teacher.nnunet`);
* any other checkpoint (a state dict, or a Lightning checkpoint's ``state_dict``) together with
  ``model: {class_path, init_args}`` describing the network.

Every load uses ``torch.load(weights_only=True)``. The teacher is frozen (``requires_grad_(False)``,
``eval()``), run under ``no_grad``, and never part of the student's checkpoint: its path and sha256 are
recorded instead. A student task's classes are mapped onto the teacher's channels BY NAME
(:mod:`lorkd_pl.models.teacher.class_mapping`): declared in the task's ``teacher_classes``, through the
teacher's own class names (``teacher.classes``), or for a generalist teacher through its same-named
task; tasks without a mapping get no logit KD. What the teacher outputs (``teacher.output``) decides
how its output becomes a KD target (:mod:`lorkd_pl.models.teacher.outputs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
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
    check_default_downloads,
    check_downloads,
    resolve_network_class,
)
from lorkd_pl.models.backbones import build_module
from lorkd_pl.models.generalist import GeneralistModule
from lorkd_pl.models.restore import model_kind, restore_module
from lorkd_pl.models.teacher.bundle import (
    activation_of,
    bundle_channel_names,
    bundle_config_file,
    check_bundle_config,
)
from lorkd_pl.models.teacher.class_mapping import (
    ClassChannels,
    ClassMappingError,
    flat_channels,
    map_task_classes,
    select_classes,
)
from lorkd_pl.models.teacher.errors import TeacherError
from lorkd_pl.models.teacher.nnunet import folder_digest, folder_of, is_nnunet_folder, load_network
from lorkd_pl.models.teacher.outputs import check_output, target_kind, task_targets
from lorkd_pl.models.teacher.spec import SIGMOID_OUTPUTS, TeacherSpec, parse_teacher

#: Cube sizes tried to tell the user which inputs a teacher accepts, after it rejected one.
PROBE_SIZES: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128)
#: What a network raises for an input it cannot take (TorchScript's ``torch.jit.Error`` is no
#: ``RuntimeError``).
INPUT_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, torch.jit.Error)


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
        output: str = "logits",
        sigmoid_kd: str = "binary",
    ) -> None:
        super().__init__()
        for parameter in network.parameters():  # (ScriptModules lack requires_grad_)
            parameter.requires_grad_(False)
        self.network = network.eval()
        self.class_channels: ClassChannels = {k: [tuple(g) for g in v] for k, v in class_channels.items()}
        self.source, self.sha256 = source, sha256
        self.feature_width = feature_width
        self.output, self.sigmoid_kd = output, sigmoid_kd
        self.target_kind = target_kind(output, sigmoid_kd)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """A teacher always stays in eval mode (dropout off, norms frozen)."""
        return super().train(False)

    def check_width(self, raw: Tensor) -> None:
        """Check the class mapping against the width of an output ``(N, K_teacher, ...)``.

        Raises:
            TeacherError: naming the tasks whose mapped channels the teacher does not output.
        """
        width = int(raw.shape[1])
        bad = {
            task: [c for c in flat_channels(groups) if not 0 <= c < width]
            for task, groups in self.class_channels.items()
        }
        bad = {task: channels for task, channels in bad.items() if channels}
        if bad:
            raise TeacherError(
                f"teacher {self.source} outputs {width} channels, but the class mapping points tasks to "
                f"channels it does not have: {bad}; fix teacher.classes or the tasks' teacher_classes "
                f"(class name -> teacher channel 0..{width - 1}, or a list of them: a merge)"
            )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """The teacher's raw output ``(N, K_teacher, *S)`` / ``(N, K_teacher)`` of ``images`` ``(N, C, *S)``.

        Raises:
            TeacherError: the teacher rejected the input's size, naming the sizes it accepts.
        """
        try:
            return self.network(images)
        except INPUT_ERRORS as error:  # TorchScript / shape errors: one line naming the sizes that work
            raise TeacherError(self._size_message(images, error)) from None

    def _size_message(self, images: Tensor, error: BaseException) -> str:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        first = lines[-1] if isinstance(error, torch.jit.Error) else lines[0]  # TorchScript: cause last
        accepted = []
        for size in PROBE_SIZES:
            probe = images.new_zeros(1, images.shape[1], *[size] * (images.ndim - 2))
            try:
                self.network(probe)
                accepted.append(size)
            except INPUT_ERRORS:
                continue
        shape = "x".join(str(n) for n in images.shape[2:])
        said = (
            f"it accepts inputs of {', '.join(f'{n}^{images.ndim - 2}' for n in accepted)} (of "
            f"{', '.join(str(n) for n in PROBE_SIZES)} tried)"
            if accepted
            else f"it accepted none of the cubes {list(PROBE_SIZES)} either"
        )
        return (
            f"teacher {self.source} rejected an input of size {shape} ({first[:160]}); {said}: set "
            "teacher.divisible (and teacher.roi_size) to sizes it accepts, with teacher.cache for its "
            "own whole-volume pipeline"
        )

    def task_logits(self, logits: Tensor, task: str) -> Tensor:
        """The teacher's logits of one task's classes, in the task's class order (a ``logits``
        teacher; merged classes as ``logsumexp``).

        Args:
            logits: ``(N, K_teacher, *S)`` / ``(N, K_teacher)`` teacher logits.
            task: a task name with a class mapping.

        Returns:
            ``(N, K_task, *S)`` / ``(N, K_task)``.
        """
        return select_classes(logits, self.class_channels[task])

    def targets(self, raw: Tensor, task: str) -> Tensor:
        """The KD target of one task from the teacher's raw output (kind :attr:`target_kind`).

        Args:
            raw: ``(N, K_teacher, *S)`` / ``(N, K_teacher)`` the teacher's output.
            task: a task name with a class mapping.

        Returns:
            ``(N, K_task, *S)`` / ``(N, K_task)`` fp32 log-probabilities or per-class log-odds
            (:func:`lorkd_pl.models.teacher.outputs.task_targets`).
        """
        return task_targets(raw, self.class_channels[task], self.output, self.sigmoid_kd)

    def check_output(self, raw: Tensor) -> str | None:
        """Check a probe output against the class mapping and the declared ``output`` (a warning, or
        None).

        Raises:
            TeacherError: a mapped channel the output lacks, or an output that contradicts the
                declaration (e.g. probabilities not summing to 1).
        """
        self.check_width(raw)
        try:
            return check_output(raw, self.output, self.source)
        except ValueError as error:
            raise TeacherError(str(error)) from None

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Teacher features ``(N, F, *S)`` / ``(N, F)`` of ``images`` ``(N, C, *S)`` (teachers that expose
        them, e.g. a generalist)."""
        if not hasattr(self.network, "features"):
            raise TeacherError(f"teacher {self.source} exposes no features; use kd='logits'")
        return self.network.features(images)


def _class_channels(
    tasks: Sequence[Mapping[str, Any]], source: Path, spec: TeacherSpec, **teacher: Any
) -> ClassChannels:
    if spec.classes is not None and "teacher_classes" not in teacher:
        teacher["teacher_classes"] = spec.classes
    try:
        return map_task_classes(
            tasks, str(source), derived_background=spec.output in SIGMOID_OUTPUTS, **teacher
        )
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
    teacher: str | Path | TeacherSpec | Mapping[str, Any],
    tasks: Sequence[Mapping[str, Any]],
    model: Mapping[str, Any] | None = None,
) -> Teacher:
    """Load a frozen teacher for ``tasks``.

    Args:
        teacher: a path (see the module docstring) or a teacher description
            (:mod:`lorkd_pl.models.teacher.spec`).
        tasks: the student's task descriptions.
        model: ``{class_path, init_args}`` of a plain weights file's network (when the description
            has none).

    Raises:
        TeacherError: naming the file and the fix.
    """
    spec = (
        teacher
        if isinstance(teacher, TeacherSpec)
        else parse_teacher(str(teacher) if isinstance(teacher, Path) else teacher, model)
    )
    path = Path(spec.path)
    if not path.exists():
        raise TeacherError(f"teacher not found: {path} (set model.init_args.teacher to a checkpoint)")
    if is_nnunet_folder(path):
        return _load_nnunet(spec, tasks)
    if spec.nnunet_fields:
        raise TeacherError(
            f"model.init_args.teacher: {', '.join(spec.nnunet_fields)} apply to nnU-Net v2 folders "
            f"(plans.json, dataset.json, fold_<k>/), and {path} is none: remove them"
        )
    digest = sha256sum(path)
    kinds = {"output": spec.output, "sigmoid_kd": spec.sigmoid_kd}
    if path.is_dir():
        network, config = _load_bundle(path)
        named = _bundle_conventions(path, config, spec)
        kinds = {"output": named.output, "sigmoid_kd": named.sigmoid_kd}
        return Teacher(network, _class_channels(tasks, path, named), str(path), digest, **kinds)
    if _is_torchscript(path):
        network = torch.jit.load(str(path), map_location="cpu")
        return Teacher(network, _class_channels(tasks, path, spec), str(path), digest, **kinds)
    if _is_exported_program(path):
        raise TeacherError(
            f"teacher {path} is a torch.export archive (.pt2): torch.export.load unpickles parts of it "
            "with weights_only=False, which can run code, so lorkd-pl does not load it; save the teacher "
            "with torch.jit.save, or as a state dict with teacher.model {class_path, init_args}"
        )
    try:
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as error:
        raise TeacherError(f"teacher: {error}") from None
    if model_kind(checkpoint) == GeneralistModule.__name__:
        if spec.output != "logits":
            raise TeacherError(
                f"teacher {path} is a lorkd-pl generalist, whose output is logits; remove "
                f"model.init_args.teacher.output ({spec.output!r})"
            )
        try:
            generalist = restore_module(checkpoint, path, (GeneralistModule,))
        except CheckpointError as error:
            raise TeacherError(f"teacher: {error}") from None
        channels = _class_channels(
            tasks,
            path,
            spec,
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
    if spec.model is None:
        raise TeacherError(
            f"teacher {path} is a plain checkpoint: also give model.init_args.teacher.model (or "
            "teacher_model) {class_path, init_args} describing its network"
        )
    network = build_module(spec.model)
    network.load_state_dict(_state_dict(path))
    return Teacher(network, _class_channels(tasks, path, spec), str(path), digest, **kinds)


def _bundle_conventions(folder: Path, config: Mapping[str, Any], spec: TeacherSpec) -> TeacherSpec:
    """``spec`` with what the bundle's own files say where the user said nothing: class names from
    ``configs/metadata.json``, a sigmoid output from its postprocessing; a bundle that declares its own
    preprocessing and inferer needs ``cache`` (it runs on whole volumes, once per case)."""
    classes = spec.classes if spec.classes is not None else bundle_channel_names(folder)
    output = spec.output
    if output == "logits" and activation_of(config) == "sigmoid":
        output = "sigmoid_logits"
    own = all(k in config for k in ("preprocessing", "inferer"))
    if own and not spec.own_pipeline and spec.cache is None:
        raise TeacherError(
            f"MONAI bundle {folder} declares its own preprocessing and inferer (its inference config), which "
            "run on whole volumes, once per case: set model.init_args.teacher.cache to a folder for its "
            "targets (or set the pipeline fields yourself: spacing, intensity, ...)"
        )
    return replace(spec, classes=classes, output=output)


def _load_nnunet(spec: TeacherSpec, tasks: Sequence[Mapping[str, Any]]) -> Teacher:
    """An nnU-Net v2 folder's teacher: its folds' networks with mirroring (logits), whose pipeline
    (:class:`~lorkd_pl.models.teacher.pipeline.NnUNetPipeline`) hands its targets probabilities in the
    image's own grid; classes by name from ``dataset.json``."""
    folder = folder_of(spec)
    classes = {name: (value,) for name, value in folder.labels.items()}
    named = replace(spec, classes=classes, output="probabilities")
    seg = [t for t in tasks if t.get("kind") == "seg3d"]  # it segments 3D volumes: the others get no KD
    channels = _class_channels(seg, folder.folder, named)
    if seg and not channels:
        shown = ", ".join(list(classes)[:8]) + (", ..." if len(classes) > 8 else "")
        raise TeacherError(
            f"{folder.folder / 'dataset.json'}: its labels ({shown}) name none of the classes of the tasks "
            f"{[t['name'] for t in seg]}: name them alike, or map them in each task's teacher_classes "
            "(student class -> teacher class name)"
        )
    network = load_network(folder)
    return Teacher(network, channels, str(folder.folder), folder_digest(folder), output="probabilities")


def _is_exported_program(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        return any(n.endswith(("serialized_exported_program.json", "models/model.json")) for n in names)


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

    References are found and made absolute by MONAI's own rules (``ConfigParser.resolve_relative_ids``,
    ``ReferenceResolver.match_refs_pattern``), so every form MONAI follows (``@name``, ``@#sibling``,
    ``@##up``, ``@::…``, the root) reaches the same entry here; one that MONAI could not resolve is
    refused.

    Raises:
        TeacherError: naming the config file, the entry and the fix.
    """
    from monai.bundle import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    seen: set[str] = set()
    missing = object()

    def child(where: str, key: Any) -> str:
        return f"{where}::{key}" if where else str(key)

    def follow(text: str, where: str) -> None:
        try:
            absolute = ConfigParser.resolve_relative_ids(where, text)
        except ValueError:
            absolute = None
        if absolute is None:
            raise TeacherError(
                f"MONAI bundle config {config}: {where} holds the reference {text!r}, which points above "
                "the config's root; reference an entry of this config"
            )
        for reference in ReferenceResolver.match_refs_pattern(absolute):
            if reference in seen:
                continue
            seen.add(reference)
            target = parser.get(reference, default=missing) if reference else parser.config
            if target is missing:
                raise TeacherError(
                    f"MONAI bundle config {config}: {where} holds the reference {text!r} to {reference!r}, "
                    "which the config does not define; define it or remove the reference"
                )
            visit(target, reference)

    def visit(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, child(where, key))
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
                    check_default_downloads(cls, node, source)
                    node["_target_"] = f"{cls.__module__}.{cls.__qualname__}"
                except UntrustedFileError as error:
                    raise TeacherError(str(error)) from None
        elif isinstance(node, (list, tuple)):
            for index, item in enumerate(node):
                visit(item, child(where, index))
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
        elif isinstance(node, str):
            follow(node, where)

    visit(parser.config["network_def"], "network_def")


def _load_bundle(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The bundle's network and its (checked) inference config."""
    from monai.bundle import ConfigParser

    config = bundle_config_file(folder)
    weights = folder / "models" / "model.pt"
    if config is None and not weights.is_file():
        raise TeacherError(
            f"teacher folder {folder} is neither a MONAI bundle (configs/inference.json or .yaml, "
            "models/model.pt) nor an nnU-Net v2 trained-model folder (plans.json, dataset.json, "
            "fold_<k>/checkpoint_final.pth): point model.init_args.teacher to one of them"
        )
    if config is None or not weights.is_file():
        raise TeacherError(
            f"MONAI bundle {folder} needs configs/inference.json (or .yaml) with 'network_def' "
            "and models/model.pt"
        )
    parser = ConfigParser()
    try:
        parser.read_config(str(config))  # JSON or YAML's safe loader: data only
    except Exception as error:  # malformed JSON/YAML: the parser's own message names the place
        reason = " ".join(str(error).split())[:300]
        raise TeacherError(f"MONAI bundle config {config} cannot be read: {reason}") from None
    if not isinstance(parser.config, dict) or "network_def" not in parser.config:
        raise TeacherError(f"MONAI bundle config {config} has no 'network_def'")
    check_bundle_config(parser.config, config)  # the WHOLE config: MONAI parses (and imports) all of it
    _check_bundle_network(parser, config)  # before MONAI imports or evaluates anything of it
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as error:  # a checked, trusted class refusing its arguments
        reason = " ".join(str(error.__cause__ or error).split())[:300]
        raise TeacherError(f"MONAI bundle config {config}: network_def cannot be built: {reason}") from None
    if not isinstance(network, nn.Module):
        raise TeacherError(
            f"MONAI bundle config {config}: network_def is not a network ({type(network).__name__})"
        )
    network.load_state_dict(_state_dict(weights))
    return network, parser.config
