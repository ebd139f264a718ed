"""Bad input fails before training, with the file, the field and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.data.formats import DatasetFormatError
from lorkd_pl.data.taskspec import load_task_spec
from lorkd_pl.data.validation import DataValidationError, validate_task
from lorkd_pl.registry import RegistryError, register_task


def write_volume(path, array, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def make_task(tmp_path, defect: str | None = None):
    image = np.random.default_rng(0).normal(size=(4, 6, 6)).astype(np.float32)
    label = np.zeros((4, 6, 6), dtype=np.uint8)
    label[1:3, 2:4, 2:4] = 1
    label_kwargs = {}
    if defect == "size":
        label = label[:, :5]
    elif defect == "geometry":
        label_kwargs["origin"] = (5.0, 0.0, 0.0)
    elif defect == "label_values":
        label[0, 0, 0] = 7
    elif defect == "nan":
        image[0, 0, 0] = np.nan
    elif defect == "dimension":
        image, label = image[0], label[0]
    suffix = ".mha" if defect == "nan" else ".nii.gz"  # ITK's NIfTI reader turns NaN into 0
    write_volume(tmp_path / f"img{suffix}", image)
    write_volume(tmp_path / f"lab{suffix}", label, **label_kwargs)
    if defect == "corrupt":
        (tmp_path / "img.nii.gz").write_bytes((tmp_path / "img.nii.gz").read_bytes()[:60])
    row = {"image": f"img{suffix}", "label": f"lab{suffix}", "region": "brain", "split": "train"}
    if defect == "missing":
        row["image"] = "nope.nii.gz"
    (tmp_path / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "task.yaml").write_text(
        "name: bad_task\nregion: brain\nkind: seg3d\nclasses: [background, lesion]\n"
        "manifest: manifest.jsonl\n"
        "patch_size: [4, 4, 4]\n"
    )
    return load_task_spec(tmp_path / "task.yaml")


def test_good_task_passes(tmp_path) -> None:
    records = validate_task(make_task(tmp_path), ["train"])
    assert len(records["train"]) == 1


@pytest.mark.parametrize(
    ("defect", "match"),
    [
        ("missing", r"manifest.jsonl, row 1: field 'image': image file not found: .*nope.nii.gz"),
        ("corrupt", r"field 'image': cannot read image .*img.nii.gz: the file is (corrupt|truncated)"),
        ("size", r"has size \(6, 6, 4\) but label .* has \(6, 5, 4\); resample the label"),
        ("geometry", r"disagree on origin .*the label must share the image's geometry"),
        ("label_values", r"field 'label' .* has values \[7\] outside the task's classes 0..1"),
        ("nan", r"field 'image' .* contains NaN or infinite voxels"),
        ("dimension", r"field 'image' .* is 2D; a seg3d task needs 3D"),
    ],
)
def test_bad_records_are_named(tmp_path, defect, match) -> None:
    with pytest.raises(DataValidationError, match=match):
        validate_task(make_task(tmp_path, defect), ["train"])


def test_datamodule_validates_before_training(tmp_path, clean_registry) -> None:
    register_task(make_task(tmp_path, "label_values"))
    module = MultiRegionDataModule(["bad_task"], batch_size=1)
    with pytest.raises(DataValidationError, match="task 'bad_task'"):
        module.setup("fit")


def test_empty_split_is_an_error(tmp_path, clean_registry) -> None:
    with pytest.raises(DataValidationError, match=r"has no 'val' samples; add rows with split='val'"):
        validate_task(make_task(tmp_path), ["val"])


def test_empty_manifest(tmp_path) -> None:
    make_task(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("")
    with pytest.raises(DatasetFormatError, match=r"manifest\.jsonl has no rows"):
        load_task_spec(tmp_path / "task.yaml").records("train")


def test_cls_label_out_of_range(tmp_path, clean_registry) -> None:
    arrays = {f"{s}_images": np.zeros((2, 8, 8), np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.array([[0], [3]]) for s in ("train", "val", "test")})
    np.savez(tmp_path / "d.npz", **arrays)
    (tmp_path / "t.yaml").write_text("name: c\nregion: spine\nkind: cls2d\nclasses: [a, b, c]\nnpz: d.npz\n")
    with pytest.raises(
        DataValidationError, match=r"\(train #1\): field 'label' is 3, outside the task's classes 0..2"
    ):
        validate_task(load_task_spec(tmp_path / "t.yaml"), ["train"])


def test_unknown_task_and_region_in_datamodule() -> None:
    with pytest.raises(RegistryError, match="unknown task 'demo_brian_seg'; did you mean 'demo_brain_seg'"):
        MultiRegionDataModule(["demo_brian_seg"])
    with pytest.raises(RegistryError, match="unknown region 'brian'"):
        MultiRegionDataModule(["demo_brain_seg"], region_weights={"brian": 2.0})
    with pytest.raises(ValueError, match="mixes task kinds"):
        MultiRegionDataModule(["demo_brain_seg", "demo_brain_cls"])


def many_cases_task(tmp_path, count: int, bad: tuple[int, ...] = ()):
    """A seg3d task of ``count`` cases; the cases in ``bad`` have a label value outside the classes."""
    rows = []
    for case in range(count):
        image = np.random.default_rng(case).normal(size=(4, 6, 6)).astype(np.float32)
        label = np.zeros((4, 6, 6), dtype=np.uint8)
        label[1, 2, 2] = 9 if case in bad else 1
        write_volume(tmp_path / f"img{case}.nii.gz", image)
        write_volume(tmp_path / f"lab{case}.nii.gz", label)
        rows.append(
            {"image": f"img{case}.nii.gz", "label": f"lab{case}.nii.gz", "region": "brain", "split": "train"}
        )
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return task_with_classes(tmp_path, 2)


def task_with_classes(folder, classes: int):
    """The task of ``folder``'s manifest with ``classes`` classes."""
    names = ", ".join(["background"] + [f"c{i}" for i in range(1, classes)])
    (folder / "task.yaml").write_text(
        f"name: many\nregion: brain\nkind: seg3d\nclasses: [{names}]\nmanifest: manifest.jsonl\n"
        "patch_size: [4, 4, 4]\n"
    )
    return load_task_spec(folder / "task.yaml")


