"""Outside foundation-model teachers: their own pipeline, their output convention, cached targets.

Stand-in teachers are built here (nothing is downloaded): a TorchScript network trained for a few
steps on whole demo brain volumes at 3 mm with its own intensity scaling (``x·0.002 − 1``), that
returns softmax PROBABILITIES and rejects inputs that are not multiples of 8; and a multi-label
network returning per-class sigmoids without a background channel.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from torch import nn

from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.data.readers import SimpleITKReader
from lorkd_pl.models.losses import kd_binary, kd_kl, kd_loss
from lorkd_pl.models.teacher.loading import TeacherError, load_teacher
from lorkd_pl.models.teacher.outputs import task_targets
from lorkd_pl.models.teacher.pipeline import prepare_targets
from lorkd_pl.models.teacher.spec import TeacherSpecError, parse_teacher
from lorkd_pl.registry import get_task

TASK = "demo_brain_seg"
CLASSES = ["background", "left_hemisphere", "right_hemisphere", "ventricles"]
TEACHER_SPACING = (3.0, 3.0, 3.0)
PATCH = (40, 40, 24)  # the demo's training crop
SCALE, SHIFT = 0.002, -1.0


class BrainTeacher(nn.Module):
    """A small 3D CNN ending in softmax; inputs must be multiples of 8 (as many foundation models)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(8, 8, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv3d(8, 4, 1),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] % 8 != 0 or x.shape[3] % 8 != 0 or x.shape[4] % 8 != 0:
            raise RuntimeError("BrainTeacher: input sizes must be multiples of 8")
        return self.net(x).softmax(1)


def own_pipeline() -> mt.Compose:
    """The teacher's own preprocessing as its authors would write it (MONAI, not lorkd-pl's code)."""
    return mt.Compose(
        [
            mt.LoadImaged(["image", "label"], reader=SimpleITKReader(), image_only=True),
            mt.EnsureChannelFirstd(["image", "label"]),
            mt.Orientationd(["image", "label"], axcodes="RAS", labels=None),
            mt.Spacingd(["image", "label"], pixdim=TEACHER_SPACING, mode=["bilinear", "nearest"]),
            mt.Lambdad("image", lambda x: x * SCALE + SHIFT),
            mt.DivisiblePadd(["image", "label"], k=8, method="end"),
        ]
    )


def own_prediction(network: nn.Module, record: dict) -> MetaTensor:
    """The teacher's label map in its own pipeline, ``(1, X, Y, Z)`` with its affine."""
    sample = own_pipeline()({"image": record["image"], "label": record["label"]})
    with torch.no_grad():
        probabilities = network(sample["image"][None].as_tensor())
    return MetaTensor(probabilities.argmax(1).float(), affine=sample["image"].affine)


