"""A MONAI bundle teacher in its own pipeline, against MONAI's own runner.

The bundle has the model zoo's layout: ``configs/inference.json`` full of ``$`` expressions (imports,
the device, the network built by an expression), a ``preprocessing`` Compose, a ``SlidingWindowInferer``,
a postprocessing of softmax → ``Invertd`` → argmax → ``SaveImaged`` (as the zoo's spleen bundle), and
``configs/metadata.json`` naming its output channels. It is a demo brain expert exported by
``lorkd-pl export --format bundle`` with that postprocessing. The oracle: ``python -m monai.bundle run``
of the same bundle, in a process that cannot import lorkd-pl.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from monai import transforms as mt

from lorkd_pl.app.cli import main
from lorkd_pl.data.transforms import seg3d_preprocessing
from lorkd_pl.io.trust import ENV_TRUST_BUNDLE_CODE
from lorkd_pl.models.teacher.loading import TeacherError, load_teacher
from lorkd_pl.models.teacher.pipeline import BundleTeacherPipeline
from lorkd_pl.models.teacher.spec import parse_teacher
from lorkd_pl.registry import get_task
from test_export_formats import run_monai_bundle, seg_student  # noqa: F401 (a fixture)

TASK = "demo_brain_seg"
ZOO_POSTPROCESSING = {
    "_target_": "Compose",
    "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": False,
            "to_tensor": True,
        },
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg",
            "separate_folder": False,
            "resample": False,
        },
    ],
}


@pytest.fixture(scope="module")
def zoo_bundle(seg_student, tmp_path_factory) -> Path:  # noqa: F811
    checkpoint, _ = seg_student
    bundle = tmp_path_factory.mktemp("zoo") / "brain_bundle"
    assert (
        main(
            [
                "export",
                "--ckpt",
                str(checkpoint),
                "--region",
                "brain",
                "--format",
                "bundle",
                "--out",
                str(bundle),
            ]
        )
        == 0
    )
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["postprocessing"] = ZOO_POSTPROCESSING
    config_file.write_text(json.dumps(config, indent=2))
    return bundle


def task_info() -> dict:
    spec = get_task(TASK)
    return {
        "name": TASK,
        "kind": "seg3d",
        "region": "brain",
        "classes": list(spec.classes),
        "modality": "MR",
        "spacing": None,
        "patch_size": list(spec.patch_size),
    }


def file_grid(record: dict) -> dict:
    """A student grid equal to the image's own."""
    return mt.Compose(seg3d_preprocessing(["image"], "other", None, [], None))({"image": record["image"]})


def test_targets_agree_with_monai_bundle_run(zoo_bundle, tmp_path, monkeypatch) -> None:
    image = get_task(TASK).records("test")[0]["image"]
    run_monai_bundle(zoo_bundle, image, tmp_path / "bundle_out")
    (written,) = (tmp_path / "bundle_out").glob("*.nii.gz")
    theirs = torch.from_numpy(
        sitk.GetArrayFromImage(sitk.ReadImage(str(written))).transpose(2, 1, 0).astype(np.int64)
    )

    spec = parse_teacher({"path": str(zoo_bundle), "cache": str(tmp_path / "cache")})
    with pytest.raises(TeacherError, match=r"is the expression .*\$.*set LORKD_PL_TRUST_BUNDLE_CODE=1"):
        load_teacher(spec, [task_info()])  # the zoo's `$` expressions run only with the user's trust
    monkeypatch.setenv(ENV_TRUST_BUNDLE_CODE, "1")
    teacher = load_teacher(spec, [task_info()])
    classes = list(get_task(TASK).classes)
    assert teacher.class_channels[TASK] == [(i,) for i in range(len(classes))]  # from metadata's channel_def
    pipeline = BundleTeacherPipeline(spec, task_info(), file_grid)
    assert pipeline.bundle.activation == "softmax"
    targets = pipeline.targets(teacher, {"image": image, "case": f"{TASK}/0"})
    ours = targets.argmax(0)
    assert ours.shape == theirs.shape
    assert len(theirs.unique()) > 1  # a real label map
    agreement = (ours == theirs).float().mean().item()
    assert agreement >= 0.99, agreement
    print(f"argmax agreement {agreement:.4f}")


