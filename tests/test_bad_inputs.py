"""The bad-input matrix (docs/reliability.md): every case through ``lorkd-pl fit``/``validate`` ends
with exit code 2 and a message naming the file or field and the fix, before any training step."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from lorkd_pl.app.cli import main
from lorkd_pl.data.plugins import load_plugins
from training_helpers import write_generalist_checkpoint

UNET = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8], "strides": [2]},
}
SPEC = {
    "name": "bad_task",
    "region": "brain",
    "kind": "seg3d",
    "classes": ["background", "lesion"],
    "manifest": "manifest.jsonl",
    "patch_size": [8, 8, 8],
}


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def good_pair(folder: Path, stem: str, suffix: str = ".nii.gz") -> dict[str, str]:
    image = np.random.default_rng(sum(map(ord, stem))).normal(size=(8, 8, 8)).astype(np.float32)
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[2:5, 2:5, 2:5] = 1
    write_volume(folder / f"{stem}_image{suffix}", image)
    write_volume(folder / f"{stem}_label{suffix}", label)
    return {"image": f"{stem}_image{suffix}", "label": f"{stem}_label{suffix}"}


class Case:
    """A task folder with one defect: ``tasks/bad_task.yaml`` + manifest + volumes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tasks = root / "tasks"
        self.tasks.mkdir()
        self.spec = dict(SPEC)
        self.rows = [
            {**good_pair(self.tasks, "a"), "split": "train"},
            {**good_pair(self.tasks, "b"), "split": "train"},
            {**good_pair(self.tasks, "c"), "split": "val"},
        ]

    def write(self) -> None:
        (self.tasks / "bad_task.yaml").write_text(yaml.safe_dump(self.spec))
        lines = [json.dumps(row) for row in self.rows]
        (self.tasks / "manifest.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))


def missing_file(case: Case) -> None:
    case.rows[0]["image"] = "nope.nii.gz"


def corrupt_file(case: Case) -> None:
    (case.tasks / "a_image.nii.gz").write_bytes(b"\x00not an image" * 40)


def truncated_file(case: Case) -> None:
    data = (case.tasks / "a_image.nii.gz").read_bytes()
    (case.tasks / "a_image.nii.gz").write_bytes(data[: len(data) // 2])


def wrong_dimensionality(case: Case) -> None:
    write_volume(case.tasks / "a_image.nii.gz", np.zeros((8, 8), np.float32), (1.0, 1.0), (0.0, 0.0))


def size_mismatch(case: Case) -> None:
    write_volume(case.tasks / "a_label.nii.gz", np.zeros((8, 8, 6), np.uint8))


def geometry_mismatch(case: Case) -> None:
    write_volume(case.tasks / "a_label.nii.gz", np.zeros((8, 8, 8), np.uint8), origin=(4.0, 0.0, 0.0))


def label_out_of_range(case: Case) -> None:
    write_volume(case.tasks / "a_label.nii.gz", np.full((8, 8, 8), 3, np.uint8))


def non_finite(value: float) -> Callable[[Case], None]:
    def defect(case: Case) -> None:
        case.rows[0].update(good_pair(case.tasks, "f", ".mha"))  # NIfTI readers may turn NaN into 0
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(case.tasks / "f_image.mha")))
        array[1, 2, 3] = value
        write_volume(case.tasks / "f_image.mha", array)

    return defect


def empty_manifest(case: Case) -> None:
    case.rows = []


def unknown_region(case: Case) -> None:
    case.spec["region"] = "elbow"


def misspelt_spec_field(case: Case) -> None:
    case.spec["patchsize"] = case.spec.pop("patch_size")


def zero_spacing(case: Case) -> None:
    case.spec["spacing"] = [0, 0, 0]


def second_task_with_other_patch(case: Case) -> None:
    (case.tasks / "other_task.yaml").write_text(
        yaml.safe_dump({**SPEC, "name": "other_task", "region": "thorax", "patch_size": [8, 8, 4]})
    )


def three_components(case: Case) -> None:
    rgb = sitk.GetImageFromArray(np.zeros((8, 8, 8, 3), np.float32), isVector=True)
    sitk.WriteImage(rgb, str(case.tasks / "a_image.nii.gz"))


def near_miss_column(case: Case) -> None:
    case.rows[2]["Split"] = case.rows[2].pop("split")


def duplicate_case_id(case: Case) -> None:
    case.rows[0]["case"] = case.rows[1]["case"] = "patient_7"


def image_in_train_and_test(case: Case) -> None:
    case.rows.append(
        {"image": case.rows[0]["image"], "label": case.rows[0]["label"], "split": "test", "case": "t"}
    )


def symlink_loop(case: Case) -> None:
    (case.tasks / "loop.yaml").symlink_to("loop.yaml")


def nothing(case: Case) -> None:
    """No defect in the files: the bad value is on the command line."""


def spec_field(**changes) -> Callable[[Case], None]:
    """A task spec with ``changes`` (lateral classes available for mirror pairs)."""

    def defect(case: Case) -> None:
        case.spec["classes"] = ["background", "lesion", "kidney_left", "kidney_right"]
        case.spec.update(changes)

    return defect


def byte_identical_copy(split: str) -> Callable[[Case], None]:
    """A training image copied under another name into ``split`` (a leak the path check cannot see)."""

    def defect(case: Case) -> None:
        for part in ("image", "label"):
            (case.tasks / f"copy_{part}.nii.gz").write_bytes((case.tasks / case.rows[0][part]).read_bytes())
        case.rows.append({"image": "copy_image.nii.gz", "label": "copy_label.nii.gz", "split": split})

    return defect


# (defect, extra CLI arguments, the fragments the message must hold)
MATRIX = {
    "three-component (RGB) image": (three_components, [], ["a_image.nii.gz", "3 components per voxel"]),
    "near-miss column name (Split)": (
        near_miss_column,
        [],
        ["manifest.jsonl", "column 'Split'", "rename it to 'split'"],
    ),
    "duplicate case id": (duplicate_case_id, [], ["case id 'patient_7' appears twice", "allow_duplicates"]),
    "the same image in train and test": (
        image_in_train_and_test,
        [],
        ["a_image.nii.gz", "appears twice", "(train) and", "(test)", "allow_duplicates=true"],
    ),
    "a symlink loop in the tasks folder": (symlink_loop, [], ["loop.yaml", "cannot be resolved"]),
    "learning rate 0": (nothing, ["--model.init_args.lr=0"], ["model.init_args.lr must be > 0"]),
    "sliding-window overlap 1": (
        nothing,
        ["--model.init_args.sw_overlap=1.0"],
        ["sw_overlap must be in [0, 1)"],
    ),
    "sliding-window batch 0": (
        nothing,
        ["--model.init_args.sw_batch_size=0"],
        ["sw_batch_size must be an integer >= 1"],
    ),
    "batch size 0": (
        nothing,
        ["--data.init_args.batch_size=0"],
        ["data.init_args.batch_size must be an integer >= 1"],
    ),
    "negative workers": (
        nothing,
        ["--data.init_args.num_workers=-1"],
        ["data.init_args.num_workers must be"],
    ),
    "negative samples per epoch": (
        nothing,
        ["--data.init_args.samples_per_epoch=-5"],
        ["samples_per_epoch must be"],
    ),
    "region weight 0": (
        nothing,
        ["--data.init_args.region_weights={brain: 0}"],
        ["region_weights['brain'] must be > 0"],
    ),
    "patch size of another dimension": (
        nothing,
        ["--data.init_args.patch_size=[8, 8]"],
        ["data.init_args.patch_size must be 3 integers >= 1"],
    ),
    "spacing 0 in the task spec": (zero_spacing, [], ["bad_task.yaml", "spacing must be 3 numbers > 0"]),
    "tasks with different patch sizes": (
        second_task_with_other_patch,
        ["--data.init_args.tasks=[bad_task, other_task]"],
        ["different patch sizes", "set data.init_args.patch_size"],
    ),
    "an accelerator the machine lacks": (
        nothing,
        ["--trainer.accelerator=gpu"],
        ["invalid trainer configuration", "check trainer.accelerator", "trainer/cpu"],
    ),
    "missing image file": (missing_file, [], ["nope.nii.gz", "'image'"]),
    "corrupt image file": (corrupt_file, [], ["a_image.nii.gz", "'image'"]),
    "truncated image file": (truncated_file, [], ["a_image.nii.gz", "'image'"]),
    "2D image in a 3D task": (wrong_dimensionality, [], ["a_image.nii.gz", "is 2D", "use a cls2d task"]),
    "image/label size mismatch": (size_mismatch, [], ["a_label.nii.gz", "resample the label"]),
    "image/label geometry mismatch": (geometry_mismatch, [], ["disagree on origin", "resample it"]),
    "label outside the class list": (label_out_of_range, [], ["a_label.nii.gz", "[3]", "class list"]),
    "NaN voxels": (non_finite(float("nan")), [], ["f_image.mha", "NaN or infinite", "fix or drop"]),
    "inf voxels": (non_finite(float("inf")), [], ["f_image.mha", "NaN or infinite", "fix or drop"]),
    "empty manifest": (empty_manifest, [], ["manifest.jsonl"]),
    "unknown region": (unknown_region, [], ["bad_task.yaml", "elbow"]),
    "misspelt task-spec field": (misspelt_spec_field, [], ["bad_task.yaml", "patchsize"]),
    "unknown task name": (lambda case: None, ["--data.init_args.tasks=[bad_tsak]"], ["bad_tsak", "bad_task"]),
    # accepted nonsense, refused now: flips, mirror pairs, spacings, copies
    "mirror pair with the background": (
        spec_field(flip_axes=[0], mirror_pairs=[["background", "lesion"]]),
        [],
        ["bad_task", "pairs the background"],
    ),
    "mirror pair of a class with itself": (
        spec_field(mirror_pairs=[["kidney_left", "kidney_left"]]),
        [],
        ["bad_task", "two different classes"],
    ),
    "a class in two mirror pairs": (
        spec_field(mirror_pairs=[["kidney_left", "kidney_right"], ["kidney_left", "lesion"]]),
        [],
        ["bad_task", "each class in one pair at most"],
    ),
    "a mirror 'pair' of one class": (
        spec_field(mirror_pairs=[["kidney_left"]]),
        [],
        ["bad_task", "mirror_pairs"],
    ),
    "fractional flip axis": (spec_field(flip_axes=[0.5]), [], ["bad_task.yaml", "flip_axes"]),
    "boolean flip axis": (spec_field(flip_axes=[True]), [], ["bad_task.yaml", "flip_axes"]),
    "flip axis as a string": (spec_field(flip_axes="0"), [], ["bad_task.yaml", "flip_axes"]),
    "a flip axis twice": (spec_field(flip_axes=[1, 1]), [], ["bad_task", "distinct axes"]),
    "flip axis 3": (spec_field(flip_axes=[3]), [], ["bad_task", "among 0 (left-right), 1, 2"]),
    "a tiny spacing in the task spec": (
        spec_field(spacing=[0.0001, 1, 1]),
        [],
        ["bad_task", "spacing must be between 0.01 and 100.0 mm"],
    ),
    "a huge spacing in the task spec": (
        spec_field(spacing=[1000, 1, 1]),
        [],
        ["bad_task", "spacing must be between"],
    ),
    "a boolean spacing in the task spec": (spec_field(spacing=[True, 1, 1]), [], ["bad_task", "spacing"]),
    "a tiny spacing on the command line": (
        nothing,
        ["--data.init_args.spacing=[0.001, 0.001, 0.001]"],
        ["data.init_args.spacing must be between 0.01"],
    ),
    "a training image copied into val under another name": (
        byte_identical_copy("val"),
        [],
        ["byte-identical copies", "(train) and", "(val)", "allow_duplicates"],
    ),
    "a training image copied into test under another name": (
        byte_identical_copy("test"),
        [],
        ["byte-identical copies", "(test)", "allow_duplicates"],
    ),
    "misspelt config key": (
        lambda case: (case.root / "typo.yaml").write_text("trainer:\n  max_epoch: 1\n"),
        ["--config", "typo.yaml"],
        ["max_epoch"],
    ),
}


def config(case: Case, model: dict | None = None) -> Path:
    path = case.root / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "trainer": {
                    "accelerator": "cpu",
                    "max_steps": 2,
                    "logger": False,
                    "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "num_sanity_val_steps": 0,
                    "callbacks": [
                        {
                            "class_path": "training_helpers.StepRecorder",
                            "init_args": {"out": str(case.root / "trained")},
                        }
                    ],
                },
                "model": model
                or {
                    "class_path": "lorkd_pl.models.generalist.GeneralistModule",
                    "init_args": {"backbone": UNET},
                },
                "data": {
                    "class_path": "lorkd_pl.data.datamodule.MultiRegionDataModule",
                    "init_args": {"tasks": ["bad_task"], "batch_size": 2},
                },
            }
        )
    )
    return path


