"""``lorkd-pl export``: one region's expert as a plain, self-contained network: ``W0 + s·ΔW_r`` plus the
region's heads, written as an export folder (:mod:`lorkd_pl.deploy.folders`), a MONAI bundle
(:mod:`lorkd_pl.deploy.bundle`) or ONNX (:mod:`lorkd_pl.deploy.program`).

``lorkd-pl export --ckpt RUN/last.ckpt --region brain --out experts/brain``. The folder is written
atomically (a temporary folder renamed at the end); an existing output is kept unless ``overwrite``;
with several regions every target is checked before any is written. The merged network has exactly the
expert-free backbone's parameters: no LoRA overhead at inference.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorkd_pl.deploy.card import ExpertCard
from lorkd_pl.deploy.folders import is_export_folder, write_folder
from lorkd_pl.deploy.networks import (
    ExportError,
    deployable,
    expert_network,
    load_student,
    region_tasks,
    router_card,
    router_network,
    student_parameters,
)
from lorkd_pl.deploy.program import export_program
from lorkd_pl.io.atomic import atomic_folder
from lorkd_pl.io.hashing import sha256sum
from lorkd_pl.models.backbones import count_parameters
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.teacher.loading import load_teacher


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
    foreign = [str(path) for path in targets if path.exists() and not is_export_folder(path)]
    if foreign:  # --overwrite replaces earlier exports only: checked for all before any is written
        raise ExportError(
            f"{', '.join(foreign)} exist(s) and are not {EXPORT_WHAT}; nothing was written: --overwrite "
            "never replaces other files, choose another --out"
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
        prepared.append((Path(outs[region]), network, card, program))
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
        prepared.append((Path(router_out), network, card, program))
    _check_free_space([item[1] for item in prepared], targets)
    written = []
    for out, network, card, program in prepared:
        with atomic_folder(out, overwrite, ExportError, is_export_folder, EXPORT_WHAT) as work:
            write_folder(work, network, card, program)
        written.append(out)
    return written


def _with_multiple(card: ExpertCard, multiple: int) -> ExpertCard:
    """``card`` with the measured ``preprocessing.spatial_multiple``."""
    return dataclasses.replace(
        card, preprocessing=dataclasses.replace(card.preprocessing, spatial_multiple=multiple)
    )


#: What ``--overwrite`` may replace, in messages.
EXPORT_WHAT = (
    "an earlier export (lorkd-pl export writes only model.pt2, state_dict.pt, metadata.json, README.md)"
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
    from lorkd_pl.deploy.program import OnnxError, onnx_graph

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
        with atomic_folder(Path(outs[region]), overwrite, ExportError, is_export_folder, EXPORT_WHAT) as work:
            if format == "bundle":
                head = network.heads[0]
                write_bundle(work, network.backbone, head, card, int(head.in_channels))
            else:
                write_folder(work, network, card, onnx=graph)
        written.append(Path(outs[region]))
    return written


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
