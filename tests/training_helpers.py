"""Helpers imported by training tests and by the DDP processes they start (kept out of test discovery)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

TESTS = Path(__file__).resolve().parent


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m lorkd_pl.app.cli ARGS`` in a subprocess that can import these helpers (as callbacks)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "lorkd_pl.app.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ddp_fit(
    folder: Path,
    config: str,
    callbacks: list[dict],
    model: dict,
    data: dict,
    timeout: int = 600,
    val_batches: int = 0,
):
    """A 3-step, 2-process CPU DDP ``fit`` of ``config`` (``val_batches`` validation batches per task
    and epoch); each process saves its weights to ``folder`` (:class:`SaveRankWeights`). Returns the
    finished process."""
    extra = {
        "trainer": {
            "devices": 2,
            "strategy": "ddp",
            "max_steps": 3,
            "limit_val_batches": val_batches,
            "val_check_interval": 3,  # with val_batches > 0: validate after the last step
            "enable_checkpointing": False,
            "logger": False,
            "callbacks": [
                {"class_path": "training_helpers.SaveRankWeights", "init_args": {"out": str(folder)}},
                *callbacks,
            ],
        },
        "model": {"init_args": model},
        "data": {"init_args": data},
    }
    (folder / "ddp.yaml").write_text(yaml.safe_dump(extra))
    return run_cli(["fit", "--config", config, "--config", str(folder / "ddp.yaml")], folder, timeout)


def rank_weights(folder: Path) -> list[dict[str, torch.Tensor]]:
    """The parameters each DDP process saved (rank 0, rank 1)."""
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


class SaveRankWeights(L.Callback):
    """At the end of training, each process writes its parameters and the regions of its batches."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.regions: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.regions.append(batch["region"].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        # Parameters only: BatchNorm running statistics are per-process buffers, which DDP broadcasts
        # from rank 0 before each forward and each process then updates locally.
        weights = {name: p.detach().cpu() for name, p in pl_module.named_parameters()}
        torch.save(weights, self.out / f"rank{rank}.pt")
        (self.out / f"rank{rank}.json").write_text(json.dumps(self.regions))


def write_generalist_checkpoint(path: Path, task_names: list[str], backbone: dict) -> Path:
    """A (random) generalist teacher checkpoint for ``task_names``, as lorkd-pl saves it."""
    from lorkd_pl.data.datamodule import MultiRegionDataModule
    from lorkd_pl.models.generalist import GeneralistModule

    data = MultiRegionDataModule(task_names, validate=False)
    model = GeneralistModule(task_info=data.task_info, regions=data.region_names, backbone=backbone)
    return save_checkpoint(model, path)


def save_checkpoint(model: L.LightningModule, path: Path) -> Path:
    """Save ``model`` as a Lightning checkpoint holds it: weights, hyperparameters, the model's extras."""
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


class PoisonBatch(L.Callback):
    """Sets the images of one region's samples to NaN in the batch of global step ``step`` (on every
    process, or only on process ``rank``)."""

    def __init__(self, step: int, region: str, rank: int | None = None) -> None:
        self.step, self.region, self.rank = step, region, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            rows = batch["region"] == pl_module.regions.index(self.region)
            assert rows.any(), "the poisoned batch must hold the region"
            batch["image"][rows] = float("nan")


class SigkillAtStep(L.Callback):
    """Kills its own process with SIGKILL (no cleanup, like an OOM kill) before global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Sends its own process ``signal`` (a name: ``"SIGTERM"``, ``"SIGINT"``) before global step ``step``,
    as a scheduler or Ctrl-C would; the step itself still runs."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            if self.signal == "SIGINT" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
                # Ctrl-C at a terminal: SIGINT enabled. A parent that ignores it (a pytest worker in which
                # Lightning handled a KeyboardInterrupt sets SIG_IGN) passes SIG_IGN on to this process
                signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), getattr(signal, self.signal))


class StepRecorder(L.Callback):
    """Touches ``out`` when a training step starts (to prove that a bad input stopped the run before)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.out.touch()


def keep_built_clis(monkeypatch) -> list:
    """Make every ``lorkd-pl`` Lightning command run in this test keep its LorkdCLI in the returned list
    (to read the model and trainer it built after ``main([...])`` returns)."""
    import lorkd_pl.app.lightning as lightning_module

    built: list = []
    original = lightning_module.lightning_cli

    def keep(args, run=True):
        built.append(original(args, run))
        return built[-1]

    monkeypatch.setattr(lightning_module, "lightning_cli", keep)
    return built
