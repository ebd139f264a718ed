"""An interrupted fit (SIGTERM from a scheduler, Ctrl-C) ends as a failure that can be resumed.

Lightning stops a fit on SIGTERM by raising ``SIGTERMException``, a ``SystemExit`` whose code is 0, and
on Ctrl-C it exits 1: a script or scheduler cannot tell the first from success, and neither leaves a
checkpoint of where it stopped. :class:`InterruptCheckpoint` (installed on every ``lorkd-pl`` trainer)
writes ``last.ckpt`` where the run's ModelCheckpoint keeps it when a fit is interrupted, at the end of
the batch Lightning stopped after (so ``--ckpt_path last`` continues from there, mid-epoch), and
:func:`describe` turns the ending (:func:`interruption`) into one line naming the epoch and the resume
command, and the shell's exit code for the signal (143 for SIGTERM, 130 for SIGINT). SLURM's requeue
(SIGUSR1, Lightning's own handler) is not touched.
"""

from __future__ import annotations

import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


@dataclass
class Interrupted:
    """Where an interrupted fit stopped."""

    signal: str
    epoch: int
    step: int
    checkpoint: Path | None


class InterruptCheckpoint(L.Callback):
    """Writes a resumable ``last.ckpt`` when a fit is interrupted (SIGTERM, Ctrl-C) and records it."""

    def __init__(self) -> None:
        self.interrupted: Interrupted | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Save and record the interruption (fits only; other errors are not interruptions)."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if isinstance(exception, SIGTERMException):
            name = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            name = "SIGINT"
        else:
            return
        callback = last_checkpoint_callback(trainer)
        path = None
        if callback is not None:
            path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            callback.last_model_path = str(path)  # saved with it: the resumed run keeps this name
            trainer.save_checkpoint(path)
        self.interrupted = Interrupted(name, trainer.current_epoch, trainer.global_step, path)


def last_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The run's first ModelCheckpoint that keeps ``last.ckpt`` (what ``--ckpt_path last`` finds), else
    its first ModelCheckpoint; ``None`` without one."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    keeping = [c for c in callbacks if c.save_last] or callbacks
    return keeping[0] if keeping else None


class FitInterrupted(Exception):
    """A fit stopped by a signal (:class:`Interrupted`): see :func:`describe`."""

    def __init__(self, stop: Interrupted) -> None:
        super().__init__(f"fit interrupted by {stop.signal}")
        self.stop = stop


def interruption(trainer: L.Trainer | None) -> Interrupted | None:
    """Where an interrupted fit on ``trainer`` stopped (``None``: it was not interrupted)."""
    callbacks = getattr(trainer, "callbacks", [])
    callback = next((c for c in callbacks if isinstance(c, InterruptCheckpoint)), None)
    return None if callback is None else callback.interrupted


def describe(stop: Interrupted, args: list[str]) -> tuple[str, int]:
    """The one line of an interrupted fit and the shell's exit code for its signal (143, 130).

    Args:
        stop: where it stopped.
        args: the command as the user gave it (``["fit", ...]``), for the resume command.
    """
    resume = list(args)
    for index, item in enumerate(resume):
        if item == "--ckpt_path":
            del resume[index : index + 2]
            break
        if item.startswith("--ckpt_path="):
            del resume[index]
            break
    where = (  # the file, not ``last``: another fit started meanwhile would move ``latest``
        f"a resumable checkpoint is {stop.checkpoint}; resume with: "
        f"lorkd-pl {shlex.join([*resume, '--ckpt_path', str(stop.checkpoint)])}"
        if stop.checkpoint is not None
        else "no checkpoint was written (the run has no ModelCheckpoint)"
    )
    code = 128 + int(signal.SIGTERM if stop.signal == "SIGTERM" else signal.SIGINT)
    return (
        f"lorkd-pl: fit interrupted by {stop.signal} in epoch {stop.epoch} (step {stop.step}); {where}",
        code,
    )
