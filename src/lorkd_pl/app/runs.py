"""Run folders: every fit gets its own folder under its recipe's root, and ``latest`` points at the newest.

The root is ``trainer.default_root_dir`` (the packaged recipes set ``runs/demo/<recipe>``)::

    <root>/latest -> <run>             the newest fit started under this root (a relative symlink)
    <root>/<run>/                      config.yaml, metrics.csv, hparams.yaml, conflicts.json, router.json
    <root>/<run>/checkpoints/          last.ckpt and the best epoch's checkpoint
    <root>/<run>/wandb/                W&B's files (a WandbLogger)
    <root>/<run>/resume_<k>/           the logs of the k-th resumption (Lightning's CSVLogger would
                                       replace the run's metrics.csv; the checkpoints stay in the run's;
                                       a WandbLogger continues the run's W&B run, its files go here)
    <root>/<run>/test_<ckpt>/summary/  ``lorkd-pl test`` of that run's checkpoint ``<ckpt>.ckpt``

A fit's run name is, in this order: ``--run_name``; ``$LORKD_PL_RUN_NAME``; the W&B run id (a sweep
agent's ``$WANDB_RUN_ID``, or a new id when a WandbLogger is configured, also offline); ``slurm-<job id>``
in a SLURM batch job (a requeued job continues in its own folder); else ``version_<N>``, the next free
number, claimed with an atomic ``mkdir`` (two fits started together never share a folder). A fit that
resumes (``--ckpt_path last``: the ``latest`` run, or the run named by ``--run_name``; or a file inside
``<root>/<run>/checkpoints/``) continues in that run's folder. ``validate``/``test`` of a run's checkpoint
write into ``<run>/<command>_<checkpoint name>/``; without a run's checkpoint, into a new run folder.

Under DDP the process that starts the fit picks the name and passes it to the processes Lightning starts
(``$LORKD_PL_RUN_NAME``); processes started by an outside launcher on several nodes need one name
from ``--run_name`` (or W&B/SLURM), which is said in one line when missing.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

#: Name of the run chosen by the process that started a fit, for the processes it starts (DDP).
RUN_NAME_ENV = "LORKD_PL_RUN_NAME"
#: The pointer to the newest run of a root.
LATEST = "latest"
#: The run folders this process created (a command that fails removes those it left unused).
CREATED: list[Path] = []
#: The file a new fit claims its run folder with (created exclusively: one fit per folder).
CLAIM = ".lorkd-pl-run"
#: A run name is one plain folder name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Launcher variables whose non-zero value marks a process that did not start the fit.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


class RunFolderError(ValueError):
    """A run name or a run to resume that cannot be used (the message names the fix)."""


class RunExistsError(FileExistsError):
    """A fit would write into a checkpoint folder holding an earlier run's checkpoints."""


@dataclass(frozen=True)
class RunPlacement:
    """Where a command's files go.

    Attributes:
        root: the recipe's root (``trainer.default_root_dir`` as configured).
        run: the run folder (its checkpoints are in ``run/checkpoints``).
        log_dir: where the loggers write: the run folder for a fit, ``run/<command>_<ckpt>`` else.
        name: the run's name (the folder's name).
        wandb_id: the W&B run id to log to: a new fit's (the folder is named by it) or, for a resumed
            fit, the id its run logged to last; ``None``: W&B (if any) picks one.
    """

    root: Path
    run: Path
    log_dir: Path
    name: str
    wandb_id: str | None = None

    @property
    def checkpoints(self) -> Path:
        """The run's checkpoint folder."""
        return self.run / "checkpoints"


def check_run_name(name: str, field: str = "--run_name") -> str:
    """``name`` if it is one plain folder name (letters, digits, ``._-``; not ``latest``).

    Raises:
        RunFolderError: naming ``field`` and what a name may hold.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == LATEST or ".." in name:
        raise RunFolderError(
            f"{field} {name!r} is not a run name: use one folder name of letters, digits, '.', '_' and '-' "
            f"(at most 128, not {LATEST!r}), e.g. {field} lr3e-3"
        )
    return name


def started_the_fit() -> bool:
    """Whether this process started the fit (``False`` in processes a launcher started beside it)."""
    for variable in _RANK_VARIABLES:
        value = os.environ.get(variable, "0").strip() or "0"
        if value != "0":
            return False
    return True


def _slurm_batch_job() -> str | None:
    """``slurm-<job id>`` in a SLURM batch job (not an interactive allocation), else ``None``."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return f"slurm-{job}"


