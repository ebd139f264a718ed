"""Gradient-conflict diagnostics: cosines against hand computations, layer groups, and a callback that
does not change training."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from monai.networks.nets import UNet

from lorkd_pl.data.datamodule import MultiRegionDataModule
from lorkd_pl.models.conflicts import (
    GradientConflict,
    cosine_matrix,
    layer_groups,
    region_gradient_cosines,
)
from lorkd_pl.models.lorkd import LoRKDModule

TASKS = ["demo_abdomen_cls", "demo_brain_cls", "demo_thorax_cls"]
CNN = {
    "class_path": "lorkd_pl.models.backbones.ConvNet2d",
    "init_args": {"in_channels": 1, "channels": [4, 8]},
}


def test_cosine_matrix_by_hand() -> None:
    got = cosine_matrix([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([-2.0, 0.0])])
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(got.numpy(), [[1, s, -1], [s, 1, -s], [-1, -s, 1]], atol=1e-12)
    assert torch.isnan(cosine_matrix([torch.zeros(2), torch.ones(2)])[0, 1])


def _student() -> LoRKDModule:
    data = MultiRegionDataModule(TASKS, validate=False)
    torch.manual_seed(0)
    student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=CNN, rank=2)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("expert_B"):
                p.normal_(0, 0.3)  # experts differ from W0 and receive A-gradients
    return student


def test_region_gradients_equal_a_per_region_loop() -> None:
    """Oracle: each region's loss written out by hand (its tasks' losses through task_logits, weighted
    by their share of the region's samples), differentiated on its own; numpy cosines."""
    student = _student()
    torch.manual_seed(1)
    tasks = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    batch = {
        "image": torch.randn(7, 1, 28, 28),
        "label": torch.tensor([0, 1, 2, 1, 0, 2, 1]),
        "task": tasks,
        "region": torch.tensor([student.regions.index(student.tasks[t]["region"]) for t in tasks.tolist()]),
    }
    records = region_gradient_cosines(student, batch, student.regions)
    named = [(n, p) for n, p in student.student.named_parameters()]
    shared = [p for n, p in named if not n.endswith(("expert_A", "expert_B"))]
    everything = [p for _, p in named]
    flats = {"w0": [], "w0_experts": []}
    for region in sorted(set(batch["region"].tolist())):
        rows = (batch["region"] == region).nonzero().squeeze(1)
        loss = 0.0
        for task in sorted(set(tasks[rows].tolist())):
            picked = rows[tasks[rows] == task]
            logits = student.task_logits(batch["image"][picked], task)
            loss = loss + len(picked) / len(rows) * student.loss(logits, batch["label"][picked])
        for kind, params in (("w0", shared), ("w0_experts", everything)):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flats[kind].append(
                np.concatenate([(g if g is not None else torch.zeros_like(p)).flatten().numpy()
                                for g, p in zip(grads, params, strict=True)])
            )  # fmt: skip
    for kind in ("w0", "w0_experts"):
        (record,) = [r for r in records if r["kind"] == kind]  # a classifier: encoder only
        assert record["group"] == "encoder" and record["regions"] == list(student.regions)
        vectors = np.stack(flats[kind])
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        np.testing.assert_allclose(record["cosine"].numpy(), unit @ unit.T, atol=1e-6)
    w0, both = (next(r["cosine"] for r in records if r["kind"] == k) for k in ("w0", "w0_experts"))
    off = ~torch.eye(len(student.regions), dtype=torch.bool)
    assert (both[off].abs() <= w0[off].abs() + 1e-9).all()  # experts take region-only components


def test_layer_groups_split_a_unet_at_its_deepest_point() -> None:
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2))
    groups = layer_groups(net, lambda: net(torch.randn(1, 1, 16, 16, 16)))
    assert groups["model.0.conv.weight"] == "encoder"  # the first down-sampling conv
    assert groups["model.2.conv.weight"] == "decoder"  # the last up-sampling conv (full resolution)
    assert groups["model.1.submodule.1.submodule.conv.weight"] == "encoder"  # the bottom
    assert set(groups) == {n for n, _ in net.named_parameters()}
    from lorkd_pl.experts import expert_routing, inject_experts

    injected = inject_experts(net, num_experts=2, rank=2)  # expert layers run their base weight themselves

    def forward():
        with expert_routing(injected, torch.tensor([1])):
            return injected(torch.randn(1, 1, 16, 16, 16))

    regrouped = layer_groups(injected, forward)
    for name, group in groups.items():
        weight = name.replace("conv.weight", "conv.base_layer.weight").replace(
            "conv.bias", "conv.base_layer.bias"
        )
        assert regrouped.get(weight, regrouped.get(name)) == group, name
    assert regrouped["model.2.conv.expert_A"] == "decoder"


