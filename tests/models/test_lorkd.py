"""LoRKDModule and GeneralistModule: loss composition, gradients, teacher loading, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.models.backbones import count_parameters
from lorkd_pl.models.generalist import GeneralistModule, union_label_space
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.losses import TaskLoss, kd_kl
from lorkd_pl.models.teacher.loading import TeacherError, load_teacher

CNN = {
    "class_path": "lorkd_pl.models.backbones.ConvNet2d",
    "init_args": {"in_channels": 1, "channels": [4, 8]},
}
TASKS = ["demo_brain_cls", "demo_thorax_cls", "demo_abdomen_cls"]


@pytest.fixture(scope="module")
def run():
    data = MultiRegionDataModule(TASKS, validate=False)
    return {"task_info": data.task_info, "regions": data.region_names}


@pytest.fixture
def teacher_path(run, tmp_path):
    generalist = GeneralistModule(**run, backbone=CNN)
    path = tmp_path / "teacher.ckpt"
    checkpoint = {"state_dict": generalist.state_dict(), "hyper_parameters": dict(generalist.hparams)}
    generalist.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def batch(regions=(0, 0, 1, 1, 1), tasks=None):
    """A region-sorted batch: demo order abdomen(0), brain(1), thorax(2) = tasks 2, 0, 1."""
    region = torch.tensor(regions)
    task = torch.tensor([{0: 2, 1: 0, 2: 1}[r] for r in regions]) if tasks is None else torch.tensor(tasks)
    return {
        "image": torch.randn(len(regions), 1, 28, 28),
        "label": torch.randint(0, 3, (len(regions),)),
        "region": region,
        "task": task,
    }


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_union_label_space() -> None:
    seg = [
        {"name": "a", "kind": "seg3d", "classes": ["bg", "x", "y"]},
        {"name": "b", "kind": "seg3d", "classes": ["bg", "z"]},
    ]
    names, channels = union_label_space(seg)
    assert names == ["background", "a/x", "a/y", "b/z"] and channels == [[0, 1, 2], [0, 3]]
    cls = [
        {"name": "a", "kind": "cls2d", "classes": ["n", "m"]},
        {"name": "b", "kind": "cls2d", "classes": ["n", "k"]},
    ]
    assert union_label_space(cls) == (["a/n", "a/m", "b/n", "b/k"], [[0, 1], [2, 3]])


def test_lambda_zero_gives_task_only_gradients(run, teacher_path) -> None:
    torch.manual_seed(1)
    with_teacher = LoRKDModule(**run, backbone=CNN, rank=2, teacher=str(teacher_path), kd_weight=0.0)
    without = LoRKDModule(**run, backbone=CNN, rank=2, teacher=None)
    without.load_state_dict(with_teacher.state_dict())
    for module in (with_teacher, without):
        for p in module.parameters():  # B != 0 so that A gets gradients too
            if p.ndim == 3:
                torch.nn.init.normal_(p, std=0.1)
    without.load_state_dict(with_teacher.state_dict())
    data = batch()
    with_teacher.training_step(data, 0).backward()
    without.training_step(data, 0).backward()
    a, b = grads(with_teacher), grads(without)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_loss_is_task_loss_plus_weighted_kd(run, teacher_path) -> None:
    model = LoRKDModule(
        **run, backbone=CNN, rank=2, teacher=str(teacher_path), kd_weight=0.7, temperature=3.0
    )
    model.eval()  # BatchNorm in eval: the hand computation below sees the same statistics
    data = batch()
    loss = model.training_step(data, 0)
    features = model.features(data["image"], data["region"])
    teacher_logits = model.teacher(data["image"])
    union = model.teacher.network.union_classes
    expected_task = expected_kd = 0.0
    for t in data["task"].unique().tolist():
        rows = data["task"] == t
        logits = model.heads[t](features[rows])
        share = rows.sum() / len(rows)
        expected_task += share * TaskLoss("cls2d")(logits, data["label"][rows])
        name = model.tasks[t]["name"]  # the generalist's union classes are "<task>/<class>"
        channels = [union.index(f"{name}/{c}") for c in model.tasks[t]["classes"]]
        expected_kd += share * kd_kl(logits, teacher_logits[rows][:, channels], 3.0)
    torch.testing.assert_close(loss, expected_task + 0.7 * expected_kd)


def test_experts_learn_only_from_their_regions(run) -> None:
    model = LoRKDModule(**run, backbone=CNN, rank=2)
    model.training_step(batch(regions=(1, 1, 2)), 0).backward()  # no abdomen (expert 0) sample
    for name, p in model.named_parameters():
        if name.endswith("expert_B"):
            assert torch.count_nonzero(p.grad[0]) == 0, name
            assert torch.count_nonzero(p.grad[1]) > 0 and torch.count_nonzero(p.grad[2]) > 0, name


def test_the_plain_kd_control_is_the_same_student_without_experts(run, teacher_path) -> None:
    torch.manual_seed(2)
    lorkd = LoRKDModule(**run, backbone=CNN, rank=2, teacher=str(teacher_path), kd_weight=0.5)
    plain = LoRKDModule(**run, backbone=CNN, rank=2, teacher=str(teacher_path), kd_weight=0.5, experts=False)
    assert not any("expert" in name for name in plain.state_dict())
    assert count_parameters(plain.student) == lorkd.expert_free_parameters
    # with every expert at zero (B = 0 at init) the two students compute the same loss on one batch
    plain.student.load_state_dict(
        {
            k.replace(".base_layer", ""): v
            for k, v in lorkd.student.state_dict().items()
            if "expert" not in k and not k.endswith("scaling")
        }
    )
    plain.heads.load_state_dict(lorkd.heads.state_dict())
    for module in (lorkd, plain):
        module.eval()
    data = batch()
    torch.testing.assert_close(plain.training_step(data, 0), lorkd.training_step(data, 0))
    # one network for every region: the region index changes nothing
    images = data["image"][:2]
    torch.testing.assert_close(plain.features(images, 0), plain.features(images, 2))
    # it exports like an expert: the deployable network of a region is its backbone and that region's head
    from lorkd_pl.deploy.networks import expert_network

    network, tasks = expert_network(plain, "brain")
    assert [t["region"] for t in tasks] == ["brain"]
    with torch.no_grad():
        torch.testing.assert_close(network(images)[0], plain.task_logits(images, 0))


def test_checkpoint_keeps_teacher_out_and_hparams_plain(run, teacher_path) -> None:
    model = LoRKDModule(**run, backbone=CNN, teacher=str(teacher_path))
    _ = model.teacher
    assert not any(k.startswith(("_teacher", "teacher")) for k in model.state_dict())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training
    json.dumps(dict(model.hparams))  # plain values only
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["teacher"]["path"] == str(teacher_path) and len(checkpoint["teacher"]["sha256"]) == 64
    assert checkpoint["regions"] == run["regions"]


def test_torchscript_state_dict_and_bundle_teachers(run, tmp_path) -> None:
    from monai.networks.nets import Regressor

    spec = {"in_shape": [1, 28, 28], "out_shape": [9], "channels": [4], "strides": [2]}
    network = Regressor(**spec).eval()
    tasks = [
        dict(t, teacher_classes={c: i + 3 * k for i, c in enumerate(t["classes"])})
        for k, t in enumerate(run["task_info"])
    ]
    x = torch.randn(2, 1, 28, 28)
    expected = network(x)

    scripted = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.script(network), scripted)
    teacher = load_teacher(scripted, tasks)
    torch.testing.assert_close(teacher(x), expected)
    assert teacher.class_channels["demo_thorax_cls"] == [(3,), (4,), (5,)]

    weights = tmp_path / "weights.pt"
    torch.save(network.state_dict(), weights)
    with pytest.raises(TeacherError, match="teacher_model"):
        load_teacher(weights, tasks)
    described = {"class_path": "monai.networks.nets.Regressor", "init_args": spec}
    torch.testing.assert_close(load_teacher(weights, tasks, described)(x), expected)

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = {"network_def": {"_target_": "monai.networks.nets.Regressor", **spec}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    torch.testing.assert_close(load_teacher(bundle, tasks)(x), expected)


def test_pickled_code_payload_is_refused(tmp_path, run) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(TeacherError, match="weights_only=True"):
        load_teacher(path, run["task_info"])


def test_merged_expert_has_the_plain_network_size(run) -> None:
    from lorkd_pl.app.demo import merged_expert_parameters
    from lorkd_pl.models.backbones import count_parameters

    model = LoRKDModule(**run, backbone=CNN, rank={"abdomen": 2, "brain": 3, "thorax": 4})
    assert count_parameters(model.student) > model.expert_free_parameters
    for task in range(len(model.tasks)):
        expected = model.expert_free_parameters + count_parameters(model.heads[task])
        assert merged_expert_parameters(model, task) == expected


def test_init_from_teacher_copies_backbone_and_heads(run, teacher_path) -> None:
    model = LoRKDModule(**run, backbone=CNN, teacher=str(teacher_path), init_from_teacher=True)
    model.initialise_from_teacher()
    generalist = model.teacher.network
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    for task in range(len(model.tasks)):
        torch.testing.assert_close(model.task_logits(x, task), generalist.task_logits(x, task))


def test_feature_kd_trains_a_projection(run, teacher_path) -> None:
    model = LoRKDModule(**run, backbone=CNN, teacher=str(teacher_path), kd="features", kd_weight=2.0)
    assert isinstance(model.projection, nn.Linear) and model.projection.out_features == 8
    model.eval()
    data = batch()
    loss = model.training_step(data, 0)
    features = model.features(data["image"], data["region"])
    task_only = LoRKDModule(**run, backbone=CNN, kd="none")
    task_only.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("projection")})
    task_only.eval()
    expected_kd = torch.nn.functional.mse_loss(
        model.projection(features), model.teacher.features(data["image"])
    )
    torch.testing.assert_close(loss, task_only.training_step(data, 0) + 2.0 * expected_kd)
    loss.backward()
    assert model.projection.weight.grad is not None and torch.count_nonzero(model.projection.weight.grad) > 0


def test_ranks_by_region_name(run) -> None:
    from lorkd_pl.experts import expert_layers

    assert run["regions"] == ["abdomen", "brain", "thorax"]
    model = LoRKDModule(**run, backbone=CNN, rank={"thorax": 6, "abdomen": 2, "default": 5})
    layers = [layer for _, layer in expert_layers(model.student)]
    assert layers and all(list(layer.ranks) == [2, 5, 6] for layer in layers)  # matched by name
    model = LoRKDModule(**run, backbone=CNN, rank={"brain": 3})  # no default: the method's 8
    assert all(list(layer.ranks) == [8, 3, 8] for _, layer in expert_layers(model.student))


@pytest.mark.parametrize(
    ("rank", "match"),
    [
        (
            [2, 3, 4],
            r"ranks by region name, got \[2, 3, 4\]; write the mapping form, e.g. rank: \{abdomen: 8",
        ),
        ({"spine": 4}, r"names \['spine'\], which are not regions of this run"),
        ({"brain": 0}, r"integers >= 1"),
        ({"brain": True}, r"integers >= 1"),
        (0, r"an integer >= 1"),
    ],
)
def test_rank_lists_and_unknown_regions_are_refused(run, rank, match) -> None:
    with pytest.raises(ValueError, match=match):
        LoRKDModule(**run, backbone=CNN, rank=rank)


def test_task_metrics_follow_the_task_spec() -> None:
    from lorkd_pl.models.base import task_metrics

    task = {"name": "t", "kind": "cls2d", "classes": ["a", "b", "c"]}
    assert sorted(task_metrics(task)) == ["accuracy", "auroc"]  # default: all of the kind
    assert sorted(task_metrics({**task, "metrics": ["accuracy"]})) == ["accuracy"]
    assert sorted(task_metrics({**task, "metrics": ["auroc"]})) == ["accuracy", "auroc"]  # the score stays


def test_rank_errors_reach_the_user_as_one_line(tmp_path, monkeypatch, capsys) -> None:
    from lorkd_pl.app.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "demo/lorkd_cls", "--model.init_args.rank=[4, 4, 4, 4]"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("lorkd-pl: error: invalid configuration: model.rank must be one integer or ")
    assert "e.g. rank: {abdomen: 8, brain: 8, default: 4}" in error[-1] and "Namespace(" not in error[-1]


def test_a_checkpoint_saved_with_a_rank_list_still_loads(run, tmp_path) -> None:
    """Checkpoints from before ranks by name hold a list in their own region order: read by name."""
    from lorkd_pl.experts import expert_layers
    from lorkd_pl.models.restore import restore_module, upgrade_hyperparameters
    from training_helpers import save_checkpoint

    model = LoRKDModule(**run, backbone=CNN, rank={"abdomen": 2, "brain": 3, "thorax": 4})
    path = save_checkpoint(model, tmp_path / "old.ckpt")
    data = torch.load(path, weights_only=True)
    data["hyper_parameters"]["rank"] = [2, 3, 4]  # as an earlier lorkd-pl saved it
    assert upgrade_hyperparameters(data["hyper_parameters"])["rank"] == {
        "abdomen": 2,
        "brain": 3,
        "thorax": 4,
    }
    restored = restore_module(data, "old.ckpt", (LoRKDModule,))
    assert all(list(layer.ranks) == [2, 3, 4] for _, layer in expert_layers(restored.student))


def test_no_feature_projection_without_feature_kd(run, teacher_path) -> None:
    """kd_weight 0 trains no projection: an unused parameter would stop DDP (no unused-parameter search)."""
    model = LoRKDModule(**run, backbone=CNN, teacher=str(teacher_path), kd="both", kd_weight=0.0)
    assert model.projection is None and not model.uses_teacher
    model.training_step(batch(), 0).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # every parameter used


DEEP_DYNUNET = {
    "class_path": "monai.networks.nets.DynUNet",
    "init_args": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 4,
        "kernel_size": [3, 3, 3, 3],
        "strides": [1, 2, 2, 2],
        "upsample_kernel_size": [2, 2, 2],
        "filters": [4, 8, 8, 16],
        "deep_supervision": True,
        "deep_supr_num": 2,
    },
}
SEG_TASK = {
    "name": "t",
    "region": "abdomen",
    "kind": "seg3d",
    "classes": ["bg", "x", "y"],
    "patch_size": [8, 8, 8],
}


def test_a_student_saved_before_transposed_experts_still_loads(tmp_path) -> None:
    """Earlier students kept transposed convs shared; their checkpoints lack `transposed_convs`."""
    from lorkd_pl.experts import ExpertConvTranspose, expert_layers
    from lorkd_pl.models.restore import restore_module
    from training_helpers import save_checkpoint

    model = LoRKDModule(
        task_info=[SEG_TASK], regions=["abdomen"], backbone=DEEP_DYNUNET, transposed_convs=False
    )
    data = torch.load(save_checkpoint(model, tmp_path / "old.ckpt"), weights_only=True)
    del data["hyper_parameters"]["transposed_convs"]  # as an earlier lorkd-pl saved it
    restored = restore_module(data, "old.ckpt", (LoRKDModule,))
    assert not any(isinstance(layer, ExpertConvTranspose) for _, layer in expert_layers(restored.student))
    fresh = LoRKDModule(task_info=[SEG_TASK], regions=["abdomen"], backbone=DEEP_DYNUNET)
    assert any(isinstance(layer, ExpertConvTranspose) for _, layer in expert_layers(fresh.student))


def test_deep_supervision_and_init_from_a_dynunet_generalist(tmp_path) -> None:
    """Loss = Σ_l 2^-l/Σ 2^-l · DiceCE(head(level l)) (MONAI's loss as oracle); init_from_teacher copies the
    teacher's weights into W0 although DynUNet reaches its blocks under two names."""
    from monai.losses import DiceCELoss

    from lorkd_pl.experts import expert_layers
    from training_helpers import save_checkpoint

    teacher = GeneralistModule(task_info=[SEG_TASK], regions=["abdomen"], backbone=DEEP_DYNUNET)
    path = save_checkpoint(teacher, tmp_path / "teacher.ckpt")
    student = LoRKDModule(
        task_info=[SEG_TASK], regions=["abdomen"], backbone=DEEP_DYNUNET, teacher=str(path), kd="none"
    )
    student.initialise_from_teacher()
    for name, layer in expert_layers(student.student):
        torch.testing.assert_close(layer.weight, teacher.backbone.get_submodule(name).weight)
    torch.testing.assert_close(student.heads[0].weight, teacher.head.weight)

    images = torch.randn(2, 1, 16, 16, 16)
    batch = {
        "image": images,
        "label": torch.randint(0, 3, (2, 1, 16, 16, 16)),
        "task": torch.zeros(2, dtype=torch.long),
        "region": torch.zeros(2, dtype=torch.long),
    }
    torch.manual_seed(0)
    loss = student.training_step(batch, 0)
    torch.manual_seed(0)
    stacked = student.features(images, 0)  # training mode: (N, 1 + deep_supr_num, F, *S)
    assert stacked.shape[:2] == (2, 3)
    weights = torch.tensor([1.0, 0.5, 0.25]) / 1.75
    oracle = DiceCELoss(to_onehot_y=True, softmax=True)
    expected = sum(w * oracle(student.heads[0](stacked[:, i]), batch["label"]) for i, w in enumerate(weights))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("cap", "expected_calls"),
    [(None, [[0, 2], [1], [3]]), (200, [[0], [1], [2], [3]])],
    ids=["default", "capped"],
)
def test_kd_batched_over_tasks_equals_a_per_sample_loop(cap, expected_calls, monkeypatch) -> None:
    """Tasks whose logits share one shape share one KD call (:func:`batched_kd`), up to
    ``KD_CALL_ELEMENTS`` logits per call; the batch's KD is still ``Σ_task share · mean over the task's
    positions`` = the per-sample mean over the batch (each sample's own KD, one sample at a time), with
    groups of other class counts and crop sizes mixed in."""
    from lorkd_pl.models import lorkd
    from lorkd_pl.models.lorkd import _DistilledTask, batched_kd
    from lorkd_pl.models.losses import kd_kl_top_k

    if cap is not None:  # task 0's logits are 180 values, task 2's 120: no longer one call
        monkeypatch.setattr(lorkd, "KD_CALL_ELEMENTS", cap)
    torch.manual_seed(0)
    # (rows in the batch, classes, crop): tasks 0 and 2 share a shape, 1 has other classes, 3 another crop
    layout = [([0, 1, 5], 4, (3, 5)), ([2], 6, (3, 5)), ([3, 6], 4, (3, 5)), ([4, 7], 4, (2, 2))]
    total, top_k = 8, 2
    parts, targets, calls = [], {}, []
    for task, (rows, classes, crop) in enumerate(layout):
        logits = torch.randn(len(rows), classes, *crop, dtype=torch.float64, requires_grad=True)
        values, index = (
            torch.randn(len(rows), classes, *crop, dtype=torch.float64).log_softmax(1).topk(top_k, 1)
        )
        parts.append(_DistilledTask(task, logits, torch.tensor(rows)))
        targets[task] = (index, values)

    def kd(group):
        calls.append([p.task for p in group])
        index = torch.cat([targets[p.task][0] for p in group])
        values = torch.cat([targets[p.task][1] for p in group])
        return kd_kl_top_k(torch.cat([p.logits for p in group]), index, values, 1.0)

    batched = batched_kd(parts, kd, total)
    assert sorted(calls) == expected_calls
    per_sample = sum(
        kd_kl_top_k(p.logits[i : i + 1], targets[p.task][0][i : i + 1], targets[p.task][1][i : i + 1], 1.0)
        for p in parts
        for i in range(len(p.rows))
    )
    torch.testing.assert_close(batched, per_sample / total, rtol=1e-12, atol=0)
    grads_batched = torch.autograd.grad(batched, [p.logits for p in parts])
    grads_loop = torch.autograd.grad(per_sample / total, [p.logits for p in parts])
    for a, b in zip(grads_batched, grads_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("top_k", [None, 2])
def test_cached_kd_of_a_mixed_batch_equals_a_per_sample_loop(run, top_k) -> None:
    """The student's KD from targets cached in the batch (dense and top-k): one call for the tasks of
    one logit shape, equal to each sample's own KD averaged over the batch; a NaN target is named by
    its task (the per-task terms are recomputed only when asked for)."""
    from lorkd_pl.models.losses import kd_kl_top_k
    from lorkd_pl.models.teacher.loading import Teacher

    torch.manual_seed(2)
    model = LoRKDModule(**run, backbone=CNN, rank=2, teacher="cached-teacher", kd_weight=0.5, temperature=2.0)
    classes = {t["name"]: [(k,) for k in range(len(t["classes"]))] for t in model.tasks}
    model.__dict__["_teacher"] = Teacher(nn.Identity(), classes, "cached-teacher", "")
    model.eval()  # BatchNorm in eval: one sample at a time sees the batch's statistics
    data = batch(regions=(0, 0, 1, 1, 1, 2))
    log_probs = torch.randn(6, 3).log_softmax(1)
    if top_k is None:
        data["teacher"] = log_probs
    else:
        data["teacher_log_probs"], data["teacher_index"] = log_probs.topk(top_k, 1)
        data["teacher_index"] = data["teacher_index"].to(torch.uint8)
    step = model.compute_loss(data)
    expected = 0.0
    for i, task in enumerate(data["task"].tolist()):
        logits = model.task_logits(data["image"][i : i + 1], task)
        if top_k is None:
            expected += kd_kl(logits, log_probs[i : i + 1], 2.0) / 6
        else:
            index, stored = data["teacher_index"][i : i + 1], data["teacher_log_probs"][i : i + 1]
            expected += kd_kl_top_k(logits, index, stored, 2.0) / 6
    torch.testing.assert_close(step.logged["train/kd_loss"], expected)
    assert step.named_terms().keys() == {(t, term) for t in range(3) for term in ("task_loss", "kd_loss")}
    poisoned = dict(data)
    key = "teacher" if top_k is None else "teacher_log_probs"
    poisoned[key] = data[key].clone()
    poisoned[key][5] = float("nan")  # the one thorax sample: task 1
    terms = model.compute_loss(poisoned).named_terms()
    assert [key for key, value in terms.items() if not torch.isfinite(value)] == [(1, "kd_loss")]