def new_run_name(run_name: str | None, wandb: bool) -> tuple[str | None, str | None]:
    """The name a new fit's run gets before numbering, and the W&B id it is named by.

    Args:
        run_name: ``--run_name`` (``None``: not given).
        wandb: whether a WandbLogger is configured.

    Returns:
        ``(name, wandb_id)``; ``name`` is ``None`` when the run is numbered (``version_<N>``).

    Raises:
        RunFolderError: a name that is not a folder name, or a process started by an outside launcher
            that cannot know the name the first process chose.
    """
    if run_name is not None:
        return check_run_name(run_name), None
    if os.environ.get(RUN_NAME_ENV):
        return check_run_name(os.environ[RUN_NAME_ENV], f"${RUN_NAME_ENV}"), None
    if os.environ.get("WANDB_RUN_ID"):  # a sweep agent's trial (or a user's chosen W&B id)
        wandb_id = check_run_name(os.environ["WANDB_RUN_ID"], "$WANDB_RUN_ID")
        return wandb_id, wandb_id
    if wandb and started_the_fit():
        wandb_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        return wandb_id, wandb_id
    slurm = _slurm_batch_job()
    if slurm is not None:
        return slurm, None
    if not started_the_fit():
        raise RunFolderError(
            "this process was started by an outside launcher beside others (RANK/NODE_RANK is set), so "
            "it cannot know the run folder the first process chose: give every process the same "
            "--run_name NAME (or $LORKD_PL_RUN_NAME)"
        )
    return None, None


def claim_numbered(folder: Path, prefix: str, claim: bool = True) -> str:
    """``<prefix><N>`` for the next free N in ``folder``, created atomically (``mkdir`` fails if another
    process took it); with ``claim=False`` the highest existing one (the one the first process of a
    DDP fit claimed), or a new one if there is none."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[len(prefix) :]) for p in folder.glob(f"{prefix}*") if p.name[len(prefix) :].isdigit()]
    if not claim and taken:
        return f"{prefix}{max(taken)}"
    number = max(taken, default=-1) + 1
    while True:
        try:
            (folder / f"{prefix}{number}").mkdir()
            CREATED.append(folder / f"{prefix}{number}")
            return f"{prefix}{number}"
        except FileExistsError:
            number += 1


def latest_run(root: Path) -> str | None:
    """The name ``root/latest`` points at (``None``: no pointer, or it points at no folder)."""
    pointer = root / LATEST
    if not pointer.is_symlink():
        return None
    name = os.readlink(pointer)
    return name if (root / name).is_dir() and _NAME.fullmatch(name) else None


def point_latest(root: Path, name: str) -> bool:
    """Point ``root/latest`` at ``root/name`` (replaced atomically); ``False`` where it cannot be (a
    folder of the user's named ``latest``, or a file system without symbolic links)."""
    pointer = root / LATEST
    if pointer.is_symlink() and not _NAME.fullmatch(os.readlink(pointer)):
        return False  # a link of the user's (to elsewhere): not lorkd-pl's pointer
    if pointer.exists() and not pointer.is_symlink():
        return False
    temporary = root / f".{LATEST}.{os.getpid()}.tmp"
    try:
        if temporary.is_symlink():
            temporary.unlink()
        os.symlink(name, temporary, target_is_directory=True)
        os.replace(temporary, pointer)
    except OSError:
        return False
    return True


def checkpoint_run(path: str | Path) -> Path | None:
    """The run folder a checkpoint file belongs to (the folder above its ``checkpoints/``), else ``None``."""
    resolved = Path(path).resolve()
    return resolved.parent.parent if resolved.parent.name == "checkpoints" else None


def place_run(
    subcommand: str,
    root: str | Path,
    ckpt_path: str | None,
    run_name: str | None = None,
    wandb: bool = False,
) -> RunPlacement:
    """Choose (and create) the run folder of a ``fit``, ``validate`` or ``test`` (module docstring).

    Args:
        subcommand: ``"fit"``, ``"validate"`` or ``"test"``.
        root: the recipe's root folder (``trainer.default_root_dir``).
        ckpt_path: ``--ckpt_path`` (a file, ``"last"``, ``"best"``, or ``None``).
        run_name: ``--run_name`` (fit only).
        wandb: whether a WandbLogger is configured (a new fit is then named by its W&B id).

    Raises:
        RunFolderError: a bad name, or nothing to resume.
    """
    root = Path(root).expanduser()  # as Lightning reads default_root_dir
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"trainer.default_root_dir {root} is a file: give a folder for the runs")
    try:
        return _place(subcommand, root, ckpt_path, run_name, wandb)
    except (FileExistsError, NotADirectoryError) as error:  # a file where a run folder goes
        raise RunFolderError(
            f"cannot make the run folder {error.filename}: a file of that name is in the way; choose "
            "another --run_name or trainer.default_root_dir"
        ) from None


