"""lorkd-pl: decompose a medical foundation model into lightweight per-region expert models."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("lorkd-pl")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["PUBLIC_NAMES", "__version__", "lazy_exports"]


#: The public names of each package, by the module that defines them (each package's ``__all__``).
PUBLIC_NAMES: dict[str, dict[str, str]] = {
    "lorkd_pl.data": {
        "datamodule": "MultiRegionDataModule collate_by_region",
        "readers": "ImageReadError InputInfo SimpleITKReader dicom_series_files inspect_input read_image "
        "read_geometry",
        "transforms": "seg3d_preprocessing seg3d_transforms cls2d_transforms",
        "plugins": "PluginError load_plugins",
        "formats": "read_manifest",
    },
    "lorkd_pl.models": {
        "base": "StepLoss TaskModule",
        "generalist": "GeneralistModule",
        "lorkd": "LoRKDModule",
        "restore": "restore_module",
        "router": "RegionClassifier RouterNetwork",
        "conflicts": "GradientConflict",
        "teacher.loading": "Teacher TeacherError load_teacher",
        "teacher.spec": "TeacherSpec parse_teacher",
    },
    "lorkd_pl.deploy": {
        "card": "ExpertCard RouterCard",
        "networks": "ExportError ExpertNetwork GeneralistNetwork deployable load_module load_student",
        "folders": "DeployedRouter Expert load_expert load_exported load_exported_router "
        "load_experts_and_router",
        "export": "export_region export_regions size_report",
        "program": "export_program onnx_graph",
        "predict": "PredictError predict_files",
        "region_choice": "RegionChoice RegionChoiceError choose_regions",
    },
    "lorkd_pl.evaluation": {
        "summaries": "classification_summary segmentation_summary task_summary dice_per_class "
        "nsd_per_class hd95_per_class",
        "comparison": "ReportError write_runs_report find_summaries",
    },
}


def lazy_exports(package: str) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__all__``, ``__getattr__`` and ``__dir__`` (PEP 562) from :data:`PUBLIC_NAMES`: a
    public name's module is imported on first use, so ``lorkd-pl --help`` and ``lorkd-pl tasks`` do not
    pay for torch or MONAI, and the modules of a package import each other by their own names, never
    through its ``__init__``.

    Args:
        package: the package's ``__name__``.
    """
    where = {
        name: f"{package}.{module}"
        for module, names in PUBLIC_NAMES[package].items()
        for name in names.split()
    }

    def getattr_(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    def dir_() -> list[str]:
        return sorted(where)

    return sorted(where), getattr_, dir_
