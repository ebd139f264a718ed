"""The multi-region LightningDataModule: any set of registered tasks, mixed-region batches.

* Tasks come from the registry by name (``--data.tasks [demo_brain_seg, demo_thorax_seg]``); all tasks
  of one module share a kind (``seg3d`` or ``cls2d``). The distinct regions of the tasks, in the
  registry's global order, are the run's experts: ``regions[i]`` is expert ``i``.
* Every sample carries ``region`` (expert index) and ``task`` (index into ``tasks``).
* Sharding: each process (DDP rank) owns a fixed, disjoint shard of every task's records
  (``records[rank::world_size]``), transforms and caches only that shard, and samples from it; so
  caching never copies the whole data set into every process.
* Training batches: tasks are drawn with region weights (default: every region equally often; tasks
  of one region share its weight), samples within a task cycle through a reshuffled order; batches
  mix regions and are sorted by region (fast path of the knowledge-separation convolution).
* Validation/test: one loader per task (metrics per task/region), unpadded shards, whole volumes for
  3D tasks (the model runs sliding-window inference).
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset, list_data_collate
from monai.transforms import Randomizable
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from lorkd_pl.checks import check_augment, check_patch_and_spacing, check_ranges
from lorkd_pl.data.teacher_targets import (
    TARGET_KEYS,
    AttachTeacherTargets,
    TeacherTargetSlot,
    TeacherTargetStore,
)
from lorkd_pl.data.transforms import cls2d_transforms, seg3d_transforms
from lorkd_pl.data.validation import PassedRecords, check_duplicates, validate_task, validation_threads
from lorkd_pl.registry import (
    TaskSpec,
    get_region_index,
    get_task,
    order_regions,
)

BATCH_KEYS: tuple[str, ...] = ("image", "label", "region", "task", "case", *TARGET_KEYS)
DEFAULT_CLS_SIZE: tuple[int, int] = (28, 28)


def collate_by_region(samples: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Collate samples (or lists of crops) into a batch sorted by region.

    Returns:
        plain tensors (no MONAI metadata):
        ``{"image": (N, C, *S), "label": (N, 1, *S) | (N,), "region": (N,), "task": (N,), "case": [N]}``
        and, with cached teacher targets, ``"teacher": (N, K_max, *S) | (N, K_max)`` (dense) or
        ``"teacher_index"`` / ``"teacher_log_probs"``: ``(N, k, *S) | (N, k)`` (top-k).
    """
    flat: list[Mapping[str, Any]] = []
    for item in samples:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    flat.sort(key=lambda sample: int(sample["region"]))
    # plain tensors: a MetaTensor runs MONAI's metadata bookkeeping (copies of its meta dict and of its
    # applied operations) in every operation of the model's step, which reads none of it; stripped before
    # collating, so the metadata is not collated either
    return list_data_collate([{k: _plain(s[k]) for k in BATCH_KEYS if k in s} for s in flat])


def _plain(value: Any) -> Any:
    """``value`` without MONAI metadata (a MetaTensor's data as a plain tensor; anything else as is)."""
    return value.as_tensor() if isinstance(value, MetaTensor) else value


def case_id(task: str, split: str, index: int, record: Mapping[str, Any]) -> str:
    """A sample's case id, ``<task>/<case>``: the record's own ``case``, else ``<split>-<index>`` (its
    position among ALL of the split's records, so ids never repeat across splits or processes)."""
    return f"{task}/{record.get('case', f'{split}-{index}')}"


class SeededIndex(int):
    """A sample index that carries the seed of that draw's random augmentation."""

    seed: int | None

    def __new__(cls, value: int, seed: int | None = None) -> SeededIndex:
        index = super().__new__(cls, value)
        index.seed = seed
        return index


class SeededConcatDataset(ConcatDataset):
    """``ConcatDataset`` that seeds a sample's random transforms from its :class:`SeededIndex`.

    The augmentation of a draw is then a function of ``(seed, epoch, rank, position in the epoch)``
    only: the same draws with 0 or 8 workers, and after a resume (the values bit for bit when the
    processes run as many torch threads: a DataLoader worker runs one, and resampling rounds by
    thread count, by up to 1e-6).
    """

    def __getitem__(self, index: int) -> Any:
        seed = getattr(index, "seed", None)
        if seed is not None:
            part = bisect.bisect_right(self.cumulative_sizes, int(index))
            transform = getattr(self.datasets[part], "transform", None)
            if isinstance(transform, Randomizable):
                transform.set_random_state(seed=seed)
        return super().__getitem__(int(index))


