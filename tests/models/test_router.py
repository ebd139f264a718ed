"""The region router: W0-only features, a student that trains exactly as without it, window averaging."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from monai.networks.nets import UNet

from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.experts import expert_routing, inject_experts, shared_weights, strip_experts
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.router import (
    RegionClassifier,
    tap_names,
    tap_width,
    tapped_features,
    volume_probabilities,
    window_starts,
)
from models.test_conflicts import CNN, TASKS  # the same tiny classifier run


def _randomise_experts(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("expert_B"):
                p.normal_(0, 0.3)  # experts differ from W0


def test_shared_weights_run_w0_alone() -> None:
    """Oracle: strip_experts' copy (the expert-free network); transposed convs included."""
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), dropout=0.0)
    injected = inject_experts(net, num_experts=3, rank=2)
    _randomise_experts(injected)
    x = torch.randn(2, 1, 8, 8, 8)
    with shared_weights(injected):
        got = injected(x)
    torch.testing.assert_close(got, strip_experts(injected)(x), rtol=0, atol=0)
    with expert_routing(injected, 1):  # the experts are really on outside the block
        assert not torch.allclose(injected(x), got)


def _student(router_weight: float, backbone=CNN) -> LoRKDModule:
    data = MultiRegionDataModule(TASKS, validate=False)
    torch.manual_seed(0)
    return LoRKDModule(
        task_info=data.task_info, regions=data.region_names, backbone=backbone, rank=2,
        router_weight=router_weight,
    )  # fmt: skip


def _batch(student: LoRKDModule) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    tasks = torch.tensor([0, 0, 1, 2, 2, 1])
    return {
        "image": torch.randn(6, 1, 28, 28),
        "label": torch.tensor([0, 1, 2, 1, 0, 2]),
        "task": tasks,
        "region": torch.tensor([student.regions.index(student.tasks[t]["region"]) for t in tasks.tolist()]),
    }


def test_router_gradient_is_its_own_and_the_students_are_unchanged() -> None:
    """Oracle: the router's loss by hand on the expert-free copy in eval mode; the student's gradients
    from the same step without a router."""
    plain, routed = _student(0.0), _student(0.5)
    routed.load_state_dict(plain.state_dict(), strict=False)  # same student weights
    _randomise_experts(plain)
    routed.student.load_state_dict(plain.student.state_dict())
    assert routed.router is not None and plain.router is None
    batch = _batch(plain)
    for module in (plain, routed):
        module.train()
        module.training_step(batch, 0).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), routed.named_parameters(), strict=False):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    oracle = strip_experts(routed.student).eval()
    convs = [m for m in oracle.modules() if isinstance(m, torch.nn.Conv2d)]
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in convs]
    final = oracle(batch["image"])
    for hook in hooks:
        hook.remove()
    pooled = [t for out in outputs for t in (out.mean((2, 3)), out.amax((2, 3)))]
    last = outputs[-1]  # the deepest layer's output (14×14), also averaged on a 2×2 grid by hand
    cells = [last[:, :, i : i + 7, j : j + 7].mean((2, 3)) for i in (0, 7) for j in (0, 7)]
    grid = torch.stack(cells, 2).flatten(1)  # (N, C·4), channel-major like adaptive pooling's flatten
    features = torch.cat([*pooled[:-2], pooled[-2], pooled[-1], grid, final], 1)
    assert routed.router_grid_taps == ["features.9"]  # the last conv at the deepest resolution
    assert len(convs) == 4 and features.shape == (6, 2 * (4 + 4 + 8 + 8) + 8 * 4 + 8)
    logits = routed.router(features)
    loss = 0.5 * F.cross_entropy(logits, batch["region"])
    expected = torch.autograd.grad(loss, list(routed.router.parameters()))
    for (name, p), want in zip(routed.router.named_parameters(), expected, strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7, msg=name)
    assert all(m.training for m in routed.student.modules())  # modes given back after the eval forward


def test_router_features_leave_modes_statistics_and_random_stream_alone() -> None:
    net = {
        "class_path": "monai.networks.nets.UNet",
        "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
                      "strides": [2], "dropout": 0.3, "norm": "batch"},
    }  # fmt: skip
    data = MultiRegionDataModule(["demo_abdomen_seg", "demo_brain_seg"], validate=False)
    student = LoRKDModule(
        task_info=data.task_info, regions=data.region_names, backbone=net, rank=2, router_weight=1.0
    ).train()
    buffers = {k: v.clone() for k, v in student.state_dict().items()}
    images = torch.randn(3, 1, 16, 16, 8)
    state = torch.random.get_rng_state()
    assert not student.router_features(images).requires_grad  # nothing flows back into the student
    assert student.router_logits(images).shape == (3, 2)
    assert torch.equal(torch.random.get_rng_state(), state)  # eval mode: no dropout draw
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=0, msg=key)  # no BN update
    assert all(m.training for m in student.modules())