@pytest.fixture
def counted_checks(monkeypatch):
    """The records the seg3d check reads, by image file name (the check itself runs unchanged)."""
    from lorkd_pl.data import validation

    seen: list[str] = []
    original = validation.validate_seg3d_record

    def counting(task, record):
        seen.append(Path(record["image"]).name)
        return original(task, record)

    monkeypatch.setattr(validation, "validate_seg3d_record", counting)
    # files written by the test a moment ago are remembered too (the rule for recent changes has its test)
    monkeypatch.setattr(validation, "RECENT_CHANGE_NS", -(10**12))
    return seen


def test_passed_records_are_checked_once_until_a_file_changes(tmp_path, counted_checks) -> None:
    from lorkd_pl.data.validation import PassedRecords

    task = many_cases_task(tmp_path, 5)
    memo_folder = tmp_path / "memo"
    validate_task(task, ["train"], workers=3, memo=PassedRecords(task, memo_folder))
    assert sorted(counted_checks) == [f"img{i}.nii.gz" for i in range(5)]
    counted_checks.clear()
    records = validate_task(task, ["train"], workers=3, memo=PassedRecords(task, memo_folder))
    assert counted_checks == [] and len(records["train"]) == 5  # every record still returned
    # a label replaced in place with its old size and modification time (what `cp -p` or `tar -x` do) is
    # a new record: its change time moved
    label = tmp_path / "lab3.nii.gz"
    content, stat = label.read_bytes(), label.stat()
    label.write_bytes(content)
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert label.stat().st_mtime_ns == stat.st_mtime_ns and label.stat().st_size == stat.st_size
    validate_task(task, ["train"], memo=PassedRecords(task, memo_folder))
    assert counted_checks == ["img3.nii.gz"]
    # another class list is another check (label values): every record again
    counted_checks.clear()
    wider = task_with_classes(tmp_path, 3)
    validate_task(wider, ["train"], memo=PassedRecords(wider, memo_folder))
    assert sorted(counted_checks) == [f"img{i}.nii.gz" for i in range(5)]


def test_a_failing_record_is_never_remembered_and_the_first_in_order_is_named(
    tmp_path, counted_checks
) -> None:
    from lorkd_pl.data.validation import PassedRecords

    task = many_cases_task(tmp_path, 6, bad=(2, 4))
    memo_folder = tmp_path / "memo"
    for workers in (1, 4):
        with pytest.raises(
            DataValidationError, match=r"manifest.jsonl, row 3: field 'label' .* values \[9\]"
        ):
            validate_task(task, ["train"], workers=workers, memo=PassedRecords(task, memo_folder))
    counted_checks.clear()
    with pytest.raises(DataValidationError, match=r"row 3: "):
        validate_task(task, ["train"], workers=1, memo=PassedRecords(task, memo_folder))
    assert counted_checks == ["img2.nii.gz"]  # rows 1 and 2 passed before the failure: remembered


