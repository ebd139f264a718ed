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

_EXPORTS: dict[str, str] = {
    "ExpertCard": "lorkd_pl.deploy.card",
    "RouterCard": "lorkd_pl.deploy.card",
    "ExportError": "lorkd_pl.deploy.networks",
    "ExpertNetwork": "lorkd_pl.deploy.networks",
    "GeneralistNetwork": "lorkd_pl.deploy.networks",
    "deployable": "lorkd_pl.deploy.networks",
    "load_module": "lorkd_pl.deploy.networks",
    "load_student": "lorkd_pl.deploy.networks",
    "DeployedRouter": "lorkd_pl.deploy.folders",
    "Expert": "lorkd_pl.deploy.folders",
    "load_expert": "lorkd_pl.deploy.folders",
    "load_exported": "lorkd_pl.deploy.folders",
    "load_exported_router": "lorkd_pl.deploy.folders",
    "load_experts_and_router": "lorkd_pl.deploy.folders",
    "export_region": "lorkd_pl.deploy.export",
    "export_regions": "lorkd_pl.deploy.export",
    "size_report": "lorkd_pl.deploy.export",
    "export_program": "lorkd_pl.deploy.program",
    "onnx_graph": "lorkd_pl.deploy.program",
    "PredictError": "lorkd_pl.deploy.predict",
    "predict_files": "lorkd_pl.deploy.predict",
    "RegionChoice": "lorkd_pl.deploy.region_choice",
    "RegionChoiceError": "lorkd_pl.deploy.region_choice",
    "choose_regions": "lorkd_pl.deploy.region_choice",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
