"""Run folders: every fit gets its own folder under its recipe's root, ``latest`` points at the newest,
an earlier run is never overwritten, and a resumed fit continues in its own folder."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import yaml

from lorkd_pl.app import runs
from lorkd_pl.app.cli import main

FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.cache=none",
    "--data.init_args.validate=false",
]
ROOT = Path("runs/demo/teacher_cls")


def fit(steps: int, *extra: str, config: str = "demo/teacher_cls") -> int:
    return main(["fit", "--config", config, *FAST, f"--trainer.max_steps={steps}", *extra])


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_two_fits_of_a_recipe_sit_side_by_side_and_both_test_and_export(
    tmp_path, monkeypatch, capsys
) -> None:
    """The issue's case: the LoRKD recipe run twice with other tasks leaves two runs, each testable
    (its summaries in its own folder) and exportable; ``latest`` names the second."""
    monkeypatch.chdir(tmp_path)  # an empty folder: the packaged configs are found by name
    assert fit(2) == 0  # the teacher the recipe reads from runs/demo/teacher_cls/latest/...
    lorkd = Path("runs/demo/lorkd_cls")
    task_lists = (["demo_brain_cls", "demo_thorax_cls"], ["demo_abdomen_cls", "demo_pelvis_cls"])
    for tasks in task_lists:
        assert fit(2, f"--data.init_args.tasks=[{', '.join(tasks)}]", config="demo/lorkd_cls") == 0
    assert os.readlink(lorkd / "latest") == "version_1"
    for version, tasks in enumerate(task_lists):
        run = lorkd / f"version_{version}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["data"]["init_args"]["tasks"] == tasks  # each run's own config beside its weights
        assert config["trainer"]["default_root_dir"] == str(lorkd)  # the recipe as given, not the run
        assert step_of(run / "checkpoints" / "last.ckpt") == 2
        test = ["test", "--config", str(run / "config.yaml"), *FAST[2:]]
        assert main([*test, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
        assert sorted(p.stem for p in (run / "test_last" / "summary").glob("*.json")) == sorted(tasks)
        out = tmp_path / f"export_{version}"
        args = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--all-regions", "--out", str(out)]
        assert main(["export", *args]) == 0
        assert sorted(p.name for p in out.iterdir() if p.name != "router") == sorted(
            t.split("_")[1] for t in tasks
        )


def test_a_named_run_is_never_overwritten_and_overwrite_moves_all_of_it_aside(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    run = ROOT / "mine"
    assert fit(1, "--run_name=mine") == 0
    first = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "notes.txt").write_text("a file the user put there")
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:  # the same name again refuses, before any step
        fit(2, "--run_name=mine")
    assert exit_info.value.code == 2
    error = error_line(capsys)
    assert error.startswith(f"lorkd-pl: error: {run} holds an earlier run (")
    assert "--ckpt_path last --run_name mine" in error and "--overwrite" in error
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == first

    assert fit(2, "--run_name=mine", "--overwrite") == 0
    assert step_of(run / "checkpoints" / "last.ckpt") == 2  # the run just made, under its name
    assert not (run / "notes.txt").exists()
    (aside,) = ROOT.glob("mine.replaced-*")  # moved whole, never deleted
    assert (aside / "checkpoints" / "last.ckpt").read_bytes() == first
    assert (aside / "notes.txt").read_text() == "a file the user put there"
    assert (aside / "metrics.csv").is_file() and (aside / "config.yaml").is_file()


def test_resuming_continues_the_run_in_its_folder_and_keeps_its_first_logs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    logged = "--trainer.log_every_n_steps=1"
    assert fit(1, logged) == 0  # stopped mid-epoch at step 1
    assert fit(1) == 0  # another run in between: latest moves to it
    run = ROOT / "version_0"
    assert fit(2, logged, "--trainer.max_epochs=2", "--ckpt_path", "last", "--run_name=version_0") == 0
    assert step_of(run / "checkpoints" / "last.ckpt") == 2
    assert sorted(p.name for p in ROOT.iterdir()) == ["latest", "version_0", "version_1"]
    steps = []
    for path in (run / "metrics.csv", run / "resume_0" / "metrics.csv"):  # Lightning's CSVLogger would
        with path.open() as handle:  # have replaced the first part's metrics.csv
            steps.append({row["step"] for row in csv.DictReader(handle) if row.get("train/loss")})
    assert steps == [{"0"}, {"1"}]
    # a file inside a run's checkpoints/ continues that run, as `last` does
    assert fit(3, "--trainer.max_epochs=3", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}") == 0
    assert step_of(run / "checkpoints" / "last.ckpt") == 3 and (run / "resume_1").is_dir()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--ckpt_path", "last"],
            "--ckpt_path last: there is no run under runs/demo/teacher_cls to continue",
        ),
        (["--run_name=../elsewhere"], "--run_name '../elsewhere' is not a run name"),
        (["--run_name=latest"], "--run_name 'latest' is not a run name"),
        (["--run_name=a b"], "--run_name 'a b' is not a run name"),
        (["--run_name=a/b"], "--run_name 'a/b' is not a run name"),
        (["--run_name=.hidden"], "--run_name '.hidden' is not a run name"),
        (["--run_name=" + "x" * 129], "--run_name 'xxxx"),
        (["--run_name=-x"], "--run_name '-x' is not a run name"),
        (["--ckpt_path", "best"], "--ckpt_path best names the best checkpoint of a fit in the same"),
        (["--ckpt_path", ""], "--ckpt_path '' is not a checkpoint file"),
        (["--ckpt_path", "hpc"], "--ckpt_path 'hpc' is not a checkpoint file"),
        (["--trainer.default_root_dir=afile"], "trainer.default_root_dir afile is a file"),
        (["--run_name=blocked"], "cannot make the run folder runs/demo/teacher_cls/blocked: a file"),
        (
            ["--ckpt_path", "last", "--run_name=nope"],
            "--ckpt_path last --run_name nope: there is no run folder",
        ),
    ],
)
def test_bad_run_names_and_nothing_to_resume_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file of the user's")
    ROOT.mkdir(parents=True)
    (ROOT / "blocked").write_text("a file of the user's")
    with pytest.raises(SystemExit) as exit_info:
        fit(1, *args)
    assert exit_info.value.code == 2
    assert error_line(capsys).startswith(f"lorkd-pl: error: {message}")
    assert sorted(p.name for p in ROOT.iterdir()) == ["blocked"]  # no run folder left behind
    assert (tmp_path / "afile").read_text() == (ROOT / "blocked").read_text() == "a file of the user's"


def test_runs_lists_nothing_or_refuses_what_is_not_a_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    for root in ("file.txt", "missing"):
        with pytest.raises(SystemExit) as exit_info:
            main(["runs", root])
        assert exit_info.value.code == 2
        assert error_line(capsys) == (
            f"lorkd-pl: error: {root} is not a folder of runs (a recipe's trainer.default_root_dir, "
            "e.g. runs/demo/lorkd_seg)"
        )
    (tmp_path / "empty" / "version_0").mkdir(parents=True)  # a run that never wrote a checkpoint
    assert main(["runs", "empty"]) == 0
    assert capsys.readouterr().out.strip() == "no runs with a checkpoints/last.ckpt under empty"


def test_two_fits_under_one_name_started_together_never_share_the_folder(tmp_path) -> None:
    """The second fit's claim of the run folder fails (the first created it exclusively)."""
    run = tmp_path / "same"
    run.mkdir()
    runs.claim_run(run)
    with pytest.raises(runs.RunExistsError, match="claimed by another fit started at the same time"):
        runs.claim_run(run)


