"""Evaluation products of a test run: per-task summaries, comparisons of runs, plots.

Lives here: :mod:`~lorkd_pl.evaluation.summaries` (nnU-Net-style ``summary.json`` per task: Dice,
NSD, HD95 / accuracy, AUROC, confusion matrix), :mod:`~lorkd_pl.evaluation.comparison` (two runs side
by side per region: ``report.md``) and :mod:`~lorkd_pl.evaluation.plots` (its PNGs).

May import: ``io``, ``registry``, torch, torchmetrics, MONAI's metrics, matplotlib. Never ``models``
(the models use the summaries), ``deploy`` or ``app``.
"""

from lorkd_pl import lazy_exports

_EXPORTS: dict[str, str] = {
    "classification_summary": "lorkd_pl.evaluation.summaries",
    "segmentation_summary": "lorkd_pl.evaluation.summaries",
    "task_summary": "lorkd_pl.evaluation.summaries",
    "dice_per_class": "lorkd_pl.evaluation.summaries",
    "nsd_per_class": "lorkd_pl.evaluation.summaries",
    "hd95_per_class": "lorkd_pl.evaluation.summaries",
    "ReportError": "lorkd_pl.evaluation.comparison",
    "write_runs_report": "lorkd_pl.evaluation.comparison",
    "find_summaries": "lorkd_pl.evaluation.comparison",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
