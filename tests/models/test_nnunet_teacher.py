"""nnU-Net v2 trained-model folders as teachers, against nnU-Net's own predictor.

The folder is made by nnU-Net's own tools (``tests/nnunet_oracle.py``: fingerprint, plans, preprocessing
and a short ``nnUNetTrainer`` training on CPU, in a subprocess); the oracle is ``nnUNetPredictor`` on
unseen cases (probabilities saved by nnU-Net). lorkd-pl reads the folder without nnU-Net's code
(``lorkd_pl.models.teacher.nnunet``): the same probabilities must come out, in the image's own grid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from monai import transforms as mt

from lorkd_pl.data.transforms import seg3d_preprocessing
from lorkd_pl.models.teacher import nnunet
from lorkd_pl.models.teacher.loading import TeacherError, load_teacher
from lorkd_pl.models.teacher.nnunet import NnUNetError
from lorkd_pl.models.teacher.pipeline import NnUNetPipeline
from lorkd_pl.models.teacher.spec import parse_teacher

ORACLE = Path(__file__).parents[1] / "nnunet_oracle.py"
MODEL = "results/Dataset501_Toy/nnUNetTrainer__nnUNetPlans__3d_fullres"
CLASSES = ["background", "liver", "spleen"]
TASK = {"name": "toy_nnunet", "kind": "seg3d", "region": "abdomen", "classes": CLASSES, "modality": "CT"}


def oracle(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ORACLE), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory) -> Path:
    """nnU-Net's folder (2 folds) and nnU-Net's predictions of the unseen cases with fold 0 and folds 0+1."""
    root = tmp_path_factory.mktemp("nnunet")
    oracle("build", str(root))
    unseen = sorted(str(p) for p in (root / "unseen").glob("*_0000.nii.gz"))
    oracle("predict", str(root / MODEL), str(root / "pred_0"), "0", *unseen)
    oracle("predict", str(root / MODEL), str(root / "pred_0,1"), "0,1", *unseen[:2])
    return root


def file_grid(record: dict) -> dict:
    """A student grid equal to the image's own (its voxel order, its spacing)."""
    load = mt.Compose(seg3d_preprocessing(["image"], "other", None, [], None))
    return load({"image": record["image"]})


def read_zyx(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


@pytest.mark.parametrize("folds", ["0", "0,1"])
def test_targets_equal_nnunets_own_predictor_in_the_images_grid(nnunet_root, folds, tmp_path) -> None:
    fold = [int(f) for f in folds.split(",")]
    spec = parse_teacher({"path": str(nnunet_root / MODEL), "fold": fold, "cache": str(tmp_path)})
    teacher = load_teacher(spec, [TASK])
    assert teacher.class_channels == {TASK["name"]: [(0,), (1,), (2,)]}  # by name from dataset.json
    pipeline = NnUNetPipeline(spec, TASK, file_grid)
    assert pipeline.folder.transpose_forward != [0, 1, 2]  # the oracle's data make nnU-Net transpose
    for case in ("toy_100", "toy_101"):  # spacings unlike the plans': resampled per slice, then back
        record = {"image": str(nnunet_root / "unseen" / f"{case}_0000.nii.gz"), "case": f"toy/{case}"}
        probabilities = pipeline.targets(teacher, record).exp()
        theirs = np.load(nnunet_root / f"pred_{folds}" / f"{case}.npz")["probabilities"]  # (K, z, y, x)
        theirs = torch.from_numpy(theirs.transpose(0, 3, 2, 1).astype(np.float32))
        segmentation = torch.from_numpy(
            read_zyx(nnunet_root / f"pred_{folds}" / f"{case}.nii.gz").astype(np.int64)
        )
        assert probabilities.shape == theirs.shape
        agreement = (probabilities.argmax(0) == segmentation).float().mean().item()
        assert agreement >= 0.99, agreement  # observed 1.0
        print(f"argmax agreement {agreement:.4f}")
        # nnU-Net sums its Gaussian-weighted windows in float16 (sums of ~100: steps of 0.06 in the
        # logits, a probability moves by at most a quarter of that): they differ by that rounding only
        difference = (probabilities - theirs).abs()
        assert difference.max().item() < 0.03 and difference.mean().item() < 2e-4, difference.mean()


def test_preprocessing_pieces_equal_nnunets(nnunet_root) -> None:
    """Resampling, Gaussian and tile positions against nnU-Net's functions, on odd shapes."""
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 9, 23, 17)).astype(np.float32)
    for shape, current, new in (
        ((14, 20, 30), (3.0, 0.8, 0.8), (2.0, 0.9, 0.6)),  # anisotropic: per slice, nearest across
        ((7, 30, 11), (1.0, 1.2, 1.0), (1.3, 0.9, 1.5)),  # isotropic enough: jointly
        ((9, 12, 40), (0.7, 0.7, 4.0), (0.7, 1.4, 2.0)),  # the low-resolution axis last
    ):
        for order, order_z in ((1, 0), (3, 0), (3, 1), (1, 3)):
            theirs = resample_data_or_seg_to_shape(data, shape, current, new, False, order, order_z, None)
            ours = nnunet.resample_to_shape(
                data, shape, current, new, order=order, order_z=order_z, force_separate_z=None
            )
            np.testing.assert_allclose(ours, theirs, atol=1e-5)
    for patch in ((14, 40, 48), (9, 16, 21)):
        theirs = compute_gaussian(
            patch, value_scaling_factor=10, dtype=torch.float32, device=torch.device("cpu")
        )
        torch.testing.assert_close(nnunet.gaussian_weights(patch), theirs)
        for size in ((14, 40, 48), (30, 97, 61), (15, 41, 200)):
            for step in (0.5, 0.3, 1.0):
                assert nnunet.window_starts(size, patch, step) == compute_steps_for_sliding_window(
                    size, patch, step
                )


