"""The console script: version, `tasks`, `demo-data`, and clean errors."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from lorkd_pl import __version__
from lorkd_pl.app.cli import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorkd-pl {__version__}"
    assert __version__ != "0.0.0"  # installed metadata is found


def test_tasks_lists_the_registry(capsys) -> None:
    assert main(["tasks", "--kind", "seg3d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "region", "kind", "#classes", "modality", "source"]
    assert lines[1].split()[:5] == ["demo_abdomen_seg", "abdomen", "seg3d", "4", "CT"]
    assert all(line.split()[2] == "seg3d" for line in lines[1:])


def test_demo_data_then_tasks_from_its_specs(tmp_path, capsys, clean_registry) -> None:
    assert main(["demo-data", "--out", str(tmp_path / "demo"), "--seed", "3"]) == 0
    assert (tmp_path / "demo" / "seg3d" / "manifest.jsonl").is_file()
    capsys.readouterr()
    assert main(["tasks", "--region", "brain", "--tasks-dir", str(tmp_path / "demo" / "tasks")]) == 0
    out = capsys.readouterr().out
    assert "demo_brain_seg.yaml" in out and "demo_brain_cls.yaml" in out  # the copies replace the built-ins
    # the same in a fresh process, which loads the folder first and the entry point after it
    tasks = str(tmp_path / "demo" / "tasks")
    code = (
        f"from lorkd_pl.app.cli import main; main(['tasks', '--region', 'brain', '--tasks-dir', {tasks!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "demo_brain_seg.yaml" in result.stdout and "lorkd_pl.data.demo_tasks" not in result.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["tasks", "--region", "brian"])
    assert exit_info.value.code == 2
    assert "unknown region 'brian'; did you mean 'brain'" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit):
        main(["demo-data", "--out", str(tmp_path / "exists")])
    assert "pass --overwrite" in capsys.readouterr().err


def test_help_and_tasks_import_neither_torch_nor_lightning() -> None:
    """Fast start: the parser and the task listing load no deep-learning stack (timings: benchmarks/)."""
    code = (
        "import sys, contextlib, io\n"
        "from lorkd_pl.app.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['tasks'])\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "stack = ('torch', 'lightning', 'monai', 'SimpleITK', 'numpy')\n"
        "heavy = sorted(m for m in stack if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_command_documents_and_accepts_tasks_dir(tmp_path, capsys) -> None:
    for command in ("predict", "tasks", "config", "demo-data", "demo", "anatomy-check", "export", "report"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--tasks-dir DIR" in capsys.readouterr().out, command
    for index, command in enumerate(
        (["--tasks-dir", "{}", "config"], ["tasks", "--tasks-dir={}"], ["fit", "--tasks-dir", "{}", "--help"])
    ):
        folder = tmp_path / f"tasks{index}"
        folder.mkdir()
        marker = tmp_path / f"loaded{index}"
        (folder / f"marker{index}.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        )
        with contextlib.suppress(SystemExit):  # --help exits
            main([part.format(folder) for part in command])  # any position, every command
        assert marker.is_file(), command


def test_predict_help_lists_the_file_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--input", "--source", "--region", "--out", "--device", "--probabilities", "--overlap"):
        assert option in out, option


def test_lightning_style_predict_points_at_the_file_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", "demo/lorkd_seg", "--ckpt_path", "x.ckpt"])
    assert exit_info.value.code == 2
    assert "lorkd-pl predict --source CHECKPOINT_OR_EXPORT" in capsys.readouterr().err


def test_packaged_configs_by_name(tmp_path, capsys, monkeypatch) -> None:
    from lorkd_pl.app.configs import config_root, packaged_configs, resolve_config_args

    assert "demo/teacher_seg" in packaged_configs() and "trainer/cpu" in packaged_configs()
    assert main(["config", "demo/teacher_seg"]) == 0
    assert capsys.readouterr().out == (config_root() / "demo" / "teacher_seg.yaml").read_text()
    assert main(["config", "demo/lorkd_cls", "trainer/cpu.yaml", "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "demo" / "lorkd_cls.yaml").is_file()
    assert (tmp_path / "mine" / "trainer" / "cpu.yaml").is_file()
    with pytest.raises(SystemExit):  # copies are never overwritten unless asked
        main(["config", "demo/lorkd_cls", "--out", str(tmp_path / "mine")])
    assert "pass --overwrite" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "teacher_seg").write_text("a local file wins\n")
    resolved = resolve_config_args(["fit", "--config", "demo/teacher_seg", "--config=demo/lorkd_seg.yaml"])
    assert resolved[2] == "demo/teacher_seg"  # an existing path is kept
    assert resolved[3] == f"--config={config_root().resolve() / 'demo' / 'lorkd_seg.yaml'}"
    with pytest.raises(LookupError, match="neither a file nor a packaged config"):
        resolve_config_args(["--config", "../../etc/passwd"])  # outside the packaged folder: refused
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "no/such"])
    assert exit_info.value.code == 2
    assert (
        "lorkd-pl: error: config 'no/such' is neither a file nor a packaged config" in capsys.readouterr().err
    )
    assert resolve_config_args(["-c", "trainer/cpu"])[1].endswith("trainer/cpu.yaml")
    with pytest.raises(SystemExit):
        main(["config", "no/such"])
    assert "no packaged config 'no/such'" in capsys.readouterr().err


def test_debug_shows_the_traceback_behind_an_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["tasks", "--region", "brian"])
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err
    from lorkd_pl.registry import RegistryError

    with pytest.raises(RegistryError, match="unknown region 'brian'"):
        main(["tasks", "--region", "brian", "--debug"])


@pytest.mark.parametrize(
    "args",
    [
        ["anatomy-check", "--seed", "-1"],
        ["anatomy-check", "--data-seed", "-3"],
        ["demo", "--seed", "-1"],
        ["demo-data", "--seed", str(2**32)],
    ],
)
def test_seeds_out_of_range_are_one_line_before_any_work(args, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *(["--out", str(tmp_path / "x")] if args[0] != "demo" else [])])
    assert exit_info.value.code == 2
    assert "must be an integer in [0, 4294967295]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()
