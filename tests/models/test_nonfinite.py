"""A NaN/inf training loss is never trained on: a clear error (step, region, term) or a counted skip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorkd_pl.app.cli import main
from lorkd_pl.models.base import NonFiniteLossError
from training_helpers import ddp_fit, keep_built_clis, rank_weights

ROOT = Path(__file__).resolve().parents[2]
TEACHER_CLS = str(ROOT / "configs" / "demo" / "teacher_cls.yaml")
LORKD_CLS = str(ROOT / "configs" / "demo" / "lorkd_cls.yaml")
COMMON = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=0",
    "--trainer.logger=false",
    "--trainer.callbacks+=training_helpers.PoisonBatch",
    "--trainer.callbacks.step=2",
    "--trainer.callbacks.region=brain",
]


@pytest.mark.parametrize(
    ("config", "model_args", "term"),
    [
        (TEACHER_CLS, [], "task_loss of task 'demo_brain_cls' (region 'brain')"),
        (
            LORKD_CLS,
            ["--model.init_args.teacher=null", "--model.init_args.init_from_teacher=false"],
            "task_loss of task 'demo_brain_cls' (region 'brain')",
        ),
    ],
    ids=["generalist", "lorkd"],
)
def test_nan_batch_raises_naming_step_region_and_term(
    config, model_args, term, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, *model_args, *COMMON])
    assert exit_info.value.code == 2 and isinstance(exit_info.value.__cause__, NonFiniteLossError)
    message = str(exit_info.value.__cause__)
    assert "global step 2 " in message and term in message
    assert "Images with NaN/inf voxels in this batch: tasks 'demo_brain_cls' (region 'brain')" in message
    assert "nonfinite_loss=skip" in message  # the fix is named
    # BatchNorm spreads NaN to every sample of the batch, so every task's loss may be NaN; the input
    # check pins the cause on the one region whose images hold NaN
    images_line = message.split("Images with NaN/inf voxels in this batch: ")[1].split(". Fix")[0]
    assert images_line == "tasks 'demo_brain_cls' (region 'brain')"


def test_skip_counts_and_keeps_weights_finite(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    built = keep_built_clis(monkeypatch)
    assert main(["fit", "--config", TEACHER_CLS, "--model.init_args.nonfinite_loss=skip", *COMMON]) == 0
    model = built[0].model
    assert model.nonfinite_skipped == 1 and model.trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_finite_loss_passes_through_unchanged() -> None:
    from lorkd_pl.data.datamodule import MultiRegionDataModule
    from lorkd_pl.models.generalist import GeneralistModule

    data = MultiRegionDataModule(["demo_brain_cls"], validate=False)
    model = GeneralistModule(task_info=data.task_info, regions=data.region_names)
    loss = torch.tensor(0.25, requires_grad=True)
    batch = {"task": torch.tensor([0]), "image": torch.zeros(1, 1, 4, 4)}
    assert model.guard_loss(loss, batch, 0, dict) is loss
    with pytest.raises(NonFiniteLossError, match=r"at global step 0 .*on another process"):
        model.guard_loss(torch.tensor(math.inf), batch, 0, dict)
    with pytest.raises(ValueError, match="nonfinite_loss must be"):
        GeneralistModule(task_info=data.task_info, regions=data.region_names, nonfinite_loss="ignore")


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_ddp_processes_decide_together(mode, tmp_path) -> None:
    """NaN on process 0 only: both processes raise (none waits forever) or both skip and stay equal."""
    poison = {
        "class_path": "training_helpers.PoisonBatch",
        "init_args": {"step": 1, "region": "brain", "rank": 0},
    }
    data = {"batch_size": 16, "cache": "none"}
    result = ddp_fit(tmp_path, TEACHER_CLS, [poison], {"nonfinite_loss": mode}, data, timeout=300)
    if mode == "raise":
        assert result.returncode != 0 and "non-finite training loss at global step 1" in result.stderr
        assert not (tmp_path / "rank1.pt").exists()  # process 1 stopped too, at the same step
        return
    assert result.returncode == 0, result.stderr[-3000:]
    weights = rank_weights(tmp_path)
    for key in weights[0]:
        assert torch.isfinite(weights[0][key]).all()
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)