def test_bundle_names_and_pipeline_in_a_fit(zoo_bundle, tmp_path, monkeypatch, capfd) -> None:
    """The bundle's own pipeline builds the cache (printed once), its channel names map the classes;
    a pipeline field of the user's replaces the bundle's pipeline (another cache key: rebuilt)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_TRUST_BUNDLE_CODE, "1")
    override = {
        "trainer": {
            "max_epochs": 1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "default_root_dir": "runs/student",
        },
        "model": {
            "init_args": {
                "teacher": {"path": str(zoo_bundle), "cache": "runs/targets"},
                "init_from_teacher": False,
            }
        },
        "data": {"init_args": {"tasks": [TASK], "samples_per_epoch": 2, "batch_size": 2, "cache": "none"}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    config = ["--config", "demo/lorkd_seg", "--config", "override.yaml"]
    assert main(["teacher-targets", *config]) == 0
    printed = capfd.readouterr().out
    assert '"format": "MONAI bundle"' in printed and "SlidingWindowInferer" in printed
    assert " built, 0 reused" in printed
    assert main(["teacher-targets", *config]) == 0  # paid once
    assert " 0 built, " in capfd.readouterr().out
    assert main(["teacher-targets", *config, "--model.init_args.teacher.spacing=[3.0,3.0,3.0]"]) == 0
    printed = capfd.readouterr().out  # the user's field: lorkd-pl's pipeline, another key: rebuilt
    assert " 0 reused" in printed and '"format": "MONAI bundle"' not in printed


def plain_bundle(folder: Path, preprocessing: list[dict]) -> Path:
    """A bundle without expressions: a small UNet, a preprocessing, a sliding-window inferer."""
    net = {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 4,
        "channels": [4, 8],
        "strides": [2],
    }
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    import monai

    torch.save(
        monai.networks.nets.UNet(**{k: v for k, v in net.items() if k != "_target_"}).state_dict(),
        folder / "models" / "model.pt",
    )
    config = {
        "image_key": "image",
        "network_def": net,
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "overlap": 0.25},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    return folder


def test_an_untrusted_bundle_runs_only_allow_listed_steps(tmp_path) -> None:
    from lorkd_pl.models.teacher.bundle import read_bundle_pipeline

    steps = [
        {"_target_": "LoadImaged", "keys": "@image_key", "reader": "NibabelReader"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "monai.transforms.Spacingd", "keys": "@image_key", "pixdim": [3.0, 3.0, 3.0]},
        {"_target_": "NormalizeIntensityd", "keys": "@image_key"},
    ]
    plain = read_bundle_pipeline(plain_bundle(tmp_path / "plain", steps))
    assert plain is not None and plain.image_key == "image"
    image = get_task(TASK).records("test")[0]["image"]
    assert plain.preprocessing({"image": image})["image"].pixdim.tolist()[:3] == pytest.approx(
        [3.0, 3.0, 3.0]
    )
    cases = {
        "a transform off the list": (
            {"_target_": "Lambdad", "keys": "image", "func": "print"},
            "'Lambdad', which lorkd-pl does not run",
        ),
        "a class by another module's name": (
            {"_target_": "os.system", "command": "true"},
            "'os.system', which lorkd-pl does not run",
        ),
        "a reader named by path": (
            {"_target_": "LoadImaged", "keys": "image", "reader": "evil.Reader"},
            "reader is 'evil.Reader'",
        ),
        "a path that walks attributes": (
            {"_target_": "monai.transforms.io.dictionary.np.Compose", "transforms": []},
            "which lorkd-pl does not run",
        ),
        "a reader argument": (
            {"_target_": "LoadImaged", "keys": "image", "reader": "NumpyReader", "allow_pickle": True},
            r"passes \['allow_pickle'\] to its reader",
        ),
        "a reference to a structure": (
            {"_target_": "LoadImaged", "keys": "@network_def"},
            "refers to '@network_def'",
        ),
    }
    for name, (step, message) in cases.items():
        folder = plain_bundle(tmp_path / name.replace(" ", "_"), [step])
        with pytest.raises(TeacherError, match=message):
            read_bundle_pipeline(folder)
    with pytest.raises(
        TeacherError, match=r"declares its own preprocessing and inferer .* set model.init_args.teacher.cache"
    ):
        load_teacher(parse_teacher({"path": str(tmp_path / "plain")}), [task_info()])
