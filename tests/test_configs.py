"""Every shipped config: --print_config, fit (fast_dev_run), test and predict through main([...])."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from lorkd_pl.app.cli import main
from lorkd_pl.registry import get_task

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO = sorted((CONFIGS / "demo").glob("*.yaml"))
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml")) + sorted((CONFIGS / "logging").glob("*.yaml"))
SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]


def run(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.mark.parametrize("config", DEMO, ids=lambda p: p.stem)
def test_print_config(config, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"].endswith("MultiRegionDataModule")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_layer_on_a_demo_config(preset, capsys) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "demo" / "teacher_cls.yaml"),
                "--config",
                str(preset),
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(preset.read_text())["trainer"]
    for key, value in expected.items():
        if key != "logger":
            assert printed["trainer"][key] == value


@pytest.mark.parametrize("kind", ["cls", "seg"])
def test_demo_configs_fit_test_predict(kind, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    teacher, student = (
        str(CONFIGS / "demo" / f"teacher_{kind}.yaml"),
        str(CONFIGS / "demo" / f"lorkd_{kind}.yaml"),
    )
    run("fit", "--config", teacher, *FAST)
    teacher_ckpt = tmp_path / "runs" / "demo" / f"teacher_{kind}" / "latest" / "checkpoints" / "last.ckpt"
    assert teacher_ckpt.is_file()
    run("fit", "--config", student, "--trainer.fast_dev_run=2")
    run("fit", "--config", student, *FAST)  # a second run beside the first; latest names it
    student_ckpt = tmp_path / "runs" / "demo" / f"lorkd_{kind}" / "latest" / "checkpoints" / "last.ckpt"
    image = tmp_path / "case.nii.gz"
    record = get_task(f"demo_brain_{kind}").records("test")[0]
    if kind == "seg":
        shutil.copy(record["image"], image)
    else:  # a 2D image file, as a user would bring one
        image = tmp_path / "case.png"
        sitk.WriteImage(sitk.GetImageFromArray(np.asarray(record["image"])), str(image))
    for config, ckpt in ((teacher, teacher_ckpt), (student, student_ckpt)):
        run("test", "--config", config, "--ckpt_path", str(ckpt), "--trainer.limit_test_batches=1")
        out = tmp_path / "predictions" / Path(config).stem
        run("predict", "--source", str(ckpt), "--region", "brain", "--input", str(image), "--out", str(out))
        expected = "case_demo_brain_seg.nii.gz" if kind == "seg" else "brain_predictions.csv"
        assert [p.name for p in out.iterdir()] == [expected]
    root = tmp_path / "runs" / "demo" / f"lorkd_{kind}"
    assert sorted(p.name for p in root.glob("version_*")) == ["version_0", "version_1"]  # one per run
    assert (root / "version_1" / "config.yaml").is_file()  # (fast_dev_run logs nothing: version_0)
    summaries = sorted(
        (tmp_path / "runs" / "demo" / f"lorkd_{kind}" / "latest").glob("test_last/summary/*.json")
    )
    assert [p.stem for p in summaries] == [
        f"demo_{r}_{kind}" for r in ("abdomen", "brain", "pelvis", "thorax")
    ]
    summary = json.loads(summaries[0].read_text())
    assert summary["cases"] and ("per_class" in summary)
    runs = tmp_path / "runs" / "demo"
    run(
        "report",
        "--teacher",
        str(runs / f"teacher_{kind}"),
        "--student",
        str(runs / f"lorkd_{kind}"),
        "--out",
        str(tmp_path / "report"),
    )
    report = (tmp_path / "report" / "report.md").read_text()
    metric = "dice" if kind == "seg" else "accuracy"
    row = next(line for line in report.splitlines() if line.startswith(f"| abdomen | demo_abdomen_{kind} |"))
    value = summary["mean"][metric] if kind == "seg" else summary[metric]
    assert row.split(" | ")[3] == f"{value:.3f}"  # the expert's value, read back from its summary
    plots = sorted(p.name for p in (tmp_path / "report" / "plots").glob("*.png"))
    assert f"{metric}_by_region.png" in plots
    if kind == "cls":
        assert "confusion_demo_abdomen_cls.png" in plots
    assert all(
        (tmp_path / "report" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in plots
    )


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_sweep_keys_are_accepted(sweep, capsys) -> None:
    spec = yaml.safe_load(sweep.read_text())
    command = spec["command"]
    assert command[:3] == ["${env}", "lorkd-pl", "fit"] and command[-1] == "${args}"
    configs = [command[i + 1] for i, item in enumerate(command) if item == "--config"]
    assert configs and not any(c.startswith("configs/") for c in configs)  # packaged names: any folder
    args = []
    for key, values in spec["parameters"].items():
        value = values["values"][0] if "values" in values else values["min"]
        args.append(f"--{key}={value}")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[a for c in configs for a in ("--config", c)], *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, values in spec["parameters"].items():
        node = printed
        for part in key.split("."):
            node = node[part]
        expected = values["values"][0] if "values" in values else values["min"]
        assert node == expected, key


@pytest.mark.parametrize("preset", PAPER, ids=lambda p: p.stem)
def test_paper_presets_layer_on_the_demo_and_train(preset, tmp_path, monkeypatch, capsys) -> None:
    """The authors' recipe over the demo config: printed values are the papers', and one step trains
    (only the patch/image size shrunk to the demo's and the teacher left out)."""
    monkeypatch.chdir(tmp_path)
    kind = preset.stem.split("_")[1]
    base = str(CONFIGS / "demo" / f"lorkd_{kind}.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", base, "--config", str(preset), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    if kind == "seg":
        assert printed["kd_weight"] == 0.1 and printed["lr"] == 0.0001 and printed["warmup_steps"] == 5000
        assert printed["layer_rank"] == {"upcat_*": "2x"} and printed["transposed_convs"] is False
    else:
        assert printed["temperature"] == 10.0 and printed["optimizer"] == "sgd" and printed["lr"] == 0.05
    size = "[32,32,32]" if kind == "seg" else "[28,28]"
    run(
        "fit", "--config", base, "--config", str(preset), "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0", f"--data.init_args.patch_size={size}",
        "--data.init_args.batch_size=2", "--data.init_args.validate=false",
        f"--data.init_args.tasks=[demo_brain_{kind}, demo_thorax_{kind}]",
        "--model.init_args.teacher=null", "--model.init_args.init_from_teacher=false",
    )  # fmt: skip


#: The learning rates an optimiser is sampled at in a sweep (AdamW's are ~100x below SGD's).
LR_RANGES = {"adamw": (1e-5, 0.01), "sgd": (1e-4, 0.5)}


def test_sweeps_sample_values_that_fit_their_recipe() -> None:
    """Every packaged sweep's learning rates lie in the range of the optimiser its recipe trains with
    (a 2D sweep once sampled AdamW rates up to 0.1)."""
    import yaml

    from lorkd_pl.app.configs import packaged_config

    sweeps = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        sweep = yaml.safe_load(path.read_text())
        recipe = sweep["command"][sweep["command"].index("--config") + 1]
        model = yaml.safe_load(Path(packaged_config(recipe)).read_text())["model"]["init_args"]
        low, high = LR_RANGES[model.get("optimizer", "adamw")]
        lr = sweep["parameters"]["model.init_args.lr"]
        values = lr.get("values") or [lr["min"], lr["max"]]
        assert all(low <= v <= high for v in values), (path.name, values)
