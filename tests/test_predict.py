"""Predicting real files: the written label map has exactly the input's geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from lorkd_pl.app.cli import main
from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.deploy.export import export_region
from lorkd_pl.deploy.predict import PredictError, predict_files
from lorkd_pl.models.generalist import GeneralistModule
from lorkd_pl.models.lorkd import LoRKDModule
from training_helpers import save_checkpoint

UNET = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8], "strides": [2]},
}
NIFTI = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
DICOM = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    data = MultiRegionDataModule(["demo_brain_seg", "demo_thorax_seg"], validate=False)
    student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=UNET, rank=2)
    return save_checkpoint(student, tmp_path_factory.mktemp("seg") / "last.ckpt")


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (
        b.GetSize(),
        b.GetSpacing(),
        b.GetOrigin(),
        b.GetDirection(),
    )


def test_nifti_prediction_keeps_the_input_geometry(seg_checkpoint, tmp_path) -> None:
    expert = export_region(seg_checkpoint, "brain", tmp_path / "brain")
    written = predict_files([NIFTI], expert, tmp_path / "out", probabilities=True)
    label, source = sitk.ReadImage(str(written[0])), sitk.ReadImage(str(NIFTI))
    assert written[0].name == "anatomical_demo_brain_seg.nii.gz"
    assert same_geometry(label, source)
    labels = sitk.GetArrayFromImage(label)
    assert set(labels.ravel().tolist()) <= {0, 1, 2, 3}
    maps = sitk.ReadImage(str(tmp_path / "out" / "anatomical_demo_brain_seg_probabilities.nii.gz"))
    assert same_geometry(maps, source) and maps.GetNumberOfComponentsPerPixel() == 4
    probabilities = sitk.GetArrayFromImage(maps)  # (z, y, x, K)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)  # interpolation keeps the simplex
    # labels are resampled nearest-neighbour, probabilities linearly: on the quarter of voxels where
    # one class wins most clearly (largest margin over the runner-up), both must name the same class
    ordered = np.sort(probabilities, axis=-1)
    margin = ordered[..., -1] - ordered[..., -2]
    clear = margin >= np.quantile(margin, 0.75)
    assert (probabilities.argmax(-1)[clear] == labels[clear]).mean() > 0.99
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [  # no temporary files left
        "anatomical_demo_brain_seg.nii.gz",
        "anatomical_demo_brain_seg_probabilities.nii.gz",
    ]


def dicom_series(folder: Path, slices: int = 4, modality: str | None = None) -> Path:
    """A series of ``slices`` copies of pydicom's CT_small, stacked along its normal."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for k in range(slices):
        ds = pydicom.dcmread(DICOM)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 5.0 * k]
        ds.InstanceNumber, ds.SOPInstanceUID, ds.SeriesInstanceUID = k + 1, generate_uid(), series_uid
        if modality:
            ds.Modality = modality
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def test_dicom_folder_from_a_checkpoint_via_cli(seg_checkpoint, tmp_path, capsys) -> None:
    series = dicom_series(tmp_path / "series")
    code = main(
        [
            "predict",
            "--input",
            str(series),
            "--source",
            str(seg_checkpoint),
            "--region",
            "thorax",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    written = next((tmp_path / "out").glob("series_demo_thorax_seg.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    label, source = sitk.ReadImage(str(written)), reader.Execute()
    assert label.GetSize() == source.GetSize() and label.GetDirection() == source.GetDirection()
    # NIfTI stores spacing and origin as float32: equal to DICOM's values up to that precision
    np.testing.assert_allclose(label.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(label.GetOrigin(), source.GetOrigin(), rtol=1e-6)
    assert f"{series}: DICOM series, 128×128×4, CT → demo_thorax_seg" in capsys.readouterr().out  # the plan


def test_inputs_the_model_cannot_mean_stop_before_inference(seg_checkpoint, tmp_path, capsys) -> None:
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(DICOM, single / "slice.dcm")
    with pytest.raises(PredictError, match=r"DICOM series of one file, 128×128×1, CT\) is not a 3D volume"):
        predict_files([single], seg_checkpoint, tmp_path / "o1", region="thorax")
    rgb = tmp_path / "rgb.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7, 8, 3), np.float32), isVector=True), str(rgb))
    with pytest.raises(PredictError, match="3 components per voxel"):
        predict_files([rgb], seg_checkpoint, tmp_path / "o2", region="thorax")
    mixed = dicom_series(tmp_path / "mixed")
    shutil.copy(NIFTI, mixed / "other.nii")
    with pytest.raises(PredictError, match=r"holds 1 DICOM series and other files \(other.nii\)"):
        predict_files([mixed], seg_checkpoint, tmp_path / "o3", region="thorax")
    mr = dicom_series(tmp_path / "mr", modality="MR")  # the thorax expert was trained on CT
    with pytest.raises(PredictError, match="is MR by its DICOM tag, but the thorax model was trained on CT"):
        predict_files([mr], seg_checkpoint, tmp_path / "o4", region="thorax")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing ran, nothing written
    written = predict_files([mr], seg_checkpoint, tmp_path / "o5", region="thorax", force=True)
    assert len(written) == 1 and "warning: " in capsys.readouterr().err


def test_errors(seg_checkpoint, tmp_path) -> None:
    with pytest.raises(PredictError, match="give --region"):
        predict_files([NIFTI], seg_checkpoint, tmp_path)
    with pytest.raises(PredictError, match="input not found"):
        predict_files([tmp_path / "missing.nii.gz"], seg_checkpoint, tmp_path, region="brain")


def generalist(folder, tasks):
    from training_helpers import write_generalist_checkpoint

    torch.manual_seed(0)
    return write_generalist_checkpoint(folder / "teacher.ckpt", tasks, UNET)


@pytest.fixture(scope="module")
def generalist_checkpoint(tmp_path_factory):
    """Two CT tasks that share one preprocessing, and the brain's MR task that does not."""
    return generalist(
        tmp_path_factory.mktemp("generalist"), ["demo_abdomen_seg", "demo_brain_seg", "demo_thorax_seg"]
    )


def test_a_generalist_checkpoint_predicts_its_tasks(generalist_checkpoint, tmp_path) -> None:
    from lorkd_pl.deploy.folders import load_expert
    from lorkd_pl.deploy.networks import ExportError
    from lorkd_pl.io.checkpoints import load_checkpoint_file
    from lorkd_pl.models.restore import restore_module

    module = restore_module(
        load_checkpoint_file(generalist_checkpoint), generalist_checkpoint, (GeneralistModule,)
    )
    with pytest.raises(ExportError, match=r"need different preprocessing .*demo_brain_seg: modality MR"):
        load_expert(generalist_checkpoint)  # CT and MR tasks cannot share one input pipeline
    expert = load_expert(generalist_checkpoint, "thorax")
    assert expert.card.region == "thorax" and expert.card.model == "GeneralistModule"
    assert [t["name"] for t in expert.card.tasks] == ["demo_thorax_seg"]
    assert expert.card.preprocessing.modality == "CT" and expert.card.preprocessing.spacing == [2.0, 2.0, 3.0]
    assert load_expert(generalist_checkpoint, "brain").card.preprocessing.modality == "MR"
    x = torch.randn(2, 1, 16, 16, 8)
    with torch.no_grad():  # oracle: the training module's own task logits
        torch.testing.assert_close(expert.network(x)[0], module.task_logits(x, 2))
    args = ["predict", "--input", str(NIFTI), "--source", str(generalist_checkpoint), "--out", str(tmp_path)]
    assert main([*args, "--region", "brain"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["anatomical_demo_brain_seg.nii.gz"]
    assert same_geometry(
        sitk.ReadImage(str(tmp_path / "anatomical_demo_brain_seg.nii.gz")), sitk.ReadImage(str(NIFTI))
    )


def test_one_sliding_window_pass_serves_every_task(tmp_path) -> None:
    from lorkd_pl.deploy.folders import load_expert
    from lorkd_pl.deploy.predict import predict_segmentation

    both_ct = generalist(tmp_path, ["demo_abdomen_seg", "demo_thorax_seg"])
    calls = []
    counts = {}
    for region in (None, "thorax"):  # two tasks, then one: the same number of backbone forwards
        expert = load_expert(both_ct, region)
        handle = expert.network.backbone.register_forward_hook(lambda *args: calls.append(1))
        written = predict_segmentation(expert, str(NIFTI), tmp_path / str(region))
        handle.remove()
        counts[region] = len(calls)
        calls.clear()
        assert [p.name for p in written] == [f"anatomical_{t['name']}.nii.gz" for t in expert.card.tasks]
    assert counts[None] == counts["thorax"] > 0


def test_classification_csv_of_several_tasks_keeps_columns_aligned(tmp_path) -> None:
    import csv

    from training_helpers import write_generalist_checkpoint

    cnn = {
        "class_path": "lorkd_pl.models.backbones.ConvNet2d",
        "init_args": {"in_channels": 1, "channels": [4, 8]},
    }
    checkpoint = write_generalist_checkpoint(
        tmp_path / "cls.ckpt", ["demo_abdomen_cls", "demo_brain_cls"], cnn
    )
    image = tmp_path / "image.png"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (28, 28)).astype(np.uint8)),
        str(image),
    )
    written = predict_files([image], checkpoint, tmp_path / "out")
    assert [p.name for p in written] == ["generalist_predictions.csv"]
    rows = list(csv.DictReader(written[0].open()))
    assert [r["task"] for r in rows] == ["demo_abdomen_cls", "demo_brain_cls"]
    for row in rows:
        mine = {k: v for k, v in row.items() if k.startswith(f"p_{row['task']}/")}
        others = {k: v for k, v in row.items() if k.startswith("p_") and k not in mine}
        assert len(mine) == 3 and len(others) == 3 and set(others.values()) == {""}
        assert abs(sum(float(v) for v in mine.values()) - 1) < 1e-5
        best = max(mine, key=lambda k: float(mine[k]))
        assert best == f"p_{row['task']}/{row['prediction']}"


def test_inputs_of_the_same_name_get_their_own_outputs(seg_checkpoint, tmp_path) -> None:
    for folder in ("site_a", "site_b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
    shutil.copy(NIFTI, tmp_path / "in" / "site_a" / "scan.nii")
    image = sitk.ReadImage(str(NIFTI))
    flipped = sitk.Flip(image, [True, False, False])  # different pixels, same name
    sitk.WriteImage(flipped, str(tmp_path / "in" / "site_b" / "scan.nii"))
    inputs = [tmp_path / "in" / "site_a", tmp_path / "in" / "site_b"]
    written = predict_files(inputs, seg_checkpoint, tmp_path / "out", region="brain")
    assert sorted(p.name for p in written) == [
        "site_a_scan_demo_brain_seg.nii.gz",
        "site_b_scan_demo_brain_seg.nii.gz",
    ]
    for site, path in zip(("site_a", "site_b"), sorted(written), strict=True):  # oracle: each alone
        alone = predict_files(
            [tmp_path / "in" / site / "scan.nii"], seg_checkpoint, tmp_path / site, region="brain"
        )
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(alone[0]))),
        )


def test_output_folder_inside_the_inputs_is_refused_and_earlier_predictions_skipped(
    seg_checkpoint, tmp_path, capsys
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(NIFTI, inputs / "scan.nii")
    for out in (inputs, inputs / "predictions"):
        with pytest.raises(PredictError, match="inside the input folder"):
            predict_files([inputs], seg_checkpoint, out, region="brain")
    assert sorted(p.name for p in inputs.iterdir()) == ["scan.nii"]
    (written,) = predict_files([inputs], seg_checkpoint, tmp_path / "out", region="brain")
    shutil.copy(written, inputs / written.name)  # an earlier prediction copied among the inputs
    again = predict_files([inputs], seg_checkpoint, tmp_path / "out2", region="brain")
    assert [p.name for p in again] == ["scan_demo_brain_seg.nii.gz"]  # not scan_demo_brain_seg_demo_brain_seg
    assert "skipping 1 earlier prediction(s)" in capsys.readouterr().out


def test_a_2d_image_file_is_classified_as_its_array_would_be(tmp_path) -> None:
    """2D files (PNG, a 2D DICOM) keep the rows × columns of the arrays the model was trained on."""
    import csv

    from lorkd_pl.data.transforms import cls2d_transforms
    from lorkd_pl.deploy.folders import load_expert
    from lorkd_pl.registry import get_task
    from training_helpers import write_generalist_checkpoint

    cnn = {
        "class_path": "lorkd_pl.models.backbones.ConvNet2d",
        "init_args": {"in_channels": 1, "channels": [4, 8]},
    }
    torch.manual_seed(0)
    checkpoint = write_generalist_checkpoint(tmp_path / "cls.ckpt", ["demo_thorax_cls"], cnn)
    array = np.asarray(get_task("demo_thorax_cls").records("test")[0]["image"])  # (H, W) uint8
    array[:5, :] = 255  # not symmetric under a transpose
    png = tmp_path / "case.png"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(png))
    (written,) = predict_files([png], checkpoint, tmp_path / "out")
    row = next(csv.DictReader(written.open()))
    expert = load_expert(checkpoint)
    x = cls2d_transforms(False, [28, 28], 1)({"image": array, "label": 0})["image"][None]  # training path
    with torch.no_grad():
        expected = expert.network(x)[0].softmax(1)[0].tolist()
    got = [float(row[f"p_{c}"]) for c in ("normal", "nodule", "effusion")]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    dicom = tmp_path / "slice.dcm"
    shutil.copy(DICOM, dicom)  # a 2D DICOM classifies too (CT, like the thorax task)
    (written,) = predict_files([dicom], checkpoint, tmp_path / "out_dicom")
    assert next(csv.DictReader(written.open()))["task"] == "demo_thorax_cls"


def multiframe(path: Path, pixel_spacing=None) -> Path:
    """CT_small as one multi-frame DICOM file of 3 frames."""
    ds = pydicom.dcmread(DICOM)
    ds.NumberOfFrames, ds.PixelData = 3, ds.PixelData * 3
    if pixel_spacing is not None:
        ds.PixelSpacing = pixel_spacing
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def test_a_multiframe_dicom_in_a_folder_reads_as_the_file_does(seg_checkpoint, tmp_path) -> None:
    from lorkd_pl.data.readers import read_image

    file = multiframe(tmp_path / "mf" / "volume.dcm")
    assert read_image(tmp_path / "mf").GetSize() == read_image(file).GetSize() == (128, 128, 3)
    (written,) = predict_files([tmp_path / "mf"], seg_checkpoint, tmp_path / "out", region="thorax")
    assert sitk.ReadImage(str(written)).GetSize() == (128, 128, 3)


def test_negative_spacing_in_a_header_stops_before_inference(seg_checkpoint, tmp_path) -> None:
    file = multiframe(tmp_path / "neg.dcm", pixel_spacing=[-0.66, 0.66])
    with pytest.raises(PredictError, match=r"has the spacing \(0.66, -0.66, .*voxel sizes must be > 0"):
        predict_files([file], seg_checkpoint, tmp_path / "out", region="thorax")
    assert not (tmp_path / "out").exists()


def test_linked_inputs_of_one_name_and_files_beside_the_output(seg_checkpoint, tmp_path, capsys) -> None:
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(NIFTI, real / "q.nii")
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(NIFTI)), [True, False, False]), str(real / "r.nii"))
    for folder, target in (("d1", "q.nii"), ("d2", "r.nii")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.nii").symlink_to(real / target)
    inputs = [tmp_path / "d1" / "x.nii", tmp_path / "d2" / "x.nii"]
    written = predict_files(inputs, seg_checkpoint, tmp_path / "out", region="brain")
    assert sorted(p.name for p in written) == ["d1_x_demo_brain_seg.nii.gz", "d2_x_demo_brain_seg.nii.gz"]
    with pytest.raises(PredictError, match="inside the input folder"):  # --out = the files' own folder
        predict_files([real / "q.nii"], seg_checkpoint, real, region="brain")
    shutil.copy(written[0], real / "q_demo_brain_seg.nii.gz")  # an earlier prediction passed as an input
    again = predict_files(
        [real / "q.nii", real / "q_demo_brain_seg.nii.gz"], seg_checkpoint, tmp_path / "o", region="brain"
    )
    assert [p.name for p in again] == ["q_demo_brain_seg.nii.gz"]
    assert "skipping 1 earlier prediction(s)" in capsys.readouterr().out


def test_unreadable_manifests_and_non_finite_inputs(seg_checkpoint, tmp_path) -> None:
    manifest = tmp_path / "inputs.jsonl"
    manifest.write_text('{"image": 123}\n')
    with pytest.raises(ValueError, match=r"row 1: field 'image' is 123; give the image's path"):
        predict_files([manifest], seg_checkpoint, tmp_path / "o1", region="brain")
    shutil.copy(NIFTI, tmp_path / "scan.nii")
    csv_manifest = tmp_path / "inputs.csv"  # no label column (inputs to predict have none), Excel's BOM
    csv_manifest.write_text("image\nscan.nii\n", encoding="utf-8-sig")
    (written,) = predict_files([csv_manifest], seg_checkpoint, tmp_path / "o2", region="brain")
    assert written.name == "scan_demo_brain_seg.nii.gz"
    image = sitk.ReadImage(str(NIFTI), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(tmp_path / "nan.mha"))
    with pytest.raises(PredictError, match="holds NaN or infinite voxels"):
        predict_files([tmp_path / "nan.mha"], seg_checkpoint, tmp_path / "o3", region="brain")
    # a NaN scan second in the list: refused before the first output is written
    with pytest.raises(PredictError, match=r"nan\.mha holds NaN or infinite voxels"):
        predict_files([NIFTI, tmp_path / "nan.mha"], seg_checkpoint, tmp_path / "o5", region="brain")
    assert not (tmp_path / "o5").exists()
    data = NIFTI.read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) - 100])  # ITK would read it zero-filled
    with pytest.raises(PredictError, match=r"cut\.nii.*truncated"):
        predict_files([tmp_path / "cut.nii"], seg_checkpoint, tmp_path / "o4", region="brain")
    assert not (tmp_path / "o4").exists()  # stopped before the first inference


