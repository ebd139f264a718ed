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
import sys
from collections.abc import Sequence
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

from lorkd_pl.data.formats import read_manifest
from lorkd_pl.data.readers import (
    SUFFIXES,
    Geometry,
    ImageReadError,
    InputInfo,
    check_complete,
    check_finite,
    dicom_series_files,
    image_header,
    inspect_input,
    non_image_sop_class,
    read_geometry,
)
from lorkd_pl.data.transforms import cls2d_transforms, seg3d_preprocessing
from lorkd_pl.deploy.card import ExpertCard
from lorkd_pl.deploy.folders import Expert, load_expert, load_experts_and_router
from lorkd_pl.deploy.networks import ExportError
from lorkd_pl.deploy.region_choice import RegionChoiceError, choose_regions, router_probabilities
from lorkd_pl.io.atomic import atomic_file


class PredictError(ValueError):
    """Inputs or the model source cannot be used; names the path and the fix."""


def collect_inputs(inputs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Expand files, DICOM folders, folders of files and manifests into ``{"image", "region"?}`` rows."""
    rows: list[dict[str, Any]] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise PredictError(f"input not found: {item}")
        if item.is_file() and item.suffix.lower() in (".jsonl", ".csv"):
            rows += [
                {k: r[k] for k in ("image", "region") if k in r}
                for r in read_manifest(item, require_label=False)
            ]
        elif item.is_dir():
            found = _folder_inputs(item)
            if not found:
                raise PredictError(
                    f"folder {item} holds no image files ({', '.join(SUFFIXES)}) and no DICOM series, in "
                    "it or its subfolders"
                )
            rows += found
        else:
            rows.append({"image": str(item)})
    return rows


def _folder_inputs(folder: Path) -> list[dict[str, Any]]:
    """The inputs in ``folder`` and its subfolders (hidden ones skipped): a folder holding one DICOM
    series is one input; image files are one input each.

    Raises:
        PredictError: for a folder mixing several series, or a series and other files.
    """
    rows: list[dict[str, Any]] = []
    series = dicom_series_files(folder)
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if series:
        dicom = {Path(f).name for files in series for f in files}
        others = [p.name for p in entries if p.is_file() and p.name not in dicom]
        if len(series) > 1 or others:
            raise PredictError(
                f"folder {folder} holds {len(series)} DICOM series"
                + (f" and other files ({', '.join(others[:3])})" if others else "")
                + "; give one series per folder (each as its own --input)"
            )
        rows.append({"image": str(folder)})
    else:
        rows += [{"image": str(p)} for p in entries if p.is_file() and p.name.lower().endswith(SUFFIXES)]
    for sub in entries:
        if sub.is_dir() and not sub.is_symlink():
            rows += _folder_inputs(sub)
    return rows


def _output_name(image: str) -> str:
    path = Path(image)
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_input(image: str, info: InputInfo, card: ExpertCard, force: bool = False) -> str | None:
    """Refuse an input the model cannot mean: wrong dimensionality or components, or (unless
    ``force``) a DICOM modality other than the card's. Returns a warning for a forced mismatch.

    Raises:
        PredictError: naming the input, what it is, what the model expects and the fix.
    """
    spatial = [s for s in info.size if s > 1]
    name = f"{image} ({info.describe})"
    kind = non_image_sop_class(info.sop_class)
    if kind is not None:
        raise PredictError(
            f"{name} is a DICOM {kind} object (SOP class {info.sop_class}), not an image; give the image "
            "series it belongs to"
        )
    if card.kind == "seg3d" and (len(info.size) < 3 or len(spatial) < 3):
        raise PredictError(f"{name} is not a 3D volume; the {card.name} model segments 3D volumes")
    if card.kind == "seg3d" and (len(info.size) > 3 and info.size[3] > 1):
        raise PredictError(f"{name} is 4D; give one 3D volume (e.g. one time point) per input")
    if card.kind == "cls2d" and len(spatial) > 2:
        raise PredictError(f"{name} is 3D; the {card.name} model classifies 2D images (give one slice)")
    if card.kind == "seg3d" and not all(s > 0 for s in info.spacing[:3]):
        raise PredictError(
            f"{name} has the spacing {tuple(info.spacing)} in its header; voxel sizes must be > 0 "
            "(fix the header, e.g. re-export the series)"
        )
    if info.components > 1 and not (card.kind == "cls2d" and info.components in (3, 4)):
        raise PredictError(
            f"{name} has {info.components} components per voxel; the model takes one value per voxel"
        )
    expected = (card.preprocessing.modality or "").upper()
    if info.modality in ("CT", "MR") and expected in ("CT", "MR") and info.modality != expected:
        message = (
            f"{name} is {info.modality} by its DICOM tag, but the {card.name} model was trained on {expected}"
        )
        if not force:
            raise PredictError(f"{message}; use a {info.modality} model, or --force to predict anyway")
        return f"lorkd-pl: warning: {message} (--force)"
    return None


def check_inputs(images: Sequence[str], card: ExpertCard, force: bool = False) -> None:
    """Check every input before the first inference and print the plan, one line per input: complete
    (ITK would zero-fill a truncated NIfTI silently), finite (float pixels are read once here), and
    meant for this model (:func:`check_input`).

    Raises:
        PredictError: for the first input that fails, naming it.
    """
    tasks = ", ".join(t["name"] for t in card.tasks)
    for image in images:
        try:
            check_complete(image)
            info = inspect_input(image)
            if info.floating:  # before the first output: a NaN scan late in the list stops nothing half-done
                check_finite(image)
        except ImageReadError as error:
            raise PredictError(str(error)) from None
        warning = check_input(image, info, card, force)
        print(f"{image}: {info.describe} → {tasks}")
        if warning:
            print(warning, file=sys.stderr)


def output_stems(images: Sequence[str]) -> dict[str, str]:
    """A unique output name stem per input: the file name, with as many parent folders prefixed
    (``parent_name``) as it takes to tell inputs of the same name apart."""
    paths = {image: Path(image).absolute() for image in images}  # as given (a link keeps its own name)
    depth = dict.fromkeys(images, 0)

    def stem(image: str) -> str:
        parents = list(paths[image].parents)[: depth[image]]
        return "_".join([*(p.name for p in reversed(parents)), _output_name(image)])

    for _ in range(64):
        seen: dict[str, list[str]] = {}
        for image in images:
            seen.setdefault(stem(image), []).append(image)
        clashes = [group for group in seen.values() if len(group) > 1]
        if not clashes:
            break
        for group in clashes:
            for image in group:
                depth[image] += 1
    stems = {image: stem(image) for image in images}
    groups: dict[str, list[str]] = {}
    for image, name in stems.items():
        groups.setdefault(name, []).append(image)
    clashes = [group for group in groups.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(" and ".join(group[:3]) for group in clashes[:3])
        raise PredictError(f"inputs would share output names: {shown}; rename or move them")
    return stems


def check_output_folder(inputs: Sequence[str | Path], out_dir: str | Path) -> None:
    """Refuse an output folder equal to, or inside, an input folder, or equal to the folder of an input
    file (outputs would mix with, or overwrite, inputs, and the next run would predict the predictions).

    Raises:
        PredictError: naming both folders.
    """
    out = Path(out_dir).resolve()
    for item in map(Path, inputs):
        folder = item.resolve() if item.is_dir() else item.resolve().parent
        if out == folder or (item.is_dir() and folder in out.parents):
            raise PredictError(
                f"--out {out_dir} is inside the input folder {folder}: the predictions would mix with (or "
                "overwrite) the inputs and become inputs of the next run; choose an output folder outside"
            )


def is_own_output(image: str, card: ExpertCard) -> bool:
    """Whether ``image`` is named like a prediction this model writes (``<name>_<task>[...].nii.gz``)."""
    name = Path(image).name
    return any(
        name.endswith((f"_{task['name']}.nii.gz", f"_{task['name']}_probabilities.nii.gz"))
        for task in card.tasks
    )


def _in_input_geometry(array: np.ndarray, original: Geometry, vector: bool = False) -> sitk.Image:
    """A SimpleITK image of ``array`` (``(x, y, z)`` or ``(K, x, y, z)``) carrying ``original``'s geometry."""
    # SimpleITK arrays are (z, y, x) or (z, y, x, K)
    image = sitk.GetImageFromArray(array.transpose(3, 2, 1, 0) if vector else array.T, isVector=vector)
    if image.GetSize() != original.size:
        raise PredictError(f"inverted prediction size {image.GetSize()} != input size {original.size}")
    return original.apply(image)


#: Written into every output image's header (NIfTI ``descrip``): predict replaces only files it wrote.
PREDICT_MARK = "lorkd-pl predict"
#: The first columns of the CSV files predict writes.
CSV_HEADERS: tuple[str, ...] = ("image,task,prediction", "image,region,decided_by")


def _write_image(image: sitk.Image, out: Path) -> Path:
    image.SetMetaData("ITK_FileNotes", PREDICT_MARK)
    with atomic_file(out) as temporary:  # the suffix is kept: SimpleITK picks NIfTI from it
        sitk.WriteImage(image, str(temporary), useCompression=True)
    return out


def planned_outputs(
    card: ExpertCard, images: Sequence[str], stems: dict[str, str], probabilities: bool
) -> list[str]:
    """The names predict will write into ``--out`` for ``images`` with one expert."""
    if card.kind == "cls2d":
        return [f"{card.name}_predictions.csv"]
    suffixes = [".nii.gz", *(["_probabilities.nii.gz"] if probabilities else [])]
    return [
        f"{stems[image]}_{task['name']}{suffix}"
        for image in images
        for task in card.tasks
        for suffix in suffixes
    ]


def check_own_outputs(out_dir: Path, names: Sequence[str]) -> None:
    """Refuse, before the first inference, to write over a file in ``out_dir`` that predict did not write
    (a user's scan or table of the same name): predict replaces only its own earlier outputs.

    Raises:
        PredictError: naming the files and the fix.
    """
    foreign = [
        name for name in names if (out_dir / name).exists() and not _is_own_output_file(out_dir / name)
    ]
    if foreign:
        raise PredictError(
            f"--out {out_dir} already holds {', '.join(foreign[:3])}"
            f"{' and others' if len(foreign) > 3 else ''}, which lorkd-pl predict did not write; nothing was "
            "written: choose another --out"
        )


def _is_own_output_file(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    if path.name.endswith(".csv"):
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.readline().strip().startswith(CSV_HEADERS)
    try:
        reader = image_header(path)
    except RuntimeError:
        return False
    return reader.HasMetaDataKey("descrip") and reader.GetMetaData("descrip").strip() == PREDICT_MARK


def predict_segmentation(
    expert: Expert,
    image: str,
    out_dir: Path,
    device: str = "cpu",
    probabilities: bool = False,
    overlap: float | None = None,
    stem: str | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<name>_<task>.nii.gz`` label maps in the geometry of ``image``; return them.

    One sliding-window pass serves every task of the expert (the network answers all its heads).

    Args:
        expert: the network and its card.
        image: a NIfTI/NRRD/MHA file or a DICOM series folder, checked by :func:`check_inputs` (as
            :func:`predict_files` does before the first inference).
        out_dir: output folder.
        device: ``"cpu"`` or ``"cuda"`` (bf16 autocast on CUDA).
        probabilities: also write ``<name>_<task>_probabilities.nii.gz``, a K-component float32 image
            of softmax probabilities resampled (linearly) to the input grid.
        overlap: sliding-window overlap (default: the card's).
        stem: output name stem (default: the input's file name without its suffix).
    """
    prep = expert.card.preprocessing
    preprocess = mt.Compose(seg3d_preprocessing(["image"], prep.modality or "other", prep.spacing))
    data = preprocess({"image": image})
    if not torch.isfinite(data["image"]).all():
        raise PredictError(
            f"{image} holds NaN or infinite voxels; fix or drop the scan (training refuses them too)"
        )
    original = read_geometry(image)  # header only: the pixels are read once, by the pipeline
    with (
        torch.no_grad(),
        torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"),
    ):
        outputs = sliding_window_inference(
            data["image"][None].to(device),
            roi_size=tuple(prep.patch_size),
            sw_batch_size=prep.sw_batch_size,
            predictor=lambda windows: tuple(expert.network(windows)),
            overlap=prep.sw_overlap if overlap is None else overlap,
            mode="gaussian",
        )
    if isinstance(outputs, Tensor):  # MONAI returns a one-element tuple as its tensor
        outputs = (outputs,)
    written = []
    for task in expert.card.tasks:
        logits = outputs[task["output_index"]]
        maps = {"pred": logits.float().argmax(1, keepdim=True)[0].cpu()}  # (1, *S) in the model grid
        if probabilities:
            maps["prob"] = logits.float().softmax(1)[0].cpu()  # (K, *S)
        keys = list(maps)
        meta = {"meta": data["image"].meta, "applied_operations": data["image"].applied_operations}
        inverted = mt.Invertd(
            keys, preprocess, orig_keys="image", nearest_interp=[k == "pred" for k in keys]
        )({**{k: MetaTensor(v, **meta) for k, v in maps.items()}, "image": data["image"]})
        base = out_dir / f"{stem or _output_name(image)}_{task['name']}"
        label = np.asarray(inverted["pred"][0]).round().astype(np.uint8)  # (x, y, z) of the input grid
        written.append(_write_image(_in_input_geometry(label, original), Path(f"{base}.nii.gz")))
        if probabilities:
            probability = np.asarray(inverted["prob"], dtype=np.float32)
            _write_image(
                _in_input_geometry(probability, original, vector=True), Path(f"{base}_probabilities.nii.gz")
            )
    return written


def predict_classification(expert: Expert, images: Sequence[str], out_dir: Path, device: str = "cpu") -> Path:
    """Write ``<out_dir>/<name>_predictions.csv``: one row per image and task with the predicted class
    and that task's class probabilities.

    Columns: ``image, task, prediction``, then ``p_<class>`` for a one-task network, or
    ``p_<task>/<class>`` for every task's classes (a row fills its own task's columns, the others stay
    empty) when the network answers several tasks.
    """
    card = expert.card
    transform = cls2d_transforms(False, card.preprocessing.patch_size, card.preprocessing.channels)
    single = len(card.tasks) == 1
    columns = [
        (task["name"], f"p_{c}" if single else f"p_{task['name']}/{c}")
        for task in card.tasks
        for c in task["classes"]
    ]
    out = out_dir / f"{card.name}_predictions.csv"
    with atomic_file(out) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "task", "prediction", *[name for _, name in columns]])
        for image in tqdm(images, desc="images"):
            x = transform({"image": image, "label": 0})["image"][None].to(device)
            if not torch.isfinite(x).all():
                raise PredictError(f"{image} holds NaN or infinite values; fix or drop the image")
            with torch.no_grad():
                outputs = expert.network(x)
            for task in card.tasks:
                probabilities = outputs[task["output_index"]].float().softmax(1)[0].cpu().tolist()
                mine = iter(probabilities)
                cells = [next(mine) if owner == task["name"] else "" for owner, _ in columns]
                writer.writerow([image, task["name"], task["classes"][int(np.argmax(probabilities))], *cells])
    return out


def predict_files(
    inputs: Sequence[str | Path],
    source: str | Path,
    out_dir: str | Path,
    *,
    region: str | None = None,
    device: str = "cpu",
    probabilities: bool = False,
    overlap: float | None = None,
    force: bool = False,
    min_confidence: float | None = None,
) -> list[Path]:
    """Predict every input with the expert from ``source``; return the written files.

    Every input is inspected first (its header only) and the plan printed, one line per input; an
    input the model cannot mean (dimensionality, components, a DICOM modality other than the card's)
    stops the run before any inference.

    Args:
        inputs: files, DICOM series folders, folders of files or manifests (see :func:`collect_inputs`).
        source: an exported expert folder, a folder of exported experts (``export --all-regions``, with
            ``region="auto"``), a LoRKD checkpoint (then ``region`` selects the expert) or a generalist
            checkpoint (all its tasks, or those of ``region``).
        out_dir: output folder; every file in it is written atomically.
        region: the region (default: the inputs' ``region`` field where they all share one); ``"auto"``:
            each input's own, from its manifest row, its DICOM ``BodyPartExamined`` or the region router
            (:mod:`lorkd_pl.deploy.region_choice`; the decisions go to ``<out_dir>/routing.csv``).
        device: ``"cpu"`` or ``"cuda"``.
        probabilities: segmentation: also write probability maps (see :func:`predict_segmentation`).
        overlap: segmentation: sliding-window overlap (default: the expert's).
        force: predict inputs whose DICOM modality differs from the card's (a warning instead).
        min_confidence: ``region="auto"``: the router's lowest acceptable probability (default: the
            router card's).
    """
    if overlap is not None and not 0 <= overlap < 1:
        raise PredictError(
            f"--overlap must be in [0, 1) (the fraction of a window its neighbour covers), got {overlap}"
        )
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise PredictError(f"--min-confidence must be in [0, 1] (a probability), got {min_confidence}")
    collected = collect_inputs(inputs)
    check_output_folder([*inputs, *(row["image"] for row in collected)], out_dir)
    unique = {str(Path(row["image"]).resolve()): row for row in reversed(collected)}
    rows = list(reversed(unique.values()))  # an input given twice is predicted once
    if region == "auto":
        return _predict_routed(
            rows, source, Path(out_dir), device, probabilities, overlap, force, min_confidence
        )
    regions = {row.get("region") for row in rows} - {None}
    if region is None and len(regions) == 1:
        region = regions.pop()
    try:
        expert = load_expert(source, region, device)
    except ExportError as error:
        raise PredictError(str(error)) from None
    regions = {t["region"] for t in expert.card.tasks}
    mismatched = [row["image"] for row in rows if row.get("region") not in (None, *regions)]
    if mismatched:
        raise PredictError(
            f"inputs {mismatched[:3]} belong to another region than the {expert.card.name!r} model's "
            f"{sorted(regions)}"
        )
    images = _without_own_outputs([row["image"] for row in rows], [expert.card])
    check_inputs(images, expert.card, force)
    stems = output_stems(images)
    check_own_outputs(Path(out_dir), planned_outputs(expert.card, images, stems, probabilities))
    return _predict_with(expert, images, Path(out_dir), stems, device, probabilities, overlap)


def _without_own_outputs(images: Sequence[str], cards: Sequence[ExpertCard]) -> list[str]:
    """``images`` less the predictions an earlier run of these models wrote (they are not inputs).

    Raises:
        PredictError: if nothing is left.
    """
    own = [image for image in images if any(is_own_output(image, card) for card in cards)]
    if own:
        print(f"lorkd-pl: skipping {len(own)} earlier prediction(s) among the inputs, e.g. {own[0]}")
    left = [image for image in images if image not in own]
    if not left:
        raise PredictError("no inputs left to predict (the input folders hold only earlier predictions)")
    return left


def _predict_with(
    expert: Expert,
    images: Sequence[str],
    out_dir: Path,
    stems: dict[str, str],
    device: str,
    probabilities: bool,
    overlap: float | None,
) -> list[Path]:
    """Predict checked ``images`` with one expert; return the written files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if expert.card.kind == "cls2d":
        return [predict_classification(expert, images, out_dir, device)]
    written: list[Path] = []
    for image in tqdm(images, desc="cases"):
        written += predict_segmentation(expert, image, out_dir, device, probabilities, overlap, stems[image])
    return written


def _predict_routed(
    rows: Sequence[dict[str, Any]],
    source: str | Path,
    out_dir: Path,
    device: str,
    probabilities: bool,
    overlap: float | None,
    force: bool,
    min_confidence: float | None,
) -> list[Path]:
    """``region="auto"``: choose every input's region (:func:`~lorkd_pl.deploy.region_choice.choose_regions`),
    check all of them against their experts, write ``routing.csv``, then predict region by region."""
    try:
        experts, router = load_experts_and_router(source, device)
    except ExportError as error:
        raise PredictError(str(error)) from None
    images = _without_own_outputs([row["image"] for row in rows], [e.card for e in experts.values()])
    stems = output_stems(images)  # before the (slow) routing: a name clash costs nothing
    kept = [row for row in rows if row["image"] in images]
    unknown = sorted({str(row["region"]) for row in kept if row.get("region")} - set(experts))
    if unknown:
        raise PredictError(
            f"the inputs name regions {unknown} that {source} has no expert for ({sorted(experts)})"
        )
    threshold = (
        min_confidence if min_confidence is not None else (router.card.min_confidence if router else 0.0)
    )
    routed_by = None
    if router is not None:
        missing = sorted(set(router.card.regions) - set(experts))
        if missing:
            raise PredictError(f"the router of {source} routes to {missing}, which have no expert there")

        def routed_by(image: str) -> dict[str, float]:
            return router_probabilities(router.network, router.card, image, device)

    try:
        modalities = {region: expert.card.preprocessing.modality for region, expert in experts.items()}
        decisions = choose_regions(kept, sorted(experts), routed_by, threshold, modalities)
    except (RegionChoiceError, ImageReadError) as error:
        raise PredictError(str(error)) from None
    groups: dict[str, list[str]] = {}
    for decision in decisions:
        groups.setdefault(decision.region, []).append(decision.image)
        how = f"router {decision.confidence:.2f}" if decision.confidence is not None else decision.decided_by
        print(f"{decision.image} → {decision.region} ({how})")
    for region, group in groups.items():
        check_inputs(group, experts[region].card, force)
    planned = ["routing.csv"]
    for region, group in groups.items():
        planned += planned_outputs(experts[region].card, group, stems, probabilities)
    check_own_outputs(out_dir, planned)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_routing(out_dir / "routing.csv", decisions, router.card.regions if router else sorted(experts))
    written: list[Path] = [out_dir / "routing.csv"]
    for region, group in groups.items():
        written += _predict_with(experts[region], group, out_dir, stems, device, probabilities, overlap)
    return written


def _write_routing(path: Path, decisions: Sequence[Any], regions: Sequence[str]) -> None:
    """``routing.csv``: image, region, decided_by, confidence and the router's ``p_<region>`` columns."""
    with atomic_file(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "region", "decided_by", "confidence", *[f"p_{r}" for r in regions]])
        for d in decisions:
            confidence = "" if d.confidence is None else f"{d.confidence:.6f}"
            cells = [f"{d.probabilities[r]:.6f}" if r in d.probabilities else "" for r in regions]
            writer.writerow([d.image, d.region, d.decided_by, confidence, *cells])
