"""Teacher vs LoRKD experts per region: ``report.md`` and PNG plots from two test runs' summaries.

``lorkd-pl test`` writes ``<log_dir>/summary/<task>.json`` per task (:mod:`lorkd_pl.evaluation.summaries`).
:func:`write_report` reads those of a teacher run and of a student run and writes, atomically::

    OUT/report.md                    per-task table (teacher, expert, difference) + per-class tables
    OUT/plots/<metric>_by_region.png per-region bars, teacher vs expert (one per metric)
    OUT/plots/confusion_<task>.png   classification: the teacher's and the expert's confusion matrices

``lorkd-pl report --teacher RUN --student RUN --out OUT`` runs it from the command line.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorkd_pl.io.atomic import atomic_folder

# Metrics per task kind (summary key, label, higher is better); the first is the primary one.
METRICS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "seg3d": (("dice", "Dice", True), ("nsd", "NSD", True), ("hd95", "HD95", False)),
    "cls2d": (("accuracy", "accuracy", True), ("auroc_macro", "macro AUROC", True)),
}


class ReportError(ValueError):
    """A run without test summaries, or runs whose tasks do not match."""


def find_summaries(run: str | Path) -> dict[str, dict[str, Any]]:
    """The test summaries of a run, by task name.

    Args:
        run: a folder holding ``summary/<task>.json`` (a test log dir), or any folder above one (the
            most recently written ``summary`` folder below it is used, e.g. ``runs/demo/lorkd_seg``).
    """
    run = Path(run)
    folders = [run / "summary"] if (run / "summary").is_dir() else list(run.glob("**/summary"))
    folders = [f for f in folders if any(f.glob("*.json"))]
    if not folders:
        raise ReportError(
            f"{run}: no summary/<task>.json below it; run `lorkd-pl test --config CONFIG --ckpt_path CKPT` "
            "first (it writes <log_dir>/summary/<task>.json) and pass that run's folder"
        )
    folder = max(folders, key=lambda f: max(p.stat().st_mtime for p in f.glob("*.json")))
    summaries = {}
    for path in sorted(folder.glob("*.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            summaries[summary["task"]] = summary
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ReportError(f"{path}: not a lorkd-pl test summary ({error})") from None
    return summaries


def task_value(summary: Mapping[str, Any], metric: str) -> float:
    """A task-level metric of a summary (segmentation: the mean over foreground classes)."""
    value = summary["mean"].get(metric) if summary["kind"] == "seg3d" else summary.get(metric)
    return float("nan") if value is None else float(value)


def comparison_rows(
    teacher: Mapping[str, Mapping[str, Any]], student: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One row per student task: ``{"task", "region", "kind", "<metric>": (teacher, expert), ...}``."""
    return run_rows([teacher, student], ["teacher", "student"])