def _place(
    subcommand: str, root: Path, ckpt_path: str | None, run_name: str | None, wandb: bool
) -> RunPlacement:
    if ckpt_path == "best":
        raise RunFolderError(
            "--ckpt_path best names the best checkpoint of a fit in the same process; give the file "
            "(`lorkd-pl runs ROOT` lists each run's best checkpoint)"
        )
    if ckpt_path == "last":
        name = check_run_name(run_name) if run_name is not None else latest_run(root)
        if name is None:
            hint = ", or --run_name NAME" if subcommand == "fit" else ""
            raise RunFolderError(
                f"--ckpt_path last: there is no run under {root} to continue ({root / LATEST} is not a "
                f"lorkd-pl pointer to a run); give the checkpoint file (RUN/checkpoints/last.ckpt){hint}"
            )
        run = root / name
        if not run.is_dir():
            raise RunFolderError(f"--ckpt_path last --run_name {name}: there is no run folder {run}")
        return _placement(subcommand, root, run, ckpt_path)
    if ckpt_path is not None:
        if not Path(ckpt_path).expanduser().is_file():
            raise RunFolderError(
                f"--ckpt_path {ckpt_path!r} is not a checkpoint file (nor 'last'); give RUN/checkpoints/"
                "last.ckpt, or `lorkd-pl runs ROOT` to list the runs"
            )
        run = checkpoint_run(ckpt_path)
        if run is not None and (subcommand != "fit" or run.parent == root.resolve()):
            if run_name is not None and run_name != run.name:
                raise RunFolderError(
                    f"--ckpt_path {ckpt_path} continues the run {run.name}, not --run_name {run_name}: "
                    "give one of them"
                )
            return _placement(subcommand, root, run, ckpt_path)
    if subcommand == "fit":
        name, wandb_id = new_run_name(run_name, wandb)
        if name is None:
            name = claim_numbered(root, "version_")
        run = root / name
        if any(run.glob("hpc_ckpt_*.ckpt")):  # a requeued SLURM job: Lightning resumes from it
            return _placement(subcommand, root, run, "hpc")
        if not run.is_dir():
            run.mkdir(parents=True)
            CREATED.append(run)
        return RunPlacement(root, run, run, name, wandb_id)
    name = claim_numbered(root, "version_")
    return RunPlacement(root, root / name, root / name, name)