class RegionBalancedSampler(DistributedSampler):
    """Per-rank sampler over a concatenation of task shards, with region weights.

    Each epoch draws ``length`` indices: a task per draw with probability ``task_weights`` and,
    within a task, the next index of a per-epoch shuffled cycle. Deterministic for ``(seed, epoch,
    rank)``; every index is a :class:`SeededIndex` carrying the seed of its augmentation.
    Subclasses ``DistributedSampler`` so Lightning does not wrap it again; every rank gets the
    same length.

    Args:
        task_sizes: number of samples of each task in this rank's shard (concatenated in order).
        task_weights: relative draw probability of each task.
        length: samples this rank draws per epoch.
        rank: this process's rank; ``num_replicas``: the world size.
        seed: base seed.
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        task_weights: Sequence[float],
        length: int,
        rank: int = 0,
        num_replicas: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            range(sum(task_sizes)), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed
        )
        if any(size == 0 for size in task_sizes):
            raise ValueError(f"every task needs samples on every rank, got shard sizes {list(task_sizes)}")
        self.task_sizes = list(task_sizes)
        self.task_weights = torch.tensor(task_weights, dtype=torch.double)
        self.length = int(length)
        self.offsets = [0, *torch.tensor(self.task_sizes).cumsum(0).tolist()[:-1]]
        self.skip = 0  # samples of the next epoch already trained on (mid-epoch resume)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) % 2**62)
        draws = torch.multinomial(self.task_weights, self.length, replacement=True, generator=generator)
        orders = [torch.randperm(size, generator=generator) for size in self.task_sizes]
        cursors = [0] * len(self.task_sizes)
        seeds = torch.randint(0, 2**31 - 1, (self.length,), generator=generator).tolist()
        skip, self.skip = self.skip, 0  # applies to one iteration only
        for position, task in enumerate(draws.tolist()):
            if position >= skip:
                index = self.offsets[task] + int(orders[task][cursors[task] % self.task_sizes[task]])
                yield SeededIndex(index, seeds[position])
            cursors[task] += 1

    def __len__(self) -> int:
        return self.length


class LocalSequentialSampler(DistributedSampler):
    """Iterates a data set that already is this process's shard, in order, unpadded (exact metrics).

    Subclasses ``DistributedSampler`` only so Lightning does not shard (and pad) it a second time.
    """

    def __init__(self, size: int) -> None:
        super().__init__(range(size), num_replicas=1, rank=0, shuffle=False)
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


class MultiRegionDataModule(L.LightningDataModule):
    """Mixed-region batches from registered tasks.

    Args:
        tasks: registered task names (one kind). Their regions, in global order, are the experts.
        batch_size: training batch size per process.
        val_batch_size: validation/test batch size (default: 1 for seg3d, ``batch_size`` for cls2d).
        num_workers: DataLoader workers per process.
        region_weights: relative sampling weight per region name (missing regions: 1.0).
        samples_per_epoch: training samples per epoch over all processes (default: the number of
            training records of all tasks).
        patch_size: override of every task's training crop (seg3d) or image size (cls2d).
        spacing: override of every seg3d task's target spacing (mm).
        nsd_tolerance: override of every seg3d task's normalised-surface-Dice tolerance (mm; the
            papers use 1 mm, lorkd-pl's task default is 2 mm).
        channels: input channels for cls2d images (RGB→grey or grey→RGB as needed).
        cache: ``"none"``, ``"memory"`` (MONAI CacheDataset of this process's shard) or ``"disk"``
            (PersistentDataset in ``cache_dir``).
        cache_dir: folder for ``cache="disk"``.
        validate: check every record before training (files, geometry, label values), several
            records at a time (up to 8 threads, as the process's cores allow).
        remember_validated: remember the records that passed (by their files' path, size, time and
            inode, in ``$LORKD_PL_CACHE/validated``, default ``~/.cache/lorkd-pl/validated``) and skip
            them on later fits until a file changes (:class:`~lorkd_pl.data.validation.PassedRecords`).
        seed: sampling seed.
        augment: random training augmentation (each task's flips and ``augment``; 2D: flips and
            affine); ``False`` leaves only the seg3d random crops. Every random transform is seeded
            per draw (:class:`SeededIndex`): the same with any number of workers and after a resume.
        augmentations: seg3d: the random augmentations of EVERY task, replacing the tasks' own
            ``augment`` (a preset such as ``"mild"`` or a mapping, see
            :class:`~lorkd_pl.registry.TaskSpec`).
        allow_duplicates: accept a case id used twice or the same image in two records (e.g. in train
            and test); off by default, because such a leak makes the metrics lie.

    Resume: the data module's checkpoint state records the epoch and the batches of it already
    trained; a run resumed from a mid-epoch checkpoint continues with the next batch of the same
    sampling order instead of restarting the epoch.

    Cached teacher targets: once a fit has built them (:meth:`use_teacher_targets`), every training
    and validation sample also carries ``teacher``, its case's cached target, cropped and flipped with
    the image (:mod:`lorkd_pl.data.teacher_targets`).
    """

    def __init__(
        self,
        tasks: list[str],
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        region_weights: dict[str, float] | None = None,
        samples_per_epoch: int | None = None,
        patch_size: list[int] | None = None,
        spacing: list[float] | None = None,
        nsd_tolerance: float | None = None,
        channels: int = 1,
        cache: Literal["none", "memory", "disk"] = "none",
        cache_dir: str | None = None,
        validate: bool = True,
        remember_validated: bool = True,
        seed: int = 0,
        augment: bool = True,
        augmentations: str | dict[str, Any] | None = None,
        allow_duplicates: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not tasks:
            raise ValueError("data.tasks is empty; list at least one registered task (see `lorkd-pl tasks`)")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"data.tasks lists a task twice: {tasks}")
        self.task_specs: list[TaskSpec] = [get_task(name) for name in tasks]
        kinds = {spec.kind for spec in self.task_specs}
        if len(kinds) > 1:
            by_kind = {k: [s.name for s in self.task_specs if s.kind == k] for k in sorted(kinds)}
            raise ValueError(f"data.tasks mixes task kinds {by_kind}; one run trains one kind, split them")
        self.kind = kinds.pop()
        self.regions: tuple[str, ...] = order_regions(spec.region for spec in self.task_specs)
        for name in region_weights or {}:
            get_region_index(name)
            if name not in self.regions:
                raise ValueError(
                    f"data.region_weights names region {name!r}, which no task of data.tasks has"
                )
        if augmentations is not None:
            self._augmentations = check_augment(augmentations, "data.init_args.augmentations")
        else:
            self._augmentations = None
        if cache == "disk" and not cache_dir:
            raise ValueError("data.cache='disk' needs data.cache_dir")
        self._check_numbers()
        self._records: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self._datasets: dict[str, list[Dataset]] = {}
        self._shards: dict[str, list[list[dict[str, Any]]]] = {}
        self._resume: dict[str, int] | None = None
        self._teacher_targets = TeacherTargetSlot()

    def _check_numbers(self) -> None:
        """Every numeric option in range, and one patch size for all tasks, before anything is read.

        Raises:
            ValueError: naming the option (``data.init_args.<name>``), the value and the fix.
        """
        h = self.hparams
        check_ranges(
            h,
            "data.init_args.",
            [
                ("batch_size", lambda v: v >= 1, "an integer >= 1 (samples per step and process)"),
                ("val_batch_size", lambda v: v >= 1, "null or >= 1"),
                ("num_workers", lambda v: v >= 0, "an integer >= 0 (0: load in the main process)"),
                ("samples_per_epoch", lambda v: v >= 1, "null (all training records) or >= 1"),
                ("channels", lambda v: v >= 1, "an integer >= 1"),
                ("nsd_tolerance", lambda v: v > 0, "null (each task's own) or > 0 (mm)"),
            ],
        )
        for region, weight in (h.region_weights or {}).items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ValueError(
                    f"data.init_args.region_weights[{region!r}] must be > 0, got {weight}; a region must be "
                    "drawn to train its expert (leave its task out of data.tasks instead)"
                )
        check_patch_and_spacing(self.kind, h.patch_size, h.spacing, "data.init_args.")
        sizes = {spec.name: self.train_patch_size(spec) for spec in self.task_specs}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"data.tasks have different patch sizes {sizes}: one batch stacks them, so they must agree; "
                "set data.init_args.patch_size to one size for all tasks"
            )

    # ------------------------------------------------------------------ run description
    @property
    def task_names(self) -> list[str]:
        """Task names in index order (a sample's ``task`` field indexes this list)."""
        return [spec.name for spec in self.task_specs]

    @property
    def task_regions(self) -> list[int]:
        """Expert index of every task."""
        return [self.regions.index(spec.region) for spec in self.task_specs]

    @property
    def task_info(self) -> list[dict[str, Any]]:
        """Plain description of every task for the model (linked to ``model.init_args.task_info``)."""
        return [
            {
                "name": spec.name,
                "region": spec.region,
                "kind": spec.kind,
                "classes": list(spec.classes),
                "patch_size": list(self.train_patch_size(spec)),
                "teacher_classes": dict(spec.teacher_classes) if spec.teacher_classes else None,
                "class_aliases": dict(spec.class_aliases) if spec.class_aliases else None,
                "modality": spec.modality,
                "spacing": list(self.hparams.spacing or spec.spacing or []) or None,
                "nsd_tolerance": self.hparams.nsd_tolerance or spec.nsd_tolerance,
                "metrics": list(spec.metrics),
            }
            for spec in self.task_specs
        ]

    @property
    def region_names(self) -> list[str]:
        """Region names in expert order (linked to ``model.init_args.regions``)."""
        return list(self.regions)

    @property
    def num_experts(self) -> int:
        """Number of experts (distinct regions)."""
        return len(self.regions)

    def train_patch_size(self, spec: TaskSpec) -> tuple[int, ...]:
        """Training crop (seg3d) or image size (cls2d) of a task, after the override."""
        if self.hparams.patch_size:
            return tuple(self.hparams.patch_size)
        if spec.patch_size:
            return tuple(spec.patch_size)
        if spec.kind == "cls2d":
            return DEFAULT_CLS_SIZE
        raise ValueError(f"task {spec.name!r} has no patch_size; set it in the task or data.patch_size")

    # ------------------------------------------------------------------ setup
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def setup(self, stage: str | None = None) -> None:
        """Validate and shard the records of the splits ``stage`` needs, and build their datasets."""
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}.get(
            stage or "fit", ["train", "val", "test"]
        )
        sizes = {self.train_patch_size(spec) for spec in self.task_specs}
        if "train" in splits and len(sizes) > 1:
            raise ValueError(
                f"tasks {self.task_names} have different patch sizes {sorted(sizes)}; batches need one size: "
                "set data.patch_size"
            )
        rank, world = self._rank_world()
        task_regions = self.task_regions
        for split in splits:
            if split in self._datasets:
                continue
            datasets = []
            for index, spec in enumerate(self.task_specs):
                records = [
                    {**r, "case": case_id(spec.name, split, i, r)}
                    for i, r in enumerate(self._task_records(spec, split))
                ]
                shard = records[rank::world]
                if len(records) < world:
                    warnings.warn(
                        f"task {spec.name!r} has {len(records)} {split} samples for {world} processes; "
                        "every process uses all of them",
                        stacklevel=2,
                    )
                    shard = records
                tagged = [
                    {
                        "image": r["image"],
                        "label": r["label"],
                        "case": r["case"],
                        "region": task_regions[index],
                        "task": index,
                    }
                    for r in shard
                ]
                datasets.append(self._dataset(tagged, self._transform(spec, train=split == "train")))
                self._shards.setdefault(split, []).append(tagged)
            self._datasets[split] = datasets

    def shard_records(self, split: str) -> list[dict[str, Any]]:
        """This process's records of ``split`` (all tasks), as its datasets hold them (after :meth:`setup`):
        ``{"image", "label", "case": "<task>/<id>", "region", "task"}``."""
        return [record for task in self._shards.get(split, []) for record in task]

    def all_cases(self, split: str) -> list[str]:
        """Every process's case ids of ``split`` (``"<task>/<id>"``)."""
        return [
            case_id(spec.name, split, i, r)
            for spec in self.task_specs
            for i, r in enumerate(self._records.get(spec.name, {}).get(split, []))
        ]

    def use_teacher_targets(self, store: TeacherTargetStore | None) -> None:
        """Attach (or with ``None`` detach) cached teacher targets: samples then carry ``teacher``."""
        self._teacher_targets.store = store

    def preprocessing(self, spec: TaskSpec) -> Any:
        """The deterministic preprocessing of one task's records (its validation transform, without
        cached targets): the student's grid and intensities."""
        return self._transform(spec, train=False, targets=False)

    def _task_records(self, spec: TaskSpec, split: str) -> list[dict[str, Any]]:
        if spec.name not in self._records:
            if not self.hparams.get("allow_duplicates", False):
                check_duplicates(spec)  # all splits' records, before any image is read
            self._records[spec.name] = {}
        table = self._records[spec.name]
        if split not in table:
            if self.hparams.validate:
                memo = PassedRecords(spec) if self.hparams.get("remember_validated", True) else None
                table.update(validate_task(spec, [split], validation_threads(), memo))
            else:
                table[split] = [dict(r) for r in spec.records(split)]
        return table[split]

    def _transform(self, spec: TaskSpec, train: bool, targets: bool = True):
        augment = self.hparams.get("augment", True)
        crop = train and spec.kind == "seg3d"  # a training crop reads its own box of the target only
        attach = AttachTeacherTargets(self._teacher_targets, after_crop=crop) if targets else None
        if spec.kind == "seg3d":
            spacing = self.hparams.spacing or spec.spacing
            patch = self.train_patch_size(spec)
            pairs = [(spec.classes.index(a), spec.classes.index(b)) for a, b in spec.mirror_pairs]
            flips = spec.flip_axes if augment else ()
            extra = (self._augmentations or spec.augment) if augment else None
            return seg3d_transforms(train, spec.modality, spacing, patch, 0.5, flips, pairs, attach, extra)
        return cls2d_transforms(train and augment, self.train_patch_size(spec), self.hparams.channels, attach)

    def _dataset(self, records: list[dict[str, Any]], transform) -> Dataset:
        if self.hparams.cache == "memory":
            return CacheDataset(records, transform, progress=False, num_workers=self.hparams.num_workers or 1)
        if self.hparams.cache == "disk":
            return PersistentDataset(records, transform, cache_dir=self.hparams.cache_dir)
        return Dataset(records, transform)

    def dataset(self, split: str, task: int) -> Dataset:
        """This process's dataset of one task and split (after :meth:`setup`)."""
        return self._datasets[split][task]

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, batch_size: int, sampler) -> DataLoader:
        """A DataLoader with its own random generator: a DataLoader draws its workers' base seed on every
        iteration, from the global generator unless given one, so validating more or less often would
        change what a model that draws from it (dropout) gets in training."""
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_by_region,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def train_dataloader(self) -> DataLoader:
        """Mixed-region, region-weighted batches from this process's shards."""
        datasets = self._datasets["train"]
        rank, world = self._rank_world()
        weights = self.hparams.region_weights or {}
        per_region = {r: sum(1 for s in self.task_specs if s.region == r) for r in self.regions}
        task_weights = [weights.get(s.region, 1.0) / per_region[s.region] for s in self.task_specs]
        total = self.hparams.samples_per_epoch or sum(
            len(self._records[s.name]["train"]) for s in self.task_specs
        )
        sampler = RegionBalancedSampler(
            [len(d) for d in datasets], task_weights, math.ceil(total / world), rank, world, self.hparams.seed
        )
        if self._resume is not None:  # restored from a checkpoint (Lightning restores before this call)
            sampler.set_epoch(self._resume["epoch"])
            sampler.skip = self._resume["batches_done"] * self.hparams.batch_size
            self._resume = None
        return self._loader(SeededConcatDataset(datasets), self.hparams.batch_size, sampler)

    def state_dict(self) -> dict[str, int]:
        """Checkpoint state: the training epoch and how many of its batches are done."""
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.current_epoch
        if done >= trainer.num_training_batches:  # saved at the end of an epoch: the next starts afresh
            epoch, done = epoch + 1, 0
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Remember the position to resume from; applied when the training loader is built."""
        self._resume = dict(state_dict) if state_dict else None

    def _per_task_loaders(self, split: str) -> list[DataLoader]:
        size = self.hparams.val_batch_size or (1 if self.kind == "seg3d" else self.hparams.batch_size)
        return [self._loader(d, size, LocalSequentialSampler(len(d))) for d in self._datasets[split]]

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task (index = task index)."""
        return self._per_task_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task (index = task index)."""
        return self._per_task_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        """The test split, one loader per task."""
        return self._per_task_loaders("test")
