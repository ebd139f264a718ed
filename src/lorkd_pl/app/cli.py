"""The ``lorkd-pl`` command line.

* ``fit``, ``validate``, ``test``: Lightning (see :mod:`lorkd_pl.app.lightning`; ``lorkd-pl fit --help``
  lists every option). ``--config`` takes a file or a packaged config name (``demo/teacher_seg``).
* ``teacher-targets`` (build a config's cached teacher targets now) and ``teacher-test`` (test an
  outside teacher in its own pipeline, for ``report --teacher``): they read the same configs.
* ``predict`` (files/folders/DICOM series/manifests → label maps or class probabilities, with an
  exported expert, a LoRKD checkpoint or a generalist checkpoint), ``export``, ``report``, ``tasks``,
  ``config``, ``demo-data``, ``demo``, ``anatomy-check`` (the 3D demo on real brain anatomy) and ``runs``
  (the runs of a recipe, best first: a sweep's best trial to export).

Every command accepts ``--tasks-dir DIR`` (repeatable, any position): folders of task plugins and
task specs, loaded before the command runs, together with ``$LORKD_PL_TASKS_DIR`` and the
``lorkd_pl.tasks`` entry points (the demo tasks come from lorkd-pl's own entry point).

This module imports only the standard library at start; a command's code is imported when it runs,
so ``lorkd-pl --help`` does not pay for torch, Lightning or MONAI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lorkd_pl.app.commands import LIGHTNING_COMMANDS, LIGHTNING_HELP, TEACHER_COMMANDS, TEACHER_HELP


class _Version(argparse.Action):
    """``--version``: reads the installed version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from lorkd_pl import __version__

        print(f"lorkd-pl {__version__}")
        parser.exit(0)