def run_rows(runs: Sequence[Mapping[str, Mapping[str, Any]]], names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per task that ANY run tested: ``{"task", "region", "kind", "missing": [run indices
    without it], "<metric>": (value of run 0, run 1, ...)}``; a run without the task has ``nan`` there
    (shown as "—"; the means compare only the tasks every run has, :func:`common_means`).

    Raises:
        ReportError: when two runs give one task name different kinds or regions.
    """
    tasks: dict[str, Mapping[str, Any]] = {}
    for run, name in zip(runs, names, strict=True):
        for task, summary in run.items():
            first = tasks.setdefault(task, summary)
            if (first["kind"], first["region"]) != (summary["kind"], summary["region"]):
                raise ReportError(
                    f"task {task!r} is {first['kind']} of region {first['region']!r} in one run and "
                    f"{summary['kind']} of region {summary['region']!r} in the {name} run: not the same task"
                )
    rows = []
    for task in sorted(tasks, key=lambda n: (tasks[n]["region"], n)):
        summary = tasks[task]
        missing = [index for index, run in enumerate(runs) if task not in run]
        row: dict[str, Any] = {
            "task": task,
            "region": summary["region"],
            "kind": summary["kind"],
            "missing": missing,
        }
        for metric, _, _ in METRICS[summary["kind"]]:
            row[metric] = tuple(task_value(run[task], metric) if task in run else math.nan for run in runs)
        rows.append(row)
    return rows


#: A run that did not test a task (the task is still listed for the runs that did).
NOT_TESTED = "—"


def _number(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _delta(pair: tuple[float, float], higher_is_better: bool) -> str:
    reference, value = (round(v, 3) for v in pair)  # as printed: no "-0.000", no ✓ for 0.0004
    if math.isnan(reference) or math.isnan(value):
        return "–"
    better = value > reference if higher_is_better else value < reference
    return f"{value - reference + 0.0:+.3f}" + (" ✓" if better else "")


def common_means(rows: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[float], int]:
    """Each run's mean of ``metric`` over the tasks where EVERY run has a value (so the means compare
    the same tasks), and how many tasks that is.

    Args:
        rows: :func:`run_rows` of one kind.
        metric: a metric key.
    """
    shared = [row[metric] for row in rows if not any(math.isnan(v) for v in row[metric])]
    runs = len(rows[0][metric]) if rows else 0
    if not shared:
        return [float("nan")] * runs, 0
    return [sum(values[i] for values in shared) / len(shared) for i in range(runs)], len(shared)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str] = ("teacher", "expert")
) -> list[str]:
    """The per-task table (one kind): each run's value of each metric of the kind, and for every run
    after the first its difference to the first (✓: better than the first run). The mean row averages
    each metric over the tasks where every run has a value (:func:`common_means`)."""
    metrics = METRICS[rows[0]["kind"]]
    header = ["region", "task"]
    for _, label, higher in metrics:
        header.append(f"{names[0]} {label}")
        for name in names[1:]:
            header += [f"{name} {label}", "Δ" + ("" if higher else " (lower is better)")]
    columns = len(metrics) * (2 * len(names) - 1)
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * columns]
    counts = {metric: common_means(rows, metric)[1] for metric, _, _ in metrics}
    partial = sorted({n for n in counts.values() if n < len(rows)})
    for row in [*rows, None]:
        cells = ["**mean**", ""] if row is None else [row["region"], row["task"]]
        if row is None and partial:  # some task lacks a value in some run: means over the shared ones
            cells[1] = f"over the tasks every run has ({', '.join(map(str, partial))} of {len(rows)})"
        absent = set() if row is None else set(row.get("missing", ()))
        for metric, _, higher in metrics:
            values = common_means(rows, metric)[0] if row is None else list(row[metric])
            shown = [f"**{_number(v)}**" if row is None else _number(v) for v in values]
            shown = [NOT_TESTED if index in absent else cell for index, cell in enumerate(shown)]
            cells.append(shown[0])
            for index in range(1, len(names)):
                delta = NOT_TESTED if absent & {0, index} else _delta((values[0], values[index]), higher)
                cells += [shown[index], delta]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_class_lines(summaries: Sequence[Mapping[str, Any] | None], names: Sequence[str]) -> list[str]:
    """Per-class table of one task, one column per run and metric: Dice/NSD (segmentation) or recall
    (``None``: the run did not test the task, "—")."""
    last = next(summary for summary in reversed(summaries) if summary is not None)
    metric_names = ["dice", "nsd"] if last["kind"] == "seg3d" else ["recall"]
    header = ["class"] + [f"{name} {m}" for m in metric_names for name in names]
    lines = [f"#### {last['task']} ({last['region']})", "", "| " + " | ".join(header) + " |"]
    lines.append("|---|" + "---:|" * (len(header) - 1))
    for name in last["per_class"]:
        cells = [name]
        for metric in metric_names:
            for summary in summaries:
                value = None if summary is None else summary["per_class"].get(name, {}).get(metric, math.nan)
                cells.append(NOT_TESTED if value is None else _number(float(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_report(
    rows: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Mapping[str, Any]]],
    names: Sequence[str],
    sources: Sequence[str],
    plots: Sequence[str] = (),
) -> str:
    """The ``report.md`` text of :func:`run_rows` ``rows`` (plots linked by relative path)."""
    pairwise = list(names) == ["teacher", "expert"]
    lines = [
        REPORT_MARK,
        "# Teacher vs LoRKD experts" if pairwise else "# " + " vs ".join(names),
        "",
        "Runs (test split): " + "; ".join(f"{n}: `{s}`" for n, s in zip(names, sources, strict=True)) + ". "
        f"Δ = run − {names[0]}; ✓ marks a run better than {names[0]}.",
        "",
    ]
    for kind in METRICS:
        kind_rows = [row for row in rows if row["kind"] == kind]
        if not kind_rows:
            continue
        title = "3D segmentation" if kind == "seg3d" else "2D classification"
        lines += [f"## {title}", "", *markdown_table(kind_rows, names), ""]
        if kind == "seg3d":
            tested = [next(run[r["task"]] for run in runs if r["task"] in run) for r in kind_rows]
            tolerances = sorted({float(summary.get("nsd_tolerance_mm", "nan")) for summary in tested})
            lines += [
                "Dice and NSD: mean over foreground classes (empty-ground-truth rule in docs/deploy.md); "
                f"NSD tolerance {', '.join(f'{t:g}' for t in tolerances)} mm; HD95 in mm.",
                "",
            ]
        lines += ["### Per class", ""]
        for row in kind_rows:
            lines += _per_class_lines([run.get(row["task"]) for run in runs], names)
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(
    teacher_run: str | Path, student_run: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
    """Write ``report.md`` and ``plots/*.png`` comparing a teacher and a student test run
    (:func:`write_runs_report` with the runs named ``teacher`` and ``expert``)."""
    return write_runs_report({"teacher": teacher_run, "expert": student_run}, out, overwrite)


def write_runs_report(runs: Mapping[str, str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Write ``report.md`` and ``plots/*.png`` comparing test runs side by side, by name (the first run
    is the reference of every Δ; every task any run tested is listed, "—" where a run lacks it).

    ``out`` may be new or an earlier report (replaced atomically: the older report stays until the new
    one is complete). A folder holding anything else (a run folder, say) is refused unless
    ``overwrite``, and then only ``report.md`` and ``plots/`` are written into it: nothing else is
    touched. A file is always refused.

    Returns:
        the path of ``report.md``.

    Raises:
        ReportError: for fewer than two runs, a file, or a folder that is not a report (without
            ``overwrite``).
    """
    if len(runs) < 2:
        raise ReportError("a report compares at least two runs (--run NAME=DIR, twice or more)")
    report_target(out, overwrite)  # before reading the runs: a refused --out costs nothing
    summaries = [find_summaries(run) for run in runs.values()]
    conflicts = {name: conflict_history(run) for name, run in runs.items()}
    return write_comparison(
        summaries, out, list(runs), [str(r) for r in runs.values()], overwrite, conflicts=conflicts
    )


REPORT_MARK = "<!-- written by lorkd-pl report -->"
#: In ``plots/``: the names of the plots the report wrote (a file a user adds there is not among them).
PLOTS_MANIFEST = ".written-by-lorkd-pl-report"


def conflict_history(log_dir: str | Path) -> dict[str, Any] | None:
    """The newest ``conflicts.json`` (``models.conflicts.GradientConflict``) below ``log_dir``, or
    ``None``; an unreadable file counts as none (the report is written without its plot)."""
    found = sorted(Path(log_dir).glob("**/conflicts.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    try:
        history = json.loads(found[-1].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    records = history.get("records") if isinstance(history, dict) else None
    return history if isinstance(records, list) and records else None


def validation_curve(log_dir: str | Path) -> list[tuple[int, float]]:
    """``[(epoch, val/score), ...]`` from every CSVLogger ``metrics.csv`` below ``log_dir`` (a resumed
    fit logs into a new version; a ``test`` of the run logs no validation score), by epoch, the newest
    file's value where two hold the same epoch; empty when there is none."""
    import csv

    by_epoch: dict[int, float] = {}
    for path in sorted(Path(log_dir).glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with path.open(encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/score") not in (None, ""):
                    by_epoch[int(float(row["epoch"]))] = float(row["val/score"])
    return sorted(by_epoch.items())


def _is_report_part(path: Path) -> bool:
    """Whether ``path`` is a part an earlier ``lorkd-pl report`` wrote: its marked ``report.md``, or a
    ``plots/`` folder holding only the plots that report links (a file a user added there is not)."""
    if path.name == "report.md" and path.is_file() and not path.is_symlink():
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.readline().strip() == REPORT_MARK
    if path.name != "plots" or not path.is_dir() or path.is_symlink():
        return False
    report = path.parent / "report.md"
    if not _is_report_part(report):
        return False
    manifest = path / PLOTS_MANIFEST
    if manifest.is_file():  # the names this report wrote
        written = set(manifest.read_text(encoding="utf-8", errors="replace").split())
    else:  # a report of an earlier version: the plots its report.md links
        written = set(
            re.findall(r"\]\(plots/([^)/]+)\)", report.read_text(encoding="utf-8", errors="replace"))
        )
    return all((p.name in written or p.name == PLOTS_MANIFEST) and p.is_file() for p in path.iterdir())


def report_target(out: str | Path, overwrite: bool = False) -> str:
    """How ``out`` can take a report: ``"new"``, ``"replace"`` (an earlier report) or ``"beside"``
    (``overwrite`` given for a folder holding other files: report.md and plots/ are written beside them).

    Raises:
        ReportError: for a file, or a folder that is not a report without ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder for report.md and plots/")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    earlier = _is_report_part(out / "report.md")  # an earlier report's report.md carries the mark
    others = sorted(p.name for p in out.iterdir() if not (earlier and _is_report_part(p)))
    if not others:
        return "replace"
    if not overwrite:
        raise ReportError(
            f"--out {out} is not an earlier report: it holds {', '.join(others[:5])}"
            f"{', …' if len(others) > 5 else ''}; choose a new folder, or pass --overwrite to write "
            "report.md and plots/ beside those files (nothing else is touched)"
        )
    for name in ("report.md", "plots"):
        if (out / name).exists() and not _is_report_part(out / name):
            raise ReportError(
                f"{out / name} exists and was not written by lorkd-pl report (or holds files it did not "
                "write); choose another --out, nothing was touched"
            )
    return "beside"


def write_comparison(
    runs: Sequence[Mapping[str, Mapping[str, Any]]],
    out: str | Path,
    names: Sequence[str] = ("teacher", "expert"),
    sources: Sequence[str] | None = None,
    overwrite: bool = False,
    curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    conflicts: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Path:
    """:func:`write_runs_report` for summaries already loaded with :func:`find_summaries`; ``curves``
    (run name → ``[(epoch, validation score), ...]``, :func:`validation_curve`) adds a learning-curve plot,
    ``conflicts`` (run name → :func:`conflict_history`) a gradient-conflict plot per run that has one."""
    out = Path(out)
    mode = report_target(out, overwrite)
    rows = run_rows(runs, names)
    sources = list(sources or names)
    if mode != "beside":
        with atomic_folder(out, overwrite=True) as work:
            _render(rows, runs, names, sources, work, curves, conflicts)
        return out / "report.md"
    work = Path(tempfile.mkdtemp(prefix=".report.", dir=out))
    try:  # report.md and plots/ are swapped in; the folder's other files stay as they are
        _render(rows, runs, names, sources, work, curves, conflicts)
        if (out / "plots").exists():
            shutil.rmtree(out / "plots")  # only the earlier report's own plots (checked by report_target)
        os.replace(work / "plots", out / "plots")
        os.replace(work / "report.md", out / "report.md")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / "report.md"


def _file_safe(name: str) -> str:
    """A run name as a file-name part (letters, digits, ``-``, ``_``, ``.``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "run"


def _render(
    rows: list[dict[str, Any]],
    runs: Sequence[Mapping[str, Mapping[str, Any]]],
    names: Sequence[str],
    sources: Sequence[str],
    work: Path,
    curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    conflicts: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> None:
    """Write ``report.md`` and ``plots/`` into the (empty) folder ``work``."""
    from lorkd_pl.evaluation.plots import conflict_matrices, confusion_matrices, learning_curves, region_bars

    (work / "plots").mkdir()
    plots = []
    if curves:
        learning_curves(curves, work / "plots" / "learning_curves.png")
        plots.append("plots/learning_curves.png")
    for index, (name, history) in enumerate((conflicts or {}).items()):
        if history:
            plot = f"plots/conflicts_{index}_{_file_safe(name)}.png"
            conflict_matrices(history, work / plot)
            plots.append(plot)
    for kind, metrics in METRICS.items():
        kind_rows = [row for row in rows if row["kind"] == kind]
        for metric, label, higher in metrics if kind_rows else ():
            name = f"plots/{metric}_by_region.png"
            region_bars(kind_rows, metric, label, higher, work / name, names)
            plots.append(name)
    for row in rows:
        if row["kind"] == "cls2d":
            name = f"plots/confusion_{row['task']}.png"
            tested = [(run[row["task"]], n) for run, n in zip(runs, names, strict=True) if row["task"] in run]
            confusion_matrices([t for t, _ in tested], [n for _, n in tested], work / name)
            plots.append(name)
    text = render_report(rows, runs, names, sources, plots)
    (work / "report.md").write_text(text, encoding="utf-8")
    (work / "plots" / PLOTS_MANIFEST).write_text(
        "\n".join(Path(p).name for p in plots) + "\n", encoding="utf-8"
    )
