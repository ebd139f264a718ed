"""The LoRKD student: a shared backbone with one low-rank expert per region, per-task heads and KD.

Training step on a mixed-region batch (sorted by region by the data module):

1. ``with expert_routing(student, region)``: one forward of the backbone, each sample through its own
   region's expert (``W0 + s·B_r A_r``); expert ``r`` gets gradients only from region-``r`` samples.
2. Per task present: its head on its samples' features → task loss (Dice + CE, or CE; with deep
   supervision, summed over the levels with weights 2^-l normalised).
3. Knowledge distillation from the frozen teacher: ``KL(softmax(z_t/τ) ‖ softmax(z_s/τ))·τ²`` on the
   task's classes (teacher channels from the task mapping; per-class binary KL for a multi-label
   teacher, see :mod:`lorkd_pl.models.teacher.outputs`), and/or feature KD (MSE between a learned 1×1
   projection of the student's features and the teacher's features). The teacher runs live on the
   batch, or (``teacher.cache``) its targets were made once per case in its own pipeline and ride
   along in the batch (``batch["teacher"]``): no teacher forward in the training step.
4. Loss = task loss + λ·KD, each term weighted by its task's share of the batch.
5. Optionally (``router_weight > 0``) the region router (:mod:`lorkd_pl.models.router`) learns the
   samples' regions from the shared weights' pooled features, computed without gradient in eval mode:
   it changes nothing of steps 1–4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from lorkd_pl.checks import check_ranges
from lorkd_pl.data.teacher_targets import INDEX_KEY, KEY, LOG_PROBS_KEY, TARGET_KEYS
from lorkd_pl.experts import expert_routing, inject_experts, load_base_weights, shared_weights
from lorkd_pl.experts.inject import base_state_dict
from lorkd_pl.experts.layers import Layout
from lorkd_pl.io.atomic import write_json_atomic
from lorkd_pl.models.backbones import (
    build_module,
    count_parameters,
    feature_channels,
    make_head,
    module_mode,
)
from lorkd_pl.models.base import StepLoss, TaskModule
from lorkd_pl.models.generalist import DEFAULT_SEG_BACKBONE, GeneralistModule
from lorkd_pl.models.losses import TaskLoss, kd_kl_top_k, kd_loss, supervision_levels
from lorkd_pl.models.router import (
    RegionClassifier,
    deepest_taps,
    tap_names,
    tap_width,
    tapped_features,
    volume_probabilities,
)
from lorkd_pl.models.teacher.loading import Teacher, TeacherError, load_teacher
from lorkd_pl.models.teacher.spec import PlainValue, TeacherSpec, parse_teacher
from lorkd_pl.models.weight_selection import select_tensor, select_weights

KDKind = Literal["logits", "features", "both", "none"]
#: The most logits one KD call takes for several tasks (2^24: 64 MiB in fp32; each of the KD's passes
#: over that many is long enough on a GPU that its launch no longer matters).
KD_CALL_ELEMENTS = 2**24


class _DistilledTask(NamedTuple):
    """One task of a training batch that is distilled: its index, the main output's logits
    ``(n, K_task, *S)`` of its samples and their rows ``(n,)`` in the batch."""

    task: int
    logits: Tensor
    rows: Tensor


def joined(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat`` along dim 0 (without a copy for one tensor)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def batched_kd(
    parts: Sequence[_DistilledTask], kd: Callable[[Sequence[_DistilledTask]], Tensor], total: int
) -> Tensor:
    """The batch's KD term, ``Σ_task (n_task / N) · KD_task``, with one ``kd`` call per group of tasks
    whose logits have one shape (classes and crop) instead of one per task.

    Equal by construction: ``KD`` is a mean over positions, and for tasks of one crop shape ``(n_t / N)
    · mean_t = Σ_t / (N · P)`` (``P`` positions per sample), so a group contributes ``(n_g / N) ·
    mean_g``. What it saves: the KD function's few dozen small operators (kernel launches on a GPU)
    run once per group, not per task. A group takes tasks up to :data:`KD_CALL_ELEMENTS` logits in
    all (a larger task alone), so that the KD's full-size temporaries stay bounded.

    Args:
        parts: the distilled tasks of the batch (logits ``(n, K_task, *S)``).
        kd: the KD of a group of tasks of one logit shape: the mean over the group's positions.
        total: ``N``, the batch size.

    Returns:
        A scalar.
    """
    open_groups: dict[tuple[int, ...], list[_DistilledTask]] = {}
    groups: list[list[_DistilledTask]] = []
    for part in parts:
        group = open_groups.get(shape := tuple(part.logits.shape[1:]))
        if group is None or sum(p.logits.numel() for p in group) + part.logits.numel() > KD_CALL_ELEMENTS:
            group = open_groups[shape] = []
            groups.append(group)
        group.append(part)
    return sum(sum(p.rows.numel() for p in group) / total * kd(group) for group in groups)


#: The router learns from the features of the last this many training batches (the current one and
#: the earlier ones, kept without gradient): more passes over recent features for the small classifier
#: at no cost to the student.
ROUTER_REPLAY = 8
DEFAULT_RANK = 8


def ranks_by_region(rank: int | Mapping[str, int] | Sequence[int], regions: Sequence[str]) -> int | list[int]:
    """The expert rank of every region of a run, in expert order.

    Args:
        rank: one rank for all, or ``{region: rank}`` with an optional ``default`` for the others.
        regions: the run's regions in expert order.

    Raises:
        ValueError: for a list (positions are not regions), an unknown region name or a rank < 1.
    """
    if isinstance(rank, int) and not isinstance(rank, bool):
        if rank < 1:
            raise ValueError(f"model.rank must be an integer >= 1 (or ranks by region name), got {rank}")
        return rank
    example = ", ".join(f"{region}: 8" for region in regions[:2]) + ", default: 4"
    if not isinstance(rank, Mapping):
        raise ValueError(
            f"model.rank must be one integer or ranks by region name, got {rank!r}; write the mapping "
            f"form, e.g. rank: {{{example}}} (regions not named take `default`)"
        )
    unknown = sorted(set(rank) - set(regions) - {"default"})
    if unknown:
        raise ValueError(
            f"model.rank names {unknown}, which are not regions of this run {list(regions)}; "
            f"e.g. rank: {{{example}}}"
        )
    default = rank.get("default", DEFAULT_RANK)
    ranks = [rank.get(region, default) for region in regions]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"model.rank values must be integers >= 1, got {dict(rank)}")
    return ranks


class LoRKDModule(TaskModule):
    """Student with region experts, distilled from a frozen teacher.

    Args:
        task_info: task descriptions (linked from the data module's ``task_info``).
        regions: region names in expert order (linked from the data module): expert ``i`` = ``regions[i]``.
        backbone: ``{"class_path", "init_args"}`` of the student backbone.
        in_channels: image channels (for probing the feature width).
        rank: expert rank of every region, or ranks by region name, e.g. ``{brain: 8, thorax: 4}``
            (regions not named take the mapping's ``default``, else 8). A list is refused: regions
            are matched by name, never by position.
        alpha: expert scaling numerator (scale ``alpha / rank``).
        layout: ``"paper"`` or ``"factorized"`` expert factors.
        strategy: knowledge-separation strategy (``"auto"`` picks the fastest exact one).
        layer_rank: per-layer ranks on top of ``rank``: ordered ``{glob: rank or "<k>x"}`` on the
            backbone's layer names, first match wins; ``"2x"`` doubles the region ranks (the papers'
            decoder rank = 2 × encoder rank is ``{"upcat_*": 2x}`` for MONAI's BasicUNet).
        transposed_convs: put experts on transposed convolutions too (U-Net decoders mix channels
            there); checkpoints from before they had experts load with ``False``.
        fold: ``{glob: "leading" | "interleaved" | "sequence_first"}``: layers whose input rows are not
            one per sample, e.g. ``{"*.attn.*": leading}`` for SwinUNETR's window attention (see
            :func:`lorkd_pl.experts.inject_experts`); an undeclared fold is an error, never a guess.
        include, exclude: glob patterns of backbone layers that get / do not get experts.
        experts: ``False`` builds the CONTROL of the papers' claim: the same student backbone, heads,
            data, steps and KD, without region experts (one plain network for all regions: "plain
            KD"); its checkpoint has no expert tensors.
        teacher: the teacher: a path (generalist checkpoint, TorchScript file, MONAI bundle folder or
            a plain checkpoint with ``teacher_model``), or a description ``{path, output, classes,
            spacing, intensity, roi_size, divisible, cache, ...}`` of a foundation model with its own
            output convention and pipeline (:mod:`lorkd_pl.models.teacher.spec`, docs/teachers.md);
            ``None`` trains without KD.
        teacher_model: ``{"class_path", "init_args"}`` of a plain-checkpoint teacher's network (also
            ``teacher.model``).
        init_from_teacher: start the shared weights ``W0`` and the heads from a generalist teacher
            whose backbone is the student's class, the same size (copied) or larger (weight selection:
            :mod:`lorkd_pl.models.weight_selection`), so the experts decompose the foundation model's
            own weights; done once, when a fit starts without ``ckpt_path``.
        kd: ``"logits"``, ``"features"``, ``"both"`` or ``"none"``.
        kd_weight: λ, the weight of the KD term(s).
        temperature: τ of the logit KD.
        router_weight: weight of the region router's cross-entropy; ``0`` (default) trains no router
            (nor does a run of one region).
            Its gradient reaches the router's own parameters only (the features it reads are
            computed without gradient), so the student trains exactly as without it; under Adam(W)
            any weight > 0 trains it alike, under SGD the weight scales its step.
        router_lr: the router's learning rate, held after the warm-up (its features move until the last
            step); default ``lr``.
        optimizer, lr, weight_decay, warmup_steps, sw_overlap, sw_batch_size, nonfinite_loss: see
            :class:`TaskModule`.
    """

    #: Rebuilt from a checkpoint, a student loads no teacher and copies no weights.
    restore_overrides: Mapping[str, Any] = {"teacher": None, "kd": "none", "init_from_teacher": False}

    def __init__(
        self,
        task_info: list[dict[str, Any]] | None = None,
        regions: list[str] | None = None,
        backbone: dict[str, Any] | None = None,
        in_channels: int = 1,
        rank: int | dict[str, int] | list[int] = DEFAULT_RANK,
        layer_rank: dict[str, int | str] | None = None,
        transposed_convs: bool = True,
        fold: dict[str, str] | None = None,
        alpha: float = 16.0,
        layout: Layout = "paper",
        strategy: str = "auto",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        experts: bool = True,
        teacher: str | dict[str, PlainValue] | None = None,
        teacher_model: dict[str, PlainValue] | None = None,
        init_from_teacher: bool = False,
        kd: KDKind = "logits",
        kd_weight: float = 1.0,
        temperature: float = 1.0,
        router_weight: float = 0.0,
        router_lr: float | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 4,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        check_ranges(
            self.hparams,
            "model.init_args.",
            [
                ("alpha", lambda v: v > 0, "> 0 (the experts' scale alpha/rank; 0 leaves them untrained)"),
                ("kd_weight", lambda v: v >= 0, ">= 0"),
                ("temperature", lambda v: v > 0, "> 0"),
                ("router_weight", lambda v: v >= 0, ">= 0 (0 trains no region router)"),
                ("router_lr", lambda v: v is None or v > 0, "> 0 (or null: the model's lr)"),
            ],
        )
        spec = parse_teacher(teacher, teacher_model)
        if spec is not None and spec.cache and kd in ("features", "both") and kd_weight > 0:
            raise TeacherError(
                "model.init_args.teacher.cache holds logit targets only; feature KD needs the live teacher: "
                "set kd: logits, or teacher.cache: null"
            )
        network = build_module(backbone or DEFAULT_SEG_BACKBONE)
        width = feature_channels(network, in_channels, self.tasks[0]["patch_size"])
        self.expert_free_parameters = count_parameters(network)
        self.student = (
            network
            if not experts
            else inject_experts(
                network,
                len(self.regions),
                rank=ranks_by_region(rank, self.regions),
                alpha=alpha,
                layout=layout,
                strategy=strategy,
                include=include,
                exclude=exclude,
                layer_rank=layer_rank,
                transposed=transposed_convs,
                fold=fold,
            )
        )
        self.heads = nn.ModuleList([make_head(self.kind, width, len(t["classes"])) for t in self.tasks])
        self.router: RegionClassifier | None = None
        self.router_taps: list[str] = []
        self.router_grid_taps: list[str] = []
        if router_weight > 0 and len(self.regions) > 1:  # one region: nothing to route
            self.router_taps = tap_names(self.student)
            self.router_grid_taps = deepest_taps(
                self.student,
                self.router_taps,
                lambda size: self.router_features(torch.zeros(1, in_channels, *size), grid=False),
                self.tasks[0]["patch_size"],
            )
            features = tap_width(self.student, self.router_taps, width, self.kind, self.router_grid_taps)
            with torch.random.fork_rng(devices=[]):  # the student's initialisation stays the same
                self.router = RegionClassifier(features, len(self.regions))
        # routing accuracy per stage (torchmetrics: reduced across processes) and the test confusion
        self.router_metrics = nn.ModuleDict(
            {
                stage: MulticlassConfusionMatrix(num_classes=len(self.regions))
                for stage in (("val", "test") if self.router is not None else ())
            }
        )
        self.router_summary: dict[str, Any] | None = None
        self.loss = TaskLoss(self.kind)
        self.__dict__["_teacher"] = None  # never a submodule: not saved, not synced by DDP
        self.__dict__["_teacher_device"] = None
        #: the router's replay: (features, regions) of the last ``ROUTER_REPLAY`` batches, no gradient;
        #: a plain list (not a buffer): never saved, a resumed fit starts it anew
        self._router_bank: list[tuple[Tensor, Tensor]] = []
        self.projection: nn.Module | None = None
        if teacher is not None and kd in ("features", "both") and kd_weight > 0:  # else never used (DDP)
            teacher_width = self.teacher.feature_width
            if teacher_width is None:
                raise ValueError(f"teacher {teacher} exposes no feature width; use kd='logits'")
            conv = nn.Conv3d if self.kind == "seg3d" else None
            self.projection = conv(width, teacher_width, 1) if conv else nn.Linear(width, teacher_width)

    # ------------------------------------------------------------------ teacher
    @property
    def teacher_spec(self) -> TeacherSpec | None:
        """The parsed teacher description (``None`` without a teacher)."""
        return parse_teacher(self.hparams.teacher, self.hparams.teacher_model)

    @property
    def teacher(self) -> Teacher:
        """The frozen teacher, loaded on first use (a checkpoint reload for test/export needs none)."""
        if self._teacher is None:
            if self.hparams.teacher is None:
                raise ValueError("no teacher configured (model.init_args.teacher)")
            # Stored outside nn.Module's registry: not in state_dict, not wrapped or synced by DDP.
            try:
                self.__dict__["_teacher"] = load_teacher(self.teacher_spec, self.tasks)
            except AttributeError as error:  # inside a property it would read "no attribute 'teacher'"
                raise TeacherError(f"teacher {self.hparams.teacher} could not be loaded: {error}") from None
            missing = [t["name"] for t in self.tasks if t["name"] not in self._teacher.class_channels]
            if missing and self.hparams.kd in ("logits", "both"):
                rank_zero_warn(
                    f"lorkd-pl: no teacher class mapping for tasks {missing}: no logit KD for them"
                )
        if self.__dict__.get("_teacher_device") != self.device:  # move once per device, not per call
            self._teacher.to(self.device)
            self.__dict__["_teacher_device"] = self.device
        return self._teacher

    @property
    def uses_teacher(self) -> bool:
        """Whether training distils (a teacher is set, KD is on and λ > 0)."""
        return self.hparams.teacher is not None and self.hparams.kd != "none" and self.hparams.kd_weight > 0

    def on_fit_start(self) -> None:
        """Load the teacher and check it before the first step: live, its class mapping and output
        convention on a training crop; cached, build the missing targets (each process its shard,
        then all wait). Optionally copy a generalist teacher into the student."""
        self._router_bank.clear()  # the router's replay starts with this fit
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            datamodule.use_teacher_targets(None)
        if self.uses_teacher and self.hparams.kd in ("logits", "both"):
            if self.teacher_spec.cache:
                self._build_teacher_targets(datamodule)
            else:
                warning = self.teacher.check_output(self.teacher(self._probe_input(datamodule)))
                if warning:
                    rank_zero_warn(f"lorkd-pl: {warning}")
        if self.hparams.init_from_teacher and self.trainer.ckpt_path is None:
            if self.hparams.teacher is None:  # teacher: null on a recipe that starts from its teacher
                rank_zero_info(
                    "lorkd-pl: init_from_teacher without a teacher: the student starts from its own init"
                )
            else:
                self.initialise_from_teacher()

    def _probe_input(self, datamodule: Any) -> Tensor:
        """A real training crop ``(1, C, *patch)`` when the data module has one, else seeded noise."""
        try:
            sample = datamodule.dataset("train", 0)[0]
            sample = sample[0] if isinstance(sample, (list, tuple)) else sample
            return torch.as_tensor(sample["image"])[None].float().to(self.device)
        except (AttributeError, KeyError, IndexError, TypeError):
            patch = self.tasks[0]["patch_size"]
            generator = torch.Generator().manual_seed(0)
            return torch.randn(1, self.hparams.in_channels, *patch, generator=generator).to(self.device)

    def _build_teacher_targets(self, datamodule: Any) -> None:
        from lorkd_pl.models.teacher.pipeline import describe_build, prepare_targets

        if not hasattr(datamodule, "use_teacher_targets"):
            raise TeacherError(
                "model.init_args.teacher.cache needs lorkd-pl's MultiRegionDataModule (it reads the cached "
                "targets with the images); use it, or set teacher.cache: null"
            )
        spec, teacher = self.teacher_spec, self.teacher
        store, report = prepare_targets(teacher, spec, datamodule, self.device)
        self.trainer.strategy.barrier("lorkd_pl_teacher_targets")  # every shard built before any reads
        rank_zero_info(describe_build(store, report, teacher, datamodule))
        datamodule.use_teacher_targets(store)
        teacher.to("cpu")  # no teacher forward in training: free the accelerator's memory
        self.__dict__["_teacher_device"] = torch.device("cpu")

    @torch.no_grad()
    def initialise_from_teacher(self) -> None:
        """Copy a generalist teacher's backbone into ``W0`` (whole, or by weight selection for a smaller
        student of its class: :mod:`lorkd_pl.models.weight_selection`) and its head rows into the task
        heads, each task class from the teacher class it maps to BY NAME (any order), the head's input
        columns selected like the backbone's output channels.

        Raises:
            TeacherError: if the teacher is not a lorkd-pl generalist of the student's backbone class,
                a student tensor is larger than the teacher's, or a task has no class mapping or a
                merged class (no single head row to copy).
        """
        network = self.teacher.network
        if not isinstance(network, GeneralistModule):
            raise TeacherError("init_from_teacher needs a lorkd-pl generalist teacher checkpoint")
        rows_of = {}
        for task in self.tasks:
            groups = self.teacher.class_channels.get(task["name"])
            if groups is None or any(len(g) != 1 for g in groups):
                raise TeacherError(
                    f"init_from_teacher: task {task['name']!r} has "
                    + ("no class mapping onto" if groups is None else "a merged class in its mapping onto")
                    + f" teacher {self.hparams.teacher}; its head needs one teacher class per class "
                    "(map the classes one-to-one in teacher_classes, or set init_from_teacher: false)"
                )
            rows_of[task["name"]] = [g[0] for g in groups]
        if type(network.backbone) is not type(self.student):
            names = (f"{type(m).__module__}.{type(m).__qualname__}" for m in (network.backbone, self.student))
            raise TeacherError(
                "init_from_teacher: the teacher's backbone is {}, the student's {}: weights are selected "
                "only within one backbone class (set init_from_teacher: false)".format(*names)
            )
        experts = self.hparams.get("experts", True)
        try:
            own = base_state_dict(self.student) if experts else self.student.state_dict()
            selected, report = select_weights(own, network.backbone.state_dict())
            if experts:
                load_base_weights(self.student, selected)
            else:  # a plain-KD student: the same backbone, no experts
                self.student.load_state_dict(selected)
            for task, head in zip(self.tasks, self.heads, strict=True):
                rows = network.head.weight[rows_of[task["name"]]]  # (K_task, C_teacher, ...)
                head.weight.copy_(select_tensor(rows, head.weight.shape, f"head of {task['name']}"))
                head.bias.copy_(network.head.bias[rows_of[task["name"]]])
        except (ValueError, RuntimeError) as error:
            raise TeacherError(f"init_from_teacher: teacher {self.hparams.teacher}: {error}") from None
        how = (
            f"{len(report.copied)} copied, {len(report.selected)} by weight selection (the teacher's "
            "uniformly spaced channels, centred kernels)"
            + (
                f", {len(report.kept)} without a teacher counterpart kept as initialised"
                if report.kept
                else ""
            )
        )
        rank_zero_info(
            f"lorkd-pl: initialised the backbone from the teacher ({how}) and {len(self.heads)} heads"
        )

    # ------------------------------------------------------------------ forward
    def features(self, images: Tensor, region: Tensor | int) -> Tensor:
        """Student features of images ``(N, C, *S)``; ``region``: ``(N,)`` expert indices or one int
        (ignored by a plain-KD student, ``experts: false``)."""
        if not self.hparams.get("experts", True):
            return self.student(images)
        with expert_routing(self.student, region):
            return self.student(images)

    def router_features(self, images: Tensor, grid: bool = True) -> Tensor:
        """Pooled features of the shared weights ``W0`` alone (every expert off), in eval mode, without
        gradient: what the region router reads, in training as at inference
        (:func:`~lorkd_pl.models.router.tapped_features`).

        Args:
            images: ``(N, C, *S)``.

        Returns:
            ``(N, D)``.
        """
        grid_taps = self.router_grid_taps if grid else ()
        experts_off = shared_weights(self.student) if self.hparams.get("experts", True) else nullcontext()
        with torch.no_grad(), module_mode(self.student, False), experts_off:
            return tapped_features(self.student, self.router_taps, images, grid_taps)

    def steady_parameters(self) -> list[nn.Parameter]:
        """The router's: its features move until the last step, so it keeps the peak learning rate
        instead of decaying with the student (a decayed router would freeze on stale features)."""
        return list(self.router.parameters()) if self.router is not None else []

    def steady_learning_rate(self) -> float:
        """``router_lr`` (default ``lr``)."""
        return float(self.hparams.get("router_lr") or self.hparams.lr)

    def router_logits(self, images: Tensor) -> Tensor:
        """Region logits ``(N, R)`` of images ``(N, C, *S)`` (windows of a volume: one row each)."""
        if self.router is None:
            raise ValueError("this student has no region router (train with model.init_args.router_weight>0)")
        return self.router(self.router_features(images))

    def region_probabilities(self, images: Tensor, task: int) -> Tensor:
        """Region probabilities ``(N, R)`` of whole inputs ``(N, C, *S)`` preprocessed as task ``task``'s:
        volumes window by window in the task's patch (:func:`~lorkd_pl.models.router.volume_probabilities`),
        2D images directly."""
        if self.kind != "seg3d":
            return self.router_logits(images).float().softmax(1)
        return volume_probabilities(
            self.router_logits, images, self.tasks[task]["patch_size"], self.hparams.sw_batch_size
        )

    def task_logits(self, images: Tensor, task: int) -> Tensor:
        """Logits of one task through its region's expert: ``(N, C, *S)`` → ``(N, K_task, ...)``."""
        region = self.regions.index(self.tasks[task]["region"])
        return self.heads[task](self.features(images, region))

    def compute_loss(self, batch: Mapping[str, Any]) -> StepLoss:
        """The student's loss on one mixed-region batch: each sample through its region's expert,
        per-task heads, task loss (weighted by the task's share of the batch) + ``kd_weight`` × KD.
        The region router's loss is not part of it (:meth:`training_step` adds it)."""
        images, labels, tasks = batch["image"], batch["label"], batch["task"]
        total = images.shape[0]
        levels = supervision_levels(self.features(images, batch["region"]), images)
        features = levels[0][1]  # the main output: feature KD uses it
        cached = self.uses_teacher and any(batch.get(k) is not None for k in TARGET_KEYS)
        teacher = None
        if self.uses_teacher:  # with cached targets it stays where it is (off the accelerator)
            teacher = self._teacher if cached and self._teacher is not None else self.teacher
        teacher_output = teacher_features = None
        if not cached and teacher is not None and self.hparams.kd in ("logits", "both"):
            teacher_output = teacher(images)
        if teacher is not None and self.hparams.kd in ("features", "both"):
            teacher_features = teacher.features(images)
        task_loss = distillation = images.new_zeros(())
        terms: dict[tuple[int, str], Tensor] = {}  # per task and term, to name a non-finite culprit
        distilled_tasks: list[_DistilledTask] = []
        present = set(tasks.unique().tolist())
        for task in range(len(self.tasks)):
            if task not in present:  # keep every head in the graph: DDP then needs no unused-parameter search
                task_loss = task_loss + 0.0 * self.heads[task](features[:0]).sum()
                continue
            rows = (tasks == task).nonzero().squeeze(1)
            share = rows.numel() / total
            task_labels = labels.index_select(0, rows)
            level_logits = [(w, self.heads[task](level.index_select(0, rows))) for w, level in levels]
            logits = level_logits[0][1]  # the main output's: KD uses it
            terms[task, "task_loss"] = sum(w * self.loss(z, task_labels) for w, z in level_logits)
            task_loss = task_loss + share * terms[task, "task_loss"]
            distilled = cached or teacher_output is not None
            if distilled and self.tasks[task]["name"] in teacher.class_channels:
                distilled_tasks.append(_DistilledTask(task, logits, rows))

        def logit_kd(group: Sequence[_DistilledTask]) -> Tensor:
            return self._logit_kd(group, batch, teacher, teacher_output)

        def kd_terms() -> dict[tuple[int, str], Tensor]:  # per task: only to name a non-finite culprit
            return {(part.task, "kd_loss"): logit_kd([part]) for part in distilled_tasks}

        if distilled_tasks:
            distillation = distillation + batched_kd(distilled_tasks, logit_kd, total)
        if teacher_features is not None and self.projection is not None:
            with torch.autocast(device_type=images.device.type, enabled=False):
                features_kd = F.mse_loss(self.projection(features.float()), teacher_features.float())
            distillation = distillation + features_kd
        loss = task_loss + self.hparams.kd_weight * distillation
        logged = {"train/task_loss": task_loss, "train/kd_loss": distillation}
        return StepLoss(loss, terms, logged, deferred_terms=kd_terms if distilled_tasks else None)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """:meth:`compute_loss`, plus ``router_weight`` × the region router's loss on the replayed
        features of the last ``ROUTER_REPLAY`` batches; checked for non-finite values (``guard_loss``)
        and logged; a scalar."""
        step = self.compute_loss(batch)
        loss, size = step.loss, batch["image"].shape[0]
        if self.router is not None:
            features = self.router_features(batch["image"])
            bank = self._router_bank  # not state: a resume starts it anew
            bank.append((features, batch["region"]))
            del bank[:-ROUTER_REPLAY]
            region_logits = self.router(torch.cat([f for f, _ in bank])).float()
            router_loss = F.cross_entropy(region_logits, torch.cat([r for _, r in bank]))
            loss = loss + self.hparams.router_weight * router_loss
            current = region_logits[-size:].detach()  # this batch's rows are the bank's last
            accuracy = (current.argmax(1) == batch["region"]).float().mean()
            self.log_dict(
                {"train/router_loss": router_loss, "train/router_accuracy": accuracy}, batch_size=size
            )
        loss = self.guard_loss(loss, batch, batch_idx, step.named_terms)
        self.log_dict(step.logged, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def _route(self, stage: str, batch: Mapping[str, Any], task: int) -> None:
        """Update the stage's routing confusion matrix with the router's answer on ``batch`` (task
        ``task``'s inputs, whole volumes or images, in that task's preprocessing)."""
        if stage not in self.router_metrics:
            return
        predicted = self.region_probabilities(batch["image"], task).argmax(1)
        truth = torch.full_like(predicted, self.regions.index(self.tasks[task]["region"]))
        self.router_metrics[stage].update(predicted, truth)

    def _log_routing(self, stage: str) -> None:
        """Log ``<stage>/router_accuracy`` (and, after a test, keep and write the confusion matrix)."""
        if stage not in self.router_metrics:
            return
        confusion = self.router_metrics[stage].compute().long()
        self.router_metrics[stage].reset()
        accuracy = float(confusion.diagonal().sum() / confusion.sum().clamp(min=1))
        self.log(f"{stage}/router_accuracy", accuracy, sync_dist=True)  # the same on every rank
        if stage != "test":
            return
        self.router_summary = {
            "regions": list(self.regions),
            "accuracy": accuracy,
            "cases": int(confusion.sum()),
            "confusion": confusion.tolist(),  # rows: true region, columns: routed region
        }
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        if self.trainer.is_global_zero and log_dir is not None:
            write_json_atomic(Path(log_dir) / "router.json", self.router_summary, nan="keep")

    def on_validation_epoch_end(self) -> None:
        """Task metrics (:class:`TaskModule`) and ``val/router_accuracy``."""
        super().on_validation_epoch_end()
        self._log_routing("val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Task metrics and cases (:class:`TaskModule`) and the router's answer."""
        super().test_step(batch, batch_idx, dataloader_idx)
        self._route("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        """Task metrics and summaries (:class:`TaskModule`), ``test/router_accuracy`` and
        ``<log_dir>/router.json`` (accuracy and confusion matrix of the router)."""
        super().on_test_epoch_end()
        self._log_routing("test")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Task metrics (:class:`TaskModule`) and the router's answer; with cached teacher targets also
        ``val/<task>/kd_loss``: how far the student is from the teacher on held-out cases (whole
        volumes)."""
        logits = self._evaluate(batch, dataloader_idx, self.val_metrics)
        self._route("val", batch, dataloader_idx)
        teacher, name = self._teacher, self.tasks[dataloader_idx]["name"]
        cached = any(batch.get(k) is not None for k in TARGET_KEYS)
        if not cached or teacher is None or name not in teacher.class_channels:
            return
        logits = torch.as_tensor(logits)
        rows = torch.arange(logits.shape[0], device=logits.device)
        distance = self._cached_kd(logits, batch, rows, teacher.target_kind)
        self.log(f"val/{name}/kd_loss", distance, add_dataloader_idx=False, batch_size=logits.shape[0])

    def _logit_kd(
        self,
        group: Sequence[_DistilledTask],
        batch: Mapping[str, Any],
        teacher: Teacher,
        teacher_output: Tensor | None,
    ) -> Tensor:
        """Logit KD of a group of tasks whose logits share one shape, in one call: the mean over the
        group's positions. Targets cached in the batch (``teacher_output`` None) or made from the
        teacher's output on the batch ``(N, K_teacher, *S)``, each task's own classes."""
        logits = joined([part.logits for part in group])
        rows = joined([part.rows for part in group])
        if teacher_output is None:
            return self._cached_kd(logits, batch, rows, teacher.target_kind)
        target = joined(
            [
                teacher.targets(teacher_output.index_select(0, part.rows), self.tasks[part.task]["name"])
                for part in group
            ]
        )
        return kd_loss(logits, target, teacher.target_kind, self.hparams.temperature)

    def _cached_kd(self, logits: Tensor, batch: Mapping[str, Any], rows: Tensor, kind: str) -> Tensor:
        """KD of one task's ``logits`` ``(n, K_task, *S)`` against the cached targets of the batch's
        ``rows`` ``(n,)``: dense (padded to the run's ``K_max``: the task's first ``K_task`` channels) or
        top-k (:func:`~lorkd_pl.models.losses.kd_kl_top_k`)."""
        temperature = self.hparams.temperature
        if batch.get(INDEX_KEY) is not None:
            index, stored = (
                torch.as_tensor(batch[k]).to(logits.device).index_select(0, rows)
                for k in (INDEX_KEY, LOG_PROBS_KEY)
            )
            return kd_kl_top_k(logits, index, stored, temperature)
        target = torch.as_tensor(batch[KEY]).to(logits.device).index_select(0, rows)[:, : logits.shape[1]]
        return kd_loss(logits, target, kind, temperature)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the model kind, the region order and the teacher's path and sha256 (not its weights)."""
        checkpoint["lorkd_pl_model"] = type(self).__name__
        checkpoint["regions"] = list(self.regions)
        if self._teacher is not None:
            checkpoint["teacher"] = {"path": self._teacher.source, "sha256": self._teacher.sha256}
