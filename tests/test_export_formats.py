"""Experts for other runtimes: a MONAI bundle that runs without lorkd-pl and writes what `lorkd-pl predict`
writes, and an ONNX graph that ONNX Runtime runs like the merged network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import SimpleITK as sitk
import torch

from lorkd_pl.app.cli import main
from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.deploy.export import export_regions
from lorkd_pl.deploy.networks import ExportError, expert_network
from lorkd_pl.deploy.predict import predict_files
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.registry import get_task
from test_predict import UNET
from training_helpers import save_checkpoint

#: Runs ``python -m monai.bundle ...`` in a process where every import of lorkd-pl fails.
WITHOUT_LORKD = (
    "import runpy, sys; sys.modules['lorkd_pl'] = None; sys.argv = ['monai.bundle', *sys.argv[1:]]; "
    "runpy.run_module('monai.bundle', run_name='__main__')"
)


def run_monai_bundle(bundle: Path, image: str, output_dir: Path) -> None:
    """``python -m monai.bundle run`` of ``bundle``'s inference config on one image, without lorkd-pl."""
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_LORKD, "run", "--config_file", "configs/inference.json",
         "--image", image, "--output_dir", str(output_dir)],
        cwd=bundle, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.fixture(scope="module")
def seg_student(tmp_path_factory):
    torch.manual_seed(0)
    data = MultiRegionDataModule(["demo_brain_seg", "demo_thorax_seg"], validate=False)
    student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=UNET, rank=2)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("expert_B"):
                p.normal_(0, 0.3)  # experts differ from W0
    return save_checkpoint(student.eval(), tmp_path_factory.mktemp("seg") / "last.ckpt"), student


@pytest.mark.parametrize("region", ["brain", "thorax"])  # MR (percentile clip) and CT (window)
def test_bundle_runs_without_lorkd_pl_and_equals_predict(seg_student, tmp_path, region) -> None:
    checkpoint, _ = seg_student
    bundle = tmp_path / "bundle"
    code = main(
        ["export", "--ckpt", str(checkpoint), "--region", region, "--format", "bundle", "--out", str(bundle)]
    )
    assert code == 0
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/metadata.json", "docs/README.md", "models/model.pt",
    ]  # fmt: skip
    # a demo volume: anisotropic spacing, a non-identity direction and origin
    image = get_task(f"demo_{region}_seg").records("test")[0]["image"]
    run_monai_bundle(bundle, image, tmp_path / "bundle_out")
    predict_files([image], checkpoint, tmp_path / "lorkd_out", region=region)
    name = f"{image.rsplit('/', 1)[1].split('.')[0]}_demo_{region}_seg.nii.gz"
    from_bundle = sitk.ReadImage(str(tmp_path / "bundle_out" / name))
    from_lorkd = sitk.ReadImage(str(tmp_path / "lorkd_out" / name))
    labels = sitk.GetArrayFromImage(from_lorkd)
    assert len(np.unique(labels)) > 1  # a real label map, not a constant
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_bundle), labels)
    assert from_bundle.GetSize() == from_lorkd.GetSize()
    np.testing.assert_allclose(from_bundle.GetSpacing(), from_lorkd.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(from_bundle.GetOrigin(), from_lorkd.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(from_bundle.GetDirection(), from_lorkd.GetDirection(), atol=1e-6)
    source = sitk.ReadImage(image)  # both in the input's own grid (NIfTI keeps float32 geometry)
    assert from_lorkd.GetSize() == source.GetSize()
    np.testing.assert_allclose(from_lorkd.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(from_lorkd.GetDirection(), source.GetDirection(), atol=1e-6)
    # every other format predict reads, through the bundle's ITK reader: the same labels as predict
    other = tmp_path / ("case.mha" if region == "brain" else "case.nrrd")
    sitk.WriteImage(source, str(other))
    run_monai_bundle(bundle, str(other), tmp_path / "bundle_other")
    predict_files([str(other)], checkpoint, tmp_path / "lorkd_other", region=region)
    name = f"case_demo_{region}_seg.nii.gz"
    from_bundle = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "bundle_other" / name)))
    np.testing.assert_array_equal(
        from_bundle, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lorkd_other" / name)))
    )
    np.testing.assert_array_equal(from_bundle, labels)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["optional_packages_version"]["itk"] != "not installed"
    classes = get_task(f"demo_{region}_seg").classes
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == dict(
        zip(map(str, range(len(classes))), classes, strict=True)
    )


def test_what_a_bundle_cannot_hold_is_refused(seg_student, tmp_path) -> None:
    from test_export import CNN

    data = MultiRegionDataModule(["demo_brain_cls", "demo_thorax_cls"], validate=False)
    classifier = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=CNN, rank=2)
    checkpoint = save_checkpoint(classifier, tmp_path / "cls.ckpt")
    with pytest.raises(ExportError, match="classifies 2D images; --format bundle writes 3D segmentation"):
        export_regions(checkpoint, ["brain"], {"brain": tmp_path / "b"}, format="bundle")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_regions(checkpoint, ["brain"], {"brain": tmp_path / "b"}, format="tflite")


def test_onnx_runtime_equals_the_merged_network(seg_student, tmp_path) -> None:
    checkpoint, student = seg_student
    outs = {r: tmp_path / r for r in student.regions}
    export_regions(checkpoint, student.regions, outs, format="onnx")
    for region in student.regions:
        network, _ = expert_network(student, region)
        session = onnxruntime.InferenceSession(str(outs[region] / "model.onnx"))
        card = json.loads((outs[region] / "metadata.json").read_text())
        assert [o.name for o in session.get_outputs()] == [f"logits_{t['name']}" for t in card["tasks"]]
        assert card["preprocessing"]["spatial_multiple"] == 2  # one stride-2 level
        for shape in [(2, 1, 40, 40, 24), (1, 1, 48, 32, 16)]:  # the patch and another window
            x = torch.randn(*shape)
            got = session.run(None, {"images": x.numpy()})
            with torch.no_grad():
                want = network(x)
            for g, w in zip(got, want, strict=True):
                assert g.shape == tuple(w.shape)
                np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0)


def test_onnx_of_a_2d_classifier(tmp_path) -> None:
    from test_export import CNN

    torch.manual_seed(0)
    data = MultiRegionDataModule(["demo_brain_cls", "demo_thorax_cls"], validate=False)
    student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=CNN, rank=2).eval()
    checkpoint = save_checkpoint(student, tmp_path / "cls.ckpt")
    export_regions(checkpoint, ["thorax"], {"thorax": tmp_path / "thorax"}, format="onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "thorax" / "model.onnx"))
    network, _ = expert_network(student, "thorax")
    for size in (28, 64):
        x = torch.randn(3, 1, size, size)
        with torch.no_grad():
            want = network(x)[0].numpy()
        np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], want, atol=1e-4, rtol=0)
