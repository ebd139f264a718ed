"""Partial labels and class mapping by name: the generalist's loss and the teacher's class channels."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from lorkd_pl.models.generalist import GeneralistModule, union_label_space
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.losses import kd_kl
from lorkd_pl.models.teacher.loading import TeacherError, load_teacher
from lorkd_pl.registry import TaskSpec

UNET = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 4,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
    },
}
PATCH = [8, 8, 8]


def seg_task(name: str, region: str, classes: list[str], **extra) -> dict:
    return {"name": name, "region": region, "kind": "seg3d", "classes": classes, "patch_size": PATCH, **extra}


def generalist(tasks: list[dict]) -> GeneralistModule:
    torch.manual_seed(0)
    return GeneralistModule(task_info=tasks, regions=sorted({t["region"] for t in tasks}), backbone=UNET)


def logit_gradient(model: GeneralistModule, batch: dict) -> torch.Tensor:
    """d(training loss)/d(union logits) of ``batch``, ``(N, K_union, *S)``."""
    kept = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        kept["logits"] = output

    handle = model.head.register_forward_hook(keep)
    model.training_step(batch, 0).backward()
    handle.remove()
    return kept["logits"].grad


def seg_batch(tasks: list[int], labels: list[int]) -> dict:
    """One sample per entry; sample ``i`` of task ``tasks[i]`` is labelled ``labels[i]`` everywhere but
    a background corner."""
    label = torch.tensor(labels).view(-1, 1, 1, 1, 1).expand(-1, 1, *PATCH).clone()
    label[:, :, :2, :2, :2] = 0
    return {
        "image": torch.randn(len(tasks), 1, *PATCH),
        "label": label,
        "task": torch.tensor(tasks),
        "region": torch.tensor(tasks),
    }


# ------------------------------------------------------------------------------- union label space
def test_union_classes_are_shared_only_through_declared_aliases() -> None:
    a = seg_task("a", "abdomen", ["background", "liver", "kidney"], class_aliases={"liver": "liver"})
    b = seg_task("b", "brain", ["background", "liver", "spleen"], class_aliases={"liver": "liver"})
    c = seg_task("c", "thorax", ["background", "liver"])  # same spelling, no alias: its own channel
    names, channels = union_label_space([a, b, c])
    assert names == ["background", "liver", "a/kidney", "b/spleen", "c/liver"]
    assert channels == [[0, 1, 2], [0, 1, 3], [0, 4]]


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ({"bg": "x"}, "background"),
        ({"liver": "a/liver"}, "without '/'"),
        ({"liver": "organ", "spleen": "organ"}, "two classes"),
        ({"lung": "lung"}, "not among its classes"),
    ],
)
def test_bad_class_aliases_are_refused(aliases, message) -> None:
    with pytest.raises(ValueError, match=message):
        TaskSpec("t", "abdomen", "seg3d", ("bg", "liver", "spleen"), lambda split: [], class_aliases=aliases)


# ------------------------------------------------------------------------------- partial-label loss
def test_a_sample_trains_only_its_own_tasks_channels() -> None:
    tasks = [
        seg_task("a", "abdomen", ["background", "liver", "spine_free"]),
        seg_task("b", "brain", ["background", "left", "right"]),
        seg_task("c", "thorax", ["background", "lung"]),
    ]
    model = generalist(tasks)
    grad = logit_gradient(model, seg_batch([0, 0, 1, 2], [1, 2, 1, 1]))
    for sample, task in enumerate([0, 0, 1, 2]):
        own = model.task_channels[task]
        others = [k for k in range(len(model.union_classes)) if k not in own]
        assert torch.count_nonzero(grad[sample, others]) == 0, (sample, others)
        assert torch.count_nonzero(grad[sample, own]) > 0


@pytest.mark.parametrize("aliased", [False, True])
def test_the_same_organ_of_two_datasets(aliased: bool) -> None:
    """A voxel labelled liver by task A: without an alias task B's liver channel gets exactly zero
    gradient from it (before: pushed down); with an alias both tasks' liver voxels push ONE channel up."""
    alias = {"class_aliases": {"liver": "liver"}} if aliased else {}
    tasks = [
        seg_task("a", "abdomen", ["background", "liver"], **alias),
        seg_task("b", "brain", ["background", "liver", "spleen"], **alias),
    ]
    model = generalist(tasks)
    batch = seg_batch([0, 1], [1, 1])
    grad = logit_gradient(model, batch)
    liver = batch["label"][:, 0] == 1
    a_liver, b_liver = model.task_channels[0][1], model.task_channels[1][1]
    assert (a_liver == b_liver) == aliased
    assert (grad[0, a_liver][liver[0]] < 0).all()  # descent raises A's liver logit on A's liver
    assert (grad[1, b_liver][liver[1]] < 0).all()
    if not aliased:
        assert torch.count_nonzero(grad[0, b_liver]) == 0 and torch.count_nonzero(grad[1, a_liver]) == 0


def test_loss_is_monai_dice_ce_on_the_tasks_channels_only() -> None:
    """Oracle: MONAI's DiceCELoss on each task's own channels (Dice of other tasks' channels never
    counted), weighted by the task's share; changing other tasks' logits changes nothing."""
    tasks = [
        seg_task("a", "abdomen", ["background", "liver"]),
        seg_task("b", "brain", ["background", "left", "right"]),
    ]
    model = generalist(tasks)
    batch = seg_batch([0, 1, 1], [1, 2, 1])
    logits = torch.randn(3, len(model.union_classes), *PATCH)
    oracle = DiceCELoss(to_onehot_y=True, softmax=True)
    expected = oracle(logits[:1][:, [0, 1]], batch["label"][:1]) / 3 + oracle(
        logits[1:][:, [0, 2, 3]], batch["label"][1:]
    ) * (2 / 3)
    losses = model.partial_label_losses(logits, batch["label"], batch["task"])
    torch.testing.assert_close(losses[0] / 3 + losses[1] * 2 / 3, expected)
    changed = logits.clone()
    changed[0, 2:] = 50.0  # task b's channels on task a's sample
    changed[1:, 1] = -50.0  # task a's channel on task b's samples
    again = model.partial_label_losses(changed, batch["label"], batch["task"])
    torch.testing.assert_close(again[0], losses[0])
    torch.testing.assert_close(again[1], losses[1])


