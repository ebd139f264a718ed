"""Untrusted files: pickled code is refused everywhere, checkpoints are written atomically, plugins
come only from the configured folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorkd_pl.app.cli import main
from lorkd_pl.app.lightning import lightning_cli
from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.data.plugins import load_plugins
from lorkd_pl.deploy.export import export_region
from lorkd_pl.io import checkpoints as checkpoint_io
from lorkd_pl.io.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.teacher.loading import TeacherError, load_teacher
from training_helpers import keep_built_clis, save_checkpoint, write_generalist_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LORKD_CLS = str(ROOT / "configs" / "demo" / "lorkd_cls.yaml")
CNN = {
    "class_path": "lorkd_pl.models.backbones.ConvNet2d",
    "init_args": {"in_channels": 1, "channels": [4, 8]},
}


class Payload:
    """Unpickling this runs ``Path(marker).touch()``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A Lightning-looking checkpoint carrying a code payload, and the marker the payload would create."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {}, "lorkd_pl_model": "LoRKDModule", "x": Payload(marker)},
        path,
    )
    return path, marker


@pytest.fixture(scope="module")
def student_checkpoint(tmp_path_factory) -> Path:
    data = MultiRegionDataModule(["demo_brain_cls", "demo_thorax_cls"], validate=False)
    student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=CNN, rank=2)
    return save_checkpoint(student, tmp_path_factory.mktemp("student") / "last.ckpt")


