"""Export one region's expert as a plain, self-contained network: ``W0 + s·ΔW_r`` plus the region's heads.

``lorkd-pl export --ckpt RUN/last.ckpt --region brain --out experts/brain`` writes a folder:

* ``model.pt2`` — a ``torch.export`` program (batch and spatial dimensions dynamic: any spatial size
  that is a multiple of the network's total stride, the card's ``preprocessing.spatial_multiple``):
  ``torch.export.load(path).module()(x)`` returns one logits tensor per task, with plain PyTorch only;
* ``state_dict.pt`` — the same weights as a state dict (``backbone.*``, ``heads.<i>.*``) for rebuilding
  the network from the card's ``backbone`` (``class_path``/``init_args``, e.g. MONAI);
* ``metadata.json`` — the :class:`~lorkd_pl.deploy.card.ExpertCard` (region, tasks and class names,
  preprocessing, backbone config, sizes, source checkpoint sha256, package versions); ``README.md``.

The folder is written atomically (a temporary folder renamed at the end); an existing output is kept
unless ``overwrite``; with several regions every target is checked before any is written. The merged
network has exactly the expert-free backbone's parameters: no LoRA overhead at inference.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorkd_pl.deploy.card import CardError, ExpertCard, Preprocessing, RouterCard, package_versions
from lorkd_pl.experts import merge_expert, strip_experts
from lorkd_pl.io.atomic import atomic_folder
from lorkd_pl.io.checkpoints import CheckpointError, load_checkpoint_file
from lorkd_pl.io.hashing import sha256sum
from lorkd_pl.io.trust import check_file_network
from lorkd_pl.models.backbones import build_module, count_parameters, feature_channels, make_head
from lorkd_pl.models.base import TaskModule
from lorkd_pl.models.generalist import GeneralistModule
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.restore import restore_module
from lorkd_pl.models.router import RegionRouter, RouterNetwork, tap_width
from lorkd_pl.models.teacher import load_teacher


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


def load_module(checkpoint: str | Path, accept: Sequence[str]) -> tuple[TaskModule, dict[str, Any]]:
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
    student, data = load_module(checkpoint, ("LoRKDModule",))
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


def export_region(
    checkpoint: str | Path,
    region: str,
    out: str | Path,
    overwrite: bool = False,
    student: LoRKDModule | None = None,
) -> Path:
    """Write the exported folder of one region (see the module docstring) and return it.

    Raises:
        ExportError: for a bad checkpoint or region, or an existing ``out`` without ``overwrite``.
    """
    return export_regions(checkpoint, [region], {region: out}, overwrite, student)[0]


def export_regions(
    checkpoint: str | Path,
    regions: Sequence[str],
    outs: dict[str, str | Path],
    overwrite: bool = False,
    student: LoRKDModule | None = None,
    router_out: str | Path | None = None,
    format: str = "torch",
) -> list[Path]:
    """Export several regions; every region and output folder is checked before anything is written.

    Args:
        checkpoint: a LoRKD training checkpoint.
        regions: the regions to export.
        outs: output folder of each region.
        overwrite: replace existing output folders.
        student: the already loaded student of ``checkpoint`` (saves a reload).
        router_out: also write the region router there (``model.pt2``: one row of region logits per
            input window; ``state_dict.pt``; ``metadata.json``, a :class:`RouterCard`).
        format: ``"torch"`` (the module docstring's folder), ``"bundle"`` (a MONAI bundle,
            :mod:`lorkd_pl.deploy.bundle`) or ``"onnx"`` (``model.onnx`` with dynamic batch and spatial
            sizes, ``metadata.json`` and ``README.md``; needs the ``onnx`` extra).

    Raises:
        ExportError: for a bad checkpoint, an unknown region, or (without ``overwrite``) every
            existing output folder, all named at once.
    """
    targets = [Path(outs[r]) for r in regions] + ([Path(router_out)] if router_out is not None else [])
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:  # fail before the (slow) export, and before writing any
        raise ExportError(
            f"{', '.join(existing)} exist(s); nothing was written: pass --overwrite to replace, or "
            "choose another --out"
        )
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")
    if student is None:
        student, _ = load_student(checkpoint)
    for region in regions:
        region_tasks(student, region)
    source = {"path": str(checkpoint), "sha256": sha256sum(checkpoint)}
    if format != "torch":
        return _export_other_format(student, regions, outs, overwrite, source, format)
    prepared = []  # every program is made before any folder is written: a failure writes nothing
    for region in regions:
        network, card = deployable(student, region, source)
        program, multiple = export_program(
            network, card.preprocessing.channels, card.preprocessing.patch_size
        )
        card = _with_multiple(card, multiple)
        prepared.append((Path(outs[region]), network, card, program, _readme(card)))
    if router_out is not None:
        network = router_network(student)
        card = router_card(student, network, source)
        first = card.preprocessing[card.regions[0]]
        program, multiple = export_program(network, first.channels, first.patch_size)
        pipelines = {
            region: dataclasses.replace(p, spatial_multiple=multiple)
            for region, p in card.preprocessing.items()
        }
        card = dataclasses.replace(card, preprocessing=pipelines)
        prepared.append((Path(router_out), network, card, program, _router_readme(card)))
    _check_free_space([item[1] for item in prepared], targets)
    written = []
    for out, network, card, program, readme in prepared:
        with atomic_folder(out, overwrite, ExportError) as work:
            torch.export.save(program, str(work / "model.pt2"))
            torch.save(network.state_dict(), work / "state_dict.pt")
            card.to_json(work / "metadata.json")
            (work / "README.md").write_text(readme, encoding="utf-8")
        written.append(out)
    return written


def _with_multiple(card: ExpertCard, multiple: int) -> ExpertCard:
    """``card`` with the measured ``preprocessing.spatial_multiple``."""
    return dataclasses.replace(
        card, preprocessing=dataclasses.replace(card.preprocessing, spatial_multiple=multiple)
    )


#: Export formats: lorkd-pl's own folder, a MONAI bundle, ONNX.
FORMATS: tuple[str, ...] = ("torch", "bundle", "onnx")


def _export_other_format(
    student: LoRKDModule,
    regions: Sequence[str],
    outs: dict[str, str | Path],
    overwrite: bool,
    source: dict[str, Any],
    format: str,
) -> list[Path]:
    """``format="bundle"`` or ``"onnx"`` for every region; everything is checked (and every ONNX graph
    made) before any folder is written."""
    from lorkd_pl.deploy.bundle import BundleError, check_bundle, write_bundle
    from lorkd_pl.deploy.onnx import OnnxError, onnx_graph

    prepared = []
    for region in regions:
        network, card = deployable(student, region, source)
        try:
            if format == "bundle":
                check_bundle(card)
                prepared.append((region, network, card, None))
            else:
                graph, multiple = onnx_graph(network, card)
                card = _with_multiple(card, multiple)
                prepared.append((region, network, card, graph))
        except (BundleError, OnnxError) as error:
            raise ExportError(str(error)) from None
    _check_free_space([network for _, network, _, _ in prepared], [Path(outs[r]) for r in regions])
    written = []
    for region, network, card, graph in prepared:
        with atomic_folder(Path(outs[region]), overwrite, ExportError) as work:
            if format == "bundle":
                head = network.heads[0]
                write_bundle(work, network.backbone, head, card, int(head.in_channels))
            else:
                (work / "model.onnx").write_bytes(graph)
                card.to_json(work / "metadata.json")
                (work / "README.md").write_text(_onnx_readme(card), encoding="utf-8")
        written.append(Path(outs[region]))
    return written


def _onnx_readme(card: ExpertCard) -> str:
    names = ", ".join(f"`logits_{t['name']}`" for t in card.tasks)
    return f"""# lorkd-pl expert: {card.region} (ONNX)

