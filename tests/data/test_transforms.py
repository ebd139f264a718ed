"""The 3D and 2D transform pipelines against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lorkd_pl.data.transforms import CT_WINDOW, MR_PERCENTILES, cls2d_transforms, seg3d_transforms


def write(path, array_zyx, spacing=(1.0, 1.0, 1.0), direction=None) -> str:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture
def volume(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 600, size=(6, 8, 10)).astype(np.float32)  # (z, y, x)
    label = (rng.random((6, 8, 10)) > 0.7).astype(np.uint8)
    return (
        {"image": write(tmp_path / "i.nii.gz", image), "label": write(tmp_path / "l.nii.gz", label)},
        image,
        label,
    )


def zscore(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / a.std()


def test_ct_window_then_zscore(volume) -> None:
    paths, image, label = volume
    out = seg3d_transforms(False, "CT", None, (4, 4, 4))(paths)
    # identity direction in LPS → RAS flips x and y: flip the oracle the same way
    expected = zscore(np.clip(image, *CT_WINDOW).T[::-1, ::-1, :])
    np.testing.assert_allclose(out["image"][0].numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["label"][0].numpy(), label.T[::-1, ::-1, :])
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.long


def test_mr_percentile_clip_then_zscore(volume) -> None:
    paths, image, _ = volume
    out = seg3d_transforms(False, "MR", None, (4, 4, 4))(paths)
    low, high = np.percentile(image, MR_PERCENTILES)
    expected = zscore(np.clip(image, low, high).T[::-1, ::-1, :])
    np.testing.assert_allclose(out["image"][0].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_resampling_to_target_spacing(tmp_path) -> None:
    image = np.zeros((10, 12, 12), np.float32)
    paths = {
        "image": write(tmp_path / "i.nii.gz", image, spacing=(1.0, 1.0, 3.0)),
        "label": write(tmp_path / "l.nii.gz", image.astype(np.uint8), spacing=(1.0, 1.0, 3.0)),
    }
    out = seg3d_transforms(False, "other", (2.0, 2.0, 1.5), (4, 4, 4))(paths)
    assert tuple(out["image"].shape) == (1, 6, 6, 19)  # 12 mm / 2, 12 mm / 2, 27 mm / 1.5 (+1)


def test_training_crops_patches_with_foreground(volume) -> None:
    paths, _, _ = volume
    transform = seg3d_transforms(True, "CT", None, (4, 4, 4))
    transform.set_random_state(0)
    crops = [transform(paths)[0] for _ in range(10)]
    assert all(tuple(c["image"].shape) == (1, 4, 4, 4) for c in crops)
    assert sum(int(c["label"].max()) for c in crops) >= 3  # positive:negative 1:1


def test_cls2d_arrays_and_channels() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 24)).astype(np.uint8)
    out = cls2d_transforms(False, (20, 24), channels=1)({"image": grey, "label": 2})
    np.testing.assert_allclose(out["image"][0].numpy(), zscore(grey / 255.0 * 1.0), rtol=1e-4, atol=1e-4)
    assert out["label"].dtype == torch.long and int(out["label"]) == 2
    rgb = rng.integers(0, 255, (20, 24, 3)).astype(np.uint8)
    out = cls2d_transforms(False, (10, 12), channels=1)({"image": rgb, "label": 0})
    assert tuple(out["image"].shape) == (1, 10, 12)
    out = cls2d_transforms(True, (16, 16), channels=3)({"image": grey, "label": 0})
    assert tuple(out["image"].shape) == (3, 16, 16)
    torch.testing.assert_close(out["image"][0], out["image"][2])


def _lateral_errors(samples, left: int, right: int) -> int:
    """Patches (RAS-oriented) whose ``left`` class lies on the patient's right of the ``right`` class."""
    wrong = 0
    for sample in samples:
        label = sample["label"][0]
        if (label == left).any() and (label == right).any():
            x_left = (label == left).nonzero()[:, 0].float().mean()
            x_right = (label == right).nonzero()[:, 0].float().mean()
            wrong += int(
                x_left > x_right
            )  # RAS: +x points to the patient's right, a left organ has smaller x
    return wrong


def test_left_right_flips_swap_mirrored_classes_and_default_flips_nothing(demo_root) -> None:
    import torch

    from lorkd_pl.data.transforms import seg3d_transforms
    from lorkd_pl.registry import get_task

    task = get_task("demo_thorax_seg")
    assert task.flip_axes == ()  # the default never flips
    left, right = task.classes.index("lung_left"), task.classes.index("lung_right")
    records = task.records("train")

    def patches(flip_axes, pairs, seed):
        transform = seg3d_transforms(True, "CT", task.spacing, task.patch_size, 0.5, flip_axes, pairs)
        transform.set_random_state(seed=seed)
        out = []
        for record in records:
            for _ in range(4):
                out += transform(dict(record))
        return out

    assert _lateral_errors(patches((), (), 0), left, right) == 0  # the anatomy as acquired
    assert _lateral_errors(patches((0,), (), 0), left, right) > 0  # oracle: a bare flip corrupts it
    assert _lateral_errors(patches((0, 1, 2), [(left, right)], 0), left, right) == 0  # mirrored: correct
    flipped = patches((0,), [(left, right)], 1)
    assert any(bool((s["label"] == left).any()) for s in flipped) and torch.is_tensor(flipped[0]["label"])