def test_a_damaged_or_unwritable_memo_only_costs_a_check(tmp_path, counted_checks, monkeypatch) -> None:
    from lorkd_pl.data.validation import PassedRecords

    task = many_cases_task(tmp_path, 2)
    memo = PassedRecords(task, tmp_path / "memo")
    memo.path.parent.mkdir()
    damaged = [
        "{not json",
        '{"version": 1, "passed": 5}',
        '{"version": 1, "passed": null}',
        "[1]",
        "[" * 100000,
    ]
    for number, text in enumerate(damaged, 1):
        memo.path.write_text(text)
        validate_task(task, ["train"], memo=PassedRecords(task, tmp_path / "memo"))
        assert json.loads(memo.path.read_text())["version"] >= 1 and len(counted_checks) == 2 * number
    counted_checks.clear()
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.warns(
        UserWarning, match=r"cannot remember the checked records of task 'many' .*LORKD_PL_CACHE"
    ):
        validate_task(task, ["train"], memo=PassedRecords(task, blocked / "memo"))
    assert len(counted_checks) == 2
    monkeypatch.delenv("LORKD_PL_CACHE", raising=False)  # no cache folder at all: no home directory
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    with pytest.warns(UserWarning, match=r"no cache folder \(no home directory\)"):
        validate_task(task, ["train"], memo=PassedRecords(task))
    assert len(counted_checks) == 4


def test_the_datamodule_remembers_in_the_cache_folder(
    tmp_path, clean_registry, monkeypatch, counted_checks
) -> None:
    monkeypatch.setenv("LORKD_PL_CACHE", str(tmp_path / "cache"))
    register_task(many_cases_task(tmp_path, 3))
    MultiRegionDataModule(["many"], batch_size=1)._task_records(clean_registry.get_task("many"), "train")
    assert len(counted_checks) == 3 and len(list((tmp_path / "cache" / "validated").glob("many-*.json"))) == 1
    MultiRegionDataModule(["many"], batch_size=1)._task_records(clean_registry.get_task("many"), "train")
    assert len(counted_checks) == 3
    module = MultiRegionDataModule(["many"], batch_size=1, remember_validated=False)
    module._task_records(clean_registry.get_task("many"), "train")
    assert len(counted_checks) == 6


def test_what_identifies_a_record_without_reading_it(tmp_path) -> None:
    """A DICOM folder by every file in it; a two-file format (header + data) never: its data file can
    change under an unchanged header."""
    from lorkd_pl.data.validation import PassedRecords

    (tmp_path / "manifest.jsonl").write_text("")
    task = task_with_classes(tmp_path, 2)
    memo = PassedRecords(task, tmp_path / "memo")
    series = tmp_path / "series"
    series.mkdir()
    for k in range(3):
        (series / f"slice{k}.dcm").write_bytes(bytes([k]) * 10)
    (tmp_path / "lab.nii.gz").write_bytes(b"x")
    record = {"image": str(series), "label": str(tmp_path / "lab.nii.gz")}
    before = memo.key(record)
    assert before is not None and memo.key(dict(record)) == before
    slice_file = series / "slice1.dcm"  # one slice rewritten in place: the folder's own time stays
    slice_file.write_bytes(b"y" * 11)
    assert memo.key(record) != before
    rewritten = memo.key(record)
    stat = slice_file.stat()  # same size, a later time (a clock's tick: set here, not waited for)
    os.utime(slice_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert memo.key(record) != rewritten
    (tmp_path / "img.mhd").write_text("ElementDataFile = img.raw\n")
    assert memo.key({"image": str(tmp_path / "img.mhd"), "label": str(tmp_path / "lab.nii.gz")}) is None
    assert memo.key({"image": str(tmp_path / "missing.nii.gz"), "label": 1}) is None
    assert memo.key({"image": str(tmp_path / "lab.nii.gz"), "label": 1}) != memo.key(
        {"image": str(tmp_path / "lab.nii.gz"), "label": 2}
    )
    # .mha and .nrrd: remembered only when the header holds the data itself
    label = str(tmp_path / "lab.nii.gz")
    for name, header, rememberable in [
        ("a.mha", "NDims = 3\nElementDataFile = LOCAL\n", True),
        ("b.mha", "NDims = 3\nElementDataFile = b.raw\n", False),
        ("c.mha", "NDims = 3\n", False),
        ("d.nrrd", "NRRD0004\ntype: float\nencoding: raw\n\n", True),
        ("e.nrrd", "NRRD0004\ntype: float\ndata file: e.raw\n\n", False),
        ("f.nrrd", "NRRD0004\ntype: float\ndatafile: e.raw\n\n", False),
    ]:
        (tmp_path / name).write_bytes(header.encode() + b"\x00" * 8)
        assert (memo.key({"image": str(tmp_path / name), "label": label}) is not None) == rememberable, name


def test_a_file_changed_just_before_the_checks_is_not_remembered(tmp_path) -> None:
    """A change within a coarse file-system clock's tick of the check could leave the times unchanged by a
    second change: such files are checked again next time."""
    from lorkd_pl.data.validation import PassedRecords

    task = many_cases_task(tmp_path, 2)
    validate_task(task, ["train"], memo=PassedRecords(task, tmp_path / "memo"))
    assert PassedRecords(task, tmp_path / "memo").known == set()