@pytest.fixture(scope="module")
def brain_teacher(tmp_path_factory) -> dict:
    """The trained TorchScript teacher (file) and its network."""
    torch.manual_seed(0)
    records = get_task(TASK).records("train")
    samples = [own_pipeline()({"image": r["image"], "label": r["label"]}) for r in records]
    network = BrainTeacher()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    for step in range(60):
        sample = samples[step % len(samples)]
        logits = network.logits(sample["image"][None].as_tensor())
        loss = nn.functional.cross_entropy(logits, sample["label"].as_tensor().long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    path = tmp_path_factory.mktemp("teacher") / "brain_fm.pt"
    torch.jit.save(torch.jit.script(network), str(path))
    return {"path": path, "network": network}


def brain_spec(path, cache, **changes) -> dict:
    spec = {
        "path": str(path),
        "output": "probabilities",
        "classes": dict(zip(CLASSES, range(4), strict=True)),
        "spacing": list(TEACHER_SPACING),
        "intensity": {"normalize": "none", "scale": SCALE, "shift": SHIFT},
        "divisible": 8,
        "cache": str(cache),
    }
    return {**spec, **changes}


@pytest.fixture(scope="module")
def brain_data() -> MultiRegionDataModule:
    data = MultiRegionDataModule([TASK], augment=False, validate=False)
    data.setup("fit")
    return data


def test_cached_targets_reproduce_the_teachers_own_pipeline(brain_teacher, brain_data, tmp_path) -> None:
    spec = parse_teacher(brain_spec(brain_teacher["path"], tmp_path / "cache"))
    teacher = load_teacher(spec, brain_data.task_info)
    store, report = prepare_targets(teacher, spec, brain_data)
    assert (report.built, report.reused) == (8, 0)  # 6 train + 2 val cases, each once

    student = brain_data.preprocessing(get_task(TASK))
    nearest = mt.ResampleToMatch(mode="nearest")
    cached_agreement, live_agreement, foreground = [], [], []
    for record in brain_data.shard_records("train"):
        grid = student(dict(record))["image"]  # the student's preprocessed grid (2 x 2 x 3 mm, z-score)
        oracle = nearest(own_prediction(brain_teacher["network"], record), grid)[0].long()
        cached = store.load(record["case"])["teacher"][:4].argmax(0)
        cached_agreement.append((cached == oracle).float().mean())
        foreground.append((oracle > 0).float().mean())
        # live KD: the teacher on a training crop (40 x 40 x 24) in the student's preprocessing
        corner = [max((n - p) // 2, 0) for n, p in zip(grid.shape[1:], PATCH, strict=True)]
        crop = tuple(slice(c, c + p) for c, p in zip(corner, PATCH, strict=True))
        image = mt.SpatialPad(PATCH)(grid.as_tensor())[None]  # as the training pipeline pads
        padded = mt.SpatialPad(PATCH)(oracle[None])[0]
        live = teacher(image[(slice(None), slice(None), *crop)]).argmax(1)[0]
        live_agreement.append((live == padded[crop]).float().mean())
    cached_agreement = float(torch.stack(cached_agreement).mean())
    live_agreement = float(torch.stack(live_agreement).mean())
    print(
        "argmax agreement with the own-pipeline prediction: "
        f"cached {cached_agreement:.4f}, live {live_agreement:.4f}"
    )
    assert float(torch.stack(foreground).mean()) > 0.05  # the teacher predicts anatomy, not all background
    assert cached_agreement >= 0.98
    assert live_agreement < 0.9

    # a second build reuses every entry; a changed teacher file makes them stale: rebuilt, never reused
    assert prepare_targets(teacher, spec, brain_data)[1].reused == 8
    network = torch.jit.load(str(brain_teacher["path"]))
    changed = tmp_path / "changed.pt"
    torch.jit.save(network, str(changed))
    with open(changed, "ab") as handle:
        handle.write(b"\0")  # another file digest
    spec2 = parse_teacher(brain_spec(changed, tmp_path / "cache"))
    assert prepare_targets(load_teacher(spec2, brain_data.task_info), spec2, brain_data)[1].built == 8


# ----------------------------------------------------------------------------- output conventions
OUTPUTS = {
    "logits": lambda z: z,
    "probabilities": lambda z: z.softmax(1),
    "log_probabilities": lambda z: z.log_softmax(1),
}


@pytest.mark.parametrize("output", sorted(OUTPUTS))
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_of_a_student_equal_to_the_teacher_is_zero(output, temperature) -> None:
    z = torch.randn(2, 4, 5, 6, 7) * 3
    groups = [(0,), (1,), (2,), (3,)]
    target = task_targets(OUTPUTS[output](z), groups, output)
    assert float(kd_kl(z, target, temperature)) == pytest.approx(0.0, abs=1e-5)
    # the old behaviour, softmaxing probabilities again, is what a declared output avoids
    if output == "probabilities":
        double = task_targets(z.softmax(1), groups, "logits")
        assert float(kd_kl(z, double, temperature)) > 0.1


@pytest.mark.parametrize("output", ["sigmoid", "sigmoid_logits"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_of_a_student_equal_to_a_sigmoid_teacher_is_zero(output, temperature) -> None:
    z = torch.randn(2, 3, 4, 5, 6) * 3  # three independent foreground classes, no background channel
    raw = torch.sigmoid(z) if output == "sigmoid" else z
    background_derived = [(), (0,), (1,), (2,)]
    # exclusive: each class's logit is its log-odds against background -> a student [0, z] is exact
    exclusive = task_targets(raw, background_derived, output, "exclusive")
    student = torch.cat([torch.zeros_like(z[:, :1]), z], 1)
    assert float(kd_kl(student, exclusive, temperature)) == pytest.approx(0.0, abs=1e-4)
    # binary, one foreground class: the student's softmax marginal can equal the sigmoid exactly
    one = task_targets(raw[:, :1], [(), (0,)], output, "binary")
    torch.testing.assert_close(one[:, 0], -z[:, 0], atol=2e-4, rtol=1e-4)  # P(background) = 1 - p
    assert float(kd_binary(student[:, :2], one, temperature)) == pytest.approx(0.0, abs=1e-4)
    # binary, three classes: a teacher with its own background channel whose probabilities a softmax can
    # realise; a student with those marginals pays 0 at every temperature
    p = torch.randn(2, 4, 4, 5, 6).softmax(1)
    binary = task_targets(p, [(0,), (1,), (2,), (3,)], "sigmoid", "binary")
    assert float(kd_binary(p.log(), binary, temperature)) == pytest.approx(0.0, abs=1e-4)
    assert float(kd_binary(p.log().flip(1), binary, temperature)) > 0.01
    # a derived background is P(none of the classes) = prod(1 - p_k)
    q = torch.sigmoid(torch.randn(2, 3, 4, 5, 6))
    derived = task_targets(q, [(), (0,), (1,), (2,)], "sigmoid", "binary")
    torch.testing.assert_close(derived[:, 0], torch.logit(torch.prod(1 - q, 1), eps=0), atol=1e-4, rtol=1e-4)


def test_binary_kd_against_a_hand_computation() -> None:
    z = torch.tensor([[0.3, -1.0, 2.0]])  # student logits (1, 3)
    odds = torch.tensor([[0.5, -0.2, 1.5]])  # teacher log-odds
    tau = 2.0
    p = z.softmax(1)[0]
    expected = 0.0
    for k in range(3):
        s = torch.sigmoid(torch.logit(p[k]) / tau)
        t = torch.sigmoid(odds[0, k] / tau)
        expected += float(t * torch.log(t / s) + (1 - t) * torch.log((1 - t) / (1 - s)))
    assert float(kd_binary(z, odds, tau)) == pytest.approx(expected * tau**2, rel=1e-5)


def test_minus_infinity_targets_keep_kd_finite() -> None:
    raw = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    target = task_targets(raw, [(0,), (1,), (2,)], "log_probabilities")
    assert torch.isfinite(kd_kl(torch.randn(1, 3), target, 2.0))


def test_merged_sigmoid_classes_are_any_of_them() -> None:
    p = torch.tensor([[0.5, 0.2, 0.9]]).view(1, 3, 1)
    binary = task_targets(p, [(), (0, 1), (2,)], "sigmoid", "binary")
    expected = torch.tensor([1 - (1 - 0.5) * (1 - 0.2), 0.9])
    torch.testing.assert_close(torch.sigmoid(binary[0, 1:, 0]), expected, atol=1e-5, rtol=1e-5)
    background = (1 - 0.5) * (1 - 0.2) * (1 - 0.9)
    assert float(torch.sigmoid(binary[0, 0, 0])) == pytest.approx(background, abs=1e-5)


def test_output_declarations_are_checked_on_a_probe(tmp_path, brain_data) -> None:
    def scripted(module: nn.Module, name: str):
        path = tmp_path / name
        torch.jit.save(torch.jit.script(module), str(path))
        return path

    class Probabilities(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, -x, 2 * x, x * 0], 1).softmax(1)

    class Logits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, -x, 2 * x, x * 0], 1)

    probe = torch.randn(1, 1, 8, 8, 8)
    names = {"classes": dict(zip(CLASSES, range(4), strict=True))}
    tasks = brain_data.task_info
    as_logits = load_teacher(parse_teacher({"path": str(scripted(Probabilities(), "p.pt")), **names}), tasks)
    assert "look like probabilities" in as_logits.check_output(as_logits(probe))
    declared = {"path": str(scripted(Logits(), "l.pt")), "output": "probabilities", **names}
    teacher = load_teacher(parse_teacher(declared), tasks)
    with pytest.raises(TeacherError, match=r"sum to .* not 1; declare what it returns"):
        teacher.check_output(teacher(probe))
    sigmoid = load_teacher(parse_teacher({**declared, "output": "sigmoid"}), tasks)
    with pytest.raises(TeacherError, match="outside \\[0, 1\\]; declare output: sigmoid_logits"):
        sigmoid.check_output(sigmoid(probe))
    logits = load_teacher(parse_teacher({**declared, "output": "logits"}), tasks)
    assert logits.check_output(logits(probe)) is None
    narrow = load_teacher(parse_teacher({**declared, "output": "logits"}), tasks)
    with pytest.raises(TeacherError, match="outputs 1 channels, but the class mapping points"):
        narrow.check_output(probe)  # a 1-channel output for a 4-class mapping


def test_rejected_input_sizes_name_the_sizes_that_work(brain_teacher, brain_data) -> None:
    teacher = load_teacher(parse_teacher({"path": str(brain_teacher["path"]), "output": "probabilities"}), [])
    with pytest.raises(TeacherError) as error:
        teacher(torch.zeros(1, 1, 20, 20, 12))
    message = str(error.value)
    assert "rejected an input of size 20x20x12" in message and "multiples of 8" in message
    assert "it accepts inputs of 16^3, 24^3, 32^3, 48^3, 64^3" in message and "teacher.divisible" in message


def test_class_names_the_teacher_lacks(brain_teacher, brain_data) -> None:
    classes = {"background": 0, "left_hemisphere": 1, "right_hemisfere": 2, "ventricles": 3}
    spec = parse_teacher({"path": str(brain_teacher["path"]), "output": "probabilities", "classes": classes})
    with pytest.raises(
        TeacherError, match="lacks the classes 'right_hemisphere' \\(did you mean 'right_hemisfere'"
    ):
        load_teacher(spec, brain_data.task_info)
    # a teacher of other anatomy (none of the task's foreground classes): no KD for that task, no error
    other = parse_teacher({"path": str(brain_teacher["path"]), "classes": {"background": 0, "liver": 1}})
    assert load_teacher(other, brain_data.task_info).class_channels == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output": "softmax"}, "teacher.output: must be one of"),
        ({"outptu": "logits"}, "unknown keys 'outptu' \\(did you mean 'output'\\?\\)"),
        ({"intensity": "ct"}, "teacher.intensity: unknown preset 'ct'"),
        ({"intensity": {"window": [1, 0]}}, "teacher.intensity.window: must be \\[low, high\\]"),
        ({"roi_size": [96, 96, 90], "divisible": 32}, "roi_size: \\[96, 96, 90\\] must be a multiple of"),
        ({"spacing": [1, 1, 0]}, "teacher.spacing: must be a list of positive numbers"),
        (
            {"cache": None},
            "teacher.cache: the teacher declares its own pipeline \\(spacing, intensity, divisible\\)",
        ),
        ({"cache_dtype": "int8"}, "teacher.cache_dtype: must be one of"),
        ({"orientation": "RAA"}, "teacher.orientation: must be axis codes such as RAS or LPS"),
        (
            {"orientation": "LPS", "spacing": None, "intensity": None, "divisible": 1, "cache": None},
            "(orientation)",
        ),
    ],
)
def test_bad_teacher_descriptions(change, message) -> None:
    with pytest.raises(TeacherSpecError, match=message):
        parse_teacher({**brain_spec("teacher.pt", "cache"), **change})