def task_folder(root: Path, tmp_path: Path) -> Path:
    """A task spec of the oracle's data: nnU-Net's training cases (train/val) and the two unseen cases at
    the plans' median spacing (test), the student grid at that spacing."""
    raw = root / "raw" / "Dataset501_Toy"
    rows = []
    for i, image in enumerate(sorted((raw / "imagesTr").glob("*_0000.nii.gz"))):
        case = image.name.removesuffix("_0000.nii.gz")
        rows.append(
            {
                "image": str(image),
                "label": str(raw / "labelsTr" / f"{case}.nii.gz"),
                "case": case,
                "split": "val" if i == 4 else "train",
            }
        )
    for case in ("toy_102", "toy_103"):
        unseen = root / "unseen"
        rows.append(
            {
                "image": str(unseen / f"{case}_0000.nii.gz"),
                "label": str(unseen / f"{case}_label.nii.gz"),
                "case": case,
                "split": "test",
            }
        )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {**TASK, "manifest": "manifest.jsonl", "spacing": [3.0, 0.8, 0.8], "patch_size": [12, 40, 40]}
    (tasks / "toy_nnunet.yaml").write_text(yaml.safe_dump(spec))
    return tasks


def fit_config(tmp_path: Path, teacher: dict, tasks: Path) -> list[str]:
    override = {
        "trainer": {
            "max_epochs": 1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "runs/student",
        },
        "model": {"init_args": {"teacher": teacher, "init_from_teacher": False}},
        "data": {
            "init_args": {"tasks": [TASK["name"]], "samples_per_epoch": 2, "batch_size": 2, "cache": "none"}
        },
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return ["--config", "demo/lorkd_seg", "--config", str(path), "--tasks-dir", str(tasks)]


def nnunet_dice(root: Path, cases: list[str]) -> float:
    """The mean over foreground classes of the mean over cases of nnU-Net's own Dice (its prediction
    against the label, in the image's grid) — a hand computation."""
    per_class = []
    for value in (1, 2):
        scores = []
        for case in cases:
            predicted = read_zyx(root / "pred_0" / f"{case}.nii.gz") == value
            truth = read_zyx(root / "unseen" / f"{case}_label.nii.gz") == value
            scores.append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
        per_class.append(np.mean(scores))
    return float(np.mean(per_class))


def test_fit_teacher_test_and_store_with_an_nnunet_folder(
    nnunet_root, tmp_path, monkeypatch, caplog, capfd
) -> None:
    from lorkd_pl.app.cli import main

    monkeypatch.chdir(tmp_path)
    tasks = task_folder(nnunet_root, tmp_path)
    teacher = {"path": str(nnunet_root / MODEL), "fold": 0, "cache": "runs/targets"}
    config = fit_config(tmp_path, teacher, tasks)
    with caplog.at_level(logging.INFO):
        assert main(["fit", *config]) == 0
    assert "teacher targets in runs/targets: 5 built, 0 reused" in caplog.text
    assert '"format": "nnU-Net v2"' in caplog.text and '"transpose_forward": [2, 0, 1]' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a second fit: built once, reused
        assert main(["fit", *config, "--overwrite"]) == 0
    assert "0 built, 5 reused" in caplog.text

    assert main(["teacher-test", *config, "--out", "runs/nnunet_teacher"]) == 0
    summary = json.loads((tmp_path / "runs/nnunet_teacher/summary/toy_nnunet.json").read_text())
    theirs = nnunet_dice(nnunet_root, ["toy_102", "toy_103"])
    print(f"mean Dice: lorkd-pl teacher-test {summary['mean']['dice']:.4f}, nnU-Net's own {theirs:.4f}")
    assert abs(summary["mean"]["dice"] - theirs) <= 0.01, (summary["mean"]["dice"], theirs)

    other = {**teacher, "fold": [0, 1]}  # another teacher (two folds): rebuilt, never reused
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["fit", *fit_config(tmp_path, other, tasks), "--overwrite"]) == 0
    assert "5 built, 0 reused" in caplog.text


