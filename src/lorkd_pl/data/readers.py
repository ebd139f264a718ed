"""A SimpleITK image reader for MONAI with ITKReader's semantics.

MONAI's ``ITKReader`` needs the ``itk`` package; this reader gives the same result with SimpleITK:
the array in (x, y, z[, channel]) order and a RAS affine built from direction, spacing and origin
(ITK's LPS world converted to RAS), so ``Orientationd``/``Spacingd`` and
``monai.data.NibabelReader`` agree with it. It reads NIfTI, NRRD, MHA/MHD, DICOM series folders
and 2D PNG/JPEG/TIFF files.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def read_image(path: str | Path) -> sitk.Image:
    """Read one file or one DICOM series folder with SimpleITK.

    Raises:
        ImageReadError: naming the path, if it does not exist, holds no DICOM series, or cannot be
            decoded (corrupt or truncated file, unknown format).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image file not found: {path} (check the path in the manifest)")
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ImageReadError(f"no DICOM series in folder {path} (expected a folder of .dcm slices)")
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
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
