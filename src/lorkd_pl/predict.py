"""Predict on real files with one region's expert; write results in the input's geometry.

``lorkd-pl predict --input scan.nii.gz --source experts/brain --out predictions/`` (or ``--source
RUN/last.ckpt --region brain``). Inputs: NIfTI/NRRD/MHA files, a DICOM series folder, a folder of
files, or a manifest (JSONL/CSV with ``image`` and, optionally, ``region``).

Segmentation: the training preprocessing (RAS orientation, target spacing, intensity by modality),
sliding-window inference with Gaussian weighting, argmax, then the preprocessing inverted (MONAI
``Invertd``) and the label map written with exactly the input's size, spacing, origin and direction;
optionally the softmax probabilities too (a K-component image, linearly resampled to the input grid).
Classification: a CSV with one row per image and one probability column per class.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import Tensor
from tqdm.auto import tqdm

from lorkd_pl.atomic import atomic_file
from lorkd_pl.data.formats import read_manifest
from lorkd_pl.data.readers import SUFFIXES, Geometry, SimpleITKReader, check_complete, read_geometry
from lorkd_pl.data.transforms import cls2d_transforms, intensity_transforms


class PredictError(ValueError):
    """Inputs or the model source cannot be used; names the path and the fix."""


@dataclass
class Expert:
    """A plain network for one region and what it needs to know about its input."""

    network: Callable[[Tensor], Sequence[Tensor]]
    region: str
    kind: str
    tasks: list[dict[str, Any]]
    patch_size: list[int]
    spacing: list[float] | None
    modality: str | None
    channels: int
    overlap: float = 0.5


def load_expert(source: str | Path, region: str | None = None, device: str = "cpu") -> Expert:
    """An exported expert folder, or a LoRKD checkpoint plus ``region`` (merged in memory).

    Both are read with ``weights_only=True`` (the folder through :func:`lorkd_pl.export.load_exported`,
    not its ``model.pt2`` program), so an untrusted file cannot run code.
    """
    source = Path(source)
    if source.is_dir():
        from lorkd_pl.export import load_exported

        network, metadata = load_exported(source)
        if region is not None and region != metadata["region"]:
            raise PredictError(f"{source} is the {metadata['region']!r} expert, not {region!r}")
        inputs = metadata["input"]
        return Expert(
            network.to(device),
            metadata["region"],
            metadata["kind"],
            metadata["tasks"],
            inputs["patch_size"],
            inputs.get("spacing"),
            inputs.get("modality"),
            inputs["channels"],
            (inputs.get("sliding_window") or {}).get("overlap", 0.5),
        )
    from lorkd_pl.export import expert_network, load_student

    student, _ = load_student(source)
    if region is None:
        raise PredictError(f"a checkpoint holds several regions {student.regions}: give --region")
    network, tasks = expert_network(student, region)
    network = network.to(device)
    first = tasks[0]
    return Expert(
        network,
        region,
        student.kind,
        [{"name": t["name"], "classes": t["classes"], "output_index": i} for i, t in enumerate(tasks)],
        list(first["patch_size"]),
        first.get("spacing"),
        first.get("modality"),
        student.hparams.in_channels,
        student.hparams.sw_overlap,
    )


def collect_inputs(inputs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Expand files, DICOM folders, folders of files and manifests into ``{"image", "region"?}`` rows."""
    rows: list[dict[str, Any]] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise PredictError(f"input not found: {item}")
        if item.is_file() and item.suffix.lower() in (".jsonl", ".csv"):
            rows += [{k: r[k] for k in ("image", "region") if k in r} for r in read_manifest(item)]
        elif item.is_dir() and sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(item)):
            rows.append({"image": str(item)})
        elif item.is_dir():
            files = [p for p in sorted(item.iterdir()) if p.is_file() and p.name.lower().endswith(SUFFIXES)]
            if not files:
                raise PredictError(f"folder {item} holds no image files ({', '.join(SUFFIXES)})")
            rows += [{"image": str(p)} for p in files]
        else:
            rows.append({"image": str(item)})
    return rows


def _output_name(image: str) -> str:
    path = Path(image)
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _in_input_geometry(array: np.ndarray, original: Geometry, vector: bool = False) -> sitk.Image:
    """A SimpleITK image of ``array`` (``(x, y, z)`` or ``(K, x, y, z)``) carrying ``original``'s geometry."""
    # SimpleITK arrays are (z, y, x) or (z, y, x, K)
    image = sitk.GetImageFromArray(array.transpose(3, 2, 1, 0) if vector else array.T, isVector=vector)
    if image.GetSize() != original.size:
        raise PredictError(f"inverted prediction size {image.GetSize()} != input size {original.size}")
    return original.apply(image)


def _write_image(image: sitk.Image, out: Path) -> Path:
    with atomic_file(out) as temporary:  # the suffix is kept: SimpleITK picks NIfTI from it
        sitk.WriteImage(image, str(temporary), useCompression=True)
    return out