```python
import onnxruntime
session = onnxruntime.InferenceSession("model.onnx")
outputs = session.run(None, {{"images": images}})   # images: float32 (N, {card.preprocessing.channels}, ...)
```

Outputs: {names} (one logits array per task, classes in `metadata.json`).
{_sizes(card).replace("model.pt2", "model.onnx")}
Preprocessing: {json.dumps(card.to_dict()["preprocessing"])}.
"""


#: The largest total stride :func:`export_program` looks for.
MAX_SPATIAL_MULTIPLE = 64


def export_program(
    network: nn.Module, channels: int, patch_size: Sequence[int]
) -> tuple[torch.export.ExportedProgram, int]:
    """``torch.export`` ``network`` with a dynamic batch AND dynamic spatial sizes.

    The spatial dimensions are exported as ``Dim.AUTO``: torch.export records the constraints the
    network imposes (a U-Net with strides 2, 2 needs sizes divisible by 4), so the program accepts
    other sliding-window sizes and whole volumes, not only the training patch. The multiple is then
    measured on the program: the smallest ``m`` for which ``patch + m`` in every spatial dimension
    passes its guards, reproduces the eager network and (segmentation) returns logits on the input's
    grid — a MONAI U-Net with strides 2, 2 runs a size of 43 but returns 44 (most wrong sizes fail on
    the guards, before any compute).

    Args:
        network: the deployable network (eval mode).
        channels: input channels C.
        patch_size: the training patch / image size (spatial dims).

    Returns:
        The program and the spatial multiple (``0``: the network could not be exported with dynamic
        spatial sizes, or the sizes it takes are not the multiples of one number: then rely on the
        training patch only).
    """
    example = torch.randn(2, channels, *patch_size)
    # batch: DYNAMIC (export fails loudly if the network fixes it); spatial: AUTO (the network's own
    # constraints, e.g. divisibility, are recorded as guards)
    dims = {0: torch.export.Dim.DYNAMIC, **{2 + i: torch.export.Dim.AUTO for i in range(len(patch_size))}}
    try:
        program = torch.export.export(network, (example,), dynamic_shapes=(dims,))
    except Exception:  # data-dependent shapes: fall back to the fixed patch
        batch = torch.export.Dim("batch", min=1, max=1024)
        return torch.export.export(network, (example,), dynamic_shapes=({0: batch},)), 0
    module = program.module()
    for multiple in range(1, MAX_SPATIAL_MULTIPLE + 1):
        probe = torch.randn(1, channels, *[size + multiple for size in patch_size])
        try:
            with torch.no_grad():
                got, want = _as_tuple(module(probe)), _as_tuple(network(probe))
        except Exception:  # a guard of the program: not a valid size
            continue
        if not all(g.shape[2:] == probe.shape[2:] for g in got if g.ndim == probe.ndim):
            continue  # runs, but not on the input's grid (43 → 44 in a U-Net)
        if all(torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, want, strict=True)):
            # sizes patch + k·m pass; they are the multiples of m only if the patch is one
            return program, multiple if all(size % multiple == 0 for size in patch_size) else 0
    return program, 0


def _as_tuple(outputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """A network's outputs as a tuple (a router answers one tensor, an expert one per task)."""
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


