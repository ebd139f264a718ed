"""Plugin discovery: tasks folders (Python and spec files), entry points, broken plugins."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint

import pytest

from lorkd_pl.data import plugins
from lorkd_pl.data.plugins import PluginError, load_plugins
from lorkd_pl.registry import get_task


def test_the_package_entry_point_registers_the_demo_tasks() -> None:
    from importlib.metadata import entry_points

    (point,) = [p for p in entry_points(group=plugins.ENTRY_POINT_GROUP) if p.name == "demo"]
    assert point.value == "lorkd_pl.data.demo_tasks:register"
    assert get_task("demo_brain_seg").source == "lorkd_pl.data.demo_tasks"
    assert plugins.default_tasks_dirs() == []  # no folder is scanned unless named


def test_tasks_dir_without_a_folder_is_refused(capsys) -> None:
    from lorkd_pl.app.cli import main

    for args in (["tasks", "--tasks-dir"], ["tasks", "--tasks-dir="], ["tasks", "--tasks-dir", "--kind"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert "--tasks-dir needs a folder" in capsys.readouterr().err


def test_folder_with_python_and_spec_files(tmp_path, clean_registry, monkeypatch) -> None:
    (tmp_path / "my_tasks.py").write_text(
        textwrap.dedent(
            """
            from lorkd_pl.registry import TaskSpec, register_task
            register_task(TaskSpec(name="py_task", region="spine", kind="cls2d", classes=("a", "b"),
                                   records=lambda split: [], source=__file__))
            """
        )
    )
    (tmp_path / "spec.yaml").write_text(
        "name: yaml_task\nregion: brain\nkind: cls2d\nclasses: [absent, present]\nnpz: data.npz\n"
    )
    (tmp_path / "_private.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.setenv(plugins.ENV_TASKS_DIR, str(tmp_path))
    loaded = load_plugins(use_entry_points=False)
    assert sorted(p.rsplit("/", 1)[-1] for p in loaded) == ["my_tasks.py", "spec.yaml"]
    assert get_task("py_task").region == "spine" and get_task("yaml_task").classes == ("absent", "present")
    assert load_plugins(use_entry_points=False) == []  # each source loads once


def test_broken_plugin_names_file_and_exception(tmp_path, clean_registry) -> None:
    (tmp_path / "broken.py").write_text("import numpy\nraise ImportError('needs package xyz')\n")
    with pytest.raises(PluginError, match=r"broken.py failed: ImportError: needs package xyz"):
        load_plugins([tmp_path], use_entry_points=False)


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(PluginError, match="does not exist"):
        load_plugins([tmp_path / "nope"], use_entry_points=False)


def test_entry_points(monkeypatch, clean_registry) -> None:
    calls = []
    point = EntryPoint(
        name="extra", value="tests.test_plugins:_register_extra", group=plugins.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(
        plugins, "entry_points", lambda group: [point] if group == plugins.ENTRY_POINT_GROUP else []
    )
    monkeypatch.setattr(EntryPoint, "load", lambda self: lambda: calls.append(self.name))
    loaded = load_plugins([], use_entry_points=True)
    assert calls == ["extra"] and loaded == ["entry point extra = tests.test_plugins:_register_extra"]
    plugins._LOADED.discard(loaded[0])


def test_yaml_booleans_as_class_names_are_refused(tmp_path, clean_registry) -> None:
    (tmp_path / "spec.yaml").write_text(
        "name: t\nregion: brain\nkind: cls2d\nclasses: [no, yes]\nnpz: d.npz\n"
    )
    with pytest.raises(PluginError, match=r"spec.yaml failed.*quote names such as 'no'"):
        load_plugins([tmp_path], use_entry_points=False)