# ----------------------------------------------------------------------------- cached == live
class Pointwise(nn.Module):
    """A 1x1x1 network: its output at a voxel depends on that voxel only, so a crop of its
    whole-volume output equals its output on the crop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * 3)


@pytest.mark.parametrize(("output", "top_k"), [("logits", None), ("sigmoid_logits", None), ("logits", 2)])
def test_cached_kd_equals_live_kd_when_the_pipelines_are_the_same(output, top_k, tmp_path) -> None:
    """Each training crop reads its own box of the cached whole-volume target (a pointwise teacher's
    crop of its whole output IS its output on the crop): cached and live KD agree, dense and top-k."""
    from lorkd_pl.data.teacher_targets import EMPTY_SLOT
    from lorkd_pl.models.losses import kd_kl_top_k

    torch.manual_seed(1)
    path = tmp_path / "pointwise.pt"
    torch.jit.save(torch.jit.script(Pointwise()), str(path))
    classes = dict(zip(CLASSES, range(4), strict=True))
    spec = parse_teacher(
        {
            "path": str(path),
            "output": output,
            "classes": classes,
            "cache": str(tmp_path / "c"),
            "cache_dtype": "float32",
            "cache_top_k": top_k,
        }
    )
    # the 16-voxel z patch is larger than some volumes: those crops are padded first
    data = MultiRegionDataModule([TASK], augment=True, validate=False, patch_size=[24, 24, 40], batch_size=4)
    data.setup("fit")
    teacher = load_teacher(spec, data.task_info)
    store, _ = prepare_targets(teacher, spec, data)
    data.use_teacher_targets(store)
    batch = next(iter(data.train_dataloader()))
    image = batch["image"]
    live = teacher.targets(teacher(image), TASK)
    inside = (image != 0).all(1, keepdim=True).expand_as(live)  # padding: the live teacher sees zeros
    student = torch.randn_like(live, requires_grad=True)
    if top_k is None:
        cached = batch["teacher"][:, :4]
        torch.testing.assert_close(cached[inside], live[inside], atol=1e-5, rtol=0)
        for temperature in (1.0, 3.0):
            a = kd_loss(student, cached, teacher.target_kind, temperature)
            b = kd_loss(student, torch.where(inside, live, cached), teacher.target_kind, temperature)
            assert abs(float(a) - float(b)) <= 1e-5
    else:
        index, stored = batch["teacher_index"], batch["teacher_log_probs"]
        assert index.dtype == torch.uint8 and tuple(index.shape) == (4, 2, 24, 24, 40)
        top, top_index = live.topk(2, dim=1)
        inside = inside[:, :2]
        torch.testing.assert_close(stored[inside], top[inside], atol=1e-5, rtol=0)
        assert torch.equal(index.long()[inside], top_index[inside])
        for temperature in (1.0, 3.0):
            a = kd_kl_top_k(student, index, stored, temperature)
            b = kd_kl_top_k(
                student,
                torch.where(inside, top_index, index.long()),
                torch.where(inside, top, stored),
                temperature,
            )
            if temperature == 1.0:  # a padded voxel stores no class: it holds no teacher information
                padded = kd_kl_top_k(student, index, torch.where(inside, EMPTY_SLOT, stored), 1.0)
                assert (~inside).any() and abs(float(padded)) <= 1e-6
            assert abs(float(a) - float(b)) <= 1e-5
    data.use_teacher_targets(None)
    assert not {"teacher", "teacher_index"} & set(next(iter(data.train_dataloader())))


def test_a_mirror_flip_swaps_the_cached_targets_channels(tmp_path) -> None:
    from lorkd_pl.data.transforms import MirrorFlipd

    flip = MirrorFlipd(1.0, [(1, 2)])
    target = torch.arange(4.0).view(4, 1, 1, 1).repeat(1, 3, 2, 2) + torch.arange(3.0).view(1, 3, 1, 1) * 10
    sample = {"image": torch.zeros(1, 3, 2, 2), "label": torch.zeros(1, 3, 2, 2), "teacher": target}
    flipped = flip(sample)["teacher"]
    expected = target.flip(1)[[0, 2, 1, 3]]
    torch.testing.assert_close(torch.as_tensor(flipped), expected)


class MultiLabel(nn.Module):
    """A universal segmenter: independent sigmoids for three structures, no background channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


