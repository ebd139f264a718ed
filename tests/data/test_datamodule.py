"""The multi-region datamodule: every registered task yields proper batches; sampling and sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lorkd_pl.data.datamodule import MultiRegionDataModule, RegionBalancedSampler, collate_by_region
from lorkd_pl.registry import list_tasks


@pytest.mark.parametrize("task", [t.name for t in list_tasks()])
def test_every_registered_task_yields_batches(task) -> None:
    spec = next(t for t in list_tasks() if t.name == task)
    module = MultiRegionDataModule([task], batch_size=2)
    module.setup("fit")
    assert module.regions == (spec.region,) and module.task_names == [task]
    batch = next(iter(module.train_dataloader()))
    patch = module.train_patch_size(spec)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.long
    assert tuple(batch["image"].shape) == (2, 1, *patch)
    # plain tensors: no MONAI metadata rides into the model's step (its bookkeeping cost 8 % of a demo step)
    assert all(type(batch[k]) is torch.Tensor for k in ("image", "label", "region", "task"))
    expected_label = (2, 1, *patch) if spec.kind == "seg3d" else (2,)
    assert tuple(batch["label"].shape) == expected_label
    assert batch["region"].tolist() == [0, 0] and batch["task"].tolist() == [0, 0]
    assert int(batch["label"].min()) >= 0 and int(batch["label"].max()) < spec.num_classes
    val = next(iter(module.val_dataloader()[0]))
    assert val["image"].ndim == batch["image"].ndim
    assert type(val["image"]) is torch.Tensor and type(val["label"]) is torch.Tensor
    assert int(val["label"].max()) < spec.num_classes


def test_batches_mix_regions_sorted_and_indexed() -> None:
    tasks = ["demo_thorax_seg", "demo_brain_seg", "demo_pelvis_seg", "demo_abdomen_seg"]
    module = MultiRegionDataModule(tasks, batch_size=4, samples_per_epoch=24)
    assert module.regions == ("abdomen", "brain", "pelvis", "thorax")  # global order, not list order
    assert module.task_regions == [3, 1, 2, 0]
    module.setup("fit")
    loader = module.train_dataloader()
    assert len(loader) == 6
    mixed = 0
    for batch in loader:
        region = batch["region"]
        assert torch.equal(region, region.sort().values)
        expected = torch.tensor([module.task_regions[t] for t in batch["task"].tolist()])
        assert torch.equal(region, expected)
        mixed += int(region.unique().numel() > 1)
    assert mixed >= 4
    assert len(module.val_dataloader()) == 4  # one loader per task


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_leave_the_global_generator_alone(workers) -> None:
    """Iterating a loader (training, validation, test) draws nothing from torch's global generator, so
    how often a fit validates cannot change what a model that draws from it (dropout) gets in training."""
    module = MultiRegionDataModule(
        ["demo_brain_cls", "demo_thorax_cls"], batch_size=4, samples_per_epoch=8, num_workers=workers
    )
    module.setup("fit")
    module.setup("test")
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    for loader in [module.train_dataloader(), *module.val_dataloader(), *module.test_dataloader()]:
        next(iter(loader))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_region_weights_set_sampling_frequencies() -> None:
    sampler = RegionBalancedSampler([10, 100], [3.0, 1.0], length=20000, seed=1)
    counts = Counter(i < 10 for i in sampler)
    assert abs(counts[True] / 20000 - 0.75) < 0.02  # weights, not dataset sizes, decide
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and len(sampler) == 20000
    cycle = RegionBalancedSampler([5], [1.0], length=10)
    indices = list(cycle)
    assert sorted(indices[:5]) == list(range(5))  # a task's samples cycle before repeating


def test_balanced_default_and_region_weights_in_module() -> None:
    module = MultiRegionDataModule(
        ["demo_brain_cls", "demo_thorax_cls"],
        batch_size=50,
        samples_per_epoch=2000,
        region_weights={"brain": 4.0},
    )
    module.setup("fit")
    loader = module.train_dataloader()
    regions = Counter()
    for index in loader.sampler:
        regions[index < len(module.dataset("train", 0))] += 1
    assert abs(regions[True] / 2000 - 0.8) < 0.04


def test_shards_are_disjoint(monkeypatch) -> None:
    cases = []
    for rank in range(2):
        module = MultiRegionDataModule(["demo_brain_seg", "demo_thorax_seg"], batch_size=2, validate=False)
        monkeypatch.setattr(module, "_rank_world", lambda rank=rank: (rank, 2))
        module.setup("fit")
        cases.append({s["case"] for task in range(2) for s in module.dataset("train", task).data})
    assert not cases[0] & cases[1]
    assert len(cases[0] | cases[1]) == 12  # 6 training volumes per region


def test_collate_flattens_crops_and_sorts() -> None:
    samples = [
        [{"image": torch.zeros(1, 2), "label": torch.tensor(1), "region": 2, "task": 1, "case": "a"}],
        {
            "image": torch.ones(1, 2),
            "label": torch.tensor(0),
            "region": 0,
            "task": 0,
            "case": "b",
            "extra": 1,
        },
    ]
    batch = collate_by_region(samples)
    assert batch["case"] == ["b", "a"] and batch["region"].tolist() == [0, 2] and "extra" not in batch


def test_ddp_two_processes_get_disjoint_mixed_shards(tmp_path) -> None:
    script = Path(__file__).with_name("ddp_shards.py")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r) for r in ranks] == [6, 6]  # 96 samples / 2 processes / batch 8
    seen = [{case for batch in r for case in batch["case"]} for r in ranks]
    assert not seen[0] & seen[1]
    for batches in ranks:
        assert all(len(set(batch["region"])) > 1 for batch in batches)


def test_worker_processes() -> None:
    module = MultiRegionDataModule(["demo_pelvis_cls", "demo_thorax_cls"], batch_size=8, num_workers=2)
    module.setup("fit")
    batches = [batch for _, batch in zip(range(3), module.train_dataloader(), strict=False)]
    assert all(b["image"].shape == (8, 1, 28, 28) for b in batches)


@pytest.mark.parametrize(
    "tasks", [["demo_pelvis_cls", "demo_thorax_cls"], ["demo_brain_seg", "demo_thorax_seg"]]
)
def test_augmentation_is_a_function_of_the_draw(tasks) -> None:
    """Random flips/affines/crops are seeded per draw: equal with 0 or 2 workers, new each epoch."""

    def first_batches(workers: int, epoch: int) -> list[dict]:
        module = MultiRegionDataModule(tasks, batch_size=4, num_workers=workers, samples_per_epoch=8)
        module.setup("fit")
        loader = module.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return list(loader)

    in_process, in_workers = first_batches(0, 0), first_batches(2, 0)
    for a, b in zip(in_process, in_workers, strict=True):
        # same crops and flips; resampling in a single-threaded worker may differ in the last bit
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)
    again = first_batches(0, 0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(in_process, again, strict=True))
    next_epoch = first_batches(0, 1)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(in_process, next_epoch, strict=True))


def test_resumed_sampler_continues_the_epoch() -> None:
    sampler = RegionBalancedSampler([5, 7], [1.0, 1.0], length=12, seed=3)
    sampler.set_epoch(2)
    full = [(int(i), i.seed) for i in sampler]
    sampler.set_epoch(2)
    sampler.skip = 5
    assert [(int(i), i.seed) for i in sampler] == full[5:]  # same indices and augmentation seeds
    assert [(int(i), i.seed) for i in sampler] == full  # the skip applies to one pass only