def variant(
    root: Path, tmp_path: Path, name: str = "nnUNetTrainer__nnUNetPlans__3d_fullres", plans=None, dataset=None
) -> Path:
    """A copy of the folder's JSON files (changed by ``plans``/``dataset``), its folds linked."""
    source, folder = root / MODEL, tmp_path / "variant" / name
    folder.mkdir(parents=True)
    for file, change in (("plans.json", plans), ("dataset.json", dataset)):
        data = json.loads((source / file).read_text())
        if change:
            change(data)
        (folder / file).write_text(json.dumps(data))
    for fold in ("fold_0", "fold_1"):
        (folder / fold).symlink_to(source / fold, target_is_directory=True)
    return folder


def set_arch(data: dict, key: str, value) -> None:
    data["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"][key] = value


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("neither", "is neither a MONAI bundle"),
        ("missing-fold", "fold_3/checkpoint_final.pth not found; the folder has folds ['0', '1']"),
        ("no-configuration", "has no configuration '3d_fullres'; it has ['2d']"),
        ("renamed-folder", "the folder name is not nnU-Net's <Trainer>__<Plans>__<configuration>"),
        ("labels-miss-the-classes", "name none of the classes of the tasks ['toy_nnunet']"),
        ("region-based-labels", "declares region-based labels"),
        ("operation", "nonlin 'os.system' is not an operation lorkd-pl builds"),
        ("network-class", "names the network 'evil.Network'"),
        ("pipeline-field", "define its pipeline, output and classes: remove spacing"),
        ("no-cache", "teacher.cache: an nnU-Net teacher runs in its own pipeline"),
        ("pickled-code", "holds pickled objects other than tensors"),
        ("cascade", "is a cascade stage"),
        ("label-type", "label values must be integers >= 0"),
        ("patch-size-type", "must be 3 positive numbers each"),
        ("transpose", "transpose_forward must be a permutation of [0, 1, 2]"),
        ("mask-length", "use_mask_for_norm must hold one true/false per image channel"),
        ("reorienting-reader", "reorients or reads images in a way lorkd-pl does not reproduce"),
        ("operation-type", "conv_op ['x'] is not an operation lorkd-pl builds"),
    ],
)
def test_bad_nnunet_folders_are_one_line(nnunet_root, tmp_path, case, message) -> None:
    spec = {"cache": str(tmp_path / "cache")}
    path = nnunet_root / MODEL
    if case == "neither":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "missing-fold":
        spec["fold"] = 3
    elif case == "no-configuration":
        path = variant(
            nnunet_root,
            tmp_path,
            plans=lambda p: p.update(configurations={"2d": p["configurations"]["3d_fullres"]}),
        )
    elif case == "renamed-folder":
        path = variant(nnunet_root, tmp_path, name="my_teacher")
    elif case == "labels-miss-the-classes":
        path = variant(
            nnunet_root,
            tmp_path,
            dataset=lambda d: d.update(labels={"background": 0, "kidney": 1, "lung": 2}),
        )
    elif case == "region-based-labels":
        path = variant(
            nnunet_root,
            tmp_path,
            dataset=lambda d: d.update(labels={"background": 0, "liver": [1, 2], "spleen": 2}),
        )
    elif case == "operation":
        path = variant(nnunet_root, tmp_path, plans=lambda p: set_arch(p, "nonlin", "os.system"))
    elif case == "network-class":
        path = variant(
            nnunet_root,
            tmp_path,
            plans=lambda p: p["configurations"]["3d_fullres"]["architecture"].update(
                network_class_name="evil.Network"
            ),
        )
    elif case == "pipeline-field":
        spec["spacing"] = [1.0, 1.0, 1.0]
    elif case == "no-cache":
        spec.pop("cache")
    elif case == "pickled-code":
        path = variant(nnunet_root, tmp_path)
        (path / "fold_0").unlink()
        (path / "fold_0").mkdir()
        torch.save({"network_weights": {}, "trainer": Path("x")}, path / "fold_0" / "checkpoint_final.pth")
        spec["fold"] = 0
    elif case == "cascade":

        def cascade(p):
            p["configurations"]["3d_cascade_fullres"] = {
                "inherits_from": "3d_fullres",
                "previous_stage": "3d_lowres",
            }

        path = variant(
            nnunet_root, tmp_path, name="nnUNetTrainer__nnUNetPlans__3d_cascade_fullres", plans=cascade
        )
    elif case == "label-type":
        path = variant(nnunet_root, tmp_path, dataset=lambda d: d["labels"].update(spleen="x"))
    elif case == "patch-size-type":
        path = variant(
            nnunet_root, tmp_path, plans=lambda p: p["configurations"]["3d_fullres"].update(patch_size="abc")
        )
    elif case == "transpose":
        path = variant(nnunet_root, tmp_path, plans=lambda p: p.update(transpose_forward=[0, 1, 1]))
    elif case == "mask-length":
        path = variant(
            nnunet_root,
            tmp_path,
            plans=lambda p: p["configurations"]["3d_fullres"].update(use_mask_for_norm=[]),
        )
    elif case == "reorienting-reader":
        path = variant(
            nnunet_root, tmp_path, plans=lambda p: p.update(image_reader_writer="NibabelIOWithReorient")
        )
    elif case == "operation-type":
        path = variant(nnunet_root, tmp_path, plans=lambda p: set_arch(p, "conv_op", ["x"]))
    with pytest.raises((TeacherError, NnUNetError, ValueError)) as error:
        load_teacher(parse_teacher({"path": str(path), **spec}), [TASK])
    text = str(error.value)
    assert message in text and "\n" not in text, text


