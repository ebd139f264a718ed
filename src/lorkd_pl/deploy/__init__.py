"""Deployment: the expert card, export of a region's merged expert, predictions on image files.

Lives here: :mod:`~lorkd_pl.deploy.card` (:class:`ExpertCard`, the one description of a deployable
network: region, tasks, classes, preprocessing, backbone, sizes, provenance), :mod:`~lorkd_pl.deploy.export`
(``lorkd-pl export``) and :mod:`~lorkd_pl.deploy.predict` (``lorkd-pl predict``).

May import: ``models``, ``evaluation``, ``data``, ``experts``, ``io``, ``registry``. Never ``app``.
"""
