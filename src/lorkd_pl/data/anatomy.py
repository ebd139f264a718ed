"""A real-anatomy check: brain tissue segmentation on the MNI ICBM152 2009a brain, shipped by PyPI.

The demo's phantoms are synthetic; this check puts real anatomy into the same pipeline. Its source is
the MNI ICBM152 2009a nonlinear symmetric template (T1, grey- and white-matter probability maps, 1 mm)
that the ``nilearn`` wheel ships in ``nilearn/datasets/data/`` (installed with
``pip install --no-deps nilearn==0.14.1``; nothing is downloaded at run time, the files' SHA-256 are
checked). The template is one brain (an average of 152 adults), so the subjects of the check are
*simulated acquisitions of that real anatomy*:

* a random smooth deformation: an affine about the brain's centre (Euler angles ≤ 8° about each axis,
  scale 0.9–1.1 per axis, shift ≤ 5 mm per axis), then a cubic B-spline on a 4³ control grid
  (coefficients of σ 3 mm; displacements of about 1 mm σ, at most about 4 mm), so no two subjects have
  the same shape or pose;
* an oblique thick-slice grid around that subject's brain (in-plane 1.0–1.6 mm, slices 2.5–4 mm,
  direction: Euler angles ≤ 15° about each axis; the slice profile of the voxel's extent) — the image
  and the reference labels share it;
* MR intensity variation: gamma 0.7–1.4, a smooth multiplicative bias field (×0.82–1.22), an arbitrary
  scanner scale and Rician noise (σ 1–4 % of the brain's maximum).

Labels are the argmax of ``background`` (outside the template's brain mask), ``csf`` (inside it,
``1 − p_gm − p_wm``), ``gray_matter`` and ``white_matter`` after the same deformation and slice
profile, i.e. what a rater would label at that resolution. Train, validation and test subjects are
drawn from disjoint random streams; the test subjects are never used for any choice (configs, epochs,
seeds). What the check does NOT measure: generalisation across real individuals (all subjects share
one anatomy, smoother than any single brain).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from lorkd_pl.io.atomic import atomic_folder

#: The template files in the nilearn 0.14.1 wheel and their SHA-256.
MNI_FILES: dict[str, tuple[str, str]] = {
    "t1": (
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    ),
    "gm": (
        "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    ),
    "wm": (
        "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
        "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    ),
}
NILEARN_SPEC = "nilearn==0.14.1"
TASK_NAME = "mni_brain_tissue"
CLASSES: tuple[str, ...] = ("background", "csf", "gray_matter", "white_matter")
#: Subjects per split; test subjects come from their own random streams.
SPLIT_SIZES: dict[str, int] = {"train": 6, "val": 2, "test": 3}
ANATOMY_VERSION = "2"
#: The first word of ``VERSION`` in a folder :func:`write_anatomy_data` wrote (only such folders are
#: ever regenerated in place).
VERSION_MARKER = "lorkd-pl-anatomy"
#: The task's training grid and patch: the 3D demo's, so the demo configs apply unchanged.
TASK_SPACING = (2.0, 2.0, 3.0)
TASK_PATCH = (40, 40, 24)


class AnatomyDataError(ValueError):
    """The template files are missing or not the pinned ones."""


def locate_mni152(folder: str | Path | None = None) -> dict[str, Path]:
    """Find the pinned template files and check their SHA-256.

    Args:
        folder: a folder holding the three files; default: the installed nilearn's
            ``datasets/data`` (found without importing nilearn, which needs scikit-learn).

    Returns:
        ``{"t1": path, "gm": path, "wm": path}``.

    Raises:
        AnatomyDataError: naming the missing or changed file and the fix.
    """
    if folder is None:
        spec = importlib.util.find_spec("nilearn")
        if spec is None or not spec.submodule_search_locations:
            raise AnatomyDataError(
                f"the MNI ICBM152 template comes from the nilearn wheel; install it with "
                f"`pip install --no-deps {NILEARN_SPEC}` (or pass --mni-dir FOLDER with the three files)"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    folder = Path(folder)
    paths = {}
    for key, (name, digest) in MNI_FILES.items():
        path = folder / name
        if not path.is_file():
            raise AnatomyDataError(f"{path} is missing; install `{NILEARN_SPEC}` or pass --mni-dir")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != digest:
            raise AnatomyDataError(
                f"{path} has SHA-256 {actual[:12]}…, not the pinned {digest[:12]}… of {NILEARN_SPEC}; "
                f"install that version"
            )
        paths[key] = path
    return paths


def tissue_probabilities(t1: sitk.Image, gm: sitk.Image, wm: sitk.Image) -> list[sitk.Image]:
    """Per-class probability images (background, csf, gray_matter, white_matter) of the template.

    Args:
        t1: the brain-masked T1 (0 outside the brain).
        gm: grey-matter probability, 0–255 (or 0–1).
        wm: white-matter probability, same scale as ``gm``.

    Returns:
        Four float32 images on ``t1``'s grid that sum to 1 in every voxel.
    """
    scale = 255.0 if sitk.GetArrayViewFromImage(gm).max() > 1.5 else 1.0
    p_gm = sitk.GetArrayFromImage(gm).astype(np.float32) / scale
    p_wm = sitk.GetArrayFromImage(wm).astype(np.float32) / scale
    brain = (sitk.GetArrayFromImage(t1) > 0).astype(np.float32)
    tissue = np.clip(p_gm + p_wm, 0.0, 1.0)
    share = np.divide(p_gm, p_gm + p_wm, out=np.zeros_like(p_gm), where=(p_gm + p_wm) > 0)
    probabilities = [
        1.0 - brain,
        brain * (1.0 - tissue),
        brain * tissue * share,
        brain * tissue * (1 - share),
    ]
    images = []
    for array in probabilities:
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.CopyInformation(t1)
        images.append(image)
    return images


@dataclass(frozen=True)
class Template:
    """The real anatomy a subject is simulated from: intensity in [0, 1] and the class probabilities."""

    t1: sitk.Image
    probabilities: tuple[sitk.Image, ...]

    @classmethod
    def from_files(cls, paths: Mapping[str, str | Path]) -> Template:
        """Read the template from :func:`locate_mni152`'s paths."""
        t1, gm, wm = (sitk.ReadImage(str(paths[key])) for key in ("t1", "gm", "wm"))
        intensity = sitk.Cast(t1, sitk.sitkFloat32)
        intensity = sitk.Cast(
            intensity / float(sitk.GetArrayViewFromImage(intensity).max()), sitk.sitkFloat32
        )
        return cls(intensity, tuple(tissue_probabilities(t1, gm, wm)))

    @functools.cached_property
    def brain_voxels(self) -> np.ndarray:
        """``(V, 3)`` ITK (x, y, z) indices of the brain mask's voxels (found once per template)."""
        return np.argwhere(sitk.GetArrayViewFromImage(self.probabilities[0]) < 0.5)[:, ::-1]


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random 3×3 rotation with angles up to ``max_degrees`` about each axis."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3)))
    return np.asarray(transform.GetMatrix()).reshape(3, 3)


