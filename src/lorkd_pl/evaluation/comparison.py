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
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorkd_pl.evaluation.summaries import nanmean
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
    missing = sorted(set(student) - set(teacher))
    if missing:
        raise ReportError(
            f"the teacher run has no test summary for tasks {missing} (it has {sorted(teacher)}); test "
            "the teacher on the same data config as the student"
        )
    rows = []
    for name in sorted(student, key=lambda n: (student[n]["region"], n)):
        summary = student[name]
        row: dict[str, Any] = {"task": name, "region": summary["region"], "kind": summary["kind"]}
        for metric, _, _ in METRICS[summary["kind"]]:
            row[metric] = (task_value(teacher[name], metric), task_value(summary, metric))
        rows.append(row)
    return rows


def _number(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _delta(pair: tuple[float, float], higher_is_better: bool) -> str:
    teacher, expert = pair
    if math.isnan(teacher) or math.isnan(expert):
        return "–"
    better = expert > teacher if higher_is_better else expert < teacher
    return f"{expert - teacher:+.3f}" + (" ✓" if better else "")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-task table (one kind): teacher, expert and difference for each metric of the kind."""
    metrics = METRICS[rows[0]["kind"]]
    header = ["region", "task"]
    for _, label, higher in metrics:
        header += [f"teacher {label}", f"expert {label}", "Δ" + ("" if higher else " (lower is better)")]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (3 * len(metrics))]
    for row in rows:
        cells = [row["region"], row["task"]]
        for metric, _, higher in metrics:
            cells += [_number(row[metric][0]), _number(row[metric][1]), _delta(row[metric], higher)]
        lines.append("| " + " | ".join(cells) + " |")
    means = ["**mean**", ""]
    for metric, _, higher in metrics:
        pair = tuple(nanmean([row[metric][i] for row in rows]) for i in (0, 1))
        means += [f"**{_number(pair[0])}**", f"**{_number(pair[1])}**", _delta(pair, higher)]
    lines.append("| " + " | ".join(means) + " |")
    return lines


def _per_class_lines(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> list[str]:
    """Per-class table of one task: Dice/NSD (segmentation) or recall (classification)."""
    metric_names = ["dice", "nsd"] if student["kind"] == "seg3d" else ["recall"]
    header = ["class"] + [f"{side} {m}" for m in metric_names for side in ("teacher", "expert")]
    lines = [f"#### {student['task']} ({student['region']})", "", "| " + " | ".join(header) + " |"]
    lines.append("|---|" + "---:|" * (len(header) - 1))
    for name, values in student["per_class"].items():
        cells = [name]
        for metric in metric_names:
            teacher_value = teacher["per_class"].get(name, {}).get(metric, float("nan"))
            cells += [_number(float(teacher_value)), _number(float(values.get(metric, float("nan"))))]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_report(
    rows: Sequence[Mapping[str, Any]],
    teacher: Mapping[str, Mapping[str, Any]],
    student: Mapping[str, Mapping[str, Any]],
    sources: tuple[str, str] = ("teacher", "student"),
    plots: Sequence[str] = (),
) -> str:
    """The ``report.md`` text of :func:`comparison_rows` ``rows`` (plots linked by relative path)."""
    lines = [
        REPORT_MARK,
        "# Teacher vs LoRKD experts",
        "",
        f"Teacher run: `{sources[0]}`; student run: `{sources[1]}` (test split). Δ = expert − teacher; "
        "✓ marks an expert better than the teacher.",
        "",
    ]
    for kind in METRICS:
        kind_rows = [row for row in rows if row["kind"] == kind]
        if not kind_rows:
            continue
        title = "3D segmentation" if kind == "seg3d" else "2D classification"
        lines += [f"## {title}", "", *markdown_table(kind_rows), ""]
        if kind == "seg3d":
            tolerances = sorted({float(student[r["task"]].get("nsd_tolerance_mm", "nan")) for r in kind_rows})
            lines += [
                "Dice and NSD: mean over foreground classes (empty-ground-truth rule in docs/deploy.md); "
                f"NSD tolerance {', '.join(f'{t:g}' for t in tolerances)} mm; HD95 in mm.",
                "",
            ]
        lines += ["### Per class", ""]
        for row in kind_rows:
            lines += _per_class_lines(teacher[row["task"]], student[row["task"]])
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(
    teacher_run: str | Path, student_run: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
    """Write ``report.md`` and ``plots/*.png`` comparing a teacher and a student test run.

    ``out`` may be new or an earlier report (replaced atomically: the older report stays until the new
    one is complete). A folder holding anything else (a run folder, say) is refused unless
    ``overwrite``, and then only ``report.md`` and ``plots/`` are written into it: nothing else is
    touched. A file is always refused.

    Returns:
        the path of ``report.md``.

    Raises:
        ReportError: for a file, or a folder that is not a report (without ``overwrite``).
    """
    report_target(out, overwrite)  # before reading the runs: a refused --out costs nothing
    teacher, student = find_summaries(teacher_run), find_summaries(student_run)
    return write_comparison(teacher, student, out, (str(teacher_run), str(student_run)), overwrite)


REPORT_MARK = "<!-- written by lorkd-pl report -->"


def _is_report_part(path: Path) -> bool:
    if path.name == "report.md" and path.is_file() and not path.is_symlink():
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.readline().strip() == REPORT_MARK
    return path.name == "plots" and path.is_dir() and all(p.suffix == ".png" for p in path.iterdir())


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
        if (out / name).exists() and not earlier:
            raise ReportError(
                f"{out / name} exists and was not written by lorkd-pl report; choose another --out"
            )
    return "beside"


def write_comparison(
    teacher: Mapping[str, Mapping[str, Any]],
    student: Mapping[str, Mapping[str, Any]],
    out: str | Path,
    sources: tuple[str, str] = ("teacher", "student"),
    overwrite: bool = False,
) -> Path:
    """:func:`write_report` for summaries already loaded with :func:`find_summaries`."""
    out = Path(out)
    mode = report_target(out, overwrite)
    rows = comparison_rows(teacher, student)
    if mode != "beside":
        with atomic_folder(out, overwrite=True) as work:
            _render(rows, teacher, student, sources, work)
        return out / "report.md"
    work = Path(tempfile.mkdtemp(prefix=".report.", dir=out))
    try:  # report.md and plots/ are swapped in; the folder's other files stay as they are
        _render(rows, teacher, student, sources, work)
        if (out / "plots").exists():
            shutil.rmtree(out / "plots")  # only PNGs (checked by report_target)
        os.replace(work / "plots", out / "plots")
        os.replace(work / "report.md", out / "report.md")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / "report.md"


def _render(
    rows: list[dict[str, Any]],
    teacher: Mapping[str, Mapping[str, Any]],
    student: Mapping[str, Mapping[str, Any]],
    sources: tuple[str, str],
    work: Path,
) -> None:
    """Write ``report.md`` and ``plots/`` into the (empty) folder ``work``."""
    from lorkd_pl.evaluation.plots import confusion_matrices, region_bars

    (work / "plots").mkdir()
    plots = []
    for kind, metrics in METRICS.items():
        kind_rows = [row for row in rows if row["kind"] == kind]
        for metric, label, higher in metrics if kind_rows else ():
            name = f"plots/{metric}_by_region.png"
            region_bars(kind_rows, metric, label, higher, work / name)
            plots.append(name)
    for row in rows:
        if row["kind"] == "cls2d":
            name = f"plots/confusion_{row['task']}.png"
            confusion_matrices(teacher[row["task"]], student[row["task"]], work / name)
            plots.append(name)
    text = render_report(rows, teacher, student, sources, plots)
    (work / "report.md").write_text(text, encoding="utf-8")
