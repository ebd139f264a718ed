"""The embedded demo data: synthetic but anatomically structured phantoms, generated locally.

``write_demo_data(out)`` writes, deterministically for a seed:

* ``seg3d/<region>/<case>_{image,label}.nii.gz`` — for brain (MR-like), thorax, abdomen and pelvis
  (CT-like): randomly shaped, sized, rotated and placed organs with region-specific labels, noise,
  partial-volume blur and (MR) a bias field, on grids with anisotropic spacing and non-identity
  direction and origin; ``seg3d/manifest.jsonl`` lists them with their split;
* ``cls2d/<region>.npz`` — MedMNIST-style 2D classification sets (normal vs. subtle findings) per region;
* ``tasks/demo_<region>_{seg,cls}.yaml`` — task-spec files pointing at them.

Anatomy is placed in world coordinates (ITK's LPS, mm), so labels such as *left* and *right* refer to
the patient whatever the image direction is: a pipeline that mishandles geometry learns nonsense.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import yaml

from lorkd_pl.checks import check_seed
from lorkd_pl.data.demo_tasks import (
    ANATOMY_SCALE,
    CLS_SPLIT_SIZES,
    DEMO_REGIONS,
    DEMO_VERSION,
    SPLIT_OF_VOLUME,
    VOLUMES_PER_REGION,
    DemoRegion,
    demo_task_fields,
)
from lorkd_pl.io.atomic import atomic_folder, holds_only


# ----------------------------------------------------------------------------- shapes
def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random rotation matrix with angles up to ``max_degrees`` about each axis."""
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rot = np.eye(3)
        rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
        matrix = rot @ matrix
    return matrix