def _check_free_space(networks: Sequence[nn.Module], outs: Sequence[Path]) -> None:
    """Refuse to start writing exports that will not fit on the disk (a full disk mid-write can abort
    the process inside torch's C++ writer instead of raising).

    Raises:
        ExportError: naming the folder, the space needed and the space free.
    """
    needed = sum(
        2 * sum(t.numel() * t.element_size() for t in network.state_dict().values()) + 2**20
        for network in networks
    )  # model.pt2 and state_dict.pt each hold the weights once, plus the card and program text
    folder = next((p for p in [outs[0], *outs[0].parents] if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ExportError(
            f"not enough free space for the export in {folder}: about {needed / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free; free some space or choose another --out"
        )


def _sizes(card: ExpertCard) -> str:
    """What spatial sizes ``model.pt2`` accepts, in words."""
    multiple = card.preprocessing.spatial_multiple
    if multiple == 1:
        return "`model.pt2` accepts any spatial size."
    if multiple > 1:
        return (
            f"`model.pt2` accepts any spatial size that is a multiple of {multiple} in every dimension "
            "(other sliding-window sizes, whole volumes)."
        )
    return f"`model.pt2` accepts the training size {card.preprocessing.patch_size} only."


def _readme(card: ExpertCard) -> str:
    tasks = ", ".join(f"{t['name']} ({len(t['classes'])} classes)" for t in card.tasks)
    shape = ", ".join(map(str, [card.preprocessing.channels, *card.preprocessing.patch_size]))
    return f"""# lorkd-pl expert: {card.region}

Plain network (the region's low-rank expert merged into the shared weights) with the heads of: {tasks}.
Parameters: {card.parameters:,}. Source checkpoint sha256: {card.source_checkpoint.get("sha256")}.

```python
import torch
network = torch.export.load("model.pt2").module()      # plain PyTorch, no lorkd-pl needed
outputs = network(images)   # images: (N, {shape}); one logits tensor per task
```

{_sizes(card)}

Preprocessing: {json.dumps(card.to_dict()["preprocessing"])}. `state_dict.pt` holds the same weights for
the backbone in `metadata.json` (`backbone`) plus one head per task.
"""


def _router_readme(card: RouterCard) -> str:
    first = card.preprocessing[card.regions[0]]
    shape = ", ".join(map(str, [first.channels, *first.patch_size]))
    windows = (
        "3D volumes are routed window by window (the training patch), the probabilities averaged over the "
        "volume. "
        if card.kind == "seg3d"
        else ""
    )
    return f"""# lorkd-pl region router: {", ".join(card.regions)}

The shared weights W0 of the student (every expert dropped) and a small classifier on their pooled
features. Parameters: {card.parameters:,}. Source checkpoint sha256: {card.source_checkpoint.get("sha256")}.

```python
import torch
router = torch.export.load("model.pt2").module()   # plain PyTorch, no lorkd-pl needed
logits = router(images)   # images: (N, {shape}); (N, {len(card.regions)}) region logits, columns as `regions`
```

{windows}Each region is scored on an input prepared with its own pipeline (`preprocessing` in
`metadata.json`). `lorkd-pl predict --source <this folder's parent> --region auto` does all of this and
stops below the confidence {card.min_confidence} instead of guessing.
"""


def load_exported_router(folder: str | Path) -> tuple[RouterNetwork, RouterCard]:
    """Rebuild an exported region router from its card and ``state_dict.pt`` (``weights_only=True``;
    only the backbone class named in the card is imported, after the trust check).

    Raises:
        ExportError: naming the folder and the fix.
    """
    folder = Path(folder)
    card_path = folder / "metadata.json"
    if not card_path.is_file():
        raise ExportError(
            f"{folder} holds no region router (no metadata.json); export the student with --all-regions "
            "(a student trained with model.init_args.router_weight > 0) or give --region"
        )
    card, backbone = _card_and_backbone(card_path, RouterCard.from_json)
    first: Preprocessing = card.preprocessing[card.regions[0]]
    width = feature_channels(backbone, first.channels, first.patch_size)
    try:
        features = tap_width(backbone, card.taps, width, card.kind, card.grid_taps)
    except AttributeError as error:  # a tap the backbone does not have
        raise ExportError(f"{card_path}: its taps do not match the backbone ({error})") from None
    network = RouterNetwork(backbone, RegionRouter(features, len(card.regions)), card.taps, card.grid_taps)
    return _load_weights(network, folder), card


def load_exported(folder: str | Path) -> tuple[ExpertNetwork, ExpertCard]:
    """Rebuild an exported expert from its card and ``state_dict.pt`` (``weights_only=True``).

    This is how lorkd-pl itself loads exports (``lorkd-pl predict``): unlike ``torch.export.load`` on
    ``model.pt2``, which may unpickle objects, it runs no code from the folder — only the backbone class
    named in the card is imported, as a config's ``class_path`` would be.

    Raises:
        ExportError: naming the folder and the fix.
    """
    folder = Path(folder)
    card_path = folder / "metadata.json"
    if not card_path.is_file():
        raise ExportError(f"{folder} is not an exported expert (no metadata.json); run lorkd-pl export first")
    card, backbone = _card_and_backbone(card_path, ExpertCard.from_json)
    width = feature_channels(backbone, card.preprocessing.channels, card.preprocessing.patch_size)
    network = ExpertNetwork(backbone, [make_head(card.kind, width, len(t["classes"])) for t in card.tasks])
    return _load_weights(network, folder), card


def _card_and_backbone(card_path: Path, read: Callable[[Path], Any]) -> tuple[Any, nn.Module]:
    """An export folder's card (``read``) and its backbone, built only after the card's class path
    passed the trust check.

    Raises:
        ExportError: naming the card and the reason.
    """
    try:
        card = read(card_path)
        check_file_network(card.backbone, str(card_path), card.backbone)  # before anything is imported
        return card, build_module(card.backbone)
    except (CardError, ValueError) as error:
        raise ExportError(f"{card_path}: {error}") from None


def _load_weights(network: nn.Module, folder: Path) -> nn.Module:
    """``folder/state_dict.pt`` (``weights_only=True``) loaded into ``network``, in eval mode.

    Raises:
        ExportError: for an unsafe file, or weights that do not match the card's network.
    """
    try:
        network.load_state_dict(load_checkpoint_file(folder / "state_dict.pt"))
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    except RuntimeError as error:  # keys or shapes do not match the card
        first = " ".join(str(error).strip().splitlines()[:2])[:300]
        raise ExportError(
            f"{folder / 'state_dict.pt'} does not match {folder / 'metadata.json'}: {first}"
        ) from None
    return network.eval()


def size_report(checkpoint: str | Path, teacher: str | Path | None = None) -> str:
    """Parameters (and on-disk sizes) of the teacher, the student with all experts and one merged expert.

    Args:
        checkpoint: a LoRKD training checkpoint.
        teacher: the teacher to count (the user's path: a path recorded in a file is never loaded).
    """
    student, data = load_student(checkpoint)
    recorded = (data.get("teacher") or {}).get("path")
    lines = ["| model | parameters | on disk |", "|---|---:|---:|"]
    if teacher is not None:
        teacher_path = Path(teacher)
        count = count_parameters(load_teacher(teacher_path, student.tasks).network)
        size = (
            sum(p.stat().st_size for p in teacher_path.rglob("*") if p.is_file())
            if teacher_path.is_dir()
            else teacher_path.stat().st_size
        )
        lines.append(f"| teacher ({teacher_path.name}) | {count:,} | {size / 2**20:.2f} MiB |")
    else:
        lines.append(f"| teacher ({recorded or 'unknown'}; pass --teacher PATH to count it) | | |")
    lines.append(
        f"| student, all {len(student.regions)} experts + {len(student.heads)} heads "
        f"| {student_parameters(student):,} "
        f"| {Path(checkpoint).stat().st_size / 2**20:.2f} MiB (checkpoint incl. optimizer) |"
    )
    for region in student.regions:
        network, _ = expert_network(student, region)
        lines.append(
            f"| merged expert: {region} | {count_parameters(network):,} | {_state_dict_mib(network)} |"
        )
    if student.router is not None:
        network = router_network(student)
        lines.append(
            f"| region router: W0 + classifier ({count_parameters(network.router):,}) "
            f"| {count_parameters(network):,} | {_state_dict_mib(network)} |"
        )
    return "\n".join(lines)


def _state_dict_mib(network: nn.Module) -> str:
    """The size of the network's ``state_dict.pt``, in words."""
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    return f"{buffer.tell() / 2**20:.2f} MiB (state_dict.pt)"


def student_parameters(student: LoRKDModule) -> int:
    """Parameters of a LoRKD student's W0, experts and heads: the region router's classifier apart."""
    return count_parameters(student) - (count_parameters(student.router) if student.router is not None else 0)
