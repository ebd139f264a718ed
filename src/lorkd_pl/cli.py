"""The ``lorkd-pl`` command line.

* Lightning subcommands ``fit``, ``validate``, ``test``, ``predict`` (a LightningCLI: subclass mode for
  model and data, YAML configs with ``class_path``/``init_args``, ``--print_config``). The data
  module's task list defines the model's tasks, heads and experts (argument links).
* Project commands: ``tasks`` (list registered tasks), ``demo-data`` (write the demo data),
  ``demo`` (the main job on the demo data: teacher, LoRKD, per-region test, comparison report),
  ``export`` (merge a region's expert into a plain network), ``report`` (teacher vs experts per
  region from two test runs) and ``predict --input`` (predictions on image files).

Task plugins are loaded first, from ``--tasks-dir`` (repeatable, any position), ``$LORKD_PL_TASKS_DIR``
or the repository's ``tasks/`` folder, and from the ``lorkd_pl.tasks`` entry points.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from lorkd_pl import __version__
from lorkd_pl.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    check_checkpoint_tasks,
    load_checkpoint_file,
)
from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.data.formats import DatasetFormatError
from lorkd_pl.data.readers import ImageReadError
from lorkd_pl.data.validation import DataValidationError
from lorkd_pl.models.base import NonFiniteLossError, TaskModule
from lorkd_pl.models.teacher import TeacherError
from lorkd_pl.plugins import PluginError, load_plugins
from lorkd_pl.registry import TASK_KINDS, RegistryError, list_tasks

LIGHTNING_COMMANDS: tuple[str, ...] = ("fit", "validate", "test", "predict")


class ConfigError(ValueError):
    """A configuration value the model, data module or trainer refused (jsonargparse's message)."""


# lorkd-pl's own errors: their messages name the file/field and the fix, so no traceback is shown
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    ConfigError,
    DataValidationError,
    DatasetFormatError,
    ImageReadError,
    NonFiniteLossError,
    PluginError,
    RegistryError,
    TeacherError,
)