def test_a_left_right_flip_needs_mirror_pairs(clean_registry) -> None:
    import pytest

    from lorkd_pl.registry import TaskSpec

    base = {
        "name": "t",
        "region": "thorax",
        "kind": "seg3d",
        "classes": ("bg", "lung_left", "lung_right"),
        "records": lambda split: [],
    }
    with pytest.raises(ValueError, match=r"would put \['lung_left', 'lung_right'\] on the wrong side"):
        TaskSpec(**base, flip_axes=(0,))
    TaskSpec(**base, flip_axes=(0,), mirror_pairs=(("lung_left", "lung_right"),))
    TaskSpec(**base, flip_axes=(2,))  # superior-inferior: no lateral meaning, allowed when declared
    with pytest.raises(ValueError, match="mirror_pairs must be pairs of two different classes of its own"):
        TaskSpec(**base, flip_axes=(0,), mirror_pairs=(("lung_left", "heart"),))


def test_augmentations_move_image_label_and_teacher_together() -> None:
    from monai.data import MetaTensor

    from lorkd_pl.checks import check_augment
    from lorkd_pl.data.transforms import seg3d_augmentations

    augment = check_augment({**check_augment("mild", "t"), "prob": 1.0, "rotate": 25, "scale": 0.3}, "t")
    transform = __import__("monai").transforms.Compose(seg3d_augmentations(augment))
    transform.set_random_state(seed=3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))
    label = ((grid[0] > 8).long() + (grid[1] > 14).long() * 2)[None]  # values 0..3 in blocks
    teacher = torch.nn.functional.one_hot(label[0], 4).permute(3, 0, 1, 2).float() * 10
    sample = {"image": MetaTensor(grid[:1] / 24), "label": MetaTensor(label), "teacher": MetaTensor(teacher)}
    out = transform(dict(sample))
    moved = out["label"][0].long()
    assert set(moved.unique().tolist()) <= {0, 1, 2, 3}  # nearest: no new label values
    assert not torch.equal(moved, label[0])  # the affine happened
    agreement = (out["teacher"].argmax(0) == moved).float().mean()
    assert agreement > 0.97  # the target moved with the label (bilinear blur at boundaries only)
    assert not torch.allclose(out["image"], sample["image"])  # intensity augmentations applied
    transform.set_random_state(seed=3)
    again = transform(dict(sample))
    torch.testing.assert_close(again["image"].as_tensor(), out["image"].as_tensor())  # seeded


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ("strong", "unknown preset 'strong'"),
        ({"gama": [0.7, 1.5]}, "unknown keys \\['gama'\\]"),
        ({"gamma": [1.5, 0.7]}, "augment.gamma must be \\[low, high\\] gamma range"),
        ({"rotate": 90}, "augment.rotate must be the largest rotation in degrees"),
        ({"prob": 0}, "augment.prob must be the probability"),
    ],
)
def test_bad_augmentations_name_the_field(augment, message) -> None:
    from lorkd_pl.checks import check_augment

    with pytest.raises(ValueError, match=message):
        check_augment(augment, "task 'x': augment")


def test_tasks_and_the_data_module_take_augmentations(clean_registry, demo_root) -> None:
    from dataclasses import replace

    from lorkd_pl.data.datamodule import MultiRegionDataModule
    from lorkd_pl.registry import get_task, register_task

    with pytest.raises(ValueError, match="augment applies to seg3d tasks"):
        replace(get_task("demo_brain_cls"), name="aug_cls", augment="mild")
    register_task(replace(get_task("demo_brain_seg"), name="aug_seg", augment={"noise": 0.5, "prob": 1.0}))
    plain = MultiRegionDataModule(["demo_brain_seg"], validate=False)
    noisy = MultiRegionDataModule(["aug_seg"], validate=False)
    every = MultiRegionDataModule(
        ["demo_brain_seg"], validate=False, augmentations={"noise": 0.5, "prob": 1.0}
    )
    images = []
    for data in (plain, noisy, every):
        data.setup("fit")
        images.append(next(iter(data.train_dataloader()))["image"])
    # the same crops (seeded), with noise (std drawn in [0, 0.5] per sample) where augmentations are on
    for noisy_images in images[1:]:
        difference = (noisy_images - images[0]).std()
        assert 0.05 < float(difference) <= 0.5
    torch.testing.assert_close(images[1], images[2])  # the task's own = the data module's, same seed
    with pytest.raises(ValueError, match=r"data.init_args.augmentations: unknown preset"):
        MultiRegionDataModule(["demo_brain_seg"], augmentations="heavy")
