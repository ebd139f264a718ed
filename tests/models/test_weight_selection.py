"""Weight selection against an embedding oracle: a wide teacher built BY HAND to hold a small network at
its even channels (zeros elsewhere) computes the small network's function on those channels; selecting
the teacher's weights must give back the small network exactly, and a student initialised from such a
teacher must compute the teacher's logits."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.models.generalist import GeneralistModule
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.teacher.loading import TeacherError
from lorkd_pl.models.weight_selection import WeightSelectionError, select_weights, uniform_indices


def embed(small: dict[str, torch.Tensor], wide: dict[str, torch.Tensor], factor: int = 2) -> dict:
    """``wide``'s shapes holding ``small`` at every ``factor``-th channel (dims 0 and 1; a kernel's
    spatial dims whole), zeros elsewhere (running variances 1)."""
    out = {}
    for key, target in wide.items():
        value = small[key]
        if target.dim() == 0:  # a BatchNorm's step counter
            out[key] = value.clone()
            continue
        fill = torch.ones_like(target) if key.endswith("running_var") else torch.zeros_like(target)
        index = []
        for dim, (t, s) in enumerate(zip(target.shape, value.shape, strict=True)):
            channel = dim < (2 if target.dim() >= 3 else target.dim())
            index.append(torch.arange(0, t, factor) if channel and t != s else torch.arange(t))
        fill[torch.meshgrid(*index, indexing="ij")] = value
        out[key] = fill
    return out


def test_uniform_indices_by_hand() -> None:
    assert uniform_indices(16, 8).tolist() == list(range(0, 16, 2))
    assert uniform_indices(48, 12).tolist() == list(range(0, 48, 4))  # a 16 + 32 concat: 4 + 8 picks
    assert uniform_indices(5, 3).tolist() == [0, 2, 3]  # round(0), round(1.67), round(3.33)
    assert uniform_indices(7, 7).tolist() == list(range(7))
    with pytest.raises(WeightSelectionError, match="above the teacher's"):
        uniform_indices(3, 4)


def test_selecting_an_embedded_unet_gives_it_back_and_computes_its_function() -> None:
    torch.manual_seed(0)
    small = UNet(3, 1, 4, (4, 8, 16), (2, 2), num_res_units=1).eval()
    wide = UNet(3, 1, 8, (8, 16, 32), (2, 2), num_res_units=1).eval()
    wide.load_state_dict(embed(small.state_dict(), wide.state_dict()))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():  # the oracle's premise: the wide network holds the small one's function
        torch.testing.assert_close(wide(x)[:, ::2], small(x), atol=1e-5, rtol=1e-5)
    fresh = UNet(3, 1, 4, (4, 8, 16), (2, 2), num_res_units=1).state_dict()
    selected, report = select_weights(fresh, wide.state_dict())
    for key, value in small.state_dict().items():
        torch.testing.assert_close(selected[key], value, rtol=0, atol=0, msg=key)
    assert report.selected and not report.kept  # (the PReLU slopes have one size: copied)


def test_what_cannot_correspond_is_refused() -> None:
    small = UNet(3, 1, 4, (4, 8, 16), (2, 2), num_res_units=1).state_dict()
    wide = UNet(3, 1, 8, (8, 16, 32), (2, 2), num_res_units=1).state_dict()
    with pytest.raises(WeightSelectionError, match="larger than the teacher's"):
        select_weights(wide, small)  # a wider student
    flat = {k: v.flatten() for k, v in wide.items()}
    with pytest.raises(WeightSelectionError, match="dimensions"):
        select_weights(small, flat)
    with pytest.raises(WeightSelectionError, match="no tensor name in common"):
        select_weights(small, {"other.weight": torch.zeros(3)})
    deeper = UNet(3, 1, 4, (4, 8, 16), (2, 2), num_res_units=2).state_dict()
    _, report = select_weights(deeper, wide)  # layers the teacher lacks keep their own initialisation
    assert report.kept and all(key in deeper for key in report.kept)


@pytest.mark.parametrize("experts", [True, False])
def test_a_smaller_student_starts_as_the_teacher(tmp_path, experts) -> None:
    """init_from_teacher with a 2x wider generalist of the student's backbone class: backbone by
    weight selection, head rows by class name and columns selected; the student's logits equal the
    teacher's (its experts start at zero)."""
    tasks = ["demo_brain_cls", "demo_thorax_cls"]
    data = MultiRegionDataModule(tasks, validate=False)
    run = {"task_info": data.task_info, "regions": data.region_names}
    cnn = {"class_path": "lorkd_pl.models.backbones.ConvNet2d", "init_args": {"in_channels": 1}}
    small_cnn = {**cnn, "init_args": {**cnn["init_args"], "channels": [4, 8]}}
    wide_cnn = {**cnn, "init_args": {**cnn["init_args"], "channels": [8, 16]}}
    torch.manual_seed(0)
    small, wide = GeneralistModule(**run, backbone=small_cnn), GeneralistModule(**run, backbone=wide_cnn)
    wide.load_state_dict(embed(small.state_dict(), wide.state_dict()))
    path = tmp_path / "teacher.ckpt"
    checkpoint = {"state_dict": wide.state_dict(), "hyper_parameters": dict(wide.hparams)}
    wide.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)

    student = LoRKDModule(
        **run, backbone=small_cnn, teacher=str(path), init_from_teacher=True, experts=experts
    )
    student.initialise_from_teacher()
    student.eval()
    wide.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        for task in range(len(student.tasks)):
            torch.testing.assert_close(
                student.task_logits(x, task), wide.task_logits(x, task), atol=1e-5, rtol=1e-5
            )

    small_path = tmp_path / "small.ckpt"
    checkpoint = {"state_dict": small.state_dict(), "hyper_parameters": dict(small.hparams)}
    small.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, small_path)
    too_wide = LoRKDModule(**run, backbone=wide_cnn, teacher=str(small_path), init_from_teacher=True)
    with pytest.raises(TeacherError, match="larger than the teacher's"):
        too_wide.initialise_from_teacher()


def test_a_teacher_of_another_backbone_class_is_refused(tmp_path) -> None:
    data = MultiRegionDataModule(["demo_brain_seg"], validate=False)
    run = {"task_info": data.task_info, "regions": data.region_names}
    unet = {
        "class_path": "monai.networks.nets.UNet",
        "init_args": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 8,
            "channels": [8, 16],
            "strides": [2],
        },
    }
    basic = {
        "class_path": "monai.networks.nets.BasicUNet",
        "init_args": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 8,
            "features": [8, 8, 16, 16, 32, 8],
        },
    }
    teacher = GeneralistModule(**run, backbone=basic)
    path = tmp_path / "teacher.ckpt"
    checkpoint = {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}
    teacher.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    student = LoRKDModule(**run, backbone=unet, teacher=str(path), init_from_teacher=True)
    with pytest.raises(
        TeacherError, match=r"the teacher's backbone is monai\.networks\.nets\.basic_unet\.BasicUNet"
    ):
        student.initialise_from_teacher()
