"""Paired comparison of two runs over seeds × test cases, with a 95 % bootstrap interval.

Two runs (e.g. LoRKD and plain KD) tested on the same cases under several seeds give, per task, a
matrix of per-case score differences ``D[seed, case]``. Per case the score is the case's accuracy
(cls2d: 1 if the predicted class is the label, else 0) or its mean Dice over the foreground classes it
has a value for (seg3d; NaN classes, absent from label and prediction, left out as everywhere).

The difference reported is ``mean over tasks of mean over (seed, case) of D`` — the difference of the
runs' mean over tasks, each task weighted equally as in the demo's headline (for seg3d the headline
averages per-class means, this the per-case means: they agree up to the order of the NaN-aware means).
Its interval is a two-level percentile bootstrap: each resample draws the seeds with replacement and,
per task, the cases with replacement (the same cases for both runs: paired), so both the spread over
seeds and the spread over cases widen it. With one seed only the cases are drawn. Across kinds (the
demo's 3D and 2D tasks together) the tasks are grouped by kind and the statistic is the mean of the
kinds' means, the same seeds drawn for both kinds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lorkd_pl.evaluation.summaries import nanmean

#: Resamples of the bootstrap; the interval's end points move by < 0.002 between generator seeds at
#: the demo's sizes.
RESAMPLES = 10_000


def case_scores(summary: Mapping[str, Any]) -> dict[str, float]:
    """``{case: score}`` of one task's test summary (``summary/<task>.json``): accuracy of a cls2d case
    (0 or 1), mean foreground Dice of a seg3d case (NaN if no class has a value)."""
    scores = {}
    for row in summary["cases"]:
        if summary["kind"] == "cls2d":
            scores[row["case"]] = float(row["prediction"] == row["label"])
        else:
            scores[row["case"]] = nanmean([float(v) for k, v in row.items() if k.startswith("dice_")])
    return scores


def paired_differences(
    a: Sequence[Mapping[str, Mapping[str, Any]]], b: Sequence[Mapping[str, Mapping[str, Any]]]
) -> dict[str, np.ndarray]:
    """Per task, the per-case score differences ``a − b`` as a ``(seeds, cases)`` array.

    Args:
        a: per seed, run A's summaries by task (:func:`~lorkd_pl.evaluation.comparison.find_summaries`).
        b: per seed, run B's summaries by task, the same seeds in the same order.

    Returns:
        ``{task: D}`` over the tasks both runs have in every seed; cases where either score is NaN are
        dropped (in every seed, to keep the pairs).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired runs need the same seeds: {len(a)} and {len(b)} summaries")
    tasks = sorted(set.intersection(*(set(s) for s in [*a, *b])))
    differences = {}
    for task in tasks:
        scores_a = [case_scores(seed[task]) for seed in a]
        scores_b = [case_scores(seed[task]) for seed in b]
        cases = sorted(set.intersection(*(set(s) for s in [*scores_a, *scores_b])))
        matrix = np.array([[sa[c] - sb[c] for c in cases] for sa, sb in zip(scores_a, scores_b, strict=True)])
        keep = ~np.isnan(matrix).any(axis=0)
        if keep.any():
            differences[task] = matrix[:, keep]
    return differences


def bootstrap_interval(
    differences: Mapping[str, np.ndarray],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> tuple[float, float, float]:
    """The mean paired difference and its two-level percentile bootstrap interval (module docstring).

    Args:
        differences: ``{task: D}``, ``D`` of shape ``(seeds, cases)``, the same number of seeds in every
            task (in every group: the seeds are drawn once per resample for all tasks).
        level: the interval's coverage.
        resamples: bootstrap resamples.
        seed: the generator's seed (the interval is reproducible).
        groups: ``{task: group}`` (e.g. its kind, ``seg3d`` or ``cls2d``): the statistic is then the mean
            over groups of the mean over each group's tasks, every group weighted equally whatever its
            number of tasks; every group must keep a task in ``differences``. Default: the mean over
            tasks.

    Returns:
        ``(difference, low, high)``.
    """
    if not differences:
        raise ValueError("no task with paired cases to compare")
    seeds = {d.shape[0] for d in differences.values()}
    if len(seeds) != 1:
        raise ValueError(f"every task needs the same seeds, got {sorted(seeds)}")
    n_seeds = seeds.pop()
    rng = np.random.default_rng(seed)
    picked_seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds)) if n_seeds > 1 else None
    per_task = []
    for task in sorted(differences):
        matrix = differences[task]
        picked = rng.integers(0, matrix.shape[1], size=(resamples, matrix.shape[1]))
        by_seed = matrix[:, picked].mean(axis=2)  # (seeds, resamples): each seed's mean over drawn cases
        if picked_seeds is None:
            per_task.append(by_seed[0])
        else:
            per_task.append(np.take_along_axis(by_seed.T, picked_seeds, axis=1).mean(axis=1))
    weights = _task_weights(sorted(differences), groups)
    statistic = weights @ np.stack(per_task)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(statistic, [tail, 100 - tail])
    difference = float(weights @ np.array([differences[task].mean() for task in sorted(differences)]))
    return difference, float(low), float(high)


def _task_weights(tasks: Sequence[str], groups: Mapping[str, str] | None) -> np.ndarray:
    """Weight of each task in the mean over groups of the mean over each group's tasks (``(tasks,)``)."""
    if groups is None:
        return np.full(len(tasks), 1 / len(tasks))
    missing = [task for task in tasks if task not in groups]
    if missing:
        raise ValueError(f"tasks without a group: {missing}")
    empty = sorted(set(groups.values()) - {groups[task] for task in tasks})
    if empty:  # the mean over groups would silently become the mean over the groups left
        raise ValueError(f"no task of group(s) {empty} is paired in every seed")
    sizes = Counter(groups[task] for task in tasks)
    return np.array([1 / (len(sizes) * sizes[groups[task]]) for task in tasks])
