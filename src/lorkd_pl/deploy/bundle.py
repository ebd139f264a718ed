"""``lorkd-pl export --format bundle``: a 3D expert as a MONAI bundle, runnable without lorkd-pl.

The bundle folder (MONAI's bundle layout)::

    configs/metadata.json    MONAI bundle metadata (network_data_format, versions, class names)
    configs/inference.json   the expert's network (its backbone's own MONAI class + a 1×1×1 head),
                             the same preprocessing and sliding window as ``lorkd-pl predict``, the
                             label map inverted to the input's grid and saved as NIfTI
    models/model.pt          the merged weights (a state dict: ``0.*`` backbone, ``1.*`` head)
    docs/README.md

Run it where only MONAI, its readers and torch are installed (no lorkd-pl)::

    pip install torch "monai[nibabel,itk,fire]"
    cd BUNDLE && python -m monai.bundle run --config_file configs/inference.json \
        --image /data/scan.nii.gz --output_dir /data/out

It reads what ``lorkd-pl predict`` reads: NIfTI with MONAI's nibabel reader; MHA/MHD, NRRD and DICOM
series folders with MONAI's ITK reader (``itk``: an optional package of the bundle).

It writes ``<output_dir>/<scan>_<task>.nii.gz``, the label map ``lorkd-pl predict`` writes for the same
file. The preprocessing is written from the very step list lorkd-pl builds its own pipeline from
(:func:`lorkd_pl.data.transforms.seg3d_steps`); only the file readers differ (MONAI's nibabel and ITK
readers instead of lorkd-pl's SimpleITK one, which give the same RAS arrays and affines).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorkd_pl.data.transforms import seg3d_steps
from lorkd_pl.deploy.card import ExpertCard, package_version, package_versions

#: The readers a bundle loads images with, MONAI's; MONAI tries them last first, by file suffix: NIfTI
#: with nibabel, every other format ``lorkd-pl predict`` reads (MHA/MHD, NRRD, DICOM series) with ITK.
BUNDLE_READERS = ["ITKReader", "NibabelReader"]


class BundleError(ValueError):
    """An expert that cannot be written as a MONAI bundle; names the reason and the alternative."""


def check_bundle(card: ExpertCard) -> None:
    """Refuse what a bundle cannot hold: a 2D classifier, several tasks in one network, a backbone that
    needs lorkd-pl itself.

    Raises:
        BundleError: naming the reason and the fix.
    """
    if card.kind != "seg3d":
        raise BundleError(
            f"the {card.name} expert classifies 2D images; --format bundle writes 3D segmentation experts "
            "(use the default format, or --format onnx)"
        )
    if len(card.tasks) != 1:
        raise BundleError(
            f"the {card.name} expert answers {len(card.tasks)} tasks "
            f"({', '.join(t['name'] for t in card.tasks)}); a MONAI bundle holds one: use the default format "
            "or --format onnx"
        )
    class_path = str(card.backbone.get("class_path", ""))
    if not class_path or class_path.startswith("lorkd_pl."):
        raise BundleError(
            f"the backbone {class_path or '(none)'} is lorkd-pl's own; a bundle must run without lorkd-pl: "
            "train with a MONAI (or torch) backbone, or use the default format or --format onnx"
        )


def bundle_network(backbone: nn.Module, head: nn.Module) -> nn.Sequential:
    """The bundle's network: ``Sequential(backbone, head)``, ``(N, C, *S) → (N, K, *S)``."""
    return nn.Sequential(backbone, head)


def _component(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"_target_": name, **arguments}


