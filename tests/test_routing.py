"""`predict --region auto`: the exported router equals the student's, each input goes to the region its
DICOM tag or the router names, and an unsure router stops the run instead of guessing."""

from __future__ import annotations

import csv
import math

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai import transforms as mt

from lorkd_pl.app.cli import main
from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.data.transforms import seg3d_preprocessing
from lorkd_pl.deploy.folders import load_exported_router
from lorkd_pl.deploy.predict import PredictError, predict_files
from lorkd_pl.deploy.region_choice import (
    RegionChoiceError,
    body_part_region,
    choose_regions,
    router_probabilities,
)
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.router import volume_probabilities
from test_predict import NIFTI, UNET, dicom_series
from training_helpers import save_checkpoint


def _student(bias: tuple[float, float] | None = None) -> LoRKDModule:
    """brain (MR) and thorax (CT): two input pipelines. ``bias``: the router's last layer answers these
    logits whatever the input (weights zeroed)."""
    torch.manual_seed(0)
    data = MultiRegionDataModule(["demo_brain_seg", "demo_thorax_seg"], validate=False)
    student = LoRKDModule(
        task_info=data.task_info, regions=data.region_names, backbone=UNET, rank=2, router_weight=1.0
    )
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("expert_B"):
                p.normal_(0, 0.3)
        if bias is not None:
            last = student.router.layers[-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
    return student.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A student with a trained-looking router, exported with --all-regions (router included)."""
    folder = tmp_path_factory.mktemp("routed")
    student = _student()
    checkpoint = save_checkpoint(student, folder / "last.ckpt")
    assert main(["export", "--ckpt", str(checkpoint), "--all-regions", "--out", str(folder / "experts")]) == 0
    return student, checkpoint, folder / "experts"


def test_exported_router_equals_the_students(exported, capsys) -> None:
    student, checkpoint, experts = exported
    assert main(["export", "--ckpt", str(checkpoint), "--dry-run"]) == 0
    head = sum(p.numel() for p in student.router.parameters())
    assert f"| region router: W0 + classifier ({head:,}) | {student.expert_free_parameters + head:,} |" in (
        capsys.readouterr().out
    )
    assert sorted(p.name for p in experts.iterdir()) == ["brain", "router", "thorax"]
    network, card = load_exported_router(experts / "router")
    assert card.regions == ["brain", "thorax"] and card.taps == student.router_taps
    assert card.preprocessing["brain"].modality == "MR" and card.preprocessing["thorax"].modality == "CT"
    x = torch.randn(3, 1, 40, 40, 24)
    with torch.no_grad():
        want = student.router_logits(x)
        torch.testing.assert_close(network(x), want, rtol=1e-5, atol=1e-6)
        program = torch.export.load(str(experts / "router" / "model.pt2")).module()
        torch.testing.assert_close(program(x), want, rtol=1e-4, atol=1e-5)
        other = torch.randn(2, 1, 48, 32, 16)  # another window size: the program's shapes are dynamic
        torch.testing.assert_close(program(other), student.router_logits(other), rtol=1e-4, atol=1e-5)


def test_router_probabilities_score_each_region_in_its_own_pipeline(exported) -> None:
    """Oracle: the student's router on the volume prepared by hand in each region's pipeline."""
    student, _, experts = exported
    network, card = load_exported_router(experts / "router")
    got = router_probabilities(network, card, str(NIFTI))
    scores = {}
    for region in ("brain", "thorax"):
        task = next(t for t in student.tasks if t["region"] == region)
        x = mt.Compose(seg3d_preprocessing(["image"], task["modality"], task["spacing"]))(
            {"image": str(NIFTI)}
        )
        with torch.no_grad():
            p = volume_probabilities(student.router_logits, x["image"][None], task["patch_size"], 2)[0]
        scores[region] = float(p[student.regions.index(region)])
    for region in scores:
        assert got[region] == pytest.approx(scores[region], rel=1e-4)


def test_an_unsure_router_never_passes_by_normalisation_or_nan() -> None:
    rows = [{"image": str(NIFTI)}]  # a NIfTI: no DICOM tag, the router decides
    # 0.05 / 0.01 on their own pipelines: 0.83 of the total, but the router rejects brain on its own
    with pytest.raises(RegionChoiceError, match=r"nii: brain 0.83, thorax 0.17 \(own-pipeline brain 0.05\)"):
        choose_regions(rows, ["brain", "thorax"], lambda image: {"brain": 0.05, "thorax": 0.01}, 0.6)
    with pytest.raises(RegionChoiceError, match="not confident enough"):
        choose_regions(rows, ["brain", "thorax"], lambda image: {"brain": math.nan, "thorax": math.nan}, 0.6)
    (routed,) = choose_regions(rows, ["brain", "thorax"], lambda image: {"brain": 0.9, "thorax": 0.1}, 0.6)
    assert (routed.region, routed.confidence) == ("brain", pytest.approx(0.9))


def _biased_export(tmp_path, bias) -> tuple:
    student = _student(bias)
    checkpoint = save_checkpoint(student, tmp_path / "last.ckpt")
    main(["export", "--ckpt", str(checkpoint), "--all-regions", "--out", str(tmp_path / "experts")])
    return student, checkpoint, tmp_path / "experts"


def test_auto_region_predicts_with_the_routed_expert(tmp_path, capsys) -> None:
    _, checkpoint, experts = _biased_export(tmp_path, (-4.0, 4.0))  # thorax, p = 0.9997
    code = main(
        ["predict", "--input", str(NIFTI), "--source", str(experts), "--region", "auto",
         "--out", str(tmp_path / "auto")]
    )  # fmt: skip
    assert code == 0
    assert "→ thorax (router 1.00)" in capsys.readouterr().out
    predict_files([NIFTI], experts / "thorax", tmp_path / "direct")
    name = "anatomical_demo_thorax_seg.nii.gz"
    auto, direct = (sitk.ReadImage(str(tmp_path / d / name)) for d in ("auto", "direct"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(auto), sitk.GetArrayFromImage(direct))
    with open(tmp_path / "auto" / "routing.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["region"] == "thorax" and row["decided_by"] == "router"
    assert float(row["p_thorax"]) > 0.999  # the share among the regions; the confidence is the smaller
    assert float(row["confidence"]) == pytest.approx(float(row["p_thorax"]), abs=1e-4)  # of it and its own
    # the same from the checkpoint itself (each expert merged in memory)
    predict_files([NIFTI], checkpoint, tmp_path / "from_ckpt", region="auto")
    from_ckpt = sitk.ReadImage(str(tmp_path / "from_ckpt" / name))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_ckpt), sitk.GetArrayFromImage(direct))


def test_an_unsure_router_stops_and_names_the_top_regions(tmp_path) -> None:
    _, _, experts = _biased_export(tmp_path, (0.0, 0.0))  # 0.50 / 0.50
    with pytest.raises(PredictError, match=r"not confident enough.*anatomical.nii: brain 0.50, thorax 0.50"):
        predict_files([NIFTI], experts, tmp_path / "out", region="auto")
    assert not (tmp_path / "out").exists()  # nothing written
    written = predict_files([NIFTI], experts, tmp_path / "low", region="auto", min_confidence=0.4)
    assert any(p.name == "anatomical_demo_brain_seg.nii.gz" for p in written)  # ties go to the first


def test_dicom_body_part_decides_before_the_router(tmp_path) -> None:
    _, _, experts = _biased_export(tmp_path, (6.0, -6.0))  # the router would say brain
    series = dicom_series(tmp_path / "series")
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "CHEST"
        ds.save_as(path)
    predict_files([series], experts, tmp_path / "out", region="auto")
    with open(tmp_path / "out" / "routing.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["region"], row["decided_by"], row["confidence"]) == (
        "thorax",
        "DICOM BodyPartExamined=CHEST",
        "",
    )
    assert (tmp_path / "out" / "series_demo_thorax_seg.nii.gz").is_file()


def test_body_part_names() -> None:
    regions = ["abdomen", "brain", "head_neck", "thorax"]
    assert body_part_region("CHEST", regions) == "thorax"
    assert body_part_region("HEAD", regions) == "brain"
    assert body_part_region("HEADNECK", regions) == "head_neck"  # a region's own name, any case/punctuation
    assert body_part_region("Thorax ", regions) == "thorax"
    assert body_part_region("ABDOMENPELVIS", regions) is None  # spans two regions: the router decides
    assert body_part_region("PELVIS", regions) is None  # no pelvis expert
    assert body_part_region("", regions) is None and body_part_region(None, regions) is None


def test_auto_needs_a_router_or_a_tag(tmp_path) -> None:
    torch.manual_seed(0)
    data = MultiRegionDataModule(["demo_brain_seg", "demo_thorax_seg"], validate=False)
    student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=UNET, rank=2)
    checkpoint = save_checkpoint(student, tmp_path / "last.ckpt")
    main(["export", "--ckpt", str(checkpoint), "--all-regions", "--out", str(tmp_path / "experts")])
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == ["brain", "thorax"]  # no router
    with pytest.raises(PredictError, match="no region router in this export"):
        predict_files([NIFTI], tmp_path / "experts", tmp_path / "out", region="auto")
    with pytest.raises(PredictError, match="is one exported expert; --region auto needs the folder"):
        predict_files([NIFTI], tmp_path / "experts" / "brain", tmp_path / "out", region="auto")
    with pytest.raises(SystemExit) as stop:
        main(
            ["predict", "--input", str(NIFTI), "--source", str(tmp_path / "experts"), "--region", "auto",
             "--min-confidence", "1.5", "--out", str(tmp_path / "o")]
        )  # fmt: skip
    assert stop.value.code == 2 and not (tmp_path / "o").exists()


def test_2d_images_are_routed_by_the_router_on_their_pixels(tmp_path) -> None:
    """Oracle: the student's router on the image prepared as in training (cls2d_transforms)."""
    from lorkd_pl.data.transforms import cls2d_transforms
    from lorkd_pl.registry import get_task
    from test_export import CNN

    torch.manual_seed(0)
    data = MultiRegionDataModule(["demo_brain_cls", "demo_thorax_cls"], validate=False)
    student = LoRKDModule(
        task_info=data.task_info, regions=data.region_names, backbone=CNN, rank=2, router_weight=1.0
    ).eval()
    checkpoint = save_checkpoint(student, tmp_path / "cls.ckpt")
    main(["export", "--ckpt", str(checkpoint), "--all-regions", "--out", str(tmp_path / "experts")])
    pngs = []
    for region in ("brain", "thorax"):
        array = np.asarray(get_task(f"demo_{region}_cls").records("test")[0]["image"])
        pngs.append(tmp_path / f"{region}.png")
        sitk.WriteImage(sitk.GetImageFromArray(array), str(pngs[-1]))
    written = predict_files(pngs, tmp_path / "experts", tmp_path / "out", region="auto", min_confidence=0.0)
    with open(tmp_path / "out" / "routing.csv", newline="") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    for png in pngs:
        x = cls2d_transforms(False, [28, 28], 1)({"image": str(png), "label": 0})["image"][None]
        with torch.no_grad():
            want = student.router_logits(x).softmax(1)[0]
        row = rows[str(png)]
        got = [float(row[f"p_{region}"]) for region in student.regions]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
        assert row["region"] == student.regions[int(want.argmax())]
    routed = {row["region"] for row in rows.values()}
    assert {p.name for p in written} == {"routing.csv"} | {f"{r}_predictions.csv" for r in routed}


def test_experts_and_router_of_different_checkpoints_are_refused(exported, tmp_path) -> None:
    import shutil

    _, _, experts = exported
    _, _, other = _biased_export(tmp_path, (0.0, 0.0))  # another checkpoint
    mixed = tmp_path / "mixed"
    shutil.copytree(experts, mixed)
    shutil.rmtree(mixed / "router")
    shutil.copytree(other / "router", mixed / "router")  # a router left from another export
    with pytest.raises(PredictError, match="come from different checkpoints"):
        predict_files([NIFTI], mixed, tmp_path / "out", region="auto")
    shutil.rmtree(mixed / "router")
    shutil.copytree(experts / "brain", mixed / "brain_copy")
    with pytest.raises(PredictError, match="two experts of region 'brain'"):
        predict_files([NIFTI], mixed, tmp_path / "out", region="auto")
    assert not (tmp_path / "out").exists()


def test_a_body_part_whose_expert_has_another_modality_falls_through_to_the_router(tmp_path) -> None:
    """A CT tagged HEAD, an MR brain expert and a CT thorax expert: the tag decides nothing (said in
    decided_by); the router does. An MR tagged HEAD still goes to the brain expert by its tag."""
    series = dicom_series(tmp_path / "ct_head", modality="CT")
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "HEAD"
        ds.save_as(path)
    modalities = {"brain": "MR", "thorax": "CT"}
    rows = [{"image": str(series)}]
    (choice,) = choose_regions(
        rows, ["brain", "thorax"], lambda image: {"brain": 0.1, "thorax": 0.9}, 0.6, modalities
    )
    assert choice.region == "thorax" and choice.decided_by.startswith("router")
    assert "names brain, an MR expert; this is CT" in choice.decided_by
    with pytest.raises(RegionChoiceError, match="names brain, an MR expert; this is CT"):
        choose_regions(rows, ["brain", "thorax"], None, 0.6, modalities)  # no router: said, not guessed
    mr = dicom_series(tmp_path / "mr_head", modality="MR")
    for path in mr.iterdir():
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "HEAD"
        ds.save_as(path)
    (choice,) = choose_regions([{"image": str(mr)}], ["brain", "thorax"], None, 0.6, modalities)
    assert (choice.region, choice.decided_by) == ("brain", "DICOM BodyPartExamined=HEAD")
