"""Bad input fails before training, with the file, the field and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.data.formats import DatasetFormatError
from lorkd_pl.data.taskspec import load_task_spec
from lorkd_pl.data.validation import DataValidationError, validate_task
from lorkd_pl.registry import RegistryError, register_task


def write_volume(path, array, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def make_task(tmp_path, defect: str | None = None):
    image = np.random.default_rng(0).normal(size=(4, 6, 6)).astype(np.float32)
    label = np.zeros((4, 6, 6), dtype=np.uint8)
    label[1:3, 2:4, 2:4] = 1
    label_kwargs = {}
    if defect == "size":
        label = label[:, :5]
    elif defect == "geometry":
        label_kwargs["origin"] = (5.0, 0.0, 0.0)
    elif defect == "label_values":
        label[0, 0, 0] = 7
    elif defect == "nan":
        image[0, 0, 0] = np.nan
    elif defect == "dimension":
        image, label = image[0], label[0]
    suffix = ".mha" if defect == "nan" else ".nii.gz"  # ITK's NIfTI reader turns NaN into 0
    write_volume(tmp_path / f"img{suffix}", image)
    write_volume(tmp_path / f"lab{suffix}", label, **label_kwargs)
    if defect == "corrupt":
        (tmp_path / "img.nii.gz").write_bytes((tmp_path / "img.nii.gz").read_bytes()[:60])
    row = {"image": f"img{suffix}", "label": f"lab{suffix}", "region": "brain", "split": "train"}
    if defect == "missing":
        row["image"] = "nope.nii.gz"
    (tmp_path / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "task.yaml").write_text(
        "name: bad_task\nregion: brain\nkind: seg3d\nclasses: [background, lesion]\n"
        "manifest: manifest.jsonl\n"
        "patch_size: [4, 4, 4]\n"
    )
    return load_task_spec(tmp_path / "task.yaml")


def test_good_task_passes(tmp_path) -> None:
    records = validate_task(make_task(tmp_path), ["train"])
    assert len(records["train"]) == 1


@pytest.mark.parametrize(
    ("defect", "match"),
    [
        ("missing", r"manifest.jsonl, row 1: field 'image': image file not found: .*nope.nii.gz"),
        ("corrupt", r"field 'image': cannot read image .*img.nii.gz: the file is (corrupt|truncated)"),
        ("size", r"has size \(6, 6, 4\) but label .* has \(6, 5, 4\); resample the label"),
        ("geometry", r"disagree on origin .*the label must share the image's geometry"),
        ("label_values", r"field 'label' .* has values \[7\] outside the task's classes 0..1"),
        ("nan", r"field 'image' .* contains NaN or infinite voxels"),
        ("dimension", r"field 'image' .* is 2D; a seg3d task needs 3D"),
    ],
)
def test_bad_records_are_named(tmp_path, defect, match) -> None:
    with pytest.raises(DataValidationError, match=match):
        validate_task(make_task(tmp_path, defect), ["train"])


def test_datamodule_validates_before_training(tmp_path, clean_registry) -> None:
    register_task(make_task(tmp_path, "label_values"))
    module = MultiRegionDataModule(["bad_task"], batch_size=1)
    with pytest.raises(DataValidationError, match="task 'bad_task'"):
        module.setup("fit")


def test_empty_split_is_an_error(tmp_path, clean_registry) -> None:
    with pytest.raises(DataValidationError, match=r"has no 'val' samples; add rows with split='val'"):
        validate_task(make_task(tmp_path), ["val"])


def test_empty_manifest(tmp_path) -> None:
    make_task(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("")
    with pytest.raises(DatasetFormatError, match=r"manifest\.jsonl has no rows"):
        load_task_spec(tmp_path / "task.yaml").records("train")


def test_cls_label_out_of_range(tmp_path, clean_registry) -> None:
    arrays = {f"{s}_images": np.zeros((2, 8, 8), np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.array([[0], [3]]) for s in ("train", "val", "test")})
    np.savez(tmp_path / "d.npz", **arrays)
    (tmp_path / "t.yaml").write_text("name: c\nregion: spine\nkind: cls2d\nclasses: [a, b, c]\nnpz: d.npz\n")
    with pytest.raises(
        DataValidationError, match=r"\(train #1\): field 'label' is 3, outside the task's classes 0..2"
    ):
        validate_task(load_task_spec(tmp_path / "t.yaml"), ["train"])


def test_unknown_task_and_region_in_datamodule() -> None:
    with pytest.raises(RegistryError, match="unknown task 'demo_brian_seg'; did you mean 'demo_brain_seg'"):
        MultiRegionDataModule(["demo_brian_seg"])
    with pytest.raises(RegistryError, match="unknown region 'brian'"):
        MultiRegionDataModule(["demo_brain_seg"], region_weights={"brian": 2.0})
    with pytest.raises(ValueError, match="mixes task kinds"):
        MultiRegionDataModule(["demo_brain_seg", "demo_brain_cls"])