def _brain_center(template: Template) -> np.ndarray:
    """World (LPS) centre of the template's brain mask."""
    index = template.brain_voxels.mean(axis=0)
    return np.asarray(template.t1.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def subject_transform(template: Template, rng: np.random.Generator) -> sitk.Transform:
    """A random smooth deformation: an affine about the brain's centre, then B-spline displacements.

    It maps subject (output) points to template points, as ``sitk.Resample`` expects.
    """
    center = _brain_center(template)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(center.tolist())
    affine.SetMatrix((_rotation(rng, 8.0) @ np.diag(rng.uniform(0.9, 1.1, 3))).ravel().tolist())
    affine.SetTranslation(rng.uniform(-5.0, 5.0, 3).tolist())
    # the B-spline's domain: the template padded by 40 mm (zero displacement outside it would leave
    # a seam where the brain stem meets the template's lower face)
    bspline = sitk.BSplineTransformInitializer(sitk.ConstantPad(template.t1, [40] * 3, [40] * 3), [4, 4, 4])
    bspline.SetParameters(rng.normal(0.0, 3.0, len(bspline.GetParameters())).tolist())
    return sitk.CompositeTransform([affine, bspline])


def _brain_box(template: Template, margin: float) -> np.ndarray:
    """The 8 world corners of the template brain's bounding box widened by ``margin`` mm."""
    brain = template.brain_voxels
    corners = np.array(
        [template.t1.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in (brain.min(0), brain.max(0))]
    )
    lows, highs = corners.min(0) - margin, corners.max(0) + margin
    return np.array(
        [[x, y, z] for x in (lows[0], highs[0]) for y in (lows[1], highs[1]) for z in (lows[2], highs[2])]
    )


def _grid(direction: np.ndarray, lows: np.ndarray, highs: np.ndarray, spacing: np.ndarray) -> sitk.Image:
    """A reference image with ``direction`` covering ``lows``–``highs`` (coordinates along its axes)."""
    size = np.ceil((highs - lows) / spacing).astype(int) + 1
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin((direction @ lows).tolist())
    return grid


def _acquisition_grid(
    template: Template, transform: sitk.Transform, rng: np.random.Generator
) -> tuple[sitk.Image, np.ndarray]:
    """An oblique thick-slice grid around the SUBJECT's (deformed) brain with an 8 mm margin, and its spacing.

    The deformed brain is located by warping the brain mask onto a coarse 4 mm grid that covers the
    template's brain with a 40 mm margin (far beyond the deformation's reach).
    """
    spacing = np.array([*([rng.uniform(1.0, 1.6)] * 2), rng.uniform(2.5, 4.0)])
    direction = _rotation(rng, 15.0)
    local = _brain_box(template, 40.0) @ direction  # corner coordinates along the grid's axes
    coarse = _grid(direction, local.min(0), local.max(0), np.full(3, 4.0))
    brain = sitk.Resample(1.0 - template.probabilities[0], coarse, transform, sitk.sitkLinear, 0.0)
    inside = np.argwhere(sitk.GetArrayViewFromImage(brain) > 0.01)[:, ::-1]  # (x, y, z) indices
    lows = local.min(0) + inside.min(0) * 4.0 - 12.0  # 8 mm margin + one coarse voxel
    highs = local.min(0) + inside.max(0) * 4.0 + 12.0
    return _grid(direction, lows, highs, spacing), spacing


def _acquire(
    channels: sitk.Image, grid: sitk.Image, transform: sitk.Transform, spacing: np.ndarray
) -> np.ndarray:
    """Warp ``channels`` onto a 1 mm version of ``grid``, apply the slice profile, sample ``grid``.

    The deformation is evaluated once, as a displacement field on a 4 mm grid (it is smooth on a
    scale of centimetres), and every channel is resampled in one pass.

    Returns:
        ``(z, y, x, channels)`` float array on ``grid``.
    """
    fine = sitk.Image(
        [math.ceil(n * s) for n, s in zip(grid.GetSize(), spacing, strict=True)], sitk.sitkUInt8
    )
    fine.SetSpacing([1.0, 1.0, 1.0])
    fine.SetDirection(grid.GetDirection())
    fine.SetOrigin(grid.GetOrigin())
    coarse = [math.ceil(n / 4.0) + 1 for n in fine.GetSize()]
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, coarse, fine.GetOrigin(), [4.0] * 3, fine.GetDirection()
    )
    displacement = sitk.DisplacementFieldTransform(field)
    warped = sitk.Resample(channels, fine, displacement, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
    # a rectangular slice profile of each voxel's extent ≈ Gaussian with σ = extent / √12
    blurred = sitk.SmoothingRecursiveGaussian(warped, (spacing / math.sqrt(12.0)).tolist())
    return sitk.GetArrayFromImage(sitk.Resample(blurred, grid, sitk.Transform(), sitk.sitkLinear, 0.0))


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth multiplicative field exp(low-order polynomial), within ±``amplitude``."""
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    field = sum(rng.uniform(-1, 1) * a for a in axes) + sum(rng.uniform(-1, 1) * a * a for a in axes)
    field = field / max(float(np.abs(field).max()), 1e-6)
    return np.exp(amplitude * field)


def simulate_subject(template: Template, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """One simulated acquisition of the template's anatomy.

    Returns:
        The MR-like image (float32) and its label (uint8, :data:`CLASSES`) on the same oblique grid.
    """
    transform = subject_transform(template, rng)
    grid, spacing = _acquisition_grid(template, transform, rng)
    channels = sitk.Compose(template.t1, *template.probabilities)
    acquired = np.moveaxis(_acquire(channels, grid, transform, spacing), -1, 0)
    intensity, probabilities = acquired[0], acquired[1:]
    probabilities[0] += np.clip(1.0 - probabilities.sum(0), 0.0, None)  # outside the template: background
    label = probabilities.argmax(0).astype(np.uint8)
    signal = np.clip(intensity, 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    signal = signal * _bias_field(signal.shape, rng, 0.2) * rng.uniform(300.0, 1200.0)
    sigma = rng.uniform(0.01, 0.04) * float(signal.max())
    noisy = np.hypot(signal + rng.normal(0.0, sigma, signal.shape), rng.normal(0.0, sigma, signal.shape))
    image = sitk.GetImageFromArray(noisy.astype(np.float32))
    mask = sitk.GetImageFromArray(label)
    for out in (image, mask):
        out.CopyInformation(grid)
    return image, mask


def task_spec_fields(manifest: str) -> dict:
    """The task-spec file's fields (the 3D demo's grid and patch, so the demo configs apply)."""
    return {
        "name": TASK_NAME,
        "region": "brain",
        "kind": "seg3d",
        "classes": list(CLASSES),
        "manifest": manifest,
        "modality": "MR",
        "spacing": list(TASK_SPACING),
        "patch_size": list(TASK_PATCH),
    }


def version_line(seed: int) -> str:
    """``VERSION``'s content for subjects of ``seed`` (the marker, the simulator version, the seed)."""
    return f"{VERSION_MARKER} {ANATOMY_VERSION} seed={seed}"