def test_payload_refused_by_every_loader(evil, tmp_path, capsys, monkeypatch) -> None:
    path, marker = evil
    with pytest.raises(CheckpointError, match=r"refused to load .*could run code"):
        load_checkpoint_file(path)
    with pytest.raises(TeacherError, match="refused to load"):
        load_teacher(path, [])
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(path), "--region", "brain", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "refused to load" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "predict",
                "--input",
                str(path),
                "--source",
                str(path),
                "--region",
                "brain",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert exit_info.value.code == 2 and "refused to load" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # resume / test through Lightning go through AtomicCheckpointIO
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", LORKD_CLS, "--model.init_args.teacher=null", "--ckpt_path", str(path)])
    assert isinstance(exit_info.value.__cause__, CheckpointError)
    assert "lorkd-pl: error: refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_payload_in_an_exported_folder_is_refused(student_checkpoint, tmp_path, capsys) -> None:
    folder = export_region(student_checkpoint, "brain", tmp_path / "brain")
    marker = tmp_path / "code-ran"
    torch.save({"backbone.x": Payload(marker)}, folder / "state_dict.pt")
    image = tmp_path / "x.png"
    image.touch()  # the expert is loaded (and refused) before any input is read
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--input", str(image), "--source", str(folder), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_checkpoint_names_the_file(student_checkpoint, tmp_path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(student_checkpoint.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt: the file is truncated"):
        load_checkpoint_file(truncated)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint_file(tmp_path / "missing.ckpt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def crash(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temporary file is gone


def test_sigkill_during_a_write_keeps_the_previous_checkpoint(tmp_path) -> None:
    script = f"""
import os, signal, torch
from lorkd_pl.io import checkpoints as checkpoint_io
io = checkpoint_io.AtomicCheckpointIO()
io.save_checkpoint({{"step": torch.tensor(1)}}, {str(tmp_path / "last.ckpt")!r})
def killed_mid_write(obj, target, *args, **kwargs):
    open(target, "wb").write(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint_io.torch.save = killed_mid_write
io.save_checkpoint({{"step": torch.tensor(2)}}, {str(tmp_path / "last.ckpt")!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert load_checkpoint_file(tmp_path / "last.ckpt")["step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(name.startswith(".tmp") for name in leftovers)  # hidden, not a checkpoint
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the next write removed them


def test_cli_trainer_uses_atomic_weights_only_io(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(["--config", LORKD_CLS, "--model.init_args.teacher=null"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_plugins_only_from_the_configured_folders(tmp_path, monkeypatch, clean_registry) -> None:
    marker = tmp_path / "imported"
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    configured, elsewhere = tmp_path / "tasks", tmp_path / "elsewhere"
    for folder in (configured / "nested", elsewhere):
        folder.mkdir(parents=True)
    (elsewhere / "evil.py").write_text(code)  # not configured
    (configured / "nested" / "evil.py").write_text(code)  # sub-folders are not scanned
    (configured / "_private.py").write_text(code)  # helpers starting with "_" are not imported
    (configured / "notes.py.txt").write_text(code)
    (configured / "good.py").write_text(
        f"from pathlib import Path\nPath({str(tmp_path / 'good')!r}).touch()\n"
    )
    monkeypatch.chdir(elsewhere)  # the working folder is never scanned either
    loaded = load_plugins([configured], use_entry_points=False)
    assert loaded == [str(configured / "good.py")]
    assert (tmp_path / "good").exists() and not marker.exists()
    monkeypatch.setenv("LORKD_PL_TASKS_DIR", os.fspath(tmp_path / "missing"))
    with pytest.raises(Exception, match="does not exist"):
        load_plugins(use_entry_points=False)


# ----------------------------------------------------------------------------- class names from files
def popen(marker: Path) -> dict:
    """A backbone config that, if built, runs a command creating ``marker``."""
    return {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}


def with_backbone(checkpoint: Path, backbone: dict, out: Path, **extra) -> Path:
    """A copy of ``checkpoint`` whose hyper-parameters name ``backbone`` (weights only: loadable)."""
    data = torch.load(checkpoint, weights_only=True)
    data["hyper_parameters"] = {**data["hyper_parameters"], "backbone": backbone, **extra}
    torch.save(data, out)
    return out


def fails_with(args: list[str], capsys, fragment: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lorkd-pl: error: ") and fragment in error, error


def test_a_class_path_payload_runs_through_no_entry_point(student_checkpoint, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "code-ran"
    crafted = with_backbone(student_checkpoint, popen(marker), tmp_path / "crafted.ckpt")
    untrusted = "names the class 'subprocess.Popen', which lorkd-pl will not import from a file"
    fails_with(
        ["export", "--ckpt", str(crafted), "--region", "brain", "--out", str(tmp_path / "x")],
        capsys,
        untrusted,
    )
    image = tmp_path / "x.png"
    image.touch()
    fails_with(
        [
            "predict",
            "--input",
            str(image),
            "--source",
            str(crafted),
            "--region",
            "brain",
            "--out",
            str(tmp_path / "p"),
        ],
        capsys,
        untrusted,
    )
    folder = export_region(student_checkpoint, "brain", tmp_path / "brain")  # an export whose card names it
    card = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**card, "backbone": popen(marker)}))
    fails_with(
        ["predict", "--input", str(image), "--source", str(folder), "--out", str(tmp_path / "p")],
        capsys,
        untrusted,
    )
    # a generalist teacher checkpoint naming it
    generalist = write_generalist_checkpoint(
        tmp_path / "teacher.ckpt", ["demo_brain_cls", "demo_thorax_cls"], CNN
    )
    crafted_teacher = with_backbone(generalist, popen(marker), tmp_path / "crafted_teacher.ckpt")
    with pytest.raises(TeacherError, match=r"subprocess\.Popen"):
        load_teacher(crafted_teacher, [])
    # --ckpt_path: neither its backbone nor its _class_path is honoured
    monkeypatch.chdir(tmp_path)
    config = [
        "--config",
        LORKD_CLS,
        "--model.init_args.teacher=null",
        "--data.init_args.tasks=[demo_brain_cls, demo_thorax_cls]",
    ]
    fails_with(["validate", *config, "--ckpt_path", str(crafted)], capsys, untrusted)
    swapped = with_backbone(
        student_checkpoint, CNN, tmp_path / "swapped.ckpt", _class_path="subprocess.Popen"
    )
    fails_with(
        ["validate", *config, "--ckpt_path", str(swapped)],
        capsys,
        "a checkpoint never changes the model class",
    )
    assert not marker.exists()


def test_trusted_modules_can_be_extended_by_the_user(student_checkpoint, tmp_path, monkeypatch) -> None:
    from lorkd_pl.deploy.networks import ExportError, load_student
    from lorkd_pl.io.trust import ENV_TRUSTED_MODULES

    backbone = {"class_path": "tests_trusted_nets.TinyNet", "init_args": {}}
    (tmp_path / "tests_trusted_nets.py").write_text(
        "import torch\nclass TinyNet(torch.nn.Module):\n"
        "    out_channels = 8\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = torch.nn.Conv2d(1, 8, 3)\n"
        "    def forward(self, x):\n        return self.conv(x).mean((2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    crafted = with_backbone(student_checkpoint, backbone, tmp_path / "mine.ckpt")
    with pytest.raises(ExportError, match=r"tests_trusted_nets\.TinyNet"):
        load_student(crafted)
    monkeypatch.setenv(ENV_TRUSTED_MODULES, "tests_trusted_nets")
    with pytest.raises(ExportError, match=r"weights do not match the network its hyper-parameters describe"):
        load_student(crafted)  # now it is built (and only then its weights are found not to fit)


UNET_NET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}


def bundle_folder(folder: Path) -> Path:
    """An empty MONAI bundle layout holding the weights of ``UNET_NET`` (write its inference.json)."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.save(
        __import__("monai").networks.nets.UNet(**UNET_NET).state_dict(), folder / "models" / "model.pt"
    )
    return folder