def test_a_multi_label_sigmoid_teacher_gets_per_class_binary_targets(tmp_path) -> None:
    path = tmp_path / "universal.pt"
    torch.jit.save(torch.jit.script(MultiLabel()), str(path))
    classes = {"ventricles": 0, "left_hemisphere": 1, "right_hemisphere": 2}  # its own channel order
    spec = parse_teacher(
        {"path": str(path), "output": "sigmoid", "classes": classes, "cache": str(tmp_path / "c")}
    )
    data = MultiRegionDataModule([TASK], augment=False, validate=False)
    data.setup("fit")
    teacher = load_teacher(spec, data.task_info)
    assert teacher.class_channels[TASK] == [(), (1,), (2,), (0,)]  # background derived, order by name
    store, _report = prepare_targets(teacher, spec, data)
    record = data.shard_records("train")[0]
    grid = data.preprocessing(get_task(TASK))(dict(record))["image"]
    with torch.no_grad():
        p = torch.sigmoid(teacher.network.conv(grid.as_tensor()[None]))[0]
    cached = torch.sigmoid(store.load(record["case"])["teacher"])
    torch.testing.assert_close(cached[1:], p[[1, 2, 0]], atol=2e-3, rtol=0)  # fp16 storage
    torch.testing.assert_close(cached[0], torch.prod(1 - p, 0), atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------- through the CLI
def cli_config(tmp_path, teacher: dict, data: dict | None = None) -> list[str]:
    """``--config`` arguments: demo/lorkd_seg on the brain task with ``teacher``, one short epoch."""
    override = {
        "trainer": {
            "max_epochs": 1,
            "limit_val_batches": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "runs/student",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs/student"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": "runs/student/checkpoints", "save_last": True},
                }
            ],
        },
        "model": {"init_args": {"teacher": teacher, "init_from_teacher": False}},
        "data": {
            "init_args": {
                "tasks": [TASK],
                "samples_per_epoch": 4,
                "batch_size": 2,
                "cache": "none",
                **(data or {}),
            }
        },
    }
    path = tmp_path / "override.yaml"
    import yaml

    path.write_text(yaml.safe_dump(override))
    return ["--config", "demo/lorkd_seg", "--config", str(path)]