def claim_run(run: Path) -> None:
    """Claim a new fit's run folder for this process: ``run/.lorkd-pl-run`` created exclusively, so of
    two fits started together under one name exactly one goes on.

    Raises:
        RunExistsError: another fit claimed it first.
    """
    try:
        descriptor = os.open(run / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise RunExistsError(
            f"{run} was claimed by another fit started at the same time; give this one another --run_name"
        ) from None
    os.write(descriptor, f"{os.getpid()}\n".encode())
    os.close(descriptor)


def discard_unused(run: Path) -> None:
    """Remove a run folder this process created for a fit that stopped before writing anything (it
    holds at most the claim and empty folders); anything else in it stays."""
    if not run.is_dir() or run.is_symlink():
        return
    entries = list(run.rglob("*"))
    if any(p.is_file() and p.name != CLAIM for p in entries) or any(p.is_symlink() for p in entries):
        return
    for path in sorted(entries, key=lambda p: len(p.parts), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    run.rmdir()


#: W&B's folder of one run: ``[offline-]run-<YYYYmmdd_HHMMSS>-<run id>`` under ``<save_dir>/wandb``.
_WANDB_RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")


def previous_wandb_id(run: Path) -> str | None:
    """The W&B run id a run folder's fit logged to last (its own ``wandb/`` or a resumption's), if any.

    A resumed fit passes it to its WandbLogger, which resumes that W&B run (``resume="allow"``) instead
    of starting a new one; ``$WANDB_RUN_ID`` (a sweep agent's trial) still wins, as W&B reads it itself.
    """
    if os.environ.get("WANDB_RUN_ID"):
        return None
    found = [
        (match[1], match[2])
        for folder in (run / "wandb", *run.glob("resume_*/wandb"))
        if folder.is_dir()
        for child in folder.iterdir()
        if child.is_dir() and (match := _WANDB_RUN_FOLDER.match(child.name))
    ]
    return max(found)[1] if found else None


def _placement(subcommand: str, root: Path, run: Path, ckpt_path: str) -> RunPlacement:
    """The placement of a command on an existing run's checkpoint: a fit continues the run (and its W&B
    run) and logs into ``run/resume_<k>``; validate/test log into ``run/<command>_<checkpoint name>``."""
    if subcommand == "fit":
        log_dir = run / claim_numbered(run, "resume_", started_the_fit())
        return RunPlacement(root, run, log_dir, run.name, previous_wandb_id(run))
    return RunPlacement(root, run, run / f"{subcommand}_{Path(ckpt_path).stem}", run.name)  # "last": itself


@dataclass(frozen=True)
class RunSummary:
    """One run of a root, as ``lorkd-pl runs`` lists it.

    Attributes:
        name: the run folder's name.
        step: the global step of its ``last.ckpt``.
        epoch: the epoch of its ``last.ckpt``.
        monitor: the metric its ModelCheckpoint ranks by (``None``: it ranks by none).
        best_score: that metric's best value (``None``: none recorded yet).
        best_checkpoint: the checkpoint holding it, else ``last.ckpt``.
        higher_is_better: the ModelCheckpoint's mode.
        error: why its ``last.ckpt`` could not be read (``None``: it was read).
    """

    name: str
    step: int
    epoch: int
    monitor: str | None
    best_score: float | None
    best_checkpoint: Path
    higher_is_better: bool = True
    error: str | None = None


def list_runs(root: str | Path) -> list[RunSummary]:
    """The runs under ``root`` that hold a ``checkpoints/last.ckpt``, best first (by the metric their
    ModelCheckpoint monitors; runs without a score last). The checkpoints are read ``weights_only`` and
    memory-mapped: only their small training state is touched."""
    from lorkd_pl.io.checkpoints import CheckpointError, load_checkpoint_file

    summaries = []
    for run in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        last = run / "checkpoints" / "last.ckpt"
        if run.is_symlink() or not last.is_file():
            continue
        try:
            state = load_checkpoint_file(last, mmap=True)
        except CheckpointError as error:  # listed, not fatal: the other runs are still shown
            summaries.append(RunSummary(run.name, 0, 0, None, None, last, error=str(error)))
            continue
        monitor, score, best, higher = None, None, last, True
        for key, value in (state.get("callbacks") or {}).items():
            if (
                not key.startswith("ModelCheckpoint")
                or not isinstance(value, dict)
                or not value.get("monitor")
            ):
                continue
            monitor, higher = value["monitor"], "'mode': 'min'" not in key
            if value.get("best_model_score") is not None:
                score = float(value["best_model_score"])
            if value.get("best_model_path"):
                named = run / "checkpoints" / Path(value["best_model_path"]).name  # the run may have moved
                best = named if named.is_file() else best
            break
        summaries.append(
            RunSummary(
                run.name,
                int(state.get("global_step", 0)),
                int(state.get("epoch", 0)),
                monitor,
                score,
                best,
                higher,
            )
        )
    return sorted(
        summaries,
        key=lambda s: (
            s.best_score is None,
            -(s.best_score or 0.0) if s.higher_is_better else (s.best_score or 0.0),
        ),
    )
