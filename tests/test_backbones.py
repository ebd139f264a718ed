"""Student backbones users bring, trained through the public CLI on the demo data (1 short epoch each):
DynUNet with deep supervision started from a DynUNet generalist (init_from_teacher), SwinUNETR with its
window attention folded, SegResNet."""

from __future__ import annotations

import pytest
import torch
import yaml

from lorkd_pl.app.cli import main
from lorkd_pl.experts import ExpertConvTranspose, ExpertLinear, expert_layers

TASKS = ["demo_brain_seg", "demo_thorax_seg"]
SHORT = {
    "trainer": {
        "max_epochs": 1,
        "limit_val_batches": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    },
    "data": {"init_args": {"tasks": TASKS, "samples_per_epoch": 4, "batch_size": 2, "cache": "none"}},
}
DYNUNET = {
    "class_path": "monai.networks.nets.DynUNet",
    "init_args": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 8,
        "kernel_size": [3, 3, 3],
        "strides": [1, 2, 2],
        "upsample_kernel_size": [2, 2],
        "filters": [4, 8, 16],
        "deep_supervision": True,
        "deep_supr_num": 1,
    },
}
SWIN = {
    "class_path": "monai.networks.nets.SwinUNETR",
    "init_args": {
        "in_channels": 1,
        "out_channels": 8,
        "feature_size": 12,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 2, 2, 4],
        "spatial_dims": 3,
    },
}
SEGRESNET = {
    "class_path": "monai.networks.nets.SegResNet",
    "init_args": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 8,
        "init_filters": 8,
        "blocks_down": [1, 1, 1],
        "blocks_up": [1, 1],
    },
}


def fit(tmp_path, config: str, name: str, model: dict, data: dict | None = None) -> torch.nn.Module:
    """Fit ``config`` with ``model`` init args in ``runs/<name>``; return the trained student/teacher."""
    override = {
        **SHORT,
        "trainer": {
            **SHORT["trainer"],
            "default_root_dir": f"runs/{name}",
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": f"runs/{name}/checkpoints",
                        "save_last": True,
                        "monitor": "val/score",  # the demo configs' (a replaced list is not merged)
                        "mode": "max",
                    },
                }
            ],
        },
        "model": {"init_args": model},
        "data": {"init_args": {**SHORT["data"]["init_args"], **(data or {})}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    assert main(["fit", "--config", config, "--config", str(path)]) == 0
    checkpoint = tmp_path / f"runs/{name}/checkpoints/last.ckpt"
    assert checkpoint.is_file()
    return torch.load(checkpoint, weights_only=True)


NO_TEACHER = {"teacher": None, "init_from_teacher": False, "kd": "none"}


@pytest.mark.parametrize(
    ("backbone", "extra", "data"),
    [
        (SWIN, {"fold": {"*.attn.*": "leading"}}, {"patch_size": [64, 64, 64]}),
        (SEGRESNET, {}, None),
    ],
    ids=["swinunetr", "segresnet"],
)
def test_student_backbones_fit_through_the_cli(tmp_path, monkeypatch, backbone, extra, data) -> None:
    monkeypatch.chdir(tmp_path)
    saved = fit(tmp_path, "demo/lorkd_seg", "student", {"backbone": backbone, **NO_TEACHER, **extra}, data)
    assert saved["global_step"] == 2 and "val/score" in str(saved["callbacks"])
    assert any(key.endswith("expert_B") for key in saved["state_dict"])


def test_an_undeclared_window_fold_is_one_clear_error(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        fit(
            tmp_path,
            "demo/lorkd_seg",
            "student",
            {"backbone": SWIN, **NO_TEACHER},
            {"patch_size": [64, 64, 64]},
        )
    assert exit_info.value.code == 2
    printed = capsys.readouterr().err
    error = printed.strip().splitlines()[-1]
    assert error.startswith("lorkd-pl: error: expert layer 'swinViT.layers1.0.blocks.0.attn.qkv' got ")
    assert "model.fold" in error and "Traceback" not in printed


def test_dynunet_deep_supervision_from_a_dynunet_generalist(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    teacher = fit(tmp_path, "demo/teacher_seg", "teacher", {"backbone": DYNUNET})
    assert teacher["global_step"] == 2
    student = {
        "backbone": DYNUNET,
        "teacher": "runs/teacher/checkpoints/last.ckpt",
        "init_from_teacher": True,
        "layer_rank": {"upsamples.*": "2x"},  # the papers: decoder rank = 2 × encoder rank
    }
    saved = fit(tmp_path, "demo/lorkd_seg", "student", student)
    assert saved["global_step"] == 2

    from lorkd_pl.models.lorkd import LoRKDModule
    from lorkd_pl.models.restore import restore_module

    module = restore_module(saved, "student", (LoRKDModule,))
    layers = dict(expert_layers(module.student))
    assert any(isinstance(layer, ExpertConvTranspose) for layer in layers.values())
    assert all(layer.ranks == (8, 8) for name, layer in layers.items() if name.startswith("upsamples"))
    assert not any(isinstance(layer, ExpertLinear) for layer in layers.values())