def test_fit_with_an_outside_teacher_cached_then_its_own_test_row(
    brain_teacher, tmp_path, monkeypatch, capfd, caplog
) -> None:
    from lorkd_pl.app.cli import main
    from lorkd_pl.evaluation.comparison import write_report

    monkeypatch.chdir(tmp_path)
    config = cli_config(tmp_path, brain_spec(brain_teacher["path"], "runs/teacher_targets"))
    with caplog.at_level(logging.INFO):
        assert main(["fit", *config]) == 0
    assert "teacher targets in runs/teacher_targets: 8 built, 0 reused" in caplog.text
    assert len(list((tmp_path / "runs/teacher_targets" / TASK).glob("*.lkc"))) == 8
    saved = torch.load(tmp_path / "runs/student/checkpoints/last.ckpt", weights_only=True)
    assert saved["teacher"]["path"] == str(brain_teacher["path"])
    metrics = (tmp_path / "runs/student/version_0/metrics.csv").read_text()
    assert f"val/{TASK}/kd_loss" in metrics  # held-out distance to the teacher, from cached targets

    assert main(["teacher-targets", *config]) == 0  # paid once: nothing to rebuild
    assert "0 built, 8 reused" in capfd.readouterr().out

    assert main(["teacher-test", *config, "--out", "runs/brain_fm"]) == 0
    summary = tmp_path / "runs/brain_fm/summary" / f"{TASK}.json"
    assert summary.is_file()
    assert main(["teacher-test", *config, "--out", "runs/brain_fm"]) == 0  # its own summaries: replaced
    assert main(["test", *config, "--ckpt_path", "runs/student/checkpoints/last.ckpt"]) == 0
    student_summaries = {p: p.read_bytes() for p in (tmp_path / "runs/student").rglob("summary/*.json")}
    assert student_summaries
    with pytest.raises(SystemExit) as exit_info:  # onto a test run: its summaries are never replaced
        main(["teacher-test", *config, "--out", str(next(iter(student_summaries)).parents[1])])
    assert exit_info.value.code == 2 and "was not written by lorkd-pl teacher-test" in capfd.readouterr().err
    assert all(p.read_bytes() == data for p, data in student_summaries.items())
    report = write_report("runs/brain_fm", "runs/student", "report")
    text = report.read_text()
    assert TASK in text and "teacher" in text.lower()


