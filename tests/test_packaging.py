"""The package as a user installs it: a wheel, installed NON-editable into a fresh venv with its declared
dependencies from the package index, runs the demo, export, predict and report from an empty folder
(demo tasks from the package's own entry point, configs from package data). A dependency missing from
pyproject.toml fails here, as it would for a user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_wheel_in_a_fresh_venv_runs_the_demo_from_an_empty_folder(tmp_path) -> None:
    source = tmp_path / "source"  # build from a copy: nothing is written into the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORKD_PL_TASKS_DIR")}
    run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")],
        source,
        env,
    )
    (wheel,) = (tmp_path / "dist").glob("lorkd_pl-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    # As a user installs it: torch first, pinned to this environment's build (the Makefile's TORCH_SPEC:
    # a bare `torch` would pull a multi-GB CUDA build), then the wheel WITH its declared dependencies,
    # resolved from the package index (pip's cache may serve them); nothing borrowed from this venv.
    torch_version = version("torch").split("+")[0]
    run([str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}"], tmp_path, env, timeout=900)
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp_path, env, timeout=900)
    run([str(python), "-m", "pip", "check"], tmp_path, env)
    inner = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env
        ).strip()
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(env, HOME=str(tmp_path / "home"), LORKD_PL_DEMO_DATA=str(tmp_path / "demo_data"))
    where = run([str(python), "-c", "import lorkd_pl; print(lorkd_pl.__file__)"], empty, env)
    assert Path(where.strip()).is_relative_to(inner), where  # the installed copy, not the checkout
    lorkd = str(venv / "bin" / "lorkd-pl")

    tasks = run([lorkd, "tasks"], empty, env)
    assert "demo_brain_seg" in tasks and "lorkd_pl.data.demo_tasks" in tasks
    assert "demo/teacher_seg" in run([lorkd, "config"], empty, env)
    run([lorkd, "demo-data", "--out", str(tmp_path / "demo_data")], empty, env)
    assert (tmp_path / "demo_data" / "seg3d" / "manifest.jsonl").is_file()
    report = run([lorkd, "demo", "--quick"], empty, env, timeout=600)
    assert "2D classification (test split)" in report and "3D segmentation (test split)" in report
    for kind in ("cls", "seg"):
        assert (empty / "runs" / "demo" / f"lorkd_{kind}" / "latest" / "checkpoints" / "last.ckpt").is_file()
        assert (empty / "runs" / "demo" / f"report_{kind}" / "report.md").is_file()
    assert (empty / "runs" / "demo" / "experts" / "seg" / "brain" / "metadata.json").is_file()
    results = json.loads((empty / "runs" / "demo" / "results.json").read_text())
    for kind, metric in (("seg3d", "dice"), ("cls2d", "accuracy")):
        result = results[kind]
        assert result["metric"] == metric and {"teacher", "plain_kd", "lorkd"} <= set(result)
        # the foundation model is >= 3x an exported expert; the control has the expert's backbone
        assert result["teacher"]["params"] >= 3 * result["lorkd"]["params_merged_expert"]
        assert result["plain_kd"]["params"] < result["lorkd"]["params_all_experts"]
        assert set(result["lorkd"]["per_region"]) == {"abdomen", "brain", "pelvis", "thorax"}
        report = empty / "runs" / "demo" / f"report_{kind[:3]}"
        assert (report / "plots" / "learning_curves.png").is_file()
        label = "Dice" if kind == "seg3d" else "accuracy"
        assert (
            f"| teacher {label} | plain_kd {label} | Δ | lorkd {label} | Δ |"
            in (report / "report.md").read_text()
        )
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]  # nothing else written in the folder
    # the documented commands after the demo: export one region, predict a demo volume, compare runs
    runs = empty / "runs" / "demo"
    run(
        [
            lorkd,
            "export",
            "--ckpt",
            str(runs / "lorkd_seg" / "latest" / "checkpoints" / "last.ckpt"),
            "--region",
            "brain",
            "--out",
            str(tmp_path / "brain"),
        ],
        empty,
        env,
    )
    volume = next((tmp_path / "demo_data" / "seg3d").rglob("brain_*image*.nii.gz"))
    predicted = run(
        [
            lorkd,
            "predict",
            "--source",
            str(tmp_path / "brain"),
            "--input",
            str(volume),
            "--out",
            str(tmp_path / "p"),
        ],
        empty,
        env,
    )
    assert "wrote" in predicted and any((tmp_path / "p").glob("*.nii.gz"))
    run(
        [
            lorkd,
            "report",
            "--run",
            f"teacher={runs / 'teacher_seg'}",
            "--run",
            f"lorkd={runs / 'lorkd_seg'}",
            "--out",
            str(tmp_path / "report"),
        ],
        empty,
        env,
    )
    assert (tmp_path / "report" / "report.md").is_file()
