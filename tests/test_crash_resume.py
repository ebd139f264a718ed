"""Crash and resume: a fit killed with SIGKILL mid-epoch resumes to the uninterrupted run's result."""

from __future__ import annotations

import csv
import signal
import subprocess
from pathlib import Path

import torch
import yaml

from training_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CLS = str(ROOT / "configs" / "demo" / "teacher_cls.yaml")
STEPS_PER_EPOCH, EPOCHS, KILL_AT = 5, 2, 7  # killed before step 8: epoch 1, after its 2nd batch


def fit(folder: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(folder / "checkpoints"),
                "every_n_train_steps": 1,
                "save_last": True,
            },
        }
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "training_helpers.SigkillAtStep", "init_args": {"step": kill_at}})
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
                "init_args": {"save_dir": str(folder), "name": "logs"},
            },
            "callbacks": callbacks,
        }
    )
    config["data"]["init_args"].update({"batch_size": 16, "cache": "none"})  # augmentation on
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return run_cli(["fit", "--config", str(folder / "config.yaml"), *extra], folder)


def last_val_score(folder: Path) -> float:
    rows = []
    for path in sorted((folder / "logs").glob("version_*/metrics.csv")):
        with path.open() as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("val/score")]
    return float(rows[-1]["val/score"])


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path) -> None:
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    reference.mkdir()
    crashed.mkdir()
    result = fit(reference)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = fit(crashed, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    at_crash = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)
    assert at_crash["global_step"] == KILL_AT and at_crash["epoch"] == 1  # mid-epoch: 2 of 5 batches done
    resumed = fit(crashed, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    final_reference = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    final_resumed = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)
    assert final_resumed["global_step"] == final_reference["global_step"] == STEPS_PER_EPOCH * EPOCHS
    # Same batches in the same order, optimiser and scheduler state restored: the weights agree to
    # float32 round-off (stated tolerance 1e-5 relative) and so does the final validation score.
    for key, value in final_reference["state_dict"].items():
        torch.testing.assert_close(final_resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert abs(last_val_score(crashed) - last_val_score(reference)) <= 1e-4
