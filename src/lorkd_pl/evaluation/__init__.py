"""Evaluation products of a test run: per-task summaries, comparisons of runs, plots.

Lives here: :mod:`~lorkd_pl.evaluation.summaries` (nnU-Net-style ``summary.json`` per task: Dice,
NSD, HD95 / accuracy, AUROC, confusion matrix), :mod:`~lorkd_pl.evaluation.comparison` (two runs side
by side per region: ``report.md``) and :mod:`~lorkd_pl.evaluation.plots` (its PNGs).

May import: ``io``, ``registry``, torch, torchmetrics, MONAI's metrics, matplotlib. Never ``models``
(the models use the summaries), ``deploy`` or ``app``.
"""

from lorkd_pl import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__)