def split_tasks_dirs(args: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Remove ``--tasks-dir X`` / ``--tasks-dir=X`` (any position) from ``args``.

    Returns:
        The remaining arguments and the tasks folders (``None`` if none were given).

    Raises:
        SystemExit: (exit 2) for ``--tasks-dir`` without a folder.
    """
    rest, folders = [], []
    items = iter(args)
    for item in items:
        if item == "--tasks-dir" or item.startswith("--tasks-dir="):
            folder = next(items, "") if item == "--tasks-dir" else item.split("=", 1)[1]
            if not folder or folder.startswith("-"):
                sys.stderr.write("lorkd-pl: error: --tasks-dir needs a folder (e.g. --tasks-dir tasks)\n")
                raise SystemExit(2)
            folders.append(folder)
        else:
            rest.append(item)
    return rest, folders or None


# ----------------------------------------------------------------------------- commands
def _lightning(args: Sequence[str], folders: list[str] | None, debug: bool = False) -> int:
    from lorkd_pl.app.configs import resolve_config_args
    from lorkd_pl.app.interrupts import FitInterrupted, describe
    from lorkd_pl.app.lightning import USER_ERRORS, lightning_cli, user_error_message
    from lorkd_pl.data.plugins import load_plugins

    try:
        load_plugins(folders)
        lightning_cli(resolve_config_args(args))
    except FitInterrupted as interrupted:  # SIGTERM / Ctrl-C: a resumable checkpoint, never "success"
        line, code = describe(interrupted.stop, [*args, *(f"--tasks-dir={f}" for f in folders or [])])
        sys.stderr.write(f"{line}\n")
        raise SystemExit(code) from None
    except (*USER_ERRORS, LookupError, RuntimeError) as error:  # one line naming the file/field and the fix
        message = user_error_message(error)  # ours, also when MONAI or a DataLoader worker wrapped it
        if debug or (message is None and not isinstance(error, (*USER_ERRORS, LookupError))):
            raise
        sys.stderr.write(f"lorkd-pl: error: {message or error}\n")
        raise SystemExit(2) from error
    return 0


def _option(args: list[str], name: str) -> str | None:
    """Remove ``name VALUE`` / ``name=VALUE`` from ``args``; its value (None if absent)."""
    for index, item in enumerate(args):
        if item == name or item.startswith(f"{name}="):
            value = (
                item.split("=", 1)[1] if "=" in item else (args[index + 1] if index + 1 < len(args) else "")
            )
            del args[index : index + (1 if "=" in item else 2)]
            if not value or value.startswith("-"):
                raise ValueError(f"{name} needs a value")
            return value
    return None


def _teacher(args: Sequence[str], folders: list[str] | None, debug: bool = False) -> int:
    from lorkd_pl.app.configs import resolve_config_args
    from lorkd_pl.app.lightning import USER_ERRORS, teacher_targets, teacher_test
    from lorkd_pl.data.plugins import load_plugins

    command, rest = args[0], list(args[1:])
    if rest[:1] in (["-h"], ["--help"]):
        print(f"usage: lorkd-pl {TEACHER_HELP[command]}")
        return 0
    try:
        out, device = _option(rest, "--out"), _device(_option(rest, "--device"))
        if command == "teacher-test" and not out:
            raise ValueError("teacher-test needs --out DIR (it writes DIR/summary/<task>.json)")
        load_plugins(folders)
        if command == "teacher-targets":
            print(teacher_targets(resolve_config_args(rest), device))
        else:
            for path in teacher_test(resolve_config_args(rest), out, device):
                print(f"wrote {path}")
    except (*USER_ERRORS, LookupError, ValueError) as error:
        if debug:
            raise
        sys.stderr.write(f"lorkd-pl: error: {error}\n")
        raise SystemExit(2) from error
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print ``header`` and ``rows`` as left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _tasks(args: argparse.Namespace) -> int:
    from lorkd_pl.registry import list_tasks

    rows = [
        (t.name, t.region, t.kind, str(t.num_classes), t.modality, t.source or "code")
        for t in list_tasks(region=args.region, kind=args.kind)
    ]
    header = ("task", "region", "kind", "#classes", "modality", "source")
    _print_table(header, rows)
    if not rows:
        print("(no tasks registered: add a plugin or task spec with --tasks-dir)")
    return 0


def _config(args: argparse.Namespace) -> int:
    from lorkd_pl.app.configs import copy_configs, packaged_config, packaged_configs

    if args.out:
        for path in copy_configs(args.name or [], args.out, args.overwrite):
            print(f"wrote {path}")
        return 0
    if not args.name:
        print("packaged configs (use as --config NAME, or copy with lorkd-pl config NAME --out DIR):")
        for name in packaged_configs():
            print(f"  {name}")
        return 0
    for name in args.name:
        path = packaged_config(name)
        if path is None:
            raise LookupError(f"no packaged config {name!r}; `lorkd-pl config` lists them")
        print(path.read_text(encoding="utf-8"), end="")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from lorkd_pl.data.demo import write_demo_data

    out = write_demo_data(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote demo data to {out}: seg3d/manifest.jsonl, cls2d/*.npz, task specs in {out / 'tasks'}")
    print(f"use them with: lorkd-pl tasks --tasks-dir {out / 'tasks'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lorkd_pl.app.demo import main as run_demo

    run_demo(
        args.workdir,
        kinds=args.kind or ("cls", "seg"),
        quick=args.quick,
        seed=args.seed,
        seeds=args.seeds,
        per_region_control=args.per_region_control,
    )
    return 0


def _anatomy_check(args: argparse.Namespace) -> int:
    from lorkd_pl.app.anatomy import main as run_check

    run_check(
        args.out,
        seed=args.seed,
        mni_dir=args.mni_dir,
        quick=args.quick,
        data_seed=args.data_seed,
        seeds=args.seeds,
        per_region_control=args.per_region_control,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from lorkd_pl.deploy.export import export_regions, size_report
    from lorkd_pl.deploy.networks import load_student

    if args.dry_run:
        print(size_report(args.ckpt, args.teacher))
        return 0
    if not args.out:
        raise ValueError("export needs --out (a folder; with --all-regions one subfolder per region)")
    if args.all_regions and args.region:
        raise ValueError("give either --region REGION or --all-regions, not both")
    if not args.all_regions and not args.region:
        raise ValueError(
            "give --region REGION or --all-regions (`lorkd-pl export --ckpt X --dry-run` lists them)"
        )
    from lorkd_pl.deploy.folders import ROUTER_FOLDER

    student, _ = load_student(args.ckpt)
    regions = student.regions if args.all_regions else [args.region]
    outs = {r: Path(args.out) / r if args.all_regions else Path(args.out) for r in regions}
    router = Path(args.out) / ROUTER_FOLDER if args.all_regions and student.router is not None else None
    if router is not None and ROUTER_FOLDER in regions:
        raise ValueError(
            f"a region is named {ROUTER_FOLDER!r}, the folder of the region router in an --all-regions "
            "export; export the regions one by one (--region) or rename the region"
        )
    if args.format != "torch" and router is not None:
        print(f"lorkd-pl: the region router is exported in the default format only (--format {args.format})")
        router = None
    written = export_regions(
        args.ckpt,
        regions,
        outs,
        overwrite=args.overwrite,
        student=student,
        router_out=router,
        format=args.format,
    )
    for name, out in zip([*regions, *(["the region router"] if router else [])], written, strict=True):
        print(f"exported {name} to {out}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from lorkd_pl.app.runs import LATEST, latest_run, list_runs

    root = Path(args.root)
    if not root.is_dir():
        raise ValueError(
            f"{root} is not a folder of runs (a recipe's trainer.default_root_dir, e.g. runs/demo/lorkd_seg)"
        )
    summaries = list_runs(root)
    if not summaries:
        print(f"no runs with a checkpoints/last.ckpt under {root}")
        return 0
    latest = latest_run(root)
    header = ("run", "step", "epoch", summaries[0].monitor or "score", "best checkpoint")
    rows = [
        (
            s.name + (f" ({LATEST})" if s.name == latest else ""),
            str(s.step),
            str(s.epoch),
            "—" if s.best_score is None else f"{s.best_score:.4f}",
            str(s.best_checkpoint) if s.error is None else f"unreadable: {s.error}",
        )
        for s in summaries
    ]
    _print_table(header, rows)
    best = summaries[0]
    if best.best_score is not None:
        print(
            f"best: {best.name}; export it with: lorkd-pl export --ckpt {best.best_checkpoint} "
            "--all-regions --out experts/"
        )
    return 0


def _report(args: argparse.Namespace) -> int:
    from lorkd_pl.evaluation.comparison import write_runs_report

    runs: dict[str, str] = {}
    for name, folder in (("teacher", args.teacher), ("expert", args.student)):
        if folder:
            runs[name] = folder
    for item in args.runs or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(
                f"--run takes NAME=DIR (e.g. --run plain_kd=runs/demo/plain_kd_seg), got {item!r}"
            )
        if name in runs:
            raise ValueError(f"--run names {name!r} twice; give every run its own name")
        runs[name] = folder
    if len(runs) < 2:
        raise ValueError(
            "report compares at least two test runs: --teacher RUN --student RUN, or --run NAME=DIR twice "
            "or more (the first is the reference of every difference)"
        )
    path = write_runs_report(runs, args.out, args.overwrite)
    print(f"wrote {path} and its plots in {path.parent / 'plots'}")
    return 0


def _device(name: str | None) -> str:
    """``--device``: cpu, cuda or cuda:N (default: cuda when available), checked against the machine."""
    import torch

    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    return device


def _predict(args: argparse.Namespace) -> int:
    from lorkd_pl.deploy.predict import predict_files

    for path in predict_files(
        args.input,
        args.source,
        args.out,
        region=args.region,
        device=_device(args.device),
        probabilities=args.probabilities,
        overlap=args.overlap,
        force=args.force,
        min_confidence=args.min_confidence,
    ):
        print(f"wrote {path}")
    return 0


def _seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct integers (argparse turns the ValueError into a usage error)."""
    seeds = [int(item) for item in text.split(",") if item.strip()]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(text)
    return seeds


_seed_list.__name__ = "list of two or more distinct seeds like 0,1,2:"  # argparse's "invalid ... value"


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all commands (Lightning's take their own options after the name)."""
    parser = argparse.ArgumentParser(
        prog="lorkd-pl",
        description="Decompose a medical foundation model into lightweight per-region experts (LoRKD).",
        epilog="Every command also takes --tasks-dir DIR (repeatable): folders of task plugins/specs, and "
        "--debug: show the traceback behind a `lorkd-pl: error:` line.",
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        commands.add_parser(name, help=f"{LIGHTNING_HELP[name]}; `lorkd-pl {name} --help`", add_help=False)
    for name in TEACHER_COMMANDS:
        commands.add_parser(name, help=TEACHER_HELP[name], add_help=False)
    tasks_dir = argparse.ArgumentParser(add_help=False)
    tasks_dir.add_argument(
        "--tasks-dir", action="append", metavar="DIR", help="folder of task plugins/specs (repeatable)"
    )

    def command(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, parents=[tasks_dir])
        sub.set_defaults(run=run)
        return sub

    predict = command(
        "predict",
        "predict image files with an exported expert, a LoRKD checkpoint (+ --region) or a generalist",
        _predict,
    )
    predict.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help="NIfTI/NRRD/MHA file, DICOM series folder, folder of files, or manifest (.jsonl/.csv); "
        "repeatable",
    )
    predict.add_argument(
        "--source",
        required=True,
        help="an exported expert folder (lorkd-pl export), the folder of all of them (export "
        "--all-regions, with --region auto), a LoRKD checkpoint or a generalist checkpoint",
    )
    predict.add_argument(
        "--region",
        help="the expert's region (a LoRKD checkpoint needs it; a generalist: only its tasks); auto: each "
        "input's own, from its DICOM BodyPartExamined or the region router (routing.csv in --out)",
    )
    predict.add_argument(
        "--min-confidence",
        type=float,
        help="--region auto: below this router probability stop and name the top regions (default: the "
        "router's card, 0.6)",
    )
    predict.add_argument("--out", required=True, help="output folder (files written atomically)")
    predict.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    predict.add_argument(
        "--probabilities", action="store_true", help="segmentation: also write probability maps"
    )
    predict.add_argument("--overlap", type=float, help="sliding-window overlap (default: the card's)")
    predict.add_argument(
        "--force",
        action="store_true",
        help="predict inputs whose DICOM modality differs from the model's (warns instead of stopping)",
    )

    tasks = command("tasks", "list the registered tasks", _tasks)
    tasks.add_argument("--region", help="only tasks of this region")
    tasks.add_argument("--kind", choices=("seg3d", "cls2d"), help="only tasks of this kind")

    config = command("config", "list, print or copy the packaged configs (demo/, trainer/, ...)", _config)
    config.add_argument("name", nargs="*", help="config names, e.g. demo/teacher_seg (none: list them)")
    config.add_argument("--out", help="copy the named configs (all without names) into this folder")
    config.add_argument("--overwrite", action="store_true", help="replace existing copies")

    demo_data = command("demo-data", "write the embedded demo data set", _demo_data)
    demo_data.add_argument("--out", required=True, help="output folder")
    demo_data.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    demo_data.add_argument("--overwrite", action="store_true", help="replace an existing folder")

    demo = command("demo", "the main job on the demo data: teacher, LoRKD, test, report, export", _demo)
    demo.add_argument("--workdir", help="folder for runs/ (default: the current folder)")
    demo.add_argument("--kind", action="append", choices=["cls", "seg"], help="only this demo (repeatable)")
    demo.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline in ~1 minute")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of every fit (default 0; the data stay the same)"
    )
    demo.add_argument(
        "--seeds",
        type=_seed_list,
        help="several seeds, e.g. 0,1,2: the whole demo per seed, then mean ± sd and the paired "
        "differences over seeds x test cases with 95%% bootstrap intervals (replaces --seed)",
    )
    demo.add_argument(
        "--per-region-control",
        action="store_true",
        help="also the per-region control: one plain-KD student per region, trained on its region only, "
        "the same total samples and steps as the other runs (4 more fits per kind)",
    )

    anatomy = command(
        "anatomy-check",
        "the 3D demo on real brain anatomy (MNI ICBM152, nilearn wheel): teacher / plain KD / LoRKD",
        _anatomy_check,
    )
    anatomy.add_argument("--out", default="runs/anatomy", help="output folder (default runs/anatomy)")
    anatomy.add_argument("--seed", type=int, default=0, help="seed of every fit (default 0)")
    anatomy.add_argument("--seeds", type=_seed_list, help="several seeds, e.g. 0,1,2 (as demo --seeds)")
    anatomy.add_argument("--per-region-control", action="store_true", help="as demo --per-region-control")
    anatomy.add_argument("--data-seed", type=int, default=0, help="seed of the simulated subjects")
    anatomy.add_argument("--mni-dir", help="template folder (default: the installed nilearn's)")
    anatomy.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline")

    export = command("export", "merge a region's expert into a plain network folder", _export)
    export.add_argument("--ckpt", required=True, help="a LoRKD training checkpoint (e.g. RUN/last.ckpt)")
    export.add_argument("--region", help="the region to export")
    export.add_argument("--all-regions", action="store_true", help="export every region into OUT/<region>")
    export.add_argument("--out", help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    export.add_argument(
        "--format",
        choices=("torch", "bundle", "onnx"),
        default="torch",
        help="torch: model.pt2 + state_dict.pt + card (default); bundle: a MONAI bundle (3D segmentation; "
        "runs with python -m monai.bundle run, no lorkd-pl); onnx: model.onnx + card (the onnx extra)",
    )
    export.add_argument("--dry-run", action="store_true", help="print parameter counts and sizes only")
    export.add_argument("--teacher", help="with --dry-run: the teacher to count (e.g. its last.ckpt)")

    runs = command(
        "runs",
        "list the runs of a recipe (its trainer.default_root_dir), best first, with their checkpoints",
        _runs,
    )
    runs.add_argument("root", help="a recipe's runs folder, e.g. runs/demo/lorkd_seg (a sweep's trials too)")

    report = command("report", "compare test runs per region (a teacher, a student, controls)", _report)
    report.add_argument("--teacher", help="the teacher's test run folder (holds summary/)")
    report.add_argument("--student", help="the student's test run folder (holds summary/)")
    report.add_argument(
        "--run",
        action="append",
        dest="runs",
        metavar="NAME=DIR",
        help="a named test run (repeatable; after --teacher/--student if given): all are shown side by "
        "side per region, differences to the first",
    )
    report.add_argument(
        "--out", required=True, help="output folder (report.md, plots/); new or an earlier report"
    )
    report.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds other files: write report.md and plots/ beside them (nothing else is touched)",
    )
    return parser


def _lightning_predict_pointer(args: Sequence[str]) -> None:
    if any(a.split("=", 1)[0] in ("--config", "--ckpt_path", "-c") for a in args):
        sys.stderr.write(
            "lorkd-pl: error: `lorkd-pl predict` predicts files and writes its outputs: "
            "lorkd-pl predict --source CHECKPOINT_OR_EXPORT [--region REGION] --input FILES --out DIR "
            "(the checkpoint replaces --config/--ckpt_path; see lorkd-pl predict --help)\n"
        )
        raise SystemExit(2)


def main(args: Sequence[str] | None = None) -> int:
    """Run the command line with ``args`` (default: ``sys.argv[1:]``) and return an exit code."""
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args  # show the traceback behind a lorkd-pl error
    rest, folders = split_tasks_dirs([a for a in args if a != "--debug"])
    if rest and rest[0] in LIGHTNING_COMMANDS:
        return _lightning(rest, folders, debug)
    if rest and rest[0] in TEACHER_COMMANDS:
        return _teacher(rest, folders, debug)
    if rest[:1] == ["predict"]:
        _lightning_predict_pointer(rest[1:])
    parser = build_parser()
    namespace = parser.parse_args(rest)
    if namespace.command is None:
        parser.print_help()
        return 0
    from lorkd_pl.data.plugins import PluginError, load_plugins

    try:
        load_plugins(folders)
        return namespace.run(namespace)
    except (LookupError, ValueError, OSError, PluginError) as error:
        if debug:
            raise
        parser.exit(2, f"lorkd-pl: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
