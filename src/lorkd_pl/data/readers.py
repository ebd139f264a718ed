"""A SimpleITK image reader for MONAI with ITKReader's semantics.

MONAI's ``ITKReader`` needs the ``itk`` package; this reader gives the same result with SimpleITK:
the array in (x, y, z[, channel]) order and a RAS affine built from direction, spacing and origin
(ITK's LPS world converted to RAS), so ``Orientationd``/``Spacingd`` and
``monai.data.NibabelReader`` agree with it. It reads NIfTI, NRRD, MHA/MHD, DICOM series folders
and 2D PNG/JPEG/TIFF files.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

SUFFIXES: tuple[str, ...] = (
    ".nii",
    ".nii.gz",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
)


class ImageReadError(OSError):
    """An image file or DICOM folder is missing or cannot be decoded."""


#: DICOM ``Modality`` (0008,0060) and ``BodyPartExamined`` (0018,0015).
MODALITY_TAG = "0008|0060"
BODY_PART_TAG = "0018|0015"
SOP_CLASS_TAG = "0008|0016"
#: DICOM objects that are not images of a patient (PS3.4 SOP classes): they must never be predicted.
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage (DICOM SEG)",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage (RTSTRUCT)",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan Storage (RTPLAN)",
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report (SR)",
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State (PR)",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}


def file_meta_sop_class(path: str | Path) -> str | None:
    """``MediaStorageSOPClassUID`` (0002,0002) from a DICOM Part 10 file's meta header (read as bytes:
    no DICOM library needed), or ``None``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    at = head.find(b"\x02\x00\x02\x00UI", 132)
    if at < 0:
        return None
    (length,) = struct.unpack("<H", head[at + 6 : at + 8])
    return head[at + 8 : at + 8 + length].decode("ascii", "replace").strip("\x00 ")


def non_image_sop_class(uid: str | None) -> str | None:
    """The name of a non-image DICOM SOP class (``uid`` exact or in a named family), else ``None``."""
    if not uid:
        return None
    return next(
        (
            name
            for key, name in NON_IMAGE_SOP_CLASSES.items()
            if uid == key or (key.endswith(".") and uid.startswith(key))
        ),
        None,
    )


def dicom_series_files(folder: str | Path) -> list[list[str]]:
    """The files of every DICOM series directly in ``folder`` (GDCM's order: by position), one list
    per series; ``[]`` when it holds none."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    return [list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i)) for i in ids]


def _nifti_expected_bytes(header: bytes) -> int | None:
    """``vox_offset + voxels × bytes per voxel`` from a NIfTI-1/2 header, or ``None`` if not NIfTI."""
    for order in ("<", ">"):
        (size,) = struct.unpack(f"{order}i", header[:4])
        if size == 348:  # NIfTI-1: dim int16[8] at 40, bitpix int16 at 72, vox_offset float32 at 108
            dims = struct.unpack(f"{order}8h", header[40:56])
            bitpix = struct.unpack(f"{order}h", header[72:74])[0]
            offset = int(struct.unpack(f"{order}f", header[108:112])[0])
        elif size == 540:  # NIfTI-2: bitpix int16 at 14, dim int64[8] at 16, vox_offset int64 at 168
            bitpix = struct.unpack(f"{order}h", header[14:16])[0]
            dims = struct.unpack(f"{order}8q", header[16:80])
            offset = struct.unpack(f"{order}q", header[168:176])[0]
        else:
            continue
        voxels = math.prod(max(int(d), 1) for d in dims[1 : 1 + max(min(int(dims[0]), 7), 0)])
        return offset + voxels * bitpix // 8
    return None


def check_complete(path: str | Path) -> None:
    """Raise if a NIfTI file (``.nii``/``.nii.gz``) holds fewer bytes than its header announces.

    ITK's NIfTI reader fills a truncated file's missing voxels with zeros without an error (tested);
    this check reads the header and, for ``.gz``, decompresses the stream once to count its bytes.

    Raises:
        ImageReadError: naming the file, the bytes expected and found, and the fix.
    """
    path = Path(path)
    name = path.name.lower()
    if path.is_dir() or not name.endswith((".nii", ".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                header, found = stream.read(540), 0
                found = len(header)
                while chunk := stream.read(1 << 20):
                    found += len(chunk)
        else:
            with path.open("rb") as stream:
                header = stream.read(540)
            found = path.stat().st_size
    except (OSError, EOFError, zlib.error) as error:  # gzip stream ends early or is damaged
        raise ImageReadError(
            f"cannot read image {path}: the file is truncated or damaged ({error}); copy it again"
        ) from None
    expected = _nifti_expected_bytes(header) if len(header) >= 348 else None
    if expected is not None and found < expected:
        raise ImageReadError(
            f"cannot read image {path}: the file is truncated ({found} of {expected} bytes the header "
            "announces); copy it again"
        )


def read_image(path: str | Path, check: bool = False) -> sitk.Image:
    """Read one file or one DICOM series folder with SimpleITK.

    Args:
        path: a file or a DICOM series folder.
        check: first verify that a NIfTI file is complete (:func:`check_complete`; used by data
            validation and prediction, not on every training read).

    Raises:
        ImageReadError: naming the path, if it does not exist, holds no DICOM series, or cannot be
            decoded (corrupt or truncated file, unknown format).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image file not found: {path} (check the path in the manifest)")
    if check:
        check_complete(path)
    try:
        if path.is_dir():
            series = dicom_series_files(path)
            if not series:
                raise ImageReadError(f"no DICOM series in folder {path} (expected a folder of .dcm slices)")
            files = series[0]
            if len(files) == 1:  # one file (e.g. a multi-frame DICOM): read it as it is
                return sitk.ReadImage(files[0])
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise ImageReadError(
            f"cannot read image {path}: the file is corrupt, truncated or not a medical image "
            f"(SimpleITK: {first_line})"
        ) from None