def test_nnunet_fields_on_another_teacher_are_refused(tmp_path) -> None:
    weights = tmp_path / "teacher.pt"
    torch.save({}, weights)
    with pytest.raises(TeacherError, match="fold apply to nnU-Net v2 folders"):
        load_teacher(parse_teacher({"path": str(weights), "fold": 0}), [TASK])


def test_older_plans_without_architecture_build_the_same_network(nnunet_root, tmp_path) -> None:
    """nnU-Net's older plans (TotalSegmentator's) name UNet_class_name and per-stage lists instead of
    an ``architecture`` entry: converted, they build the same network, which takes the same weights."""

    def older(plans: dict) -> None:
        config = plans["configurations"]["3d_fullres"]
        kwargs = config.pop("architecture")["arch_kwargs"]
        config.update(
            UNet_class_name="PlainConvUNet",
            UNet_base_num_features=kwargs["features_per_stage"][0],
            unet_max_num_features=max(kwargs["features_per_stage"]),
            n_conv_per_stage_encoder=kwargs["n_conv_per_stage"],
            n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"],
            conv_kernel_sizes=kwargs["kernel_sizes"],
            pool_op_kernel_sizes=kwargs["strides"],
            num_pool_per_axis=[2, 2, 2],
        )

    new = nnunet.read_folder(nnunet_root / MODEL, fold=0)
    old = nnunet.read_folder(variant(nnunet_root, tmp_path, plans=older), fold=0)
    network = nnunet.load_network(old)
    reference = nnunet.load_network(new)
    images = torch.randn(1, 1, *new.patch_size)
    torch.testing.assert_close(network(images), reference(images))
    shutil.rmtree(tmp_path / "variant")


def test_checkpoints_of_numpy_1_and_nnunets_default_folds(nnunet_root, tmp_path) -> None:
    """A checkpoint pickled under NumPy 1 (``numpy.core.multiarray.scalar``, most published models) loads;
    left out, ``fold`` means the numbered folds, as nnU-Net's predictor (not ``fold_all``, not others)."""
    import io
    import zipfile

    source = nnunet_root / MODEL / "fold_0" / "checkpoint_final.pth"
    buffer = io.BytesIO()
    torch.save(torch.load(source, map_location="cpu", weights_only=False), buffer)
    folder = variant(nnunet_root, tmp_path)
    (folder / "fold_0").unlink()
    (folder / "fold_0").mkdir()
    patched = 0
    with (
        zipfile.ZipFile(buffer) as original,
        zipfile.ZipFile(folder / "fold_0" / "checkpoint_final.pth", "w") as out,
    ):
        for name in original.namelist():
            data = original.read(name)
            if name.endswith("data.pkl"):
                patched = data.count(b"numpy._core.multiarray\nscalar")
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            out.writestr(name, data)
    assert patched > 0  # nnU-Net's log holds NumPy floats
    read = nnunet.read_folder(folder)
    weights, axes = nnunet.load_fold(read, "0")
    reference, _ = nnunet.load_fold(nnunet.read_folder(nnunet_root / MODEL), "0")
    assert axes == (0, 1, 2) and all(torch.equal(weights[k], reference[k]) for k in reference)
    for odd in ("fold_all", "fold_0_old"):
        (folder / odd).symlink_to(nnunet_root / MODEL / "fold_0", target_is_directory=True)
    assert nnunet.read_folder(folder).folds == ("0", "1")
    assert nnunet.read_folder(folder, fold="all").folds == ("all",)
