"""PNG plots of the comparison report (matplotlib's object API: no pyplot state, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

TEACHER_COLOUR, EXPERT_COLOUR = "#8c8c8c", "#1f77b4"


def _bar_label(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The region, or region and task where a region has several tasks."""
    shared = sum(r["region"] == row["region"] for r in rows) > 1
    return f"{row['region']}\n{row['task']}" if shared else row["region"]


def region_bars(
    rows: Sequence[Mapping[str, Any]], metric: str, label: str, higher_is_better: bool, path: Path
) -> Path:
    """Grouped bars per region: the teacher's and the expert's value of ``metric``.

    Args:
        rows: :func:`lorkd_pl.evaluation.comparison.comparison_rows` of one task kind; ``row[metric]``
            is the pair (teacher, expert).
        metric: summary key; ``label``: its axis label; ``higher_is_better``: noted in the title.
        path: the PNG to write.
    """
    figure = Figure(figsize=(max(4.0, 1.2 * len(rows) + 1.5), 3.4), layout="constrained")
    axes = figure.add_subplot()
    positions = range(len(rows))
    width = 0.38
    for offset, side, colour, name in ((-1, 0, TEACHER_COLOUR, "teacher"), (1, 1, EXPERT_COLOUR, "expert")):
        values = [row[metric][side] for row in rows]
        bars = axes.bar(
            [p + offset * width / 2 for p in positions],
            [0.0 if math.isnan(v) else v for v in values],
            width,
            color=colour,
            label=name,
        )
        axes.bar_label(bars, labels=["–" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=7)
    axes.set_xticks(list(positions), [_bar_label(row, rows) for row in rows], fontsize=8)
    axes.set_ylabel(label)
    axes.set_title(f"{label} per region ({'higher' if higher_is_better else 'lower'} is better)", fontsize=10)
    if all(0 <= v <= 1 for row in rows for v in row[metric] if not math.isnan(v)):
        axes.set_ylim(0, 1.22)  # room for the legend above the bars
    axes.legend(fontsize=8, loc="upper left", ncols=2)
    figure.savefig(path, dpi=110)
    return path


def confusion_matrices(teacher: Mapping[str, Any], expert: Mapping[str, Any], path: Path) -> Path:
    """Side-by-side confusion matrices (rows: truth, columns: prediction) of one classification task.

    Args:
        teacher: the teacher's classification summary of the task; ``expert``: the student's.
        path: the PNG to write.
    """
    classes = expert["confusion_matrix"]["rows_truth_columns_prediction"]
    figure = Figure(figsize=(2.0 + 2.4 * len(classes), 1.2 + 1.1 * len(classes)), layout="constrained")
    panels = figure.subplots(1, 2)
    for axes, name, summary in ((panels[0], "teacher", teacher), (panels[1], "expert", expert)):
        counts = summary["confusion_matrix"]["counts"]
        image = axes.imshow(counts, cmap="Blues")
        peak = max(max(row) for row in counts) or 1
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                colour = "white" if value > peak / 2 else "black"
                axes.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=8)
        axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        axes.set_yticks(range(len(classes)), classes, fontsize=7)
        axes.set_xlabel("prediction")
        axes.set_ylabel("truth")
        axes.set_title(f"{name}: accuracy {summary['accuracy']:.3f}", fontsize=9)
        figure.colorbar(image, ax=axes, shrink=0.8)
    figure.suptitle(expert["task"], fontsize=10)
    figure.savefig(path, dpi=110)
    return path
