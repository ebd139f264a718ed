"""Export of a region's merged expert: equal outputs, plain size, atomic folder, loads without lorkd-pl."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorkd_pl.app.cli import main
from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.deploy.export import export_region
from lorkd_pl.deploy.folders import load_exported
from lorkd_pl.deploy.networks import ExpertNetwork, ExportError, load_student
from lorkd_pl.models.backbones import build_module, count_parameters, make_head
from lorkd_pl.models.lorkd import LoRKDModule
from training_helpers import save_checkpoint

CNN = {
    "class_path": "lorkd_pl.models.backbones.ConvNet2d",
    "init_args": {"in_channels": 1, "channels": [4, 8]},
}
TASKS = ["demo_brain_cls", "demo_thorax_cls", "demo_abdomen_cls"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    data = MultiRegionDataModule(TASKS, validate=False)
    torch.manual_seed(0)
    student = LoRKDModule(
        task_info=data.task_info,
        regions=data.region_names,
        backbone=CNN,
        rank={"abdomen": 2, "brain": 3, "thorax": 4},
    )
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("expert_B"):
                p.normal_(0, 0.2)  # experts differ from W0
    student.eval()
    return save_checkpoint(student, tmp_path_factory.mktemp("ckpt") / "last.ckpt"), student


def test_exported_network_equals_the_student(checkpoint, tmp_path) -> None:
    path, student = checkpoint
    x = torch.randn(5, 1, 28, 28)
    for region in student.regions:
        out = export_region(path, region, tmp_path / region)
        program = torch.export.load(str(out / "model.pt2")).module()
        metadata = json.loads((out / "metadata.json").read_text())
        outputs = program(x)
        for task in metadata["tasks"]:
            index = [t["name"] for t in student.tasks].index(task["name"])
            with torch.no_grad():
                expected = student.task_logits(x, index)
            torch.testing.assert_close(outputs[task["output_index"]], expected, rtol=1e-5, atol=1e-6)
        heads = [make_head("cls2d", 8, len(t["classes"])) for t in metadata["tasks"]]
        rebuilt = ExpertNetwork(build_module(metadata["backbone"]), heads).eval()
        rebuilt.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True))
        torch.testing.assert_close(rebuilt(x)[0], outputs[0], rtol=1e-5, atol=1e-6)
        loaded, _ = load_exported(out)  # what lorkd-pl predict uses: no program unpickling
        for got, want in zip(loaded(x), outputs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert metadata["parameters"] == student.expert_free_parameters + sum(
            count_parameters(student.heads[[t["name"] for t in student.tasks].index(t["name"])])
            for t in metadata["tasks"]
        )
        assert metadata["parameters"] == count_parameters(rebuilt)
        assert len(metadata["source_checkpoint"]["sha256"]) == 64


def test_export_loads_with_plain_pytorch(checkpoint, tmp_path) -> None:
    path, _ = checkpoint
    out = export_region(path, "brain", tmp_path / "brain")
    code = (
        "import sys, torch\n"
        f"m = torch.export.load({str(out / 'model.pt2')!r}).module()\n"
        "y = m(torch.randn(3, 1, 28, 28))\n"
        "assert y[0].shape == (3, 3), y[0].shape\n"
        "assert not [k for k in sys.modules if k.startswith(('lorkd_pl', 'monai'))]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_atomic_and_no_overwrite(checkpoint, tmp_path, monkeypatch) -> None:
    path, _ = checkpoint
    out = export_region(path, "thorax", tmp_path / "thorax")
    with pytest.raises(ExportError, match="--overwrite"):
        export_region(path, "thorax", out)
    before = (out / "metadata.json").read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_region(path, "thorax", out, overwrite=True)
    assert (out / "metadata.json").read_text() == before  # the previous export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thorax"]  # no temporary folder left


def test_errors_and_dry_run(checkpoint, tmp_path, capsys) -> None:
    path, student = checkpoint
    with pytest.raises(ExportError, match=r"unknown region 'spine'; this checkpoint's regions are"):
        export_region(path, "spine", tmp_path / "x")
    not_lorkd = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, not_lorkd)
    with pytest.raises(ExportError, match="not a LoRKD student checkpoint"):
        load_student(not_lorkd)
    assert main(["export", "--ckpt", str(path), "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert f"| merged expert: brain | {student.expert_free_parameters + 27:,} |" in report
    assert main(["export", "--ckpt", str(path), "--all-regions", "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(student.regions)
    on_disk = (tmp_path / "all" / "brain" / "state_dict.pt").stat().st_size / 2**20
    assert f"| {on_disk:.2f} MiB (state_dict.pt) |" in report.split("merged expert: brain")[1].splitlines()[0]


def test_all_regions_checks_every_target_before_writing(checkpoint, tmp_path, capsys) -> None:
    path, _ = checkpoint
    (tmp_path / "all" / "thorax").mkdir(parents=True)  # one target exists: nothing may be written
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(path), "--all-regions", "--out", str(tmp_path / "all")])
    assert exit_info.value.code == 2
    assert "thorax exist(s); nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["thorax"]  # no partial set
    assert not any((tmp_path / "all" / "thorax").iterdir())


def test_export_accepts_tasks_dir_anywhere(checkpoint, tmp_path) -> None:
    path, _ = checkpoint
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    marker = tmp_path / "plugin_loaded"
    (folder / "export_marker.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    args = ["export", "--ckpt", str(path), "--tasks-dir", str(folder), "--region", "brain"]
    assert main([*args, "--out", str(tmp_path / "brain")]) == 0
    assert (tmp_path / "brain" / "metadata.json").is_file()
    assert marker.is_file()  # the folder's plugins were loaded before the export


def test_expert_card_round_trip_and_refusals(checkpoint, tmp_path) -> None:
    from lorkd_pl.deploy.card import CardError, ExpertCard

    path, student = checkpoint
    out = export_region(path, "brain", tmp_path / "brain")
    card = ExpertCard.from_json(out / "metadata.json")
    assert card.region == "brain" and card.model == "LoRKDModule" and card.kind == "cls2d"
    assert [t["name"] for t in card.tasks] == ["demo_brain_cls"] and card.tasks[0]["output_index"] == 0
    assert card.preprocessing.patch_size == [28, 28] and card.preprocessing.channels == 1
    assert card.preprocessing.sw_batch_size == student.hparams.sw_batch_size
    assert card.backbone == CNN and card.expert_free_backbone_parameters == student.expert_free_parameters
    card.to_json(tmp_path / "again.json")
    assert ExpertCard.from_json(tmp_path / "again.json") == card
    data = json.loads((out / "metadata.json").read_text())
    for broken, match in (
        ({**data, "format": 99}, "card format 99"),
        ({k: v for k, v in data.items() if k != "preprocessing"}, "malformed expert card"),
        ({**data, "tasks": [{"name": "x"}]}, r"tasks lack \['classes', 'output_index'\]"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(CardError, match=match):
            ExpertCard.from_json(tmp_path / "bad.json")


def test_an_export_from_before_the_card_still_loads(checkpoint, tmp_path) -> None:
    """lorkd-pl 0.1's first exports wrote metadata.json with an ``input`` block and no format."""
    path, _ = checkpoint
    out = export_region(path, "brain", tmp_path / "brain")
    card = json.loads((out / "metadata.json").read_text())
    first_layout = {
        "region": "brain",
        "kind": "cls2d",
        "tasks": [
            {"name": t["name"], "classes": t["classes"], "output_index": t["output_index"]}
            for t in card["tasks"]
        ],
        "input": {
            "channels": 1,
            "patch_size": [28, 28],
            "orientation": None,
            "spacing": None,
            "modality": "MR",
            "intensity": "scale to [0, 1], resize to patch_size, z-score",
            "sliding_window": None,
        },
        "backbone": card["backbone"],
        "parameters": card["parameters"],
        "expert_free_backbone_parameters": card["expert_free_backbone_parameters"],
        "source_checkpoint": card["source_checkpoint"],
        "versions": card["versions"],
    }
    (out / "metadata.json").write_text(json.dumps(first_layout))
    network, loaded = load_exported(out)
    assert loaded.region == "brain" and loaded.preprocessing.patch_size == [28, 28]
    assert loaded.tasks[0]["region"] == "brain" and loaded.parameters == card["parameters"]
    x = torch.randn(2, 1, 28, 28)
    program = torch.export.load(str(out / "model.pt2")).module()
    torch.testing.assert_close(network(x)[0], program(x)[0], rtol=1e-5, atol=1e-6)