def _fit(folder, router_weight: float):
    L.seed_everything(0)
    data = MultiRegionDataModule(TASKS, batch_size=12, cache="none", validate=False)
    student = LoRKDModule(
        task_info=data.task_info, regions=data.region_names, backbone=CNN, rank=2, router_weight=router_weight
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=CSVLogger(folder, name="logs"), log_every_n_steps=1,
        limit_val_batches=2, val_check_interval=4, num_sanity_val_steps=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    trainer.fit(student, datamodule=data)
    with open(f"{trainer.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return student, rows


def test_a_fit_with_a_router_trains_the_same_student(tmp_path) -> None:
    plain, plain_rows = _fit(tmp_path / "plain", 0.0)
    routed, rows = _fit(tmp_path / "routed", 1.0)
    want = plain.state_dict()
    for key, value in routed.state_dict().items():
        if not key.startswith("router."):
            torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    tasks = [r["train/task_loss"] for r in plain_rows if r.get("train/task_loss")]
    assert [r["train/task_loss"] for r in rows if r.get("train/task_loss")] == tasks and len(tasks) == 4
    accuracy = [float(r["val/router_accuracy"]) for r in rows if r.get("val/router_accuracy")]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0
    assert any(r.get("train/router_loss") for r in rows)
    assert routed.router is not None and any(p.abs().sum() > 0 for p in routed.router.parameters())
    student_group, router_group = routed.trainer.optimizers[0].param_groups
    assert [id(p) for p in router_group["params"]] == [id(p) for p in routed.router.parameters()]
    assert router_group["lr"] == routed.hparams.lr > student_group["lr"]  # the router's rate does not decay


def test_volume_probabilities_average_the_windows() -> None:
    """Oracle: a hand loop over the 4 non-overlapping windows of a volume 2×2×1 windows large."""
    torch.manual_seed(0)
    router = RegionClassifier(6, 4)
    conv = torch.nn.Conv3d(1, 3, 1)

    def logits(windows: torch.Tensor) -> torch.Tensor:
        out = conv(windows).flatten(2)
        return router(torch.cat([out.mean(2), out.amax(2)], 1))

    volume = torch.randn(1, 1, 8, 6, 4)
    with torch.no_grad():
        got = volume_probabilities(logits, volume, (4, 3, 4), sw_batch_size=3)
        windows = [volume[:, :, i : i + 4, j : j + 3, :] for i in (0, 4) for j in (0, 3)]
        expected = torch.stack([logits(w).softmax(1)[0] for w in windows]).mean(0)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(got.sum()), 1.0, rel_tol=1e-5)
    assert window_starts(10, 4) == [0, 4, 6] and window_starts(8, 4) == [0, 4] and window_starts(3, 4) == [0]
    small = torch.randn(2, 1, 3, 6, 4)  # smaller than the window along x: zero-padded 0 | 1, as MONAI
    with torch.no_grad():
        padded = torch.nn.functional.pad(small, (0, 0, 0, 0, 0, 1))
        want = torch.stack([logits(padded[:, :, :, j : j + 3]).softmax(1) for j in (0, 3)]).mean(0)
        torch.testing.assert_close(
            volume_probabilities(logits, small, (4, 3, 4), 1), want, rtol=1e-5, atol=1e-6
        )


def test_taps_are_the_convolutions_once_each() -> None:
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)
    plain = tap_names(net)
    injected = inject_experts(net, num_experts=2, rank=2)
    assert tap_names(injected) == plain  # an expert layer counts once, under the plain layer's name
    assert tap_names(strip_experts(injected)) == plain
    x = torch.randn(2, 1, 8, 8, 8)
    features = tapped_features(strip_experts(injected), plain, x)
    assert features.shape == (2, tap_width(injected, plain, 2, "seg3d"))


def test_router_weight_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="router_weight"):
        _student(-1.0)


def test_router_learns_from_the_last_batches_features() -> None:
    """Oracle: cross-entropy over the features of the last ROUTER_REPLAY batches, computed by hand."""
    from lorkd_pl.models.lorkd import ROUTER_REPLAY

    student = _student(1.0).train()
    seen = []  # each batch's features as they were at its step (BatchNorm statistics move)
    for seed in range(ROUTER_REPLAY + 2):
        torch.manual_seed(seed)
        batch = _batch(student)
        batch["image"] = torch.randn_like(batch["image"])
        student.zero_grad()
        student.training_step(batch, seed).backward()  # no optimiser step: the weights stay
        # the router read them after the step's own forward had updated the BatchNorm statistics
        seen.append((student.router_features(batch["image"]), batch["region"]))
    kept = seen[-ROUTER_REPLAY:]
    features = torch.cat([f for f, _ in kept])
    loss = F.cross_entropy(student.router(features), torch.cat([r for _, r in kept]))
    expected = torch.autograd.grad(loss, list(student.router.parameters()))
    for (name, p), want in zip(student.router.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7, msg=name)
