"""PNG plots of the comparison report (matplotlib's object API: no pyplot state, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

#: Bar colours by run position: the reference (teacher) grey, then the matplotlib cycle.
COLOURS: tuple[str, ...] = ("#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _bar_label(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The region, or region and task where a region has several tasks."""
    shared = sum(r["region"] == row["region"] for r in rows) > 1
    return f"{row['region']}\n{row['task']}" if shared else row["region"]


def region_bars(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    label: str,
    higher_is_better: bool,
    path: Path,
    names: Sequence[str] = ("teacher", "expert"),
) -> Path:
    """Grouped bars per region: each run's value of ``metric``.

    Args:
        rows: :func:`lorkd_pl.evaluation.comparison.run_rows` of one task kind; ``row[metric]`` holds
            one value per run.
        metric: summary key; ``label``: its axis label; ``higher_is_better``: noted in the title.
        path: the PNG to write.
        names: the runs' names, in order.
    """
    runs = len(names)
    figure = Figure(figsize=(max(4.0, (0.45 * runs + 0.4) * len(rows) + 1.5), 3.4), layout="constrained")
    axes = figure.add_subplot()
    positions = range(len(rows))
    width = 0.8 / runs
    for side, name in enumerate(names):
        values = [row[metric][side] for row in rows]
        bars = axes.bar(
            [p + (side - (runs - 1) / 2) * width for p in positions],
            [0.0 if math.isnan(v) else v for v in values],
            width,
            color=COLOURS[side % len(COLOURS)],
            label=name,
        )
        axes.bar_label(bars, labels=["–" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=7)
    axes.set_xticks(list(positions), [_bar_label(row, rows) for row in rows], fontsize=8)
    axes.set_ylabel(label)
    axes.set_title(f"{label} per region ({'higher' if higher_is_better else 'lower'} is better)", fontsize=10)
    if all(0 <= v <= 1 for row in rows for v in row[metric] if not math.isnan(v)):
        axes.set_ylim(0, 1.22)  # room for the legend above the bars
    axes.legend(fontsize=8, loc="upper left", ncols=runs)
    figure.savefig(path, dpi=110)
    return path


def confusion_matrices(summaries: Sequence[Mapping[str, Any]], names: Sequence[str], path: Path) -> Path:
    """Side-by-side confusion matrices (rows: truth, columns: prediction) of one classification task,
    one per run.

    Args:
        summaries: each run's classification summary of the task; ``names``: the runs' names.
        path: the PNG to write.
    """
    expert = summaries[-1]
    classes = expert["confusion_matrix"]["rows_truth_columns_prediction"]
    width = 1.2 * len(summaries) * len(classes) + 1.0
    figure = Figure(figsize=(width, 1.2 + 1.1 * len(classes)), layout="constrained")
    panels = figure.subplots(1, len(summaries), squeeze=False)[0]
    for axes, name, summary in zip(panels, names, summaries, strict=True):
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


def learning_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """Validation score per epoch of several runs on one plot.

    Args:
        curves: run name → ``[(epoch, validation score), ...]``.
        path: the PNG to write.
    """
    figure = Figure(figsize=(5.0, 3.2), layout="constrained")
    axes = figure.add_subplot()
    for index, (name, points) in enumerate(curves.items()):
        if points:
            epochs, values = zip(*points, strict=True)
            axes.plot(
                epochs, values, marker="o", markersize=3, color=COLOURS[index % len(COLOURS)], label=name
            )
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation score")
    axes.set_title("learning curves (validation split)", fontsize=10)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def conflict_matrices(history: Mapping[str, Any], path: Path) -> Path:
    """Region × region gradient cosines of one run (``conflicts.json``, ``models.conflicts``): per
    kind and layer group, the matrix at the first and at the last measured step, and the mean
    off-diagonal cosine over training.

    Args:
        history: ``{"regions": [...], "records": [{"step", "kind", "group", "regions", "cosine"}]}``.
        path: the PNG to write.
    """
    series: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in sorted(history["records"], key=lambda r: r["step"]):
        series.setdefault((record["kind"], record["group"]), []).append(record)
    figure = Figure(figsize=(9.0, 2.8 * len(series)), layout="constrained")
    grid = figure.subplots(len(series), 3, squeeze=False)
    for row, ((kind, group), records) in enumerate(sorted(series.items())):
        for column, record in enumerate((records[0], records[-1])):
            axes = grid[row][column]
            values = [[math.nan if v is None else v for v in line] for line in record["cosine"]]
            image = axes.imshow(values, vmin=-1.0, vmax=1.0, cmap="RdBu")
            names = record["regions"]
            axes.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
            axes.set_yticks(range(len(names)), names, fontsize=7)
            for i, line in enumerate(values):
                for j, value in enumerate(line):
                    if i != j and math.isfinite(value):
                        axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
            axes.set_title(f"{kind} / {group}, step {record['step']}", fontsize=8)
        figure.colorbar(image, ax=grid[row][1], shrink=0.8, label="cosine")
        trend = grid[row][2]
        steps = [r["step"] for r in records]
        trend.plot(steps, [_mean_off_diagonal(r["cosine"]) for r in records], marker="o", markersize=3)
        trend.axhline(0.0, color="#8c8c8c", linewidth=0.8)
        trend.set_xlabel("step", fontsize=8)
        trend.set_ylabel("mean cosine of region pairs", fontsize=8)
        trend.set_ylim(-1.0, 1.0)
    figure.savefig(path, dpi=100)
    return path


def _mean_off_diagonal(matrix: Sequence[Sequence[float | None]]) -> float:
    """Mean of the finite off-diagonal entries (``nan`` when there are none)."""
    values = [
        v
        for i, line in enumerate(matrix)
        for j, v in enumerate(line)
        if i != j and v is not None and math.isfinite(v)
    ]
    return sum(values) / len(values) if values else math.nan