@pytest.mark.parametrize(
    ("teacher", "data", "message"),
    [
        (
            {"output": "probabilities", "classes": dict(zip(CLASSES, range(4), strict=True))},
            {"patch_size": [20, 20, 12]},
            "rejected an input of size 20x20x12",
        ),
        (
            {"spacing": [3.0, 3.0, 3.0]},
            None,
            "teacher.cache: the teacher declares its own pipeline (spacing)",
        ),
        ({"output": "logits", "classes": dict(zip(CLASSES, range(4), strict=True))}, None, None),
    ],
    ids=["input-size", "pipeline-without-cache", "logits-declared-for-probabilities"],
)
def test_teacher_errors_are_one_line_before_training(
    brain_teacher, tmp_path, monkeypatch, capfd, teacher, data, message
) -> None:
    from lorkd_pl.app.cli import main

    monkeypatch.chdir(tmp_path)
    described = {"path": str(brain_teacher["path"]), **teacher}
    if message is None:  # softmax output declared as logits: a warning before the first step, then it runs
        with pytest.warns(UserWarning, match="look like probabilities"):
            assert main(["fit", *cli_config(tmp_path, described, data)]) == 0
        return
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *cli_config(tmp_path, described, data)])
    assert exit_info.value.code == 2
    printed = capfd.readouterr().err
    assert printed.strip().splitlines()[-1].startswith("lorkd-pl: error: ")
    assert message in printed and "Traceback" not in printed
    assert not (tmp_path / "runs/student/checkpoints/last.ckpt").exists()