def test_bundle_expressions_and_untrusted_targets_are_refused(tmp_path, monkeypatch) -> None:
    from lorkd_pl.io.trust import ENV_TRUST_BUNDLE_CODE

    marker = tmp_path / "code-ran"
    net = {"_target_": "monai.networks.nets.UNet", **UNET_NET}
    bundle = bundle_folder(tmp_path / "bundle")
    cases = {
        "expression": {
            "touch": f"$__import__('pathlib').Path({str(marker)!r}).touch()",
            "network_def": {**net, "out_channels": "$@touch or 2"},
        },
        "target": {"network_def": {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}},
        "referenced target": {
            "evil": {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]},
            "network_def": {**net, "act": "@evil"},
        },
    }
    for name, config in cases.items():
        (bundle / "configs" / "inference.json").write_text(json.dumps(config))
        with pytest.raises(TeacherError, match=r"expression|subprocess\.Popen"):
            load_teacher(bundle, [])
        assert not marker.exists(), name
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": net}))
    assert load_teacher(bundle, []).network is not None  # a plain bundle loads
    monkeypatch.setenv(ENV_TRUST_BUNDLE_CODE, "1")  # the user's explicit trust
    (bundle / "configs" / "inference.json").write_text(json.dumps(cases["expression"]))
    load_teacher(bundle, [])
    assert marker.exists()


