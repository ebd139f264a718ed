"""The embedded demo data: deterministic, anatomically consistent, real geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from lorkd_pl.data.demo import DEMO_REGIONS, ensure_demo_data, write_demo_data
from lorkd_pl.data.taskspec import load_task_spec
from lorkd_pl.data.transforms import seg3d_transforms
from lorkd_pl.registry import get_task


@pytest.fixture(scope="module")
def demo(demo_root):
    return ensure_demo_data(demo_root)


def rows(demo):
    return [json.loads(line) for line in (demo / "seg3d" / "manifest.jsonl").read_text().splitlines()]


def test_layout_and_counts(demo) -> None:
    manifest = rows(demo)
    for region in DEMO_REGIONS:
        mine = [r for r in manifest if r["region"] == region.region]
        assert len(mine) >= 8
        assert {r["split"] for r in mine} == {"train", "val", "test"}
        npz = np.load(demo / "cls2d" / f"{region.region}.npz")
        assert set(npz["train_labels"].reshape(-1)) == set(range(len(region.cls_classes)))
        for kind in ("seg", "cls"):
            spec = load_task_spec(demo / "tasks" / f"demo_{region.region}_{kind}.yaml")
            assert spec.classes == get_task(spec.name).classes


def test_geometry_is_anisotropic_and_not_identity(demo) -> None:
    spacings, directions, origins = [], [], []
    for row in rows(demo):
        image = sitk.ReadImage(str(demo / "seg3d" / row["image"]))
        label = sitk.ReadImage(str(demo / "seg3d" / row["label"]))
        assert image.GetSize() == label.GetSize() and image.GetDirection() == label.GetDirection()
        spacings.append(image.GetSpacing())
        directions.append(image.GetDirection())
        origins.append(image.GetOrigin())
        labels = np.unique(sitk.GetArrayViewFromImage(label))
        region = next(r for r in DEMO_REGIONS if r.region == row["region"])
        assert set(labels.tolist()) == set(range(len(region.seg_classes))), row["case"]
    spacings = np.array(spacings)
    assert (spacings[:, 2] > 1.3 * spacings[:, 0]).all()  # anisotropic
    assert all(not np.allclose(np.reshape(d, (3, 3)), np.eye(3)) for d in directions)
    assert len({tuple(np.round(o, 3)) for o in origins}) == len(origins)


def test_left_and_right_follow_the_patient_whatever_the_direction(demo) -> None:
    """After orientation to RAS (x grows to the patient's right), the left hemisphere has smaller x."""
    transform = seg3d_transforms(False, "MR", (2.0, 2.0, 3.0), (40, 40, 24))
    flipped = set()
    for row in [r for r in rows(demo) if r["region"] == "brain"]:
        image = sitk.ReadImage(str(demo / "seg3d" / row["image"]))
        flipped.add(np.sign(image.GetDirection()[0]))
        sample = transform(
            {"image": str(demo / "seg3d" / row["image"]), "label": str(demo / "seg3d" / row["label"])}
        )
        label = sample["label"][0].numpy()
        x = np.arange(label.shape[0])[:, None, None]
        left = (x * (label == 1)).sum() / (label == 1).sum()
        right = (x * (label == 2)).sum() / (label == 2).sum()
        assert left < right - 5, row["case"]
    assert flipped == {-1.0, 1.0}  # both image directions occur


def test_deterministic_for_a_seed(demo, tmp_path) -> None:
    again = write_demo_data(tmp_path / "again", seed=0)
    other = write_demo_data(tmp_path / "other", seed=1)
    for name in ("seg3d/brain/brain_000_image.nii.gz", "seg3d/thorax/thorax_003_label.nii.gz"):
        first = sitk.GetArrayFromImage(sitk.ReadImage(str(demo / name)))
        np.testing.assert_array_equal(first, sitk.GetArrayFromImage(sitk.ReadImage(str(again / name))))
        assert not np.array_equal(first, sitk.GetArrayFromImage(sitk.ReadImage(str(other / name))))
    a, b = np.load(demo / "cls2d" / "pelvis.npz"), np.load(again / "cls2d" / "pelvis.npz")
    np.testing.assert_array_equal(a["train_images"], b["train_images"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_demo_data(again)


def test_demo_data_overwrite_replaces_only_earlier_demo_data(tmp_path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "patient.nii.gz").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="is not earlier demo data"):
        write_demo_data(scans, overwrite=True)
    assert (scans / "patient.nii.gz").read_bytes() == b"precious"
