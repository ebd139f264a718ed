"""The console script: version, `tasks`, `demo-data`, and clean errors."""

from __future__ import annotations

import pytest

from lorkd_pl import __version__
from lorkd_pl.cli import main


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
    for name in [n for n in clean_registry._TASKS if n.startswith("demo_")]:
        clean_registry._TASKS.pop(name)  # a fresh process given --tasks-dir loads only that folder
    capsys.readouterr()
    assert main(["tasks", "--region", "brain", "--tasks-dir", str(tmp_path / "demo" / "tasks")]) == 0
    out = capsys.readouterr().out
    assert "demo_brain_seg.yaml" in out and "demo_brain_cls.yaml" in out


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["tasks", "--region", "brian"])
    assert exit_info.value.code == 2
    assert "unknown region 'brian'; did you mean 'brain'" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit):
        main(["demo-data", "--out", str(tmp_path / "exists")])
    assert "pass --overwrite" in capsys.readouterr().err
