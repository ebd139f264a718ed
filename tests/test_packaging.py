"""The package as a user installs it: a wheel, installed NON-editable into a fresh venv, runs the demo
from an empty folder (demo tasks from the package's own entry point, configs from package data)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
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
    # The dependencies (torch, Lightning, MONAI, ...) come from this environment, read-only: a .pth
    # file adds its site-packages after the venv's own, so lorkd_pl itself is the wheel's copy.
    inner = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env
        ).strip()
    )
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()] or [sysconfig.get_path("purelib")]
    (inner / "outer-environment.pth").write_text("\n".join(outer) + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)

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
        assert (empty / "runs" / "demo" / f"lorkd_{kind}" / "checkpoints" / "last.ckpt").is_file()
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