# ------------------------------------------------------------------------------- class mapping by name
def save_generalist(model: GeneralistModule, path) -> str:
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture
def liver_teacher(tmp_path):
    model = generalist([seg_task("liver", "abdomen", ["background", "liver", "spleen", "kidney"])])
    with torch.no_grad():
        model.head.bias.copy_(torch.arange(4.0))  # distinguishable head rows
    return model, save_generalist(model, tmp_path / "teacher.ckpt")


def test_reordered_classes_map_by_name(liver_teacher) -> None:
    teacher_model, path = liver_teacher
    student_task = seg_task("liver", "abdomen", ["background", "kidney", "liver", "spleen"])
    teacher = load_teacher(path, [student_task])
    x = torch.randn(2, 1, *PATCH)
    logits = teacher(x)
    # teacher union: background, liver/liver, liver/spleen, liver/kidney
    torch.testing.assert_close(teacher.task_logits(logits, "liver"), logits[:, [0, 3, 1, 2]])

    torch.manual_seed(3)
    student = LoRKDModule(
        task_info=[student_task], regions=["abdomen"], backbone=UNET, teacher=path, init_from_teacher=True
    )
    student.initialise_from_teacher()
    torch.testing.assert_close(student.heads[0].bias, torch.tensor([0.0, 3.0, 1.0, 2.0]))
    torch.testing.assert_close(student.heads[0].weight, teacher_model.head.weight[[0, 3, 1, 2]])
    # the KD target of the training step follows the names too
    batch = {
        "image": x,
        "label": torch.zeros(2, 1, *PATCH, dtype=torch.long),
        "task": torch.zeros(2, dtype=torch.long),
        "region": torch.zeros(2, dtype=torch.long),
    }
    student.eval()
    with torch.no_grad():
        task_part = student.loss(student.heads[0](student.features(x, 0)), batch["label"])
        kd = kd_kl(student.heads[0](student.features(x, 0)), logits[:, [0, 3, 1, 2]], 1.0)
        torch.testing.assert_close(student.training_step(batch, 0), task_part + kd)


def test_a_class_the_teacher_lacks_is_an_error(liver_teacher) -> None:
    _, path = liver_teacher
    task = seg_task("liver", "abdomen", ["background", "liver", "tumour"])
    with pytest.raises(TeacherError, match=r"\['tumour'\] are not among the classes"):
        load_teacher(path, [task])


def test_merges_must_be_declared_and_add_probabilities(liver_teacher) -> None:
    _, path = liver_teacher
    merged = seg_task(
        "liver",
        "abdomen",
        ["background", "organ", "kidney"],
        teacher_classes={
            "background": "background",
            "organ": ["liver/liver", "liver/spleen"],
            "kidney": "liver/kidney",
        },
    )
    teacher = load_teacher(path, [merged])
    logits = teacher(torch.randn(1, 1, *PATCH))
    target = teacher.task_logits(logits, "liver").softmax(1)
    full = logits.softmax(1)
    torch.testing.assert_close(target[:, 1], full[:, 1] + full[:, 2])
    torch.testing.assert_close(target[:, 2], full[:, 3])
    undeclared = dict(merged, teacher_classes={"background": 0, "organ": 1, "kidney": 1})
    with pytest.raises(TeacherError, match="both take"):
        load_teacher(path, [undeclared])
    misspelt = dict(merged, teacher_classes={"background": 0, "organ": "liver/livr", "kidney": 3})
    with pytest.raises(TeacherError, match="did you mean"):
        load_teacher(path, [misspelt])


def test_a_teacher_task_of_another_kind_is_refused(liver_teacher) -> None:
    _, path = liver_teacher
    cls_task = {"name": "liver", "region": "abdomen", "kind": "cls2d", "classes": ["background", "liver"]}
    with pytest.raises(
        TeacherError, match="task 'liver' is cls2d, but the teacher's task of that name is seg3d"
    ):
        load_teacher(path, [dict(cls_task, patch_size=[8, 8])])


def test_a_class_renamed_by_an_alias_is_named_by_its_alias(tmp_path) -> None:
    teacher = generalist(
        [
            seg_task(
                "kid", "abdomen", ["bg", "kidney_left", "kidney_right"], class_aliases={"kidney_left": "kl"}
            )
        ]
    )
    path = save_generalist(teacher, tmp_path / "aliased.ckpt")
    task = seg_task(
        "mine", "abdomen", ["bg", "k"], teacher_classes={"bg": "background", "k": "kid/kidney_left"}
    )
    with pytest.raises(TeacherError, match="trained as the shared class 'kl'; name it so"):
        load_teacher(path, [task])
    assert load_teacher(path, [dict(task, teacher_classes={"bg": 0, "k": "kl"})]).class_channels["mine"] == [
        (0,),
        (1,),
    ]


def test_python_task_dicts_check_their_aliases() -> None:
    task = seg_task(
        "t", "abdomen", ["bg", "liver", "spleen"], class_aliases={"liver": "organ", "spleen": "organ"}
    )
    with pytest.raises(ValueError, match="two classes of one task on one shared name"):
        generalist([task])