def test_cls2d_cached_targets_ride_along_with_each_image(tmp_path) -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(32 * 32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.flatten(1)).log_softmax(1)

    torch.manual_seed(0)
    path = tmp_path / "classifier.pt"
    network = Classifier()
    torch.jit.save(torch.jit.script(network), str(path))
    task = "demo_brain_cls"
    classes = {"normal": 0, "infarct": 1, "hemorrhage": 2}
    described = {"path": str(path), "output": "log_probabilities", "classes": classes, "roi_size": [32, 32]}
    spec = parse_teacher({**described, "intensity": "none", "cache": str(tmp_path / "c")})
    data = MultiRegionDataModule([task], validate=False, batch_size=8)
    data.setup("fit")
    teacher = load_teacher(spec, data.task_info)
    store, report = prepare_targets(teacher, spec, data)
    assert report.built == 300  # 240 training + 60 validation images
    data.use_teacher_targets(store)
    batch = next(iter(data.train_dataloader()))
    assert batch["teacher"].shape == (8, 3)
    # oracle: the teacher on the raw image resized to 32 x 32 (intensity: none), by hand
    records = {r["case"]: r for r in data.shard_records("train")}
    for case, target in zip(batch["case"], batch["teacher"], strict=True):
        image = torch.as_tensor(records[case]["image"], dtype=torch.float32)[None, None]
        resized = nn.functional.interpolate(image, size=(32, 32), mode="bilinear", align_corners=False)
        with torch.no_grad():
            expected = network(resized)[0].clamp_min(math.log(1e-12))  # targets stop at p = 1e-12
        torch.testing.assert_close(target, expected, atol=1e-3, rtol=2e-3)  # fp16 storage


def test_ddp_processes_build_their_own_shards_of_the_cache(brain_teacher, tmp_path) -> None:
    from training_helpers import ddp_fit

    teacher = brain_spec(brain_teacher["path"], tmp_path / "targets")
    data = {"tasks": [TASK], "batch_size": 2, "cache": "none", "samples_per_epoch": 8}
    result = ddp_fit(tmp_path, "demo/lorkd_seg", [], {"teacher": teacher, "init_from_teacher": False}, data)
    assert result.returncode == 0, result.stderr[-2000:]
    # 6 training + 2 validation cases, sharded over 2 processes: rank 0 builds 3 + 1 of them
    assert "8 cases" in result.stderr and "4 built, 0 reused (this process)" in result.stderr
    assert len(list((tmp_path / "targets" / TASK).glob("*.lkc"))) == 8


def test_orientation_null_is_the_default_and_none_is_the_files_own() -> None:
    assert parse_teacher({"path": "t.pt", "orientation": None}).orientation == "RAS"
    assert parse_teacher({"path": "t.pt", "orientation": "none", "cache": "c"}).orientation is None


def test_tasks_the_teacher_does_not_know_get_placeholder_targets(brain_teacher, tmp_path) -> None:
    spec = parse_teacher(brain_spec(brain_teacher["path"], tmp_path / "c"))
    data = MultiRegionDataModule(["demo_abdomen_seg", TASK], augment=False, validate=False, batch_size=8)
    data.setup("fit")
    teacher = load_teacher(spec, data.task_info)
    assert set(teacher.class_channels) == {TASK}  # abdomen: no KD
    store, report = prepare_targets(teacher, spec, data)
    assert report.built == 8  # the brain cases only
    data.use_teacher_targets(store)
    batch = next(iter(data.train_dataloader()))
    abdomen = batch["task"] == 0
    assert abdomen.any() and (~abdomen).any()
    assert float(batch["teacher"][abdomen].abs().max()) == 0.0
    assert float(batch["teacher"][~abdomen].abs().max()) > 0.0
    # a target rewritten under another key during the run is refused, never read
    case = data.shard_records("train")[-1]["case"]
    store.expected[case] = "another key"
    with pytest.raises(Exception, match="rewritten for another teacher"):
        store.load(case, store.expected[case])