def test_an_export_that_does_not_fit_on_the_disk_writes_nothing(checkpoint, tmp_path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    path, _ = checkpoint
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError, match=r"not enough free space .* MiB needed, 0.0 MiB free"):
        export_region(path, "brain", tmp_path / "brain")
    assert list(tmp_path.iterdir()) == []


def test_3d_export_accepts_every_multiple_of_the_total_stride(tmp_path) -> None:
    """model.pt2 of a U-Net with strides (2, 2) runs windows other than the training patch and whole
    volumes (every size divisible by 2·2 = 4, the oracle), equal to the eager merged network, and
    refuses a size the network cannot take."""
    unet = {
        "class_path": "monai.networks.nets.UNet",
        "init_args": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8, 16], "strides": [2, 2],
        },
    }  # fmt: skip
    data = MultiRegionDataModule(["demo_brain_seg", "demo_thorax_seg"], validate=False)
    torch.manual_seed(0)
    student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=unet, rank=2).eval()
    path = save_checkpoint(student, tmp_path / "last.ckpt")
    out = export_region(path, "brain", tmp_path / "brain")
    card = json.loads((out / "metadata.json").read_text())
    assert card["preprocessing"]["spatial_multiple"] == 2 * 2
    assert "multiple of 4" in (out / "README.md").read_text()
    program = torch.export.load(str(out / "model.pt2")).module()
    eager, _ = load_exported(out)
    patch = card["preprocessing"]["patch_size"]
    assert patch != [44, 36, 28]
    for shape in ([1, 1, 44, 36, 28], [3, 1, *patch], [1, 1, 64, 64, 32]):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(program(x)[0], eager(x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match=r"[Gg]uard"):
        program(torch.randn(1, 1, 42, 36, 28))


def test_2d_export_accepts_any_image_size(checkpoint, tmp_path) -> None:
    path, student = checkpoint
    out = export_region(path, "brain", tmp_path / "brain")
    assert json.loads((out / "metadata.json").read_text())["preprocessing"]["spatial_multiple"] == 1
    program = torch.export.load(str(out / "model.pt2")).module()
    x = torch.randn(2, 1, 33, 47)
    with torch.no_grad():
        expected = student.task_logits(x, [t["name"] for t in student.tasks].index("demo_brain_cls"))
    torch.testing.assert_close(program(x)[0], expected, rtol=1e-5, atol=1e-6)


def test_spatial_multiple_is_a_divisor_of_the_accepted_sizes() -> None:
    """A U-Net with four 2× poolings takes sizes 16k + 8 from a 40 patch (56, 72 ...) but refuses 32, 48,
    64: no single multiple describes that, so the card says 0 (the patch only); from a 48 × 32 patch the
    accepted sizes are the multiples of 2⁴ = 16 (the oracle)."""
    from monai.networks.nets import BasicUNet

    from lorkd_pl.deploy.program import export_program

    class Tasks(torch.nn.Module):  # an exported network returns one output per task
        def __init__(self) -> None:
            super().__init__()
            self.net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 8, 4))

        def forward(self, x):
            return (self.net(x),)

    network = Tasks().eval()
    assert export_program(network, 1, (40, 40))[1] == 0
    program, multiple = export_program(network, 1, (48, 32))
    assert multiple == 16
    x = torch.randn(1, 1, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x)[0], network(x)[0], rtol=1e-4, atol=1e-5)


def test_overwrite_replaces_only_an_earlier_export(checkpoint, tmp_path, capsys) -> None:
    """--overwrite onto a run folder, a user's folder or file: refused with nothing touched; onto an
    earlier export: replaced. An export a user added a file to is no longer only an export."""
    path, _ = checkpoint
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"precious")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "patient.nii.gz").write_bytes(b"precious")
    note = tmp_path / "notes.txt"
    note.write_text("precious")
    for target in (run, scans, note):
        with pytest.raises(ExportError, match="never replaces other files"):
            export_region(path, "thorax", target, overwrite=True)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"precious"
    assert (scans / "patient.nii.gz").read_bytes() == b"precious" and note.read_text() == "precious"
    out = export_region(path, "thorax", tmp_path / "thorax")
    assert export_region(path, "thorax", out, overwrite=True) == out  # an earlier export: replaced
    (out / "my_notes.md").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(path), "--region", "thorax", "--out", str(out), "--overwrite"])
    assert exit_info.value.code == 2 and "never replaces other files" in capsys.readouterr().err
    assert (out / "my_notes.md").read_text() == "mine"
