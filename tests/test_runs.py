"""Runs that cannot go stale: the checkpoint path the docs use always holds the run just made."""

from __future__ import annotations

import pytest
import torch

from lorkd_pl.app.cli import main

# docs/usage.md: `lorkd-pl fit --config demo/teacher_cls`, then runs/demo/teacher_cls/checkpoints/last.ckpt
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.cache=none",
    "--data.init_args.validate=false",
]
LAST = "runs/demo/teacher_cls/checkpoints/last.ckpt"


def fit(steps: int, *extra: str) -> int:
    return main(["fit", "--config", "demo/teacher_cls", *FAST, f"--trainer.max_steps={steps}", *extra])


def test_a_documented_fit_run_twice_leaves_the_second_run_at_the_documented_path(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # an empty folder: the packaged config is found by name
    assert fit(1) == 0
    first = (tmp_path / LAST).read_bytes()
    assert torch.load(tmp_path / LAST, weights_only=True)["global_step"] == 1
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:  # a plain re-run refuses, before any step
        fit(2)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lorkd-pl: error: checkpoint folder ")
    assert "runs/demo/teacher_cls/checkpoints holds an earlier run's checkpoints" in error
    assert "--ckpt_path last" in error and "--overwrite" in error
    assert (tmp_path / LAST).read_bytes() == first  # nothing of the first run was touched

    (tmp_path / LAST).with_name("my_backup.ckpt").write_bytes(first)  # a file the user put there
    assert fit(2, "--overwrite") == 0
    saved = torch.load(tmp_path / LAST, weights_only=True)
    assert saved["global_step"] == 2  # the run just made, at the path the docs use
    names = sorted(p.name for p in (tmp_path / LAST).parent.iterdir())
    assert names == ["last.ckpt"]  # no last-v1.ckpt beside a stale last.ckpt
    (aside,) = (tmp_path / LAST).parent.parent.glob("checkpoints.replaced-*")  # moved, never deleted
    assert (aside / "last.ckpt").read_bytes() == first and (aside / "my_backup.ckpt").read_bytes() == first


def test_overwrite_is_a_fit_option_only(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "demo/teacher_cls", "--overwrite"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_resuming_is_not_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert fit(1) == 0
    assert fit(2, "--trainer.max_epochs=2", "--ckpt_path", "last") == 0  # resumes into its own folder
    assert torch.load(tmp_path / LAST, weights_only=True)["global_step"] == 2


def test_a_checkpoint_of_aliased_tasks_is_accepted_by_ckpt_path(
    tmp_path, monkeypatch, clean_registry
) -> None:
    """The --ckpt_path pre-check compares class aliases too: the run's own aliases must be read."""
    import dataclasses

    monkeypatch.chdir(tmp_path)
    for name in ("demo_brain_cls", "demo_thorax_cls"):
        spec = clean_registry.get_task(name)
        aliases = {spec.classes[0]: "normal"}
        clean_registry.register_task(dataclasses.replace(spec, name=f"aliased_{name}", class_aliases=aliases))
    tasks = "--data.init_args.tasks=[aliased_demo_brain_cls, aliased_demo_thorax_cls]"
    assert fit(1, tasks) == 0
    assert main(["validate", "--config", "demo/teacher_cls", *FAST, tasks, "--ckpt_path", LAST]) == 0