def write_anatomy_data(
    out: str | Path, paths: Mapping[str, str | Path], seed: int = 0, overwrite: bool = False
) -> Path:
    """Simulate the subjects and write them with a manifest and a task spec (atomically).

    Writes ``<out>/subjects/<case>_{image,label}.nii.gz``, ``<out>/manifest.jsonl`` and
    ``<out>/tasks/mni_brain_tissue.yaml``; the same ``seed`` gives the same subjects.

    Args:
        out: output folder; must not exist unless ``overwrite``.
        paths: the template files (:func:`locate_mni152`).
        seed: random seed of the subjects.
        overwrite: replace an existing folder.
    """
    template = Template.from_files(paths)
    out = Path(out)
    with atomic_folder(out, overwrite) as work:
        (work / "subjects").mkdir()
        rows = []
        for s_index, (split, count) in enumerate(SPLIT_SIZES.items()):
            for index in range(count):
                case = f"{split}_{index:02d}"
                image, label = simulate_subject(template, np.random.default_rng([seed, s_index, index]))
                for suffix, volume in (("image", image), ("label", label)):
                    sitk.WriteImage(
                        volume, str(work / "subjects" / f"{case}_{suffix}.nii.gz"), useCompression=True
                    )
                rows.append(
                    {
                        "image": f"subjects/{case}_image.nii.gz",
                        "label": f"subjects/{case}_label.nii.gz",
                        "region": "brain",
                        "task": TASK_NAME,
                        "modality": "MR",
                        "split": split,
                        "case": case,
                    }
                )
        (work / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (work / "tasks").mkdir()
        spec = task_spec_fields("../manifest.jsonl")
        (work / "tasks" / f"{TASK_NAME}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        (work / "VERSION").write_text(version_line(seed) + "\n")
    return out
