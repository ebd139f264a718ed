"""nnU-Net v2's own tools, as the oracle of lorkd-pl's nnU-Net teacher (run as a subprocess: nnU-Net reads
its folders from environment variables at import).

    python tests/nnunet_oracle.py build ROOT   # raw dataset -> plan -> preprocess -> a short training
    python tests/nnunet_oracle.py predict MODEL_FOLDER OUT FOLDS IMAGE...   # nnU-Net's own predictor

``build`` writes a small CT-like dataset (one channel "CT", zero outside the body so nnU-Net crops,
spacings that differ per case and are anisotropic along the FILE's first axis, so nnU-Net transposes
and resamples each slice on its own), then runs nnU-Net's fingerprint extraction, experiment planning
and preprocessing (3d_fullres) and ``nnUNetTrainer.run_training`` for one short epoch on the CPU. The
trained-model folder is ``ROOT/results/Dataset501_Toy/nnUNetTrainer__nnUNetPlans__3d_fullres``; a
``fold_1`` is fold 0's checkpoint with every weight scaled by 0.9 (two folds to average). Unseen cases
are written to ``ROOT/unseen/`` with their labels.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATASET_ID, DATASET = 501, "Dataset501_Toy"
LABELS = {"background": 0, "liver": 1, "spleen": 2}


def phantom(
    seed: int, spacing: tuple[float, float, float], shape=(12, 44, 40)
) -> tuple[np.ndarray, np.ndarray]:
    """A body (an ellipse of soft tissue, zero outside) holding a liver and a spleen; arrays in the
    file's (x, y, z) order; the organs' size in mm is the same at every spacing."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(
        *[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"
    )
    x, y, z = grid
    body = (y / 17) ** 2 + (z / 15) ** 2 <= 1
    image = np.where(body, 40.0, 0.0) + np.where(body, rng.normal(0, 12, shape), 0)
    centre = rng.uniform(-3, 3, 3)
    liver = ((x - centre[0]) / 14) ** 2 + ((y - 5 - centre[1]) / 8) ** 2 + ((z - centre[2]) / 7) ** 2 <= 1
    spleen = ((x + centre[0]) / 10) ** 2 + ((y + 8 + centre[1]) / 5) ** 2 + ((z + 4) / 5) ** 2 <= 1
    label = np.zeros(shape, np.uint8)
    label[liver & body] = 1
    label[spleen & body & ~liver] = 2
    image[label == 1] += 60
    image[label == 2] += 110
    return image.astype(np.float32), label


def write(array: np.ndarray, spacing, path: Path) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))  # sitk wants (z, y, x)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin((-12.0, 30.0, 5.0))
    sitk.WriteImage(image, str(path))


def build(root: Path) -> None:
    raw, pre, results = root / "raw", root / "preprocessed", root / "results"
    for folder in (raw, pre, results):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(results))
    os.environ["NNUNET_N_PROC_DA"] = "1"  # the planner sets its torch threads to this
    data = raw / DATASET
    (data / "imagesTr").mkdir(parents=True, exist_ok=True)
    (data / "labelsTr").mkdir(parents=True, exist_ok=True)
    spacings = [(3.0, 0.8, 0.8), (2.5, 0.9, 0.8), (3.5, 0.8, 0.9), (3.0, 0.75, 0.75), (3.0, 0.85, 0.85)]
    for i, spacing in enumerate(spacings):
        image, label = phantom(i, spacing)
        write(image, spacing, data / "imagesTr" / f"toy_{i:03d}_0000.nii.gz")
        write(label, spacing, data / "labelsTr" / f"toy_{i:03d}.nii.gz")
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": len(spacings),
        "file_ending": ".nii.gz",
    }
    (data / "dataset.json").write_text(json.dumps(dataset))
    unseen = root / "unseen"
    unseen.mkdir(exist_ok=True)
    # two at spacings of their own (the teacher's grid is tested), two at the training median (a
    # student's grid that equals the image's: Dice comparable with nnU-Net's own)
    for i, spacing in (
        (100, (2.0, 0.9, 0.9)),
        (101, (4.0, 0.7, 0.75)),
        (102, (3.0, 0.8, 0.8)),
        (103, (3.0, 0.8, 0.8)),
    ):
        image, label = phantom(i, spacing, shape=(10, 48, 44))
        write(image, spacing, unseen / f"toy_{i}_0000.nii.gz")
        write(label, spacing, unseen / f"toy_{i}_label.nii.gz")

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(0)
    torch.set_num_threads(1)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,))
    os.environ["NNUNET_N_PROC_DA"] = "0"  # augmentation in this process
    trainer = get_trainer_from_args(
        str(DATASET_ID), "3d_fullres", 0, "nnUNetTrainer", device=torch.device("cpu")
    )
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 25, 1
    trainer.initial_lr = 0.01
    trainer.run_training()
    model = results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = {
        k: v * 0.9 if v.is_floating_point() else v for k, v in checkpoint["network_weights"].items()
    }
    (model / "fold_1").mkdir(exist_ok=True)
    torch.save(checkpoint, model / "fold_1" / "checkpoint_final.pth")


def predict(model: Path, out: Path, folds: str, images: list[str]) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(1)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model), use_folds=tuple(folds.split(",")))
    out.mkdir(parents=True, exist_ok=True)
    outputs = [str(out / Path(i).name.replace("_0000.nii.gz", "")) for i in images]
    predictor.predict_from_files_sequential([[i] for i in images], outputs, save_probabilities=True)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "build":
        build(Path(sys.argv[2]))
    elif command == "predict":
        predict(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5:])
    else:
        raise SystemExit(f"unknown command {command!r}")