def test_names_that_look_trusted_but_are_not(student_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    """Attribute walks, training modules and downloads: each refused, no marker, no network."""
    marker = tmp_path / "code-ran"
    bundle = bundle_folder(tmp_path / "bundle")
    walks = {"_target_": "torch.nn.modules.module.torch.os.system", "command": f"touch {marker}"}
    for network_def, match in (
        (walks, "not a network class of a trusted module"),  # pydoc.locate would reach os.system
        (
            {
                "_target_": "UNet",
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [4, 8],
                "strides": [2],
                "_mode_": "debug",
            },
            "_requires_ or _mode_",
        ),
        (
            {
                "_target_": "DenseNet121",
                "spatial_dims": 2,
                "in_channels": 1,
                "out_channels": 2,
                "pretrained": True,
            },
            r"fetch weights \(pretrained=True\)",
        ),
    ):
        (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
        with pytest.raises(TeacherError, match=match):
            load_teacher(bundle, [])
    net = {"_target_": "UNet", **UNET_NET}
    (bundle / "configs" / "inference.json").write_text(
        json.dumps({"network_def": net})
    )  # MONAI's short names
    torch.save(
        __import__("monai").networks.nets.UNet(3, 1, 2, [4, 8], [2]).state_dict(),
        bundle / "models" / "model.pt",
    )
    assert type(load_teacher(bundle, []).network).__name__ == "UNet"

    # a trusted training module as a "backbone" could load a teacher of the file's choosing
    data = torch.load(student_checkpoint, weights_only=True)
    nested = {"class_path": "lorkd_pl.models.lorkd.LoRKDModule", "init_args": {"teacher": str(bundle)}}
    crafted = with_backbone(student_checkpoint, nested, tmp_path / "nested.ckpt")
    fails_with(
        ["export", "--ckpt", str(crafted), "--region", "brain", "--out", str(tmp_path / "x")],
        capsys,
        "training module",
    )
    # a teacher path recorded in a checkpoint is never loaded by export --dry-run
    data["teacher"] = {"path": str(bundle), "sha256": "x"}
    torch.save(data, tmp_path / "recorded.ckpt")
    loaded = []
    monkeypatch.setattr("lorkd_pl.deploy.export.load_teacher", lambda *a, **k: loaded.append(a))
    assert main(["export", "--ckpt", str(tmp_path / "recorded.ckpt"), "--dry-run"]) == 0
    assert loaded == [] and "pass --teacher PATH to count it" in capsys.readouterr().out
    assert not marker.exists()


def test_ckpt_path_never_chooses_the_teacher(student_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    data = torch.load(student_checkpoint, weights_only=True)
    data["hyper_parameters"] = {**data["hyper_parameters"], "teacher": str(tmp_path / "their_teacher.ckpt")}
    torch.save(data, tmp_path / "theirs.ckpt")
    monkeypatch.chdir(tmp_path)
    built = keep_built_clis(monkeypatch)
    args = [
        "validate",
        "--config",
        LORKD_CLS,
        "--model.init_args.teacher=null",
        "--model.init_args.rank=2",
        f"--model.init_args.backbone={json.dumps(CNN)}",  # the checkpoint's network
        "--trainer.limit_val_batches=2",
        "--data.init_args.tasks=[demo_brain_cls, demo_thorax_cls]",
        "--ckpt_path",
        str(tmp_path / "theirs.ckpt"),
    ]
    with pytest.raises(SystemExit):  # the packaged config trains a router; this checkpoint has none
        main(args)
    assert "trained without a region router" in capsys.readouterr().err
    args.insert(3, "--model.init_args.router_weight=0")
    assert main(args) == 0
    assert built[0].model.hparams.teacher is None  # the user's config, not the file


def test_bundle_references_are_followed_as_monai_resolves_them(tmp_path) -> None:
    """Relative references (``@#``, ``@##``, ``@::``, into lists, to the root) reach the same entries
    MONAI's own resolver reaches; each such entry is checked, so none of them runs."""
    marker = tmp_path / "code-ran"
    net = {"_target_": "monai.networks.nets.UNet", **UNET_NET}
    evil = {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}
    code = f"$__import__('pathlib').Path({str(marker)!r}).touch()"
    bundle = bundle_folder(tmp_path / "bundle")
    cases = {
        "up one level (@##)": {"evil": evil, "network_def": {**net, "act": "@##evil"}},
        "up one level (@::::)": {"evil": evil, "network_def": {**net, "act": "@::::evil"}},
        "an expression up one level": {"touch": code, "network_def": {**net, "act": "@##touch"}},
        "from a list": {"evil": evil, "network_def": {**net, "act": ["@###evil", {"inplace": True}]}},
        "up from a referenced entry (@##)": {
            "parts": {"evil": evil, "net": {**net, "act": "@##evil"}},
            "network_def": "@parts::net",
        },
        "up from a referenced entry (@::::)": {
            "parts": {"touch": code, "net": {**net, "act": "@::::touch"}},
            "network_def": "@parts#net",
        },
        "the root (@##)": {"evil": evil, "network_def": {**net, "act": "@##"}},
    }
    for name, config in cases.items():
        (bundle / "configs" / "inference.json").write_text(json.dumps(config))
        with pytest.raises(TeacherError, match=r"expression|subprocess\.Popen"):
            load_teacher(bundle, [])
        assert not marker.exists(), name
    for name, reference in (("a missing entry", "@##nowhere"), ("beyond the root", "@####evil")):
        config = {"evil": evil, "network_def": {**net, "act": reference}}
        (bundle / "configs" / "inference.json").write_text(json.dumps(config))
        with pytest.raises(TeacherError, match=r"reference"):
            load_teacher(bundle, [])
        assert not marker.exists(), name
    # a relative reference to plain data still loads, and MONAI resolves it to the same entry
    config = {"act": ["PRELU", {}], "net": {**net, "act": "@##act", "channels": "@#sizes", "sizes": [4, 8]}}
    config["network_def"] = "@net"
    config["net"].pop("sizes")
    config["sizes"] = [4, 8]
    config["net"]["channels"] = "@##sizes"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    network = load_teacher(bundle, []).network
    assert type(network).__name__ == "UNet" and tuple(network.channels) == (4, 8)
    assert any(isinstance(module, torch.nn.PReLU) for module in network.modules())  # "@##act"


def test_a_checkpoint_of_another_model_kind_is_refused(
    student_checkpoint, tmp_path, monkeypatch, capsys
) -> None:
    """A plain-KD checkpoint tested under a LoRKD config (or the reverse) would be reported as the
    configured kind: refused before anything is built, naming both and the fix."""
    data = torch.load(student_checkpoint, weights_only=True)
    data["hyper_parameters"] = {**data["hyper_parameters"], "experts": False}
    torch.save(data, tmp_path / "plain_kd.ckpt")
    monkeypatch.chdir(tmp_path)
    args = [
        "validate",
        "--config",
        LORKD_CLS,
        "--model.init_args.router_weight=0",
        "--model.init_args.rank=2",
        f"--model.init_args.backbone={json.dumps(CNN)}",
        "--trainer.limit_val_batches=1",
        "--data.init_args.tasks=[demo_brain_cls, demo_thorax_cls]",
    ]
    fails_with([*args, "--ckpt_path", str(tmp_path / "plain_kd.ckpt")], capsys, "experts=False")
    fails_with(
        [*args, "--model.init_args.experts=false", "--ckpt_path", str(student_checkpoint)],
        capsys,
        "experts=True",
    )
    other = {"class_path": "monai.networks.nets.BasicUNet", "init_args": {"spatial_dims": 2}}
    data["hyper_parameters"] = {**data["hyper_parameters"], "experts": True, "backbone": other}
    torch.save(data, tmp_path / "other_backbone.ckpt")
    fails_with([*args, "--ckpt_path", str(tmp_path / "other_backbone.ckpt")], capsys, "backbone.class_path")
    assert main([*args, "--ckpt_path", str(student_checkpoint)]) == 0  # the same kind still loads


def test_bundle_entries_that_monai_reads_anywhere_are_checked(tmp_path) -> None:
    """What MONAI parses and runs anywhere in the config (not only under network_def): an ``$import``
    of an unused entry, keys that alias another entry's id (``a::b``, ``#``, non-string YAML keys), a
    YAML alias rewritten in place, a class that downloads by default, a macro elsewhere — each refused,
    no marker, no download."""
    marker = tmp_path / "code-ran"
    net = {"_target_": "monai.networks.nets.UNet", **UNET_NET}
    evil = {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}
    bundle = bundle_folder(tmp_path / "bundle")
    json_cases = {
        "an unused $import": ({"unused": "$import this", "network_def": net}, "expression"),
        "a key holding '::'": (
            {"x": {"a::b": evil, "a": {"b": 2}}, "network_def": {**net, "out_channels": "@x::a::b"}},
            "not a plain name",
        ),
        "a key holding '#'": (
            {"x": {"y::k": {"z": evil}, "y": {"k#z": 1}}, "network_def": {**net, "act": "@x::y"}},
            "not a plain name",
        ),
        "a macro elsewhere": ({"other": "%missing.json::a", "network_def": net}, "loads another file"),
        "a network that downloads by default": (
            {
                "network_def": {
                    "_target_": "EfficientNetBN",
                    "model_name": "efficientnet-b0",
                    "spatial_dims": 2,
                }
            },
            "fetches weights by default",
        ),
    }
    for name, (config, match) in json_cases.items():
        (bundle / "configs" / "inference.json").write_text(json.dumps(config))
        with pytest.raises(TeacherError, match=match):
            load_teacher(bundle, [])
        assert not marker.exists(), name
    (bundle / "configs" / "inference.json").unlink()
    yaml_cases = {
        "non-string keys": f"x:\n  1: {{_target_: subprocess.Popen, args: [touch, {marker}]}}\n  '1': 2\n"
        "network_def: {_target_: monai.networks.nets.UNet, spatial_dims: 3, in_channels: 1,"
        " out_channels: '@x::1', channels: [4, 8], strides: [2]}\n",
        "an alias": f"evil: {{_target_: subprocess.Popen, args: [touch, {marker}]}}\n"
        "x:\n  inner: &net {_target_: monai.networks.nets.UNet, spatial_dims: 3, in_channels: 1,"
        " out_channels: 2, channels: [4, 8], strides: [2], act: '@##evil'}\n  evil: 2\nnetwork_def: *net\n",
    }
    for name, text in yaml_cases.items():
        (bundle / "configs" / "inference.yaml").write_text(text)
        with pytest.raises(TeacherError, match=r"not a plain name|two places"):
            load_teacher(bundle, [])
        assert not marker.exists(), name
    (bundle / "configs" / "inference.yaml").write_text("network_def: {unclosed")
    with pytest.raises(TeacherError, match="cannot be read"):
        load_teacher(bundle, [])
