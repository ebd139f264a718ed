"""The real-anatomy check's subject simulator, on a small template built here (the MNI files come from
the nilearn wheel, which the test environment does not install)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from lorkd_pl.data import anatomy
from lorkd_pl.data.anatomy import (
    CLASSES,
    SPLIT_SIZES,
    AnatomyDataError,
    Template,
    locate_mni152,
    simulate_subject,
    subject_transform,
    tissue_probabilities,
    write_anatomy_data,
)
from lorkd_pl.data.taskspec import load_task_spec


def _template_files(folder: Path) -> dict[str, Path]:
    """A 1 mm template in the MNI file conventions: a masked T1, GM and WM probabilities 0-255.

    An ellipsoidal brain (off-centre, LPS direction like the MNI file) with a white-matter core, a
    grey-matter shell and a CSF "ventricle" in the core.
    """
    size = (56, 64, 48)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size[::-1]], indexing="ij")
    r = np.sqrt(((x - 26) / 22) ** 2 + ((y - 33) / 27) ** 2 + ((z - 24) / 19) ** 2)
    brain = r <= 1.0
    ventricle = ((x - 30) / 5) ** 2 + ((y - 30) / 8) ** 2 + ((z - 24) / 4) ** 2 <= 1.0
    wm = (r <= 0.62) & ~ventricle
    gm = brain & ~wm & ~ventricle
    t1 = np.where(wm, 220, np.where(gm, 140, np.where(ventricle, 40, 0))).astype(np.uint8)
    paths = {}
    for key, array in (("t1", t1), ("gm", gm.astype(np.uint8) * 255), ("wm", wm.astype(np.uint8) * 255)):
        image = sitk.GetImageFromArray(array)
        image.SetOrigin((40.0, 50.0, -30.0))
        image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        paths[key] = folder / f"{key}.nii.gz"
        sitk.WriteImage(image, str(paths[key]))
    return paths


@pytest.fixture(scope="module")
def template_files(tmp_path_factory) -> dict[str, Path]:
    return _template_files(tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def template(template_files) -> Template:
    return Template.from_files(template_files)


def test_tissue_probabilities_hand_computed():
    t1 = sitk.GetImageFromArray(np.array([[[0, 10, 10, 10]]], dtype=np.uint8))
    gm = sitk.GetImageFromArray(np.array([[[0, 255, 51, 0]]], dtype=np.uint8))
    wm = sitk.GetImageFromArray(np.array([[[0, 0, 102, 0]]], dtype=np.uint8))
    probabilities = np.stack([sitk.GetArrayFromImage(p)[0, 0] for p in tissue_probabilities(t1, gm, wm)])
    expected = np.array(  # rows: background, csf, gray_matter, white_matter; columns: voxels
        [
            [1.0, 0.0, 0.0, 0.0],  # outside the brain
            [0.0, 0.0, 0.4, 1.0],  # 1 - p_gm - p_wm inside it
            [0.0, 1.0, 0.2, 0.0],
            [0.0, 0.0, 0.4, 0.0],
        ]
    )
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)


def test_subject_labels_follow_the_deformation(template):
    """Oracle: each label voxel's centre, mapped through the subject's transform point by point
    (ITK's TransformPoint, not the resampling path), lands on the template's class there."""
    image, label = simulate_subject(template, np.random.default_rng(7))
    transform = subject_transform(template, np.random.default_rng(7))  # the same first draw
    hard = np.stack([sitk.GetArrayFromImage(p) for p in template.probabilities]).argmax(0)
    array = sitk.GetArrayFromImage(label)
    rng = np.random.default_rng(0)
    foreground = np.argwhere(array > 0)
    picks = np.concatenate([foreground[rng.choice(len(foreground), 300)], np.argwhere(array == 0)[::997]])
    agree = []
    for z, y, x in picks:
        point = transform.TransformPoint(label.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
        index = template.t1.TransformPhysicalPointToIndex(point)
        inside = all(0 <= i < n for i, n in zip(index, template.t1.GetSize(), strict=True))
        expected = hard[index[2], index[1], index[0]] if inside else 0
        agree.append(expected == array[z, y, x])
    assert np.mean(agree) > 0.95  # the rest: partial volume at class borders (thick slices)
    # same grid for image and label, an oblique anisotropic acquisition
    assert image.GetSize() == label.GetSize() and image.GetDirection() == label.GetDirection()
    spacing = np.asarray(label.GetSpacing())
    assert 1.0 <= spacing[0] == spacing[1] <= 1.6 and 2.5 <= spacing[2] <= 4.0
    direction = np.asarray(label.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-9)
    assert not np.allclose(direction, np.eye(3))


def test_subject_keeps_t1_contrast_and_every_class(template):
    image, label = simulate_subject(template, np.random.default_rng(3))
    values, classes = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    means = [values[classes == c].mean() for c in range(len(CLASSES))]
    assert means[3] > means[2] > means[1] > means[0]  # WM > GM > CSF > background (T1)
    assert np.isfinite(values).all() and values.min() >= 0.0  # Rician noise is non-negative


def test_write_anatomy_data_is_a_deterministic_task(tmp_path, template_files):
    out = write_anatomy_data(tmp_path / "a", template_files, seed=1)
    spec = load_task_spec(out / "tasks" / "mni_brain_tissue.yaml")
    assert spec.classes == CLASSES and spec.region == "brain" and spec.kind == "seg3d"
    for split, count in SPLIT_SIZES.items():
        records = spec.records(split)
        assert len(records) == count and all(Path(r["image"]).is_file() for r in records)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len({r["case"] for r in rows}) == sum(SPLIT_SIZES.values())
    again = write_anatomy_data(tmp_path / "b", template_files, seed=1)
    first, second = (sitk.ReadImage(str(o / "subjects" / "test_00_image.nii.gz")) for o in (out, again))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(first), sitk.GetArrayFromImage(second))
    train = sitk.ReadImage(str(out / "subjects" / "train_00_image.nii.gz"))
    assert train.GetSize() != first.GetSize() or not np.array_equal(
        sitk.GetArrayFromImage(train), sitk.GetArrayFromImage(first)
    )
    with pytest.raises(FileExistsError):
        write_anatomy_data(out, template_files, seed=1)


def test_locate_checks_presence_and_digest(tmp_path, monkeypatch, template_files):
    with pytest.raises(AnatomyDataError, match="missing"):
        locate_mni152(tmp_path)
    pinned = {}
    for key, path in template_files.items():
        name = anatomy.MNI_FILES[key][0]
        (tmp_path / name).write_bytes(path.read_bytes())
        pinned[key] = (name, hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setattr(anatomy, "MNI_FILES", pinned)
    assert locate_mni152(tmp_path)["t1"] == tmp_path / pinned["t1"][0]
    (tmp_path / pinned["wm"][0]).write_bytes(b"changed")
    with pytest.raises(AnatomyDataError, match="SHA-256"):
        locate_mni152(tmp_path)


def test_cli_names_the_missing_template(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lorkd_pl.app.cli", "anatomy-check", "--out", str(tmp_path / "o"),
         "--mni-dir", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorkd-pl: error:") and "is missing" in lines[0]
    assert not (tmp_path / "o" / "data").exists()


def test_derived_configs_move_every_run_folder(tmp_path):
    from lorkd_pl.app.configs import config_root
    from lorkd_pl.app.demo import RUNS, derive_configs

    root = tmp_path / "check"
    derive_configs(config_root() / "demo", tmp_path / "configs", root, ["seg"], tasks=["a", "b"])
    for name in RUNS:
        text = (tmp_path / "configs" / f"{name}_seg.yaml").read_text()
        assert "runs/demo" not in text
        config = yaml.safe_load(text)
        assert config["data"]["init_args"]["tasks"] == ["a", "b"]
        assert config["trainer"]["default_root_dir"] == f"{root.as_posix()}/{name}_seg"
        if name != "teacher":
            assert config["model"]["init_args"]["teacher"].startswith(root.as_posix())


def test_grid_follows_a_strongly_moved_brain(template, monkeypatch):
    """The acquisition grid frames the deformed subject, not the template: a brain shifted and
    enlarged beyond the margin of a template-sized box still has background on every face."""

    def moved(template, rng):
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(np.diag([0.8, 0.8, 0.8]).ravel().tolist())  # subject → template: 25 % larger
        affine.SetTranslation([25.0, -20.0, 15.0])
        return affine

    monkeypatch.setattr(anatomy, "subject_transform", moved)
    _, label = simulate_subject(template, np.random.default_rng(0))
    array = sitk.GetArrayFromImage(label)
    faces = [array[0], array[-1], array[:, 0], array[:, -1], array[:, :, 0], array[:, :, -1]]
    assert all((face == 0).all() for face in faces)
    # the whole brain is there: its volume matches the template's, scaled by 1 / 0.8³
    brain_ml = (array > 0).sum() * np.prod(label.GetSpacing()) / 1000
    template_ml = (sitk.GetArrayFromImage(template.probabilities[0]) < 0.5).sum() / 1000
    assert brain_ml == pytest.approx(template_ml / 0.8**3, rel=0.1)


def test_data_folder_is_reused_refreshed_or_refused(tmp_path, template_files, monkeypatch):
    from lorkd_pl.app.anatomy import check_out_folder, ensure_anatomy_data

    folder = tmp_path / "data"
    monkeypatch.setattr(anatomy, "locate_mni152", lambda mni_dir: template_files)
    monkeypatch.setattr("lorkd_pl.app.anatomy.locate_mni152", lambda mni_dir: template_files)
    ensure_anatomy_data(folder, None, 0)
    stamp = (folder / "manifest.jsonl").stat().st_mtime_ns
    ensure_anatomy_data(folder, None, 0)  # same seed: reused
    assert (folder / "manifest.jsonl").stat().st_mtime_ns == stamp
    ensure_anatomy_data(folder, None, 1)  # another seed: regenerated (lorkd-pl's own folder)
    assert (folder / "VERSION").read_text().strip().endswith("seed=1")
    check_out_folder(tmp_path)  # an anatomy-check folder
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "scans.txt").write_text("my data")
    with pytest.raises(FileExistsError, match="no lorkd-pl-anatomy VERSION"):
        ensure_anatomy_data(mine / "data", None, 0)
    with pytest.raises(FileExistsError, match="not an anatomy-check folder"):
        check_out_folder(mine)
    assert (mine / "data" / "scans.txt").read_text() == "my data"


def test_derived_configs_take_any_folder_name(tmp_path):
    from lorkd_pl.app.configs import config_root
    from lorkd_pl.app.demo import derive_configs

    root = tmp_path / "my runs #2: check"
    derive_configs(config_root() / "demo", tmp_path / "configs", root, ["seg"])
    config = yaml.safe_load((tmp_path / "configs" / "lorkd_seg.yaml").read_text())
    assert (
        config["model"]["init_args"]["teacher"]
        == f"{root.as_posix()}/teacher_seg/latest/checkpoints/last.ckpt"
    )
    assert config["trainer"]["default_root_dir"] == f"{root.as_posix()}/lorkd_seg"  # the runs' root
