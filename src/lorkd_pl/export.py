"""Export one region's expert as a plain, self-contained network: ``W0 + s·ΔW_r`` plus the region's heads.

``lorkd-pl export --ckpt RUN/last.ckpt --region brain --out experts/brain`` writes a folder:

* ``model.pt2`` — a ``torch.export`` program (batch dimension dynamic): ``torch.export.load(path)
  .module()(x)`` returns one logits tensor per task, with plain PyTorch only;
* ``state_dict.pt`` — the same weights as a state dict (``backbone.*``, ``heads.<i>.*``) for rebuilding
  the network from ``metadata.json``'s ``backbone`` (``class_path``/``init_args``, e.g. MONAI);
* ``metadata.json`` — region, tasks and class names, preprocessing, backbone config, parameter count,
  source checkpoint sha256, package versions; ``README.md``.

The folder is written atomically (a temporary folder renamed at the end); an existing output is kept
unless ``overwrite``. The merged network has exactly the expert-free backbone's parameters: no LoRA
overhead at inference.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorkd_pl.atomic import atomic_folder
from lorkd_pl.checkpoint_io import CheckpointError, load_checkpoint_file
from lorkd_pl.experts import merge_expert
from lorkd_pl.models.backbones import build_module, count_parameters, feature_channels, make_head
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.teacher import load_teacher, sha256sum


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


def load_student(checkpoint: str | Path) -> tuple[LoRKDModule, dict[str, Any]]:
    """Rebuild a LoRKD student from a checkpoint (``weights_only=True``; the teacher is not loaded).

    Raises:
        ExportError: if the file is not a lorkd-pl LoRKD checkpoint.
    """
    path = Path(checkpoint)
    try:
        data = load_checkpoint_file(path)
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    if not isinstance(data, dict) or data.get("lorkd_pl_model") != "LoRKDModule":
        raise ExportError(
            f"{path} is not a LoRKD student checkpoint (train one with configs/demo/lorkd_*.yaml)"
        )
    accepted = inspect.signature(LoRKDModule.__init__).parameters
    hparams = {k: v for k, v in data["hyper_parameters"].items() if k in accepted}
    hparams.update(teacher=None, kd="none", init_from_teacher=False)
    student = LoRKDModule(**hparams)
    state = {k: v for k, v in data["state_dict"].items() if not k.startswith("projection.")}
    student.load_state_dict(state)
    return student.eval(), data


def expert_network(student: LoRKDModule, region: str) -> tuple[ExpertNetwork, list[dict[str, Any]]]:
    """The plain network of ``region`` and the descriptions of its tasks (in output order)."""
    if region not in student.regions:
        raise ExportError(f"unknown region {region!r}; this checkpoint's regions are {student.regions}")
    index = student.regions.index(region)
    tasks = [(i, t) for i, t in enumerate(student.tasks) if t["region"] == region]
    backbone = merge_expert(student.student, index)
    heads = [copy.deepcopy(student.heads[i]) for i, _ in tasks]
    return ExpertNetwork(backbone, heads).eval(), [t for _, t in tasks]


def _example_input(task: dict[str, Any], in_channels: int) -> Tensor:
    return torch.randn(2, in_channels, *task["patch_size"])


def _versions() -> dict[str, str]:
    out = {}
    for package in ("lorkd-pl", "torch", "lightning", "monai", "torchmetrics", "SimpleITK"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


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
    out = Path(out)
    if out.exists() and not overwrite:  # fail before the (slow) export
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    if student is None:
        student, _ = load_student(checkpoint)
    network, tasks = expert_network(student, region)
    in_channels = student.hparams.in_channels
    example = _example_input(tasks[0], in_channels)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
    with atomic_folder(out, overwrite, ExportError) as work:
        torch.export.save(program, str(work / "model.pt2"))
        torch.save(network.state_dict(), work / "state_dict.pt")
        metadata = {
            "region": region,
            "kind": student.kind,
            "tasks": [
                {"name": t["name"], "classes": list(t["classes"]), "output_index": i}
                for i, t in enumerate(tasks)
            ],
            "input": {
                "channels": in_channels,
                "patch_size": list(tasks[0]["patch_size"]),
                "orientation": "RAS" if student.kind == "seg3d" else None,
                "spacing": tasks[0].get("spacing"),
                "modality": tasks[0].get("modality"),
                "intensity": _intensity_description(tasks[0].get("modality"), student.kind),
                "sliding_window": {"overlap": student.hparams.sw_overlap, "mode": "gaussian"}
                if student.kind == "seg3d"
                else None,
            },
            "backbone": student.hparams.backbone,
            "parameters": count_parameters(network),
            "expert_free_backbone_parameters": student.expert_free_parameters,
            "source_checkpoint": {"path": str(checkpoint), "sha256": sha256sum(checkpoint)},
            "versions": _versions(),
        }
        (work / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        (work / "README.md").write_text(_readme(metadata), encoding="utf-8")
    return out


def _intensity_description(modality: str | None, kind: str) -> str:
    if kind != "seg3d":
        return "scale to [0, 1], resize to patch_size, z-score"
    if (modality or "").upper() == "CT":
        return "clip to [-500, 1000] HU, then z-score"
    if (modality or "").upper() == "MR":
        return "clip to the 0.5-99.5 percentiles, then z-score"
    return "z-score"


def _readme(metadata: dict[str, Any]) -> str:
    tasks = ", ".join(f"{t['name']} ({len(t['classes'])} classes)" for t in metadata["tasks"])
    shape = ", ".join(map(str, [metadata["input"]["channels"], *metadata["input"]["patch_size"]]))
    return f"""# lorkd-pl expert: {metadata["region"]}