def test_folders_are_searched_recursively_and_non_image_dicom_is_refused(seg_checkpoint, tmp_path) -> None:
    """A study folder with a series in a subfolder and a NIfTI in another: both found. A DICOM SEG (or
    RTSTRUCT, SR, PR) is never predicted as if it were a CT: one line naming its SOP class."""
    from lorkd_pl.deploy.predict import collect_inputs

    study = tmp_path / "study"
    dicom_series(study / "patient1" / "ct")
    (study / "patient2").mkdir()
    shutil.copy(NIFTI, study / "patient2" / "scan.nii.gz")
    (study / ".cache").mkdir()
    shutil.copy(NIFTI, study / ".cache" / "hidden.nii.gz")
    found = sorted(Path(row["image"]).relative_to(study).as_posix() for row in collect_inputs([study]))
    assert found == ["patient1/ct", "patient2/scan.nii.gz"]
    (tmp_path / "nothing" / "deeper").mkdir(parents=True)
    with pytest.raises(PredictError, match=r"no image files .* no DICOM series, in it or its subfolders"):
        collect_inputs([tmp_path / "nothing"])
    for uid, kind in (
        ("1.2.840.10008.5.1.4.1.1.66.4", "Segmentation Storage"),
        ("1.2.840.10008.5.1.4.1.1.481.3", "RT Structure Set"),
        ("1.2.840.10008.5.1.4.1.1.88.33", "Structured Report"),
    ):
        seg = dicom_series(tmp_path / f"seg_{uid}", slices=1)
        for path in seg.iterdir():
            ds = pydicom.dcmread(path)
            ds.SOPClassUID = uid
            ds.file_meta.MediaStorageSOPClassUID = uid
            ds.save_as(path)
        with pytest.raises(PredictError, match=rf"is a DICOM {kind}.* not an image"):
            predict_files([next(seg.iterdir())], seg_checkpoint, tmp_path / f"out_{kind[:4]}", region="brain")


def test_predict_replaces_only_its_own_earlier_outputs(seg_checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    (written,) = predict_files([NIFTI], seg_checkpoint, out, region="brain")
    again = predict_files([NIFTI], seg_checkpoint, out, region="brain")  # its own earlier output
    assert again == [written]
    shutil.copy(NIFTI, written)  # a user's scan under that name
    before = written.read_bytes()
    with pytest.raises(PredictError, match=r"already holds .* which lorkd-pl predict did not write"):
        predict_files([NIFTI], seg_checkpoint, out, region="brain")
    assert written.read_bytes() == before
