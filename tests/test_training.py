"""Training through the CLI: DDP on CPU, bf16 mixed precision, resume from last.ckpt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorkd_pl.app.cli import main
from training_helpers import ddp_fit, rank_weights, write_generalist_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLS = str(ROOT / "configs" / "demo" / "lorkd_cls.yaml")
TEACHER_CLS = str(ROOT / "configs" / "demo" / "teacher_cls.yaml")
TASKS = ["demo_abdomen_cls", "demo_brain_cls", "demo_pelvis_cls", "demo_thorax_cls"]
BACKBONE = {
    "class_path": "lorkd_pl.models.backbones.ConvNet2d",
    "init_args": {"in_channels": 1, "channels": [16, 32, 64]},
}


@pytest.fixture
def teacher(tmp_path) -> str:
    return str(write_generalist_checkpoint(tmp_path / "teacher.ckpt", TASKS, BACKBONE))


def test_ddp_two_cpu_processes_keep_identical_weights(tmp_path, teacher) -> None:
    result = ddp_fit(
        tmp_path, CLS, [], {"teacher": teacher}, {"batch_size": 8, "cache": "none"}, val_batches=1
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # validation metrics are reduced by torchmetrics across processes; Lightning must not warn per key
    assert "sync_dist=True" not in result.stderr, result.stderr[-4000:]
    weights = rank_weights(tmp_path)
    experts = [k for k in weights[0] if k.endswith("expert_B")]
    assert experts and all(torch.count_nonzero(weights[0][k]) > 0 for k in experts)  # B left 0: trained
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)
    for rank in range(2):
        batches = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(batches) == 3 and all(len(set(b)) > 1 for b in batches)  # mixed regions per rank


def test_bf16_mixed_precision_on_cpu(tmp_path, teacher, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "fit",
                "--config",
                CLS,
                f"--model.init_args.teacher={teacher}",
                "--trainer.precision=bf16-mixed",
                "--trainer.max_steps=3",
                "--trainer.log_every_n_steps=1",
                "--trainer.max_epochs=1",
            ]
        )
        == 0
    )
    metrics = (tmp_path / "runs" / "demo" / "lorkd_cls" / "latest" / "metrics.csv").read_text()
    assert "train/kd_loss" in metrics and "nan" not in metrics.lower()


def test_resume_continues_steps_and_optimizer(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        TEACHER_CLS,
        "--model.init_args.optimizer=adamw",
        "--model.init_args.lr=0.001",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
    ]
    assert main(["fit", *common, "--trainer.max_epochs=1"]) == 0
    folder = tmp_path / "runs" / "demo" / "teacher_cls" / "latest" / "checkpoints"
    first = torch.load(folder / "last.ckpt", weights_only=True)
    assert first["global_step"] == 3 and first["epoch"] == 0
    assert main(["fit", *common, "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
    second = torch.load(folder / "last.ckpt", weights_only=True)
    assert second["global_step"] == 6 and second["epoch"] >= 1
    steps = {int(s["step"]) for s in second["optimizer_states"][0]["state"].values()}
    assert steps == {6}  # AdamW's per-parameter step counters continued from 3
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if "-v" in n], names  # no duplicate epoch checkpoint