def inference_config(card: ExpertCard, head_in: int) -> dict[str, Any]:
    """``configs/inference.json`` of a checked card (:func:`check_bundle`)."""
    prep = card.preprocessing
    task = card.tasks[0]
    steps = seg3d_steps(["image"], prep.modality or "other", prep.spacing)
    preprocessing = [
        _component(name, {**arguments, **({"reader": BUNDLE_READERS} if name == "LoadImaged" else {})})
        for name, arguments in steps
    ]
    return {
        "imports": ["$import torch", "$import numpy", "$import monai"],
        "bundle_root": ".",
        "image": "$@bundle_root + '/sample.nii.gz'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "backbone": _component(card.backbone["class_path"], dict(card.backbone.get("init_args") or {})),
        "head": _component(
            "torch.nn.Conv3d",
            {"in_channels": head_in, "out_channels": len(task["classes"]), "kernel_size": 1},
        ),
        "network_def": "$torch.nn.Sequential(@backbone, @head)",
        "network": "$@network_def.to(@device)",
        "checkpoint": (
            "$torch.load(@bundle_root + '/models/model.pt', map_location=@device, weights_only=True)"
        ),
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(prep.patch_size),
            "sw_batch_size": prep.sw_batch_size,
            "overlap": prep.sw_overlap,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                _component("AsDiscreted", {"keys": "pred", "argmax": True}),
                _component(
                    "Invertd",
                    {
                        "keys": "pred",
                        "transform": "@preprocessing",
                        "orig_keys": "image",
                        "nearest_interp": True,
                    },
                ),
                _component(
                    "SaveImaged",
                    {
                        "keys": "pred",
                        "output_dir": "@output_dir",
                        "output_postfix": task["name"],
                        "output_dtype": "$numpy.uint8",
                        "resample": False,
                        "separate_folder": False,
                        "print_log": False,
                    },
                ),
            ],
        },
        "data": "$@preprocessing({'image': @image})",
        "prediction": "$@inferer(@data['image'][None].to(@device), @network)[0].cpu()",
        "run": [
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(@checkpoint)",
            "$@network.eval()",
            "$@postprocessing({'pred': @prediction, 'image': @data['image']})",
        ],
    }


def bundle_metadata(card: ExpertCard) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's bundle metadata fields for the expert."""
    versions = package_versions()
    task = card.tasks[0]
    prep = card.preprocessing
    patch = list(prep.patch_size)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by lorkd-pl {versions.get('lorkd-pl')}"},
        "monai_version": versions.get("monai"),
        "pytorch_version": versions.get("torch"),
        "numpy_version": package_version("numpy"),
        "required_packages_version": {"nibabel": package_version("nibabel")},
        "optional_packages_version": {"itk": package_version("itk-io")},  # MHA/NRRD/DICOM inputs
        "name": f"lorkd-pl {card.name} expert: {task['name']}",
        "task": f"{card.name} segmentation ({', '.join(task['classes'][1:])})",
        "description": (
            f"The {card.name} expert of a LoRKD student (its low-rank expert merged into the shared "
            "weights), with the preprocessing and sliding window it was trained and evaluated with."
        ),
        "authors": "lorkd-pl export",
        "copyright": "the owners of the training data and checkpoint",
        "data_source": "see the source checkpoint",
        "data_type": "nifti (itk: mha, nrrd, dicom)",
        "image_classes": f"single channel {prep.modality or ''} volume".replace("  ", " "),
        "label_classes": {str(i): name for i, name in enumerate(task["classes"])},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if (prep.modality or "").upper() == "CT" else "magnitude",
                    "modality": prep.modality or "other",
                    "num_channels": prep.channels,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(task["classes"]),
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): name for i, name in enumerate(task["classes"])},
                }
            },
        },
        "lorkd_pl": {"card": card.to_dict()},
    }


def write_bundle(work: Path, backbone: nn.Module, head: nn.Module, card: ExpertCard, head_in: int) -> None:
    """Write the bundle of a checked card into the (temporary) folder ``work``."""
    (work / "configs").mkdir(parents=True)
    (work / "models").mkdir()
    (work / "docs").mkdir()
    network = bundle_network(backbone, head)
    torch.save(network.state_dict(), work / "models" / "model.pt")
    (work / "configs" / "inference.json").write_text(
        json.dumps(inference_config(card, head_in), indent=2) + "\n", encoding="utf-8"
    )
    (work / "configs" / "metadata.json").write_text(
        json.dumps(bundle_metadata(card), indent=2) + "\n", encoding="utf-8"
    )
    task = card.tasks[0]["name"]
    (work / "docs" / "README.md").write_text(
        f"""# lorkd-pl {card.name} expert as a MONAI bundle ({task})

Runs with MONAI and torch only (no lorkd-pl):

```bash
pip install torch "monai[nibabel,itk,fire]"   # itk: for .mha/.mhd, .nrrd and DICOM series folders
python -m monai.bundle run --config_file configs/inference.json --image /data/scan.nii.gz --output_dir out
```

(from this folder; elsewhere add `--bundle_root THIS_FOLDER`). Writes `out/<scan>_{task}.nii.gz`, the label
map in the input's own grid (classes: {", ".join(card.tasks[0]["classes"])}), equal to what
`lorkd-pl predict` writes for the same file. Preprocessing: {json.dumps(card.to_dict()["preprocessing"])}.
""",
        encoding="utf-8",
    )