def command(name: str, case: Case, *extra: str, model: dict | None = None) -> list[str]:
    """``lorkd-pl NAME`` on the case's tasks folder and config, plus ``extra`` arguments."""
    return [name, "--tasks-dir", str(case.tasks), "--config", str(config(case, model)), *extra]


def run_fails(args: list[str], case: Case, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert not (case.root / "trained").exists(), "a training step ran"
    return capsys.readouterr().err


@pytest.mark.parametrize("name", list(MATRIX))
def test_bad_input_fails_before_training(name, tmp_path, capsys, monkeypatch, clean_registry) -> None:
    monkeypatch.chdir(tmp_path)
    defect, extra, fragments = MATRIX[name]
    case = Case(tmp_path)
    defect(case)
    case.write()
    message = run_fails(command("fit", case, *extra), case, capsys)
    for fragment in fragments:
        assert fragment in message, (name, fragment, message)


def test_the_good_case_trains(tmp_path, monkeypatch, clean_registry) -> None:
    """The matrix's baseline: without a defect the same command trains (so each failure is the defect)."""
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    case.write()
    assert main(command("fit", case)) == 0
    assert (case.root / "trained").exists()


def test_checkpoint_from_another_region_set(tmp_path, capsys, monkeypatch, clean_registry) -> None:
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    case.write()
    other = write_generalist_checkpoint(
        tmp_path / "other.ckpt", ["demo_abdomen_seg", "demo_thorax_seg"], UNET
    )
    message = run_fails(command("validate", case, "--ckpt_path", str(other)), case, capsys)
    assert "was trained for tasks ['demo_abdomen_seg', 'demo_thorax_seg']" in message
    assert (
        "this run's data.tasks are ['bad_task']" in message and "use the training run's data.tasks" in message
    )


def test_checkpoint_with_other_classes_for_the_same_task(
    tmp_path, capsys, monkeypatch, clean_registry
) -> None:
    """Same task name, another class list: refused by the model before its weights are loaded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trained_with").mkdir()
    original = Case(tmp_path / "trained_with")
    original.write()
    load_plugins([original.tasks], use_entry_points=False)
    saved = write_generalist_checkpoint(tmp_path / "saved.ckpt", ["bad_task"], UNET)
    clean_registry._TASKS.pop("bad_task")  # the same task name, registered again with 3 classes
    (tmp_path / "now").mkdir()
    case = Case(tmp_path / "now")
    case.spec["classes"] = ["background", "lesion", "oedema"]
    case.write()
    message = run_fails(command("validate", case, "--ckpt_path", str(saved)), case, capsys)
    assert "names, regions, class lists and class aliases must match" in message, message[-1500:]


def test_teacher_classes_beyond_the_teacher_outputs(tmp_path, capsys, monkeypatch, clean_registry) -> None:
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    case.spec["teacher_classes"] = {"background": 0, "lesion": 5}  # the teacher has 4 output channels
    case.write()
    teacher = tmp_path / "teacher.pt"
    torch.save(__import__("monai").networks.nets.UNet(**UNET["init_args"]).state_dict(), teacher)
    model = {
        "class_path": "lorkd_pl.models.lorkd.LoRKDModule",
        "init_args": {"backbone": UNET, "rank": 2, "teacher": str(teacher), "teacher_model": UNET},
    }
    message = run_fails(command("fit", case, model=model), case, capsys)
    assert (
        "outputs 4 channels" in message
        and "{'bad_task': [5]}" in message
        and "fix teacher.classes or the tasks' teacher_classes" in message
    )


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ("--model.init_args.alpha=0", "model.init_args.alpha must be > 0"),
        ("--model.init_args.kd_weight=-1", "model.init_args.kd_weight must be >= 0"),
        ("--model.init_args.rank=[4]", "write the mapping form"),
    ],
)
def test_bad_student_options_fail_before_training(
    option, fragment, tmp_path, capsys, monkeypatch, clean_registry
):
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    case.write()
    model = {"class_path": "lorkd_pl.models.lorkd.LoRKDModule", "init_args": {"backbone": UNET, "rank": 2}}
    message = run_fails(command("fit", case, option, model=model), case, capsys)
    assert message.strip().splitlines()[-1].startswith("lorkd-pl: error: ") and fragment in message, message[
        -800:
    ]


def test_deliberate_reuse_is_allowed_explicitly(tmp_path, monkeypatch, clean_registry) -> None:
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    image_in_train_and_test(case)
    case.write()
    assert main(command("fit", case, "--data.init_args.allow_duplicates=true")) == 0
    assert (case.root / "trained").exists()


def test_an_exports_state_dict_as_ckpt_path(tmp_path, capsys, monkeypatch, clean_registry) -> None:
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    case.write()
    torch.save(
        __import__("monai").networks.nets.UNet(**UNET["init_args"]).state_dict(), tmp_path / "state_dict.pt"
    )
    message = run_fails(
        command("validate", case, "--ckpt_path", str(tmp_path / "state_dict.pt")), case, capsys
    )
    assert "state_dict.pt is not a training checkpoint" in message and "lorkd-pl predict" in message


def test_a_checkpoint_of_another_network_for_the_same_tasks(
    tmp_path, capsys, monkeypatch, clean_registry
) -> None:
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    case.write()
    load_plugins([case.tasks], use_entry_points=False)
    wider = {**UNET, "init_args": {**UNET["init_args"], "channels": [8, 16]}}
    other = write_generalist_checkpoint(tmp_path / "wider.ckpt", ["bad_task"], wider)
    message = run_fails(command("validate", case, "--ckpt_path", str(other)), case, capsys)
    assert "the checkpoint's weights do not fit the configured model" in message and "config.yaml" in message
    assert "Traceback" not in message


TEACHER_MATRIX = {
    "teacher.divisible a million": ({"divisible": 10**6}, "divisible: must be an integer in [1, 512]"),
    "teacher.divisible boolean": ({"divisible": True}, "divisible: must be an integer"),
    "teacher.spacing tiny": ({"spacing": [0.0001, 1.0, 1.0]}, "spacing: must be between 0.01 and 100.0"),
    "teacher.spacing negative": ({"spacing": [-1.0, 1.0, 1.0]}, "spacing"),
    "teacher.roi_size huge": ({"roi_size": [4096, 8, 8], "cache": "c"}, "roi_size: must be at most 1024"),
    "teacher.cache_top_k 0": (
        {"cache": "c", "cache_top_k": 0},
        "cache_top_k: must be an integer in [1, 255]",
    ),
    "teacher.cache_top_k 300": (
        {"cache": "c", "cache_top_k": 300},
        "cache_top_k: must be an integer in [1, 255]",
    ),
    "teacher.cache_top_k boolean": ({"cache": "c", "cache_top_k": True}, "cache_top_k: must be an integer"),
    "teacher.cache_top_k of a per-class sigmoid teacher": (
        {"cache": "c", "cache_top_k": 2, "output": "sigmoid"},
        "cache_top_k: keeps the k most likely",
    ),
    "teacher.overlap 1": ({"overlap": 1.0}, "overlap: must be in [0, 1)"),
    "teacher.sw_batch_size 0": ({"sw_batch_size": 0}, "sw_batch_size: must be an integer >= 1"),
}


@pytest.mark.parametrize("name", list(TEACHER_MATRIX))
def test_bad_teacher_values_fail_before_anything_is_allocated(
    name, tmp_path, capsys, monkeypatch, clean_registry
) -> None:
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    case.write()
    changes, fragment = TEACHER_MATRIX[name]
    teacher = {"path": str(tmp_path / "teacher.pt"), "classes": {"background": 0, "lesion": 1}, **changes}
    model = {"class_path": "lorkd_pl.models.lorkd.LoRKDModule", "init_args": {"backbone": UNET, "rank": 2}}
    message = run_fails(
        command("fit", case, f"--model.init_args.teacher={json.dumps(teacher)}", model=model), case, capsys
    )
    last = message.strip().splitlines()[-1]
    assert last.startswith("lorkd-pl: error: ") and fragment in last, (name, last)


def test_the_documented_teacher_model_form_is_taken_as_written(
    tmp_path, capsys, monkeypatch, clean_registry
) -> None:
    """``teacher: {path, model: {class_path, init_args}}`` (docs/teachers.md): the network is built from
    the description, not instantiated by the config parser into an object the spec refuses."""
    monkeypatch.chdir(tmp_path)
    case = Case(tmp_path)
    case.write()
    from monai.networks.nets import UNet

    torch.save(UNet(**UNET["init_args"]).state_dict(), tmp_path / "teacher.pt")
    teacher = {"path": str(tmp_path / "teacher.pt"), "model": UNET, "classes": {"background": 0, "lesion": 1}}
    model = {"class_path": "lorkd_pl.models.lorkd.LoRKDModule", "init_args": {"backbone": UNET, "rank": 2}}
    assert main(command("fit", case, f"--model.init_args.teacher={json.dumps(teacher)}", model=model)) == 0
    assert (case.root / "trained").exists()
