"""Crash and resume: a fit killed with SIGKILL mid-epoch resumes to the uninterrupted run's result."""

from __future__ import annotations

import csv
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from training_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CLS = str(ROOT / "configs" / "demo" / "teacher_cls.yaml")
STEPS_PER_EPOCH, EPOCHS, KILL_AT = 5, 2, 7  # killed before step 8: epoch 1, after its 2nd batch


def fit(
    folder: Path,
    *extra: str,
    kill_at: int | None = None,
    signal_at: tuple[int, str] | None = None,
    every: int = 1,
) -> subprocess.CompletedProcess:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {  # no dirpath: lorkd-pl puts it in the run folder, folder/latest/checkpoints
                "every_n_train_steps": every,
                "save_last": True,
            },
        }
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "training_helpers.SigkillAtStep", "init_args": {"step": kill_at}})
    if signal_at is not None:
        step, name = signal_at
        callbacks.append(
            {"class_path": "training_helpers.SignalAtStep", "init_args": {"step": step, "signal": name}}
        )
    config = yaml.safe_load(Path(TEACHER_CLS).read_text())  # one self-contained config: lists replaced
    config["trainer"].update(
        {
            "max_epochs": EPOCHS,
            "limit_train_batches": STEPS_PER_EPOCH,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "default_root_dir": str(folder),
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(folder)},
            },
            "callbacks": callbacks,
        }
    )
    config["data"]["init_args"].update({"batch_size": 16, "cache": "none"})  # augmentation on
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return run_cli(["fit", "--config", str(folder / "config.yaml"), *extra], folder)


def last_val_score(folder: Path) -> float:
    rows = []
    for path in sorted((folder / "latest").glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with path.open() as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("val/score")]
    return float(rows[-1]["val/score"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run both interruption tests are compared with."""
    folder = tmp_path_factory.mktemp("reference")
    result = fit(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def resume_matches(reference: Path, stopped: Path, every: int = 1) -> None:
    """``--ckpt_path last`` in ``stopped`` ends where the uninterrupted ``reference`` run ended: same
    batches in the same order, optimiser and scheduler state restored, so the weights agree to float32
    round-off (stated tolerance 1e-5 relative)."""
    resumed = fit(stopped, "--ckpt_path", "last", every=every)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final_reference = torch.load(reference / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    final_resumed = torch.load(stopped / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final_resumed["global_step"] == final_reference["global_step"] == STEPS_PER_EPOCH * EPOCHS
    for key, value in final_reference["state_dict"].items():
        torch.testing.assert_close(final_resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(reference, tmp_path) -> None:
    crashed = tmp_path / "crashed"
    crashed.mkdir()

    killed = fit(crashed, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    at_crash = torch.load(crashed / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    assert at_crash["global_step"] == KILL_AT and at_crash["epoch"] == 1  # mid-epoch: 2 of 5 batches done
    resume_matches(reference, crashed)
    assert abs(last_val_score(crashed) - last_val_score(reference)) <= 1e-4


def test_sigterm_mid_epoch_exits_non_zero_with_a_resumable_checkpoint(reference, tmp_path) -> None:
    """A scheduler's SIGTERM: exit 143 and one line naming the epoch and the resume command; the
    checkpoint written at the stop (the periodic ones are far apart here) resumes to the uninterrupted
    run's result. Ctrl-C (SIGINT) the same, exit 130."""
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    result = fit(stopped, signal_at=(KILL_AT, "SIGTERM"), every=100)
    assert result.returncode == 143, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("lorkd-pl: fit interrupted")]
    assert len(lines) == 1 and "by SIGTERM in epoch 1 (step 8)" in lines[0], result.stderr[-2000:]
    assert f"--ckpt_path {(stopped / 'latest' / 'checkpoints' / 'last.ckpt').resolve()}" in lines[0]
    at_stop = torch.load(stopped / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    assert at_stop["global_step"] == KILL_AT + 1  # the step running when the signal came finished
    resume_matches(reference, stopped, every=100)

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    result = fit(interrupted, signal_at=(2, "SIGINT"), every=100)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "lorkd-pl: fit interrupted by SIGINT in epoch 0" in result.stderr
    assert (interrupted / "latest" / "checkpoints" / "last.ckpt").is_file()
