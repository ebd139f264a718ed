"""SimpleITKReader against independent oracles: nibabel (NIfTI), pydicom tags (DICOM), round trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.data import NibabelReader
from monai.transforms import LoadImage

from lorkd_pl.data.readers import ImageReadError, SimpleITKReader, check_complete, read_geometry, read_image

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"


def load(path, reader):
    image = LoadImage(reader=reader, image_only=True)(str(path))
    return np.asarray(image), np.asarray(image.affine, dtype=np.float64)


@pytest.mark.parametrize("name", ["anatomical.nii", "functional.nii", "example4d.nii.gz", "standard.nii.gz"])
def test_nifti_matches_nibabel_reader(name) -> None:
    ours, our_affine = load(NIBABEL_DATA / name, SimpleITKReader())
    theirs, their_affine = load(NIBABEL_DATA / name, NibabelReader())
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    np.testing.assert_allclose(our_affine, their_affine, atol=1e-4)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_matches_its_tags(name) -> None:
    path = PYDICOM_DATA / name
    dataset = pydicom.dcmread(path)
    array, affine = load(path, SimpleITKReader())
    expected = dataset.pixel_array * float(getattr(dataset, "RescaleSlope", 1)) + float(
        getattr(dataset, "RescaleIntercept", 0)
    )
    assert array.shape[:2] == (dataset.Columns, dataset.Rows)
    np.testing.assert_allclose(array[..., 0].T, expected)  # (x, y) order: x runs along a row
    row_cosine, column_cosine = np.array(dataset.ImageOrientationPatient, dtype=float).reshape(2, 3)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(affine[:3, 0], lps_to_ras @ row_cosine * column_spacing, atol=1e-6)
    np.testing.assert_allclose(affine[:3, 1], lps_to_ras @ column_cosine * row_spacing, atol=1e-6)
    np.testing.assert_allclose(
        affine[:3, 3], lps_to_ras @ np.array(dataset.ImagePositionPatient, float), atol=1e-4
    )


def test_dicom_series_folder(tmp_path) -> None:
    shutil.copy(PYDICOM_DATA / "CT_small.dcm", tmp_path / "slice0.dcm")
    folder_array, folder_affine = load(tmp_path, SimpleITKReader())
    file_array, file_affine = load(PYDICOM_DATA / "CT_small.dcm", SimpleITKReader())
    np.testing.assert_array_equal(folder_array, file_array)
    np.testing.assert_allclose(folder_affine, file_affine)


def random_volume(rng: np.random.Generator) -> sitk.Image:
    array = rng.normal(size=(7, 6, 5)).astype(np.float32)  # (z, y, x)
    image = sitk.GetImageFromArray(array)
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple((rotation @ np.diag([-1.0, 1, 1])).reshape(-1)))
    image.SetSpacing((0.7, 1.3, 3.1))
    image.SetOrigin((12.5, -40.0, 7.25))
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_read_round_trip(tmp_path, suffix) -> None:
    original = random_volume(np.random.default_rng(0))
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(original, str(path))
    array, affine = load(path, SimpleITKReader())
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(original).T)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, original.GetSpacing(), rtol=1e-6)
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(lps @ affine[:3, 3], original.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(
        lps @ affine[:3, :3] / spacing, np.reshape(original.GetDirection(), (3, 3)), atol=1e-6
    )
    reread = read_image(path)
    assert reread.GetSize() == original.GetSize()
    if suffix == ".nii.gz":  # nibabel as an independent oracle of the same file
        _, their_affine = load(path, NibabelReader())
        np.testing.assert_allclose(affine, their_affine, atol=1e-5)


def test_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(ImageReadError, match="image file not found"):
        read_image(tmp_path / "missing.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageReadError, match=r"cannot read image .*corrupt.nii.gz: the file is corrupt"):
        read_image(corrupt)
    with pytest.raises(ImageReadError, match="no DICOM series"):
        read_image(tmp_path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_detected(tmp_path, suffix) -> None:
    """ITK's NIfTI reader zero-fills a truncated file silently; read_image(check=True) refuses it."""
    array = np.random.default_rng(0).normal(size=(8, 8, 9)).astype(np.float32)
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(whole))
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    silently_wrong = sitk.GetArrayFromImage(sitk.ReadImage(str(cut)))
    assert not np.array_equal(silently_wrong, array)  # the reason for the check: no error, wrong voxels
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(whole, check=True)), array)
    for size in (len(data) // 2, len(data) - 1):  # half the file, or only the last byte missing
        cut.write_bytes(data[:size])
        with pytest.raises(ImageReadError, match=r"cut\.nii.* truncated"):
            read_image(cut, check=True)


def test_complete_nifti_files_pass_the_check(tmp_path) -> None:
    for path in sorted((Path(nibabel.__file__).parent / "tests" / "data").glob("*.nii*")):
        check_complete(path)  # nibabel's samples: NIfTI-1, big/little endian, gz, 4D
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    nibabel.save(nibabel.Nifti2Image(array, np.eye(4)), tmp_path / "two.nii")
    check_complete(tmp_path / "two.nii")
    (tmp_path / "cut.nii").write_bytes((tmp_path / "two.nii").read_bytes()[:-2])
    with pytest.raises(ImageReadError, match="truncated"):
        check_complete(tmp_path / "cut.nii")


def test_header_geometry_equals_the_full_read(tmp_path) -> None:
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((-3.0, 12.5, 40.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "rotated.mha"))
    for path in (
        tmp_path / "rotated.mha",
        Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii",
    ):
        full = read_image(path)
        geometry = read_geometry(path)
        assert geometry.size == full.GetSize() and geometry.spacing == full.GetSpacing()
        assert geometry.origin == full.GetOrigin() and geometry.direction == full.GetDirection()
    with pytest.raises(ImageReadError, match="not found"):
        read_geometry(tmp_path / "missing.nii.gz")