@dataclass(frozen=True)
class Geometry:
    """Size, spacing, origin and direction of an image (ITK/LPS conventions, x-fastest order)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (of the same size) this geometry; return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def read_geometry(path: str | Path) -> Geometry:
    """The geometry of an image file from its header only (a DICOM series folder is read whole).

    Raises:
        ImageReadError: as :func:`read_image`.
    """
    path = Path(path)
    if path.is_dir():
        source = read_image(path)
    else:
        if not path.exists():
            raise ImageReadError(f"image file not found: {path} (check the path in the manifest)")
        try:
            source = image_header(path)
        except RuntimeError as error:
            raise ImageReadError(
                f"cannot read the header of image {path}: {str(error).strip()[-200:]}"
            ) from None
    return Geometry(
        tuple(source.GetSize()),
        tuple(source.GetSpacing()),
        tuple(source.GetOrigin()),
        tuple(source.GetDirection()),
    )


def affine_ras(image: sitk.Image) -> np.ndarray:
    """The ``(d+1, d+1)`` RAS affine: ``direction · diag(spacing)`` and ``origin``, LPS → RAS."""
    dims = min(image.GetDimension(), 3)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(image.GetDimension(), -1)
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = direction[:dims, :dims] @ np.diag(np.asarray(image.GetSpacing())[:dims])
    affine[:dims, -1] = np.asarray(image.GetOrigin())[:dims]
    return orientation_ras_lps(affine)


def array_xyz(image: sitk.Image) -> np.ndarray:
    """Voxel array in (x, y, z) order (channels last for vector images), like ITKReader."""
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
    if image.GetNumberOfComponentsPerPixel() == 1:
        return array.T
    return np.moveaxis(array, -1, 0).T  # (c, z, y, x) -> (x, y, z, c)


class SimpleITKReader(ImageReader):
    """Load medical images with SimpleITK for MONAI's ``LoadImage``/``LoadImaged``.

    Args:
        channel_dim: channel dimension of the data; ``None``: no channel for scalar images, last
            for vector images (same default as ITKReader).
        affine_lps_to_ras: convert the affine to RAS (as NibabelReader/ITKReader do). Default True.
    """

    def __init__(self, channel_dim: int | None = None, affine_lps_to_ras: bool = True) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.affine_lps_to_ras = affine_lps_to_ras

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True for supported suffixes and for folders (DICOM series)."""
        for name in ensure_tuple(filename):
            path = Path(name)
            if not (path.is_dir() or str(path).lower().endswith(SUFFIXES)):
                return False
        return True

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> sitk.Image | list[sitk.Image]:
        """Read one image, or several to stack as channels."""
        images = [read_image(name) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """Array (x, y, z order; stacked on a new first axis for several images) and metadata."""
        arrays, meta = [], {}
        for image in img if isinstance(img, (list, tuple)) else [img]:  # an Image iterates its pixels
            array = array_xyz(image)
            affine = affine_ras(image)
            if not self.affine_lps_to_ras:
                affine = orientation_ras_lps(affine)
            spatial = np.asarray(image.GetSize()[: min(image.GetDimension(), 3)])
            header = {
                "spacing": np.asarray(image.GetSpacing()),
                MetaKeys.ORIGINAL_AFFINE: affine,
                MetaKeys.AFFINE: affine.copy(),
                MetaKeys.SPACE: SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS,
                MetaKeys.SPATIAL_SHAPE: spatial,
                MetaKeys.ORIGINAL_CHANNEL_DIM: (
                    self.channel_dim
                    if self.channel_dim is not None
                    else float("nan")
                    if array.ndim == len(spatial)
                    else -1
                ),
            }
            _copy_compatible_dict(header, meta)
            arrays.append(array)
        return _stack_images(arrays, meta), meta


@dataclass(frozen=True)
class InputInfo:
    """What an input is, from its header (no pixels read): how it will be read, its size, components
    per voxel and the DICOM ``Modality`` tag when it has one."""

    what: str
    size: tuple[int, ...]
    components: int
    modality: str | None
    spacing: tuple[float, ...] = ()
    body_part: str | None = None
    floating: bool = False  # float pixels: the only ones that can hold NaN or inf
    sop_class: str | None = None  # DICOM SOPClassUID

    @property
    def describe(self) -> str:
        """``DICOM series, 512×512×80, CT`` and the like."""
        parts = [self.what, "×".join(map(str, self.size))]
        if self.components > 1:
            parts.append(f"{self.components} components")
        if self.modality:
            parts.append(self.modality)
        return ", ".join(parts)


def inspect_input(image: str) -> InputInfo:
    """Classify one input from its header: a DICOM series folder, a DICOM file or another image file.

    Raises:
        ImageReadError: naming the input if its header cannot be read.
    """
    path = Path(image)
    files: list[str] = []
    try:
        if path.is_dir():
            series = dicom_series_files(path)
            files = series[0] if series else []
            if not files:
                raise ImageReadError(f"{path}: no DICOM series in this folder")
            header = image_header(files[0])
            size = (*header.GetSize()[:2], len(files)) if len(files) > 1 else tuple(header.GetSize())
            what = "DICOM series" if len(files) > 1 else "DICOM series of one file"
        else:
            header = image_header(path)
            size = tuple(header.GetSize())
            what = (
                "DICOM file"
                if header.HasMetaDataKey(MODALITY_TAG)
                else f"{path.suffix.lstrip('.') or 'image'} file"
            )
        modality = (
            header.GetMetaData(MODALITY_TAG).strip().upper() if header.HasMetaDataKey(MODALITY_TAG) else None
        )
    except RuntimeError as error:
        first = files[0] if path.is_dir() and files else path
        kind = non_image_sop_class(file_meta_sop_class(first))
        if kind is not None:  # ITK has no reader for an object without pixels (RTSTRUCT, SR, ...)
            raise ImageReadError(
                f"{path} is a DICOM {kind} object, not an image; give the image series"
            ) from None
        reason = " ".join(str(error).split())[-200:]
        raise ImageReadError(f"cannot read the header of {path}: {reason}") from None
    body_part = header.GetMetaData(BODY_PART_TAG).strip() if header.HasMetaDataKey(BODY_PART_TAG) else None
    floating = "float" in sitk.GetPixelIDValueAsString(header.GetPixelID()).lower()
    sop_class = (
        header.GetMetaData(SOP_CLASS_TAG).strip().strip("\x00")
        if header.HasMetaDataKey(SOP_CLASS_TAG)
        else None
    )
    return InputInfo(
        what,
        size,
        header.GetNumberOfComponents(),
        modality or None,
        tuple(header.GetSpacing()),
        body_part or None,
        floating,
        sop_class or None,
    )


def check_finite(image: str | Path) -> None:
    """Refuse an image (file or DICOM series folder) holding NaN or infinite values (reads its pixels).

    Raises:
        ImageReadError: naming the image and the fix.
    """
    pixels = read_image(image)  # held: a view of a temporary image reads freed memory (spurious NaN)
    if not np.isfinite(sitk.GetArrayViewFromImage(pixels)).all():
        raise ImageReadError(
            f"{image} holds NaN or infinite voxels; fix or drop the scan (training refuses them too)"
        )


def image_header(path: str | Path) -> sitk.ImageFileReader:
    """A reader holding ``path``'s header (size, spacing, metadata): no pixels are read.

    Raises:
        RuntimeError: ITK's, for a file it cannot read.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader
