"""Deployment: the deployable networks, the export folder format, export, prediction on image files.

Lives here: :mod:`~lorkd_pl.deploy.card` (:class:`ExpertCard` and :class:`RouterCard`, the description
of a deployable network: region, tasks, classes, preprocessing, backbone, sizes, provenance),
:mod:`~lorkd_pl.deploy.networks` (what a trained module becomes for one region, or for routing),
:mod:`~lorkd_pl.deploy.folders` (the export folder format, written and read side by side),
:mod:`~lorkd_pl.deploy.program` (``torch.export`` with dynamic shapes, ONNX),
:mod:`~lorkd_pl.deploy.bundle` (MONAI bundles), :mod:`~lorkd_pl.deploy.export` (``lorkd-pl export``),
:mod:`~lorkd_pl.deploy.region_choice` (the input→region choice of ``--region auto``) and
:mod:`~lorkd_pl.deploy.predict` (``lorkd-pl predict``).

May import: ``models``, ``evaluation``, ``data``, ``experts``, ``checks``, ``io``, ``registry``. Never
``app``.
"""

from lorkd_pl import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__)