def _ellipsoid(points: np.ndarray, center, radii, rotation: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of ``points`` (..., 3) inside an ellipsoid (world mm)."""
    local = points - np.asarray(center, dtype=np.float64)
    if rotation is not None:
        local = local @ rotation
    return (np.square(local / np.asarray(radii, dtype=np.float64))).sum(-1) <= 1.0


class _Phantom:
    """Paints labelled structures with intensities; later structures overwrite earlier ones."""

    def __init__(self, points: np.ndarray, rng: np.random.Generator, background: float) -> None:
        self.points, self.rng = points, rng
        self.intensity = np.full(points.shape[:-1], background, dtype=np.float64)
        self.label = np.zeros(points.shape[:-1], dtype=np.uint8)

    def jitter(self, value, fraction: float) -> np.ndarray:
        value = np.asarray(value, dtype=np.float64)
        return value * (1 + self.rng.uniform(-fraction, fraction, size=value.shape))

    def add(
        self, center, radii, value: float, label: int = 0, mask: np.ndarray | None = None, rotate: float = 12
    ):
        inside = _ellipsoid(
            self.points,
            np.asarray(center) + self.rng.normal(0, 3.0, size=3),
            self.jitter(radii, 0.18),
            _rotation(self.rng, rotate),
        )
        if mask is not None:
            inside &= mask
        self.intensity[inside] = value + self.rng.normal(0, abs(value) * 0.05 + 5)
        if label:
            self.label[inside] = label
        return inside


def _paint(region: str, phantom: _Phantom) -> None:
    p, add = phantom.points, phantom.add
    x = p[..., 0]  # LPS: +x is the patient's left
    if region == "brain":
        add((0, 0, 0), (70, 85, 70), 650)  # scalp
        add((0, 0, 0), (64, 79, 64), 120)  # skull (dark on MR)
        brain = add((0, 0, 0), (58, 73, 58), 0)
        midline = phantom.rng.normal(0, 2.0)
        phantom.intensity[brain] = 430
        phantom.label[brain & (x > midline + 1.5)] = 1  # left hemisphere
        phantom.label[brain & (x < midline - 1.5)] = 2  # right hemisphere
        phantom.intensity[brain & (np.abs(x - midline) <= 1.5)] = 700  # falx / CSF gap
        for side in (-1, 1):
            add((side * 9 + midline, -5, 8), (6, 20, 9), 760, label=3, mask=brain)
        phantom.intensity[brain & (phantom.label < 3)] += phantom.rng.normal(0, 25)
        return
    add((0, 0, 0), (95, 70, 140), -90, rotate=5)  # body with fat
    body = add((0, 0, 0), (88, 63, 140), 35, rotate=5)
    if region == "thorax":
        add((-38, 5, 0), (30, 42, 70), -820, label=2, mask=body)  # right lung (patient right: -x)
        add((38, 5, 0), (28, 42, 70), -820, label=1, mask=body)  # left lung
        add((14, -22, -10), (26, 22, 30), 45, label=3, mask=body)  # heart, anterior-left
        add((0, 45, 0), (11, 11, 140), 420, label=4, mask=body, rotate=3)  # spine
    elif region == "abdomen":
        add((-35, -5, 10), (40, 38, 45), 62, label=1, mask=body)  # liver, patient right
        add((45, 22, 10), (16, 14, 28), 50, label=3, mask=body)  # spleen, left posterior
        for side in (-1, 1):
            add((side * 38, 35, -25), (12, 10, 26), 150, label=2, mask=body)  # kidneys
        add((0, 48, 0), (10, 10, 140), 400, mask=body, rotate=3)  # spine (unlabelled here)
    elif region == "pelvis":
        add((0, -20, 0), (28, 22, 26), 8, label=1, mask=body)  # bladder
        for side, label in ((1, 3), (-1, 2)):  # patient left = +x
            outer = add((side * 55, 10, 0), (22, 34, 48), 720, label=label, mask=body)
            inner = _ellipsoid(p, (side * 55, 10, 0), (15, 27, 41))
            phantom.intensity[outer & inner] = 250  # marrow
    else:
        raise ValueError(f"no demo anatomy for region {region!r}")


def _blur(volume: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(volume).float()[None, None]
    kernel = torch.tensor([0.25, 0.5, 0.25])
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = 3
        pad = [0] * 6
        pad[2 * (2 - dim)], pad[2 * (2 - dim) + 1] = 1, 1
        tensor = F.conv3d(F.pad(tensor, pad, mode="replicate"), kernel.view(shape))
    return tensor[0, 0].double().numpy()


def make_volume(region: DemoRegion, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """One random phantom of ``region``: (image float32, label uint8) with its own geometry."""
    size = np.array([rng.integers(44, 53), rng.integers(44, 53), rng.integers(22, 29)])
    spacing = np.array([rng.uniform(1.8, 2.3), rng.uniform(1.8, 2.3), rng.uniform(3.0, 3.8)])
    flips = np.diag([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), 1.0])
    direction = _rotation(rng, 8) @ flips
    center = rng.normal(0, 5.0, size=3) + np.array([0, 0, 20.0])
    extent = direction @ np.diag(spacing) @ ((size - 1) / 2)
    origin = center - extent
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).astype(np.float64)
    points = origin + (grid * spacing) @ direction.T - center  # world mm relative to the anatomy
    points = points / ANATOMY_SCALE  # anatomy is drawn at 1 / ANATOMY_SCALE of its coded size
    background = -1000.0 if region.modality == "CT" else 0.0
    phantom = _Phantom(points, rng, background)
    _paint(region.region, phantom)
    image = _blur(phantom.intensity)
    if region.modality == "MR":
        gradient = rng.normal(0, 0.15, size=3) / 100 * ANATOMY_SCALE
        image = image * (1 + points @ gradient)  # smooth bias field
        image += rng.normal(0, rng.uniform(30, 60), size=image.shape)
        image = np.clip(image, 0, None)
    else:
        image += rng.normal(0, rng.uniform(25, 55), size=image.shape)
    sitk_image = sitk.GetImageFromArray(image.astype(np.float32).transpose(2, 1, 0))
    sitk_label = sitk.GetImageFromArray(phantom.label.transpose(2, 1, 0))
    for item in (sitk_image, sitk_label):
        item.SetSpacing(tuple(float(s) for s in spacing))
        item.SetOrigin(tuple(float(o) for o in origin))
        item.SetDirection(tuple(float(d) for d in direction.reshape(-1)))
    return sitk_image, sitk_label


# ----------------------------------------------------------------------------- 2D classification
def make_cls_image(region: DemoRegion, label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A 2D ``(size, size)`` uint8 slice-like image of ``region``; class ``label`` adds a subtle finding."""
    coords = (np.arange(size) - (size - 1) / 2) / (size / 2)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    def blob(cy, cx, ry, rx):
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    image = np.zeros((size, size))
    body = blob(rng.normal(0, 0.04), rng.normal(0, 0.04), rng.uniform(0.7, 0.85), rng.uniform(0.8, 0.95))
    image[body] = 0.45
    organs = []
    if region.region == "brain":
        image[body] = 0.55
        organs = [blob(0, 0, 0.6, 0.55)]
        image[blob(0, -0.12, 0.25, 0.07) | blob(0, 0.12, 0.25, 0.07)] = 0.85  # ventricles
    elif region.region == "thorax":
        organs = [blob(0, -0.4, 0.5, 0.28), blob(0, 0.4, 0.5, 0.26)]
        for organ in organs:
            image[organ] = 0.12
        image[blob(0.15, 0.1, 0.25, 0.22)] = 0.5
    elif region.region == "abdomen":
        organs = [blob(-0.1, -0.35, 0.4, 0.33), blob(0.2, 0.45, 0.2, 0.15)]
        image[organs[0]] = 0.55
        image[organs[1]] = 0.5
    elif region.region == "pelvis":
        organs = [blob(-0.2, -0.6, 0.35, 0.18), blob(-0.2, 0.6, 0.35, 0.18)]
        for organ in organs:
            image[organ] = 0.85
        image[blob(0.15, 0, 0.22, 0.28)] = 0.3
    if label:
        organ = organs[rng.integers(len(organs))]
        ys, xs = np.nonzero(organ)
        pick = rng.integers(len(ys))
        radius = rng.uniform(0.1, 0.17)
        finding = blob(coords[ys[pick]], coords[xs[pick]], radius * rng.uniform(0.6, 1.4), radius) & body
        if region.region in ("thorax",) and label == 2:  # effusion: posterior crescent
            finding = organ & (yy > 0.2 + rng.uniform(0, 0.15))
        if region.region == "pelvis" and label == 1:  # fracture: a dark line through a bone
            angle = rng.uniform(0, math.pi)
            line = (
                np.abs((yy - coords[ys[pick]]) * math.cos(angle) - (xx - coords[xs[pick]]) * math.sin(angle))
                < 0.05
            )
            finding = organ & line
        contrast = rng.uniform(0.28, 0.42) * (1 if label == 2 and region.region != "pelvis" else -1)
        image[finding] += contrast
    image += rng.normal(0, rng.uniform(0.06, 0.1), size=image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writing
#: Everything a demo data folder holds: what ``demo-data --overwrite`` may replace.
DEMO_DATA_NAMES: tuple[str, ...] = ("seg3d", "cls2d", "tasks", "VERSION")


def is_demo_data(folder: Path) -> bool:
    """Whether ``folder`` is earlier demo data (its names only, with its VERSION file)."""
    return holds_only(folder, DEMO_DATA_NAMES) and (folder / "VERSION").is_file()


def write_demo_data(out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Generate the demo data set into ``out`` (atomically: a temporary folder renamed at the end).

    Args:
        out: output folder; must not exist unless ``overwrite``.
        seed: random seed; the same seed gives byte-identical arrays.
        overwrite: replace an existing folder.

    Returns:
        The output folder.
    """
    check_seed(seed, "--seed")
    out = Path(out)
    with atomic_folder(
        out, overwrite, owned=is_demo_data, what="earlier demo data (seg3d/, cls2d/, tasks/, VERSION)"
    ) as work:
        rows = []
        for r_index, region in enumerate(DEMO_REGIONS):
            folder = work / "seg3d" / region.region
            folder.mkdir(parents=True)
            for v in range(VOLUMES_PER_REGION):
                rng = np.random.default_rng([seed, r_index, v])
                image, label = make_volume(region, rng)
                case = f"{region.region}_{v:03d}"
                sitk.WriteImage(image, str(folder / f"{case}_image.nii.gz"), useCompression=True)
                sitk.WriteImage(label, str(folder / f"{case}_label.nii.gz"), useCompression=True)
                rows.append(
                    {
                        "image": f"{region.region}/{case}_image.nii.gz",
                        "label": f"{region.region}/{case}_label.nii.gz",
                        "region": region.region,
                        "task": f"demo_{region.region}_seg",
                        "modality": region.modality,
                        "split": SPLIT_OF_VOLUME[v],
                        "case": case,
                    }
                )
            (work / "cls2d").mkdir(exist_ok=True)
            arrays = {}
            for s_index, (split, count) in enumerate(CLS_SPLIT_SIZES.items()):
                rng = np.random.default_rng([seed, r_index, 1000 + s_index])
                labels = np.arange(count) % len(region.cls_classes)
                rng.shuffle(labels)
                arrays[f"{split}_images"] = np.stack([make_cls_image(region, int(c), rng) for c in labels])
                arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
            np.savez_compressed(work / "cls2d" / f"{region.region}.npz", **arrays)
        with (work / "seg3d" / "manifest.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        (work / "tasks").mkdir()
        for region in DEMO_REGIONS:
            for kind, data in (
                ("seg3d", "../seg3d/manifest.jsonl"),
                ("cls2d", f"../cls2d/{region.region}.npz"),
            ):
                spec = demo_task_fields(region, kind, data)
                (work / "tasks" / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        (work / "VERSION").write_text(f"{DEMO_VERSION} seed={seed}\n")
    return out


def ensure_demo_data(out: str | Path, seed: int = 0) -> Path:
    """Return ``out``, generating the demo data there first if it is missing or outdated."""
    out = Path(out)
    version = out / "VERSION"
    if version.is_file() and version.read_text().strip() == f"{DEMO_VERSION} seed={seed}":
        return out
    try:
        return write_demo_data(out, seed=seed, overwrite=True)
    except OSError:
        if version.is_file():  # another process (e.g. a DDP rank) finished first
            return out
        raise