class LorkdCLI(LightningCLI):
    """LightningCLI whose data module defines the model's tasks and regions (one source of truth)."""

    def add_arguments_to_parser(self, parser) -> None:
        """Link the data module's task list and regions into the model's arguments."""
        parser.link_arguments("data.task_info", "model.init_args.task_info", apply_on="instantiate")
        parser.link_arguments("data.region_names", "model.init_args.regions", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` (a file) once, safely, and check it belongs to the configured tasks.

        Replaces LightningCLI's step that loads the checkpoint to merge its model hyperparameters into
        the config: here the file goes through :func:`load_checkpoint_file` (``weights_only=True``,
        clear errors), a checkpoint of other tasks is refused before anything is built, and the task
        list and regions stay linked from the data module rather than taken from the file.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():  # "last"/"best" are resolved (and checked) later
            return
        hparams = dict(load_checkpoint_file(path).get("hyper_parameters") or {})
        data = self.config[subcommand].get("data")
        configured = list(getattr(getattr(data, "init_args", None), "tasks", None) or [])
        check_checkpoint_tasks(path, [t["name"] for t in hparams.get("task_info") or []], configured)
        for key in ("_instantiator", "task_info", "regions"):
            hparams.pop(key, None)
        if "_class_path" not in hparams:  # not made by the CLI: the config alone describes the model
            return
        hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def instantiate_classes(self) -> None:
        """Build data module, model and trainer; a bad value becomes a :class:`ConfigError`."""
        try:
            super().instantiate_classes()
        except (TypeError, ValueError, KeyError) as error:
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, USER_ERRORS):  # jsonargparse wraps ours
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            raise ConfigError(f"invalid configuration: {error}") from error

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured trainer, with :class:`AtomicCheckpointIO` unless a checkpoint plugin is set."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def lightning_cli(args: Sequence[str], run: bool = True) -> LorkdCLI:
    """Build (and by default run) the Lightning command line on ``args``."""
    return LorkdCLI(
        TaskModule,
        MultiRegionDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def _split_tasks_dirs(args: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Remove ``--tasks-dir X`` / ``--tasks-dir=X`` from ``args``; return the rest and the folders."""
    rest, folders = [], []
    items = iter(args)
    for item in items:
        if item == "--tasks-dir":
            folders.append(next(items, ""))
        elif item.startswith("--tasks-dir="):
            folders.append(item.split("=", 1)[1])
        else:
            rest.append(item)
    return rest, folders or None


def _tasks(args: argparse.Namespace) -> int:
    rows = [
        (t.name, t.region, t.kind, str(t.num_classes), t.modality, t.source or "code")
        for t in list_tasks(region=args.region, kind=args.kind)
    ]
    header = ("task", "region", "kind", "#classes", "modality", "source")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(no tasks registered: add a plugin or task spec to tasks/ or pass --tasks-dir)")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from lorkd_pl.data.demo import write_demo_data

    out = write_demo_data(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote demo data to {out}: seg3d/manifest.jsonl, cls2d/*.npz, task specs in {out / 'tasks'}")
    print(f"use them with: lorkd-pl tasks --tasks-dir {out / 'tasks'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lorkd_pl.demo_run import main as run_demo

    run_demo(args.workdir, kinds=args.kind or ("cls", "seg"))
    return 0


def _export(args: argparse.Namespace) -> int:
    from lorkd_pl.export import export_region, load_student, size_report

    if args.dry_run:
        print(size_report(args.ckpt))
        return 0
    if not args.out:
        raise ValueError("export needs --out (a folder; with --all-regions one subfolder per region)")
    student, _ = load_student(args.ckpt)
    regions = student.regions if args.all_regions else [args.region]
    if regions == [None]:
        raise ValueError(f"give --region (one of {student.regions}) or --all-regions")
    for region in regions:
        out = Path(args.out) / region if args.all_regions else Path(args.out)
        export_region(args.ckpt, region, out, overwrite=args.overwrite, student=student)
        print(f"exported {region} to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lorkd_pl.comparison import write_report

    path = write_report(args.teacher, args.student, args.out)
    print(f"wrote {path} and its plots in {path.parent / 'plots'}")
    return 0


def _predict_files(args: Sequence[str]) -> int:
    """``lorkd-pl predict --input ... --source ...``: files in, predictions out (see lorkd_pl.predict)."""
    from lorkd_pl.predict import predict_files

    parser = argparse.ArgumentParser(prog="lorkd-pl predict", description="Predict on files with one expert.")
    parser.add_argument(
        "--input", action="append", required=True, help="file, DICOM folder, folder or manifest"
    )
    parser.add_argument("--source", required=True, help="an exported expert folder or a LoRKD checkpoint")
    parser.add_argument("--region", help="the region (needed with a checkpoint)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--probabilities", action="store_true", help="segmentation: also write probability maps"
    )
    parser.add_argument("--overlap", type=float, help="sliding-window overlap (default: the expert's)")
    options = parser.parse_args(args)
    try:
        for path in predict_files(
            options.input,
            options.source,
            options.out,
            options.region,
            options.device,
            options.probabilities,
            options.overlap,
        ):
            print(f"wrote {path}")
    except (LookupError, ValueError, OSError) as error:
        parser.exit(2, f"lorkd-pl: error: {error}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the project's own commands."""
    parser = argparse.ArgumentParser(
        prog="lorkd-pl",
        description="Decompose a medical foundation model into lightweight per-region experts (LoRKD).",
    )
    parser.add_argument("--version", action="version", version=f"lorkd-pl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        commands.add_parser(
            name, help=f"Lightning {name} (lorkd-pl {name} --help for its options)", add_help=False
        )

    tasks = commands.add_parser("tasks", help="list the registered tasks")
    tasks.add_argument("--region", help="only tasks of this region")
    tasks.add_argument("--kind", choices=TASK_KINDS, help="only tasks of this kind")
    tasks.add_argument("--tasks-dir", action="append", help="folder of task plugins/specs (repeatable)")
    tasks.set_defaults(run=_tasks)

    demo = commands.add_parser("demo-data", help="write the embedded demo data set")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    demo.set_defaults(run=_demo_data)

    job = commands.add_parser("demo", help="the main job on the demo data: teacher, LoRKD, test, report")
    job.add_argument("--workdir", help="folder for runs/ (default: the current folder)")
    job.add_argument("--kind", action="append", choices=["cls", "seg"], help="only this demo (repeatable)")
    job.set_defaults(run=_demo)

    export = commands.add_parser("export", help="merge a region's expert into a plain network folder")
    export.add_argument("--ckpt", required=True, help="a LoRKD training checkpoint (e.g. RUN/last.ckpt)")
    export.add_argument("--region", help="the region to export")
    export.add_argument("--all-regions", action="store_true", help="export every region into OUT/<region>")
    export.add_argument("--out", help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.add_argument("--dry-run", action="store_true", help="print parameter counts and sizes only")
    export.set_defaults(run=_export)

    report = commands.add_parser("report", help="compare a teacher and a student test run per region")
    report.add_argument("--teacher", required=True, help="the teacher's test run folder (holds summary/)")
    report.add_argument("--student", required=True, help="the student's test run folder (holds summary/)")
    report.add_argument("--out", required=True, help="output folder (report.md, plots/)")
    report.set_defaults(run=_report)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run the command line with ``args`` (default: ``sys.argv[1:]``) and return an exit code."""
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["predict"] and any(a == "--input" or a.startswith("--input=") for a in args):
        return _predict_files(args[1:])
    if args and args[0] in LIGHTNING_COMMANDS:
        rest, folders = _split_tasks_dirs(args)
        try:
            load_plugins(folders)
            lightning_cli(rest)
        except USER_ERRORS as error:  # clear messages that name the file/field and the fix
            sys.stderr.write(f"lorkd-pl: error: {error}\n")
            raise SystemExit(2) from error
        return 0
    parser = build_parser()
    namespace = parser.parse_args(args)
    if namespace.command is None:
        parser.print_help()
        return 0
    try:
        load_plugins(getattr(namespace, "tasks_dir", None))
        return namespace.run(namespace)
    except (LookupError, ValueError, OSError, PluginError) as error:
        parser.exit(2, f"lorkd-pl: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