def test_case_ids_without_a_case_field_never_collide(clean_registry, demo_root) -> None:
    from lorkd_pl.registry import TaskSpec, register_task

    demo = get_task(TASK)
    plain = TaskSpec(
        name="plain_brain",
        region="brain",
        kind="seg3d",
        classes=demo.classes,
        records=lambda split: [{k: v for k, v in r.items() if k != "case"} for r in demo.records(split)],
        modality="MR",
        spacing=demo.spacing,
        patch_size=demo.patch_size,
    )
    register_task(plain)
    data = MultiRegionDataModule(["plain_brain"], validate=False)
    data.setup("fit")
    cases = data.all_cases("train") + data.all_cases("val")
    assert len(set(cases)) == len(cases) == 8 and "plain_brain/val-0" in cases


def test_a_cache_that_is_a_file_and_a_missing_device_are_one_line_errors(tmp_path, capfd) -> None:
    from lorkd_pl.app.cli import main

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    from lorkd_pl.data.teacher_targets import TeacherTargetError, TeacherTargetStore

    with pytest.raises(TeacherTargetError, match="is a file, not a folder"):
        TeacherTargetStore(not_a_folder)
    with pytest.raises(SystemExit) as exit_info:
        main(["teacher-targets", "--config", "demo/lorkd_seg", "--device", "gpu"])
    assert exit_info.value.code == 2
    assert "--device must be cpu, cuda or cuda:N" in capfd.readouterr().err


def test_sliding_windows_of_log_probabilities_stay_normalised(tmp_path, brain_data) -> None:
    class LogSoftmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).log_softmax(1)

    path = tmp_path / "logsoftmax.pt"
    torch.jit.save(torch.jit.script(LogSoftmax()), str(path))
    described = {
        "path": str(path),
        "output": "log_probabilities",
        "roi_size": [16, 16, 16],
        "cache": str(tmp_path),
    }
    spec = parse_teacher({**described, "classes": dict(zip(CLASSES, range(4), strict=True))})
    teacher = load_teacher(spec, brain_data.task_info)
    from lorkd_pl.models.teacher.pipeline import task_pipelines

    pipeline = task_pipelines(spec, brain_data)[TASK]
    raw = pipeline.raw_output(teacher, torch.randn(1, 1, 30, 28, 20))
    torch.testing.assert_close(raw.exp().sum(1), torch.ones(1, 30, 28, 20), atol=1e-5, rtol=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_cache_is_rebuilt_and_a_target_lost_mid_fit_is_one_line(
    brain_teacher, tmp_path, workers
) -> None:
    """Damage found at fit start: rebuilt. A target deleted or damaged during the fit: one line naming
    the case and the fix, through MONAI's wrapping and through a DataLoader worker alike."""
    from lorkd_pl.app.lightning import user_error_message

    spec = parse_teacher(brain_spec(brain_teacher["path"], tmp_path / "c", cache_top_k=2))
    data = MultiRegionDataModule([TASK], validate=False, batch_size=2, num_workers=workers)
    data.setup("fit")
    teacher = load_teacher(spec, data.task_info)
    store, report = prepare_targets(teacher, spec, data)
    assert (report.built, report.reused) == (8, 0)
    files = sorted((tmp_path / "c" / TASK).glob("*.lkc"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    files[1].write_bytes(b"PK\x03\x04 an old .npz or anything else")
    store, report = prepare_targets(teacher, spec, data)  # a half-built or damaged store resumes
    assert (report.built, report.reused) == (2, 6)
    data.use_teacher_targets(store)
    batch = next(iter(data.train_dataloader()))
    assert batch["teacher_index"].shape[1] == 2
    for damage in ("deleted", "truncated"):
        for path in files:
            if damage == "deleted":
                path.unlink()
            else:
                path.write_bytes(b"")
        with pytest.raises(RuntimeError) as caught:
            next(iter(data.train_dataloader()))
        message = user_error_message(caught.value)
        assert message is not None and "\n" not in message, caught.value
        assert TASK in message and ("restart" in message or "rebuilt" in message), message