Plain network (the region's low-rank expert merged into the shared weights) with the heads of: {tasks}.
Parameters: {metadata["parameters"]:,}. Source checkpoint sha256: {metadata["source_checkpoint"]["sha256"]}.

```python
import torch
network = torch.export.load("model.pt2").module()      # plain PyTorch, no lorkd-pl needed
outputs = network(images)   # images: (N, {shape}); one logits tensor per task
```

Preprocessing: {json.dumps(metadata["input"])}. `state_dict.pt` holds the same weights for the backbone in
`metadata.json` (`backbone`) plus one head per task.
"""


def load_exported(folder: str | Path) -> tuple[ExpertNetwork, dict[str, Any]]:
    """Rebuild an exported expert from ``metadata.json`` and ``state_dict.pt`` (``weights_only=True``).

    This is how lorkd-pl itself loads exports (``lorkd-pl predict``): unlike ``torch.export.load`` on
    ``model.pt2``, which may unpickle objects, it runs no code from the folder — only the backbone class
    named in ``metadata.json`` is imported, as a config's ``class_path`` would be.

    Raises:
        ExportError: naming the folder and the fix.
    """
    folder = Path(folder)
    metadata_path = folder / "metadata.json"
    if not metadata_path.is_file():
        raise ExportError(f"{folder} is not an exported expert (no metadata.json); run lorkd-pl export first")
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
        kind, in_channels = metadata["kind"], metadata["input"]["channels"]
        backbone = build_module(metadata["backbone"])
        classes = [len(task["classes"]) for task in metadata["tasks"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ExportError(
            f"{metadata_path}: unreadable export metadata ({type(error).__name__}: {error})"
        ) from None
    width = feature_channels(backbone, kind, in_channels)
    network = ExpertNetwork(backbone, [make_head(kind, width, k) for k in classes])
    try:
        network.load_state_dict(load_checkpoint_file(folder / "state_dict.pt"))
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    except RuntimeError as error:  # keys or shapes do not match the metadata
        raise ExportError(f"{folder / 'state_dict.pt'} does not match {metadata_path}: {error}") from None
    return network.eval(), metadata


def size_report(checkpoint: str | Path) -> str:
    """Parameters (and on-disk sizes) of the teacher, the student with all experts and one merged expert."""
    student, data = load_student(checkpoint)
    teacher = data.get("teacher") or {}
    lines = ["| model | parameters | on disk |", "|---|---:|---:|"]
    teacher_path = Path(teacher["path"]) if teacher.get("path") else None
    if teacher_path is not None and teacher_path.exists():
        count = count_parameters(load_teacher(teacher_path, student.tasks).network)
        lines.append(
            f"| teacher ({teacher_path.name}) | {count:,} | {teacher_path.stat().st_size / 2**20:.2f} MiB |"
        )
    else:
        lines.append("| teacher | (file not available) | |")
    lines.append(
        f"| student, all {len(student.regions)} experts + {len(student.heads)} heads "
        f"| {count_parameters(student):,} "
        f"| {Path(checkpoint).stat().st_size / 2**20:.2f} MiB (checkpoint incl. optimizer) |"
    )
    for region in student.regions:
        network, _ = expert_network(student, region)
        buffer = io.BytesIO()
        torch.save(network.state_dict(), buffer)  # the size of its state_dict.pt
        lines.append(
            f"| merged expert: {region} | {count_parameters(network):,} "
            f"| {buffer.tell() / 2**20:.2f} MiB (state_dict.pt) |"
        )
    return "\n".join(lines)