def predict_segmentation(
    expert: Expert,
    image: str,
    out_dir: Path,
    device: str = "cpu",
    probabilities: bool = False,
    overlap: float | None = None,
) -> Path:
    """Write ``<out_dir>/<name>_<task>.nii.gz`` label maps in the geometry of ``image``; return the first.

    Args:
        expert: the region's network and input description.
        image: a NIfTI/NRRD/MHA file or a DICOM series folder.
        out_dir: output folder.
        device: ``"cpu"`` or ``"cuda"`` (bf16 autocast on CUDA).
        probabilities: also write ``<name>_<task>_probabilities.nii.gz``, a K-component float32 image
            of softmax probabilities resampled (linearly) to the input grid.
        overlap: sliding-window overlap (default: the expert's).
    """
    steps: list[mt.Transform] = [
        mt.LoadImaged("image", reader=SimpleITKReader(), image_only=True),
        mt.EnsureChannelFirstd("image"),
        mt.Orientationd("image", axcodes="RAS", labels=None),
    ]
    if expert.spacing:
        steps.append(mt.Spacingd("image", pixdim=tuple(expert.spacing), mode="bilinear"))
    steps += intensity_transforms(expert.modality or "other")
    preprocess = mt.Compose(steps)
    data = preprocess({"image": image})
    check_complete(image)  # before MONAI reads it: ITK would zero-fill a truncated NIfTI silently
    original = read_geometry(image)  # header only: the pixels are read once, by the pipeline
    written = []
    for task in expert.tasks:
        with (
            torch.no_grad(),
            torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"),
        ):
            logits = sliding_window_inference(
                data["image"][None].to(device),
                roi_size=tuple(expert.patch_size),
                sw_batch_size=4,
                predictor=lambda windows, t=task: expert.network(windows)[t["output_index"]],
                overlap=expert.overlap if overlap is None else overlap,
                mode="gaussian",
            )
        outputs = {"pred": logits.float().argmax(1, keepdim=True)[0].cpu()}  # (1, *S) in the model grid
        if probabilities:
            outputs["prob"] = logits.float().softmax(1)[0].cpu()  # (K, *S)
        keys = list(outputs)
        meta = {"meta": data["image"].meta, "applied_operations": data["image"].applied_operations}
        inverted = mt.Invertd(
            keys, preprocess, orig_keys="image", nearest_interp=[k == "pred" for k in keys]
        )({**{k: MetaTensor(v, **meta) for k, v in outputs.items()}, "image": data["image"]})
        stem = out_dir / f"{_output_name(image)}_{task['name']}"
        label = np.asarray(inverted["pred"][0]).round().astype(np.uint8)  # (x, y, z) of the input grid
        written.append(_write_image(_in_input_geometry(label, original), Path(f"{stem}.nii.gz")))
        if probabilities:
            maps = np.asarray(inverted["prob"], dtype=np.float32)
            _write_image(
                _in_input_geometry(maps, original, vector=True), Path(f"{stem}_probabilities.nii.gz")
            )
    return written[0]


def predict_classification(expert: Expert, images: Sequence[str], out_dir: Path, device: str = "cpu") -> Path:
    """Write ``<out_dir>/<region>_predictions.csv``: image, task, class, one probability per class."""
    transform = cls2d_transforms(False, expert.patch_size, expert.channels)
    out = out_dir / f"{expert.region}_predictions.csv"
    with atomic_file(out) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["image", "task", "prediction", *[f"p_{c}" for t in expert.tasks for c in t["classes"]]]
        )
        for image in tqdm(images, desc="images"):
            x = transform({"image": image, "label": 0})["image"][None].to(device)
            with torch.no_grad():
                outputs = expert.network(x)
            for task in expert.tasks:
                probabilities = outputs[task["output_index"]].float().softmax(1)[0].cpu().tolist()
                writer.writerow(
                    [image, task["name"], task["classes"][int(np.argmax(probabilities))], *probabilities]
                )
    return out


def predict_files(
    inputs: Sequence[str | Path],
    source: str | Path,
    out_dir: str | Path,
    region: str | None = None,
    device: str = "cpu",
    probabilities: bool = False,
    overlap: float | None = None,
) -> list[Path]:
    """Predict every input with the expert from ``source``; return the written files.

    Args:
        inputs: files, DICOM series folders, folders of files or manifests (see :func:`collect_inputs`).
        source: an exported expert folder or a LoRKD checkpoint (then ``region`` selects the expert).
        out_dir: output folder; every file in it is written atomically.
        region: the region (default: the inputs' ``region`` field where they all share one).
        device: ``"cpu"`` or ``"cuda"``.
        probabilities: segmentation: also write probability maps (see :func:`predict_segmentation`).
        overlap: segmentation: sliding-window overlap (default: the expert's).
    """
    rows = collect_inputs(inputs)
    regions = {row.get("region") for row in rows} - {None}
    if region is None and len(regions) == 1:
        region = regions.pop()
    expert = load_expert(source, region, device)
    mismatched = [row["image"] for row in rows if row.get("region") not in (None, expert.region)]
    if mismatched:
        raise PredictError(
            f"inputs {mismatched[:3]} belong to another region than the {expert.region!r} expert"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if expert.kind == "cls2d":
        return [predict_classification(expert, [row["image"] for row in rows], out_dir, device)]
    return [
        predict_segmentation(expert, row["image"], out_dir, device, probabilities, overlap)
        for row in tqdm(rows, desc="cases")
    ]
