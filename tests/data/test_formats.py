"""Manifests, MSD / nnU-Net dataset.json, MedMNIST npz and task-spec files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorkd_pl.data.formats import (
    DatasetFormatError,
    assign_split,
    read_decathlon,
    read_manifest,
    read_medmnist,
)
from lorkd_pl.data.taskspec import load_task_spec


def test_jsonl_and_csv_manifests_agree(tmp_path) -> None:
    rows = [
        {"image": "a/img1.nii.gz", "label": "a/lab1.nii.gz", "region": "brain", "split": "train"},
        {"image": "/abs/img2.nii.gz", "label": "/abs/lab2.nii.gz", "region": "brain", "case": "c2"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "m.csv").write_text(
        "image,label,region,split,case\na/img1.nii.gz,a/lab1.nii.gz,brain,train,\n"
        "/abs/img2.nii.gz,/abs/lab2.nii.gz,brain,,c2\n"
    )
    for name in ("m.jsonl", "m.csv"):
        records = read_manifest(tmp_path / name)
        assert records[0]["image"] == str(tmp_path / "a" / "img1.nii.gz")  # relative to the manifest
        assert records[0]["split"] == "train" and records[0]["case"] == "img1"
        assert records[1]["image"] == "/abs/img2.nii.gz"
        assert records[1]["split"] == assign_split("c2")
        assert records[1]["source"].endswith(f"{name}, row 2")


def test_split_assignment_is_deterministic_and_proportional() -> None:
    splits = [assign_split(f"case{i}") for i in range(2000)]
    assert splits == [assign_split(f"case{i}") for i in range(2000)]
    fractions = [splits.count(s) / len(splits) for s in ("train", "val", "test")]
    np.testing.assert_allclose(fractions, [0.7, 0.15, 0.15], atol=0.03)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "has no rows"),
        ('{"image": "x.nii.gz"}\n', r"row 1: missing field 'label'"),
        ('{"image": "x", "label": "y", "split": "training"}\n', "field 'split' is 'training'"),
        ("not json\n", "line 1: not valid JSON"),
    ],
)
def test_bad_manifests(tmp_path, content, match) -> None:
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(DatasetFormatError, match=match):
        read_manifest(tmp_path / "m.jsonl")


def test_missing_manifest_and_unknown_format(tmp_path) -> None:
    with pytest.raises(DatasetFormatError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(DatasetFormatError, match=r"use \.jsonl or \.csv"):
        read_manifest(tmp_path / "m.txt")


def test_msd_dataset_json(tmp_path) -> None:
    info = {
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "modality": {"0": "CT"},
        "training": [
            {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
            for i in range(5)
        ],
        "test": ["./imagesTs/liver_9.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    parsed = read_decathlon(tmp_path / "dataset.json")
    assert parsed["classes"] == ["background", "liver", "tumour"] and parsed["modality"] == "CT"
    assert len(parsed["records"]) == 5
    assert parsed["records"][0]["label"] == str(tmp_path / "labelsTr" / "liver_0.nii.gz")
    assert {r["split"] for r in parsed["records"]} <= {"train", "val", "test"}


def test_nnunet_v2_dataset_json(tmp_path) -> None:
    (tmp_path / "labelsTr").mkdir()
    for case in ("p1", "p2"):
        (tmp_path / "labelsTr" / f"{case}.nii.gz").touch()
    info = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "prostate": 1},
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    parsed = read_decathlon(tmp_path / "dataset.json")
    assert parsed["classes"] == ["background", "prostate"] and parsed["modality"] == "MR"
    assert parsed["records"][0]["image"] == str(tmp_path / "imagesTr" / "p1_0000.nii.gz")


def test_dataset_json_errors(tmp_path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DatasetFormatError, match="field 'labels' is missing"):
        read_decathlon(tmp_path / "dataset.json")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "2": "x"}, "training": []}))
    with pytest.raises(DatasetFormatError, match="without gaps"):
        read_decathlon(tmp_path / "dataset.json")


def test_medmnist_npz(tmp_path) -> None:
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = np.random.randint(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(n).reshape(-1, 1) % 2
    np.savez(tmp_path / "d.npz", **arrays)
    records = read_medmnist(tmp_path / "d.npz")
    assert [len(records[s]) for s in ("train", "val", "test")] == [5, 2, 3]
    assert records["test"][2]["label"] == 0 and records["test"][2]["image"].shape == (28, 28)
    np.savez(
        tmp_path / "bad.npz", train_images=arrays["train_images"], train_labels=arrays["train_labels"][:3]
    )
    with pytest.raises(DatasetFormatError, match="train_images has 5 entries but train_labels has 3"):
        read_medmnist(tmp_path / "bad.npz")


def test_task_spec_file_with_manifest_of_several_tasks(tmp_path) -> None:
    rows = [
        {
            "image": "i1.nii.gz",
            "label": "l1.nii.gz",
            "region": "brain",
            "task": "brain_seg",
            "split": "train",
        },
        {
            "image": "i2.nii.gz",
            "label": "l2.nii.gz",
            "region": "thorax",
            "task": "lung_seg",
            "split": "train",
        },
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "brain.yaml").write_text(
        "name: brain_seg\nregion: brain\nkind: seg3d\nclasses: [background, tissue]\n"
        "manifest: manifest.jsonl\n"
        "spacing: [1, 1, 2]\npatch_size: [8, 8, 4]\n"
    )
    spec = load_task_spec(tmp_path / "brain.yaml")
    assert spec.spacing == (1.0, 1.0, 2.0) and spec.patch_size == (8, 8, 4)
    assert [r["case"] for r in spec.records("train")] == ["i1"] and spec.records("val") == []
    (tmp_path / "other.yaml").write_text(
        "name: other\nregion: brain\nkind: seg3d\nclasses: [a, b]\nmanifest: manifest.jsonl\n"
    )
    with pytest.raises(
        DatasetFormatError, match=r"no rows with task 'other' \(its tasks: \['brain_seg', 'lung_seg'\]\)"
    ):
        load_task_spec(tmp_path / "other.yaml").records("train")


@pytest.mark.parametrize(
    ("field", "value", "spec_field"),
    [("region", "thorax", "region: brain"), ("modality", "CT", "modality: MR")],
)
def test_manifest_row_disagreeing_with_its_task_is_refused(tmp_path, field, value, spec_field) -> None:
    rows = [
        {"image": "i1.nii.gz", "label": "l1.nii.gz", "region": "brain", "modality": "mr", "split": "train"},
        {"image": "i2.nii.gz", "label": "l2.nii.gz", "region": "brain", "modality": "MR", "split": "val"},
    ]
    rows[1][field] = value
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "t.yaml").write_text(
        f"name: t\nregion: brain\nkind: seg3d\nclasses: [a, b]\nmanifest: manifest.jsonl\n{spec_field}\n"
    )
    spec = load_task_spec(tmp_path / "t.yaml")
    with pytest.raises(
        DatasetFormatError, match=rf"manifest.jsonl, row 2: {field} '{value}' disagrees with task 't'"
    ):
        spec.records("train")
    rows[1][field] = rows[0][field]  # agreeing rows (modality compared case-insensitively) pass
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert len(load_task_spec(tmp_path / "t.yaml").records("val")) == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: t\nregion: brain\nkind: seg3d\nclasses: [a, b]\n", "give exactly one of"),
        (
            "name: t\nregion: brain\nkind: cls2d\nclasses: [a, b]\nnpz: x.npz\nmetrics: [dice]\n",
            r"metrics \['dice'\] are not cls2d metrics; choose among \['accuracy', 'auroc'\]",
        ),
        (
            "name: t\nregion: brain\nkind: seg3d\nclasses: [a, b]\nnpz: x.npz\nspacnig: [1]\n",
            r"unknown field\(s\) \['spacnig'\]",
        ),
        (
            "name: t\nregion: brian\nkind: seg3d\nclasses: [a, b]\nnpz: x.npz\n",
            "unknown region 'brian'; did you mean 'brain'",
        ),
        ("region: brain\nkind: seg3d\nclasses: [a, b]\nnpz: x.npz\n", "missing field 'name'"),
        (
            "name: t\nregion: brain\nkind: seg3d\nclasses: [a, b]\nnpz: x.npz\npatch_size: big\n",
            "'patch_size' must be",
        ),
    ],
)
def test_bad_task_specs(tmp_path, text, match) -> None:
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(DatasetFormatError, match=match):
        load_task_spec(tmp_path / "t.yaml")


def test_fractional_npz_labels_are_refused(tmp_path) -> None:
    arrays = {f"{split}_images": np.zeros((3, 4, 4), np.uint8) for split in ("train", "val", "test")}
    arrays.update({f"{split}_labels": np.array([0.0, 1.0, 2.0]) for split in ("train", "val", "test")})
    arrays["val_labels"] = np.array([0.0, 1.5, 2.0])
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DatasetFormatError, match=r"val_labels\[1\] is 1.5, not a class index"):
        read_medmnist(tmp_path / "d.npz")
    arrays["val_labels"] = np.array([0.0, 1.0, 2.0])  # whole numbers stored as floats are fine
    np.savez(tmp_path / "d.npz", **arrays)
    assert [r["label"] for r in read_medmnist(tmp_path / "d.npz")["val"]] == [0, 1, 2]


def test_rows_lacking_the_task_column_are_not_dropped_silently(tmp_path) -> None:
    rows = [
        {"image": "i1.nii.gz", "label": "l1.nii.gz", "task": "brain_seg", "split": "train"},
        {"image": "i2.nii.gz", "label": "l2.nii.gz", "split": "train"},  # no task: it would vanish
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "t.yaml").write_text(
        "name: brain_seg\nregion: brain\nkind: seg3d\nclasses: [a, b]\nmanifest: manifest.jsonl\n"
    )
    with pytest.raises(DatasetFormatError, match=r"row 2 has no 'task' while other rows .* do \(1 row"):
        load_task_spec(tmp_path / "t.yaml").records("train")