def test_a_resumed_runs_config_starts_a_new_run_and_a_listing_survives_a_damaged_run(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert fit(1) == 0
    assert fit(2, "--trainer.max_epochs=2", "--ckpt_path", "last") == 0
    saved = yaml.safe_load((ROOT / "version_0" / "resume_0" / "config.yaml").read_text())
    assert "ckpt_path" not in saved and "run_name" not in saved  # how a run started is not the recipe
    assert main(["fit", "--config", str(ROOT / "version_0" / "resume_0" / "config.yaml")]) == 0
    assert os.readlink(ROOT / "latest") == "version_1"  # a new run, not a resumption of another
    (ROOT / "version_1" / "checkpoints" / "last.ckpt").write_bytes(b"damaged")
    capsys.readouterr()
    assert main(["runs", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert "version_0" in out and "version_1" in out and "unreadable: cannot read checkpoint" in out


def test_resume_of_a_run_without_a_last_checkpoint_is_refused(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (ROOT / "version_0").mkdir(parents=True)
    assert runs.point_latest(ROOT, "version_0")
    with pytest.raises(SystemExit):
        fit(1, "--ckpt_path", "last")
    assert "--ckpt_path last: there is no last.ckpt in" in error_line(capsys)


def test_a_resumed_fit_continues_its_wandb_run(tmp_path, monkeypatch) -> None:
    """A fit named by --run_name gets a W&B id of W&B's choosing; resuming it (twice) logs to that same
    W&B run, as W&B's own offline folders show, not to a new one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    wandb = ["--config", "logging/wandb", "--run_name", "mine"]
    assert fit(1, *wandb) == 0
    run = ROOT / "mine"
    (first,) = (run / "wandb").glob("offline-run-*")
    run_id = first.name.rsplit("-", 1)[1]
    assert run_id != "mine" and (first / f"run-{run_id}.wandb").is_file()
    for resumption, steps in enumerate((2, 3)):
        assert fit(steps, *wandb, "--trainer.max_epochs=3", "--ckpt_path", "last") == 0
        assert step_of(run / "checkpoints" / "last.ckpt") == steps  # it did resume
        (resumed,) = (run / f"resume_{resumption}" / "wandb").glob("offline-run-*")
        assert resumed.name.rsplit("-", 1)[1] == run_id
    assert runs.previous_wandb_id(run) == run_id
    monkeypatch.setenv("WANDB_RUN_ID", "trial7")  # a sweep agent's id is W&B's to apply, not ours
    assert runs.previous_wandb_id(run) is None
    import wandb

    wandb.teardown()  # stop this process's W&B service (its socket would reach later tests' processes)


def test_run_names_come_from_the_flag_the_launcher_wandb_or_slurm(tmp_path, monkeypatch) -> None:
    """The order of module runs' docstring; processes a launcher started beside the first (RANK,
    LOCAL_RANK, NODE_RANK) never claim a new folder."""
    for name in (runs.RUN_NAME_ENV, "WANDB_RUN_ID", "SLURM_JOB_ID", "SLURM_JOB_NAME", *runs._RANK_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    assert runs.new_run_name(None, wandb=False) == (None, None)  # numbered
    assert runs.new_run_name("lr3e-3", wandb=True) == ("lr3e-3", None)
    name, wandb_id = runs.new_run_name(None, wandb=True)
    assert name == wandb_id and len(name) == 8 and name.isalnum()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert runs.new_run_name(None, wandb=False) == ("slurm-4242", None)
    monkeypatch.setenv("WANDB_RUN_ID", "trial7")  # a sweep agent's trial
    assert runs.new_run_name(None, wandb=True) == ("trial7", "trial7")
    monkeypatch.setenv(runs.RUN_NAME_ENV, "chosen")  # set by the process that started a DDP fit
    assert runs.new_run_name(None, wandb=True) == ("chosen", None)
    for name in (runs.RUN_NAME_ENV, "WANDB_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("NODE_RANK", "1")  # another node's process, started by an outside launcher
    with pytest.raises(runs.RunFolderError, match="give every process the same --run_name"):
        runs.new_run_name(None, wandb=False)

    root = tmp_path / "root"
    assert [runs.claim_numbered(root, "version_") for _ in range(3)] == [
        "version_0",
        "version_1",
        "version_2",
    ]
    (root / "version_7.replaced-1").mkdir()  # not a number: not counted
    assert runs.claim_numbered(root, "version_") == "version_3"
    assert runs.claim_numbered(root, "version_", claim=False) == "version_3"  # a DDP process: the same


def test_latest_is_replaced_atomically_and_a_users_folder_named_latest_is_left_alone(tmp_path) -> None:
    for name in ("version_0", "version_1"):
        (tmp_path / name).mkdir()
    assert runs.point_latest(tmp_path, "version_0") and runs.latest_run(tmp_path) == "version_0"
    assert runs.point_latest(tmp_path, "version_1") and runs.latest_run(tmp_path) == "version_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "version_0", "version_1"]
    other = tmp_path / "other"
    (other / "latest").mkdir(parents=True)
    (other / "latest" / "mine.txt").write_text("x")
    assert not runs.point_latest(other, "version_0")
    assert (other / "latest" / "mine.txt").read_text() == "x" and runs.latest_run(other) is None


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
    last = ROOT / "latest" / "checkpoints" / "last.ckpt"
    assert main(["validate", "--config", "demo/teacher_cls", *FAST, tasks, "--ckpt_path", str(last)]) == 0
    assert (ROOT / "version_0" / "validate_last" / "metrics.csv").is_file()


def test_overwrite_is_a_fit_option_only(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "demo/teacher_cls", "--overwrite"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--overwrite" in capsys.readouterr().out