def _fit(tmp_path, callbacks) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    data = MultiRegionDataModule(TASKS, batch_size=12, cache="none", validate=False)
    student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=CNN, rank=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=CSVLogger(tmp_path, name="logs"), callbacks=callbacks,
        log_every_n_steps=1, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    trainer.fit(student, datamodule=data)
    with open(f"{trainer.log_dir}/metrics.csv") as handle:
        losses = [r["train/loss"] for r in csv.DictReader(handle) if r.get("train/loss")]
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, trainer.log_dir, losses


def test_callback_logs_history_and_leaves_training_unchanged(tmp_path) -> None:
    plain, _, plain_losses = _fit(tmp_path / "plain", [])
    probed, log_dir, probed_losses = _fit(
        tmp_path / "probed", [GradientConflict(every_n_steps=2, probe_samples_per_region=3)]
    )
    for key in plain:  # BatchNorm statistics and the random stream are restored after each probe
        torch.testing.assert_close(probed[key], plain[key], rtol=0, atol=0, msg=key)
    assert probed_losses == plain_losses and len(plain_losses) == 3  # the probe's losses are not logged
    history = json.loads((tmp_path / "probed" / "logs" / "version_0" / "conflicts.json").read_text())
    steps = sorted({r["step"] for r in history["records"]})
    assert steps in ([0, 2], [2])  # every 2nd step, from the one where the probe holds every region
    assert {r["kind"] for r in history["records"]} == {"w0", "w0_experts"}
    from lorkd_pl.evaluation.plots import conflict_matrices

    assert conflict_matrices(history, tmp_path / "conflicts.png").stat().st_size > 1000  # report's plot
    with open(f"{log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [float(r["conflict/w0/encoder/mean"]) for r in rows if r.get("conflict/w0/encoder/mean")]
    assert len(logged) == len(steps) and all(-1.0 <= v <= 1.0 for v in logged)


def test_callback_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientConflict(every_n_steps=0)


def test_a_generalist_has_shared_weights_only() -> None:
    from lorkd_pl.models.generalist import GeneralistModule

    data = MultiRegionDataModule(TASKS, validate=False)
    torch.manual_seed(0)
    generalist = GeneralistModule(task_info=data.task_info, regions=data.region_names, backbone=CNN)
    batch = {
        "image": torch.randn(6, 1, 28, 28),
        "label": torch.tensor([0, 1, 2, 0, 1, 2]),
        "task": torch.tensor([0, 0, 1, 1, 2, 2]),
        "region": torch.tensor([0, 0, 1, 1, 2, 2]),
    }
    records = region_gradient_cosines(generalist, batch, generalist.regions)
    assert [(r["kind"], r["group"]) for r in records] == [("w0", "encoder")]
    cosine = records[0]["cosine"]
    torch.testing.assert_close(cosine, cosine.T)
    torch.testing.assert_close(torch.diagonal(cosine), torch.ones(3, dtype=torch.float64))


def test_a_resumed_fit_continues_the_history(tmp_path) -> None:
    def fit(steps: int, callback: GradientConflict, ckpt_path=None) -> L.Trainer:
        L.seed_everything(0)
        data = MultiRegionDataModule(TASKS, batch_size=12, cache="none", validate=False)
        student = LoRKDModule(task_info=data.task_info, regions=data.region_names, backbone=CNN, rank=2)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=steps, logger=CSVLogger(tmp_path, name="logs"), callbacks=[callback],
            limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(student, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    first = GradientConflict(every_n_steps=1, probe_samples_per_region=2)
    trainer = fit(2, first)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    measured = sorted({r["step"] for r in first.records})
    assert measured and max(measured) == 1
    resumed = GradientConflict(every_n_steps=1, probe_samples_per_region=2)
    trainer = fit(4, resumed, tmp_path / "step2.ckpt")
    history = json.loads((Path(trainer.log_dir) / "conflicts.json").read_text())
    steps = sorted({r["step"] for r in history["records"]})
    assert steps[: len(measured)] == measured and steps[-1] == 3  # the earlier steps kept, then continued
