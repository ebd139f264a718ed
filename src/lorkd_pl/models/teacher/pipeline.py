"""A teacher in its OWN pipeline: its spacing, intensity and input sizes, on whole volumes, once.

For one case (:class:`TeacherPipeline`):

1. the image is read, brought to the teacher's ``orientation`` (default RAS, as the student), resampled
   to its ``spacing`` and normalised with its ``intensity`` (fields left out: the student's own);
2. the teacher runs on the whole volume: sliding windows of ``roi_size`` (Gaussian blending), or one
   forward with the volume zero-padded at its end to a multiple of ``divisible`` (cropped back after);
   cls2d: the image resized to ``roi_size`` (default: the student's size);
3. its output becomes the task's KD target (:mod:`lorkd_pl.models.teacher.outputs`), and is resampled
   (as probabilities, trilinear, by the two grids' affines) into the student's preprocessed grid.

:func:`build_targets` does that for every training and validation case of this process's shard that
has no fresh entry in the cache (:mod:`lorkd_pl.data.teacher_targets`); :func:`evaluate_teacher` does it
on a test split and writes the same ``summary/<task>.json`` as ``lorkd-pl test``, so an outside teacher
gets its row in ``lorkd-pl report``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import Tensor

import lorkd_pl.models.teacher.nnunet as nnunet
from lorkd_pl.data.teacher_targets import TeacherTargetStore, image_digest
from lorkd_pl.data.transforms import LoadArrayOrFile, ToChannels, seg3d_preprocessing
from lorkd_pl.io.atomic import write_json_atomic
from lorkd_pl.models.teacher.bundle import read_bundle_pipeline
from lorkd_pl.models.teacher.loading import Teacher, TeacherError
from lorkd_pl.models.teacher.outputs import target_probabilities, targets_from_probabilities
from lorkd_pl.models.teacher.spec import Intensity, TeacherSpec


class _AffineIntensity(mt.MapTransform):
    """``image · scale + shift``."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__(["image"])
        self.scale, self.shift = scale, shift

    def __call__(self, data):
        sample = dict(data)
        sample["image"] = sample["image"] * self.scale + self.shift
        return sample


def teacher_intensity(intensity: Intensity) -> list[mt.MapTransform]:
    """The transforms of a teacher's intensity pipeline: clip → normalise → ``x·scale + shift``."""
    steps: list[mt.MapTransform] = []
    if intensity.window:
        low, high = intensity.window
        steps.append(
            mt.ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=low, b_max=high, clip=True)
        )
    if intensity.percentiles:
        steps.append(
            mt.ClipIntensityPercentilesd(
                "image", lower=intensity.percentiles[0], upper=intensity.percentiles[1]
            )
        )
    if intensity.normalize == "zscore":
        steps.append(mt.NormalizeIntensityd("image"))
    elif intensity.normalize == "minmax":
        steps.append(mt.ScaleIntensityd("image", minv=0.0, maxv=1.0))
    if (intensity.scale, intensity.shift) != (1.0, 0.0):
        steps.append(_AffineIntensity(intensity.scale, intensity.shift))
    return steps


def _same_grid(a: MetaTensor, b: MetaTensor) -> bool:
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and torch.allclose(
        a.affine.double(), b.affine.double(), atol=1e-4
    )


@dataclass
class TeacherPipeline:
    """The teacher's own pipeline for one task.

    Args:
        spec: the teacher description.
        task: the task's description (``task_info`` entry: ``name``, ``kind``, ``modality``, ``spacing``,
            ``patch_size``).
        student_transform: the student's deterministic preprocessing of a record (its validation
            transform): gives the grid the targets must live in.
        channels: cls2d image channels.
    """

    spec: TeacherSpec
    task: Mapping[str, Any]
    student_transform: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    channels: int = 1

    def __post_init__(self) -> None:
        kind, spec, where = self.task["kind"], self.spec, "model.init_args.teacher"
        dims = 3 if kind == "seg3d" else 2
        if kind == "cls2d" and spec.spacing:
            raise TeacherError(f"{where}.spacing is for seg3d teachers; cls2d images have none")
        for name, value in (("spacing", spec.spacing), ("roi_size", spec.roi_size)):
            if value and len(value) != dims:
                raise TeacherError(f"{where}.{name} needs {dims} values for a {kind} task, got {list(value)}")
        if kind == "seg3d":
            spacing = spec.spacing or self.task.get("spacing")
            intensity = teacher_intensity(spec.intensity) if spec.intensity is not None else None
            modality = self.task.get("modality") or "other"
            steps = seg3d_preprocessing(["image"], modality, spacing, intensity, spec.orientation)
        else:
            size = spec.roi_size or tuple(self.task["patch_size"])
            steps = [LoadArrayOrFile(), ToChannels(self.channels)]
            steps += teacher_intensity(spec.intensity) if spec.intensity else [mt.ScaleIntensityd("image")]
            steps.append(mt.Resized("image", spatial_size=tuple(size), mode="bilinear", anti_aliasing=False))
            if spec.intensity is None:
                steps.append(mt.NormalizeIntensityd("image"))
        self.teacher_transform = mt.Compose([*steps, mt.EnsureTyped("image", dtype=torch.float32)])

    def description(self) -> dict[str, Any]:
        """The teacher's pipeline and the student's preprocessing of this task (part of the key)."""
        task = self.task
        student = {"kind": task["kind"], "modality": task.get("modality"), "spacing": task.get("spacing")}
        if task["kind"] == "cls2d":
            student.update(size=list(task["patch_size"]), channels=self.channels)
        return {"teacher_pipeline": self.spec.pipeline(), "student": student}

    def raw_output(self, teacher: Teacher, image: Tensor) -> Tensor:
        """The teacher's output on a whole preprocessed input ``(1, C, *S)`` → ``(1, K_teacher, *S)``."""
        spec = self.spec
        if self.task["kind"] == "seg3d" and spec.roi_size:
            blended = sliding_window_inference(
                image,
                roi_size=tuple(spec.roi_size),
                sw_batch_size=spec.sw_batch_size,
                predictor=teacher,
                overlap=spec.overlap,
                mode="gaussian",
            )  # a weighted mean: probabilities still sum to 1, log-probabilities need renormalising
            return blended.log_softmax(1) if spec.output == "log_probabilities" else blended
        if self.task["kind"] == "seg3d" and spec.divisible > 1:
            sizes = image.shape[2:]
            pad = [(-n) % spec.divisible for n in sizes]
            padded = F.pad(image, [p for axis in reversed(pad) for p in (0, axis)])
            out = teacher(padded)
            return out[(slice(None), slice(None), *[slice(0, n) for n in sizes])]
        return teacher(image)

    def prepare(self, record: Mapping[str, Any], student: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Read and preprocess one case for the teacher (and, seg3d, for the student's grid): the
        part of :meth:`targets` that needs no teacher, so DataLoader workers can do it ahead.

        Returns:
            ``{"image": the teacher's input (C, *S), "grid": the student's preprocessed image}``.
        """
        image = self.teacher_transform({"image": record["image"]})["image"]
        grid = None
        if self.task["kind"] == "seg3d":
            grid = (student or self.student_transform(dict(record)))["image"]
        return {"image": image, "grid": grid}

    def teacher_output(
        self, teacher: Teacher, prepared: Mapping[str, Any], device: torch.device | str
    ) -> tuple[Tensor, Tensor | None]:
        """The teacher's raw output on a prepared case ``(1, K_teacher, *S)`` and the affine of its grid
        (seg3d; ``None`` for cls2d)."""
        image = prepared["image"]
        plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        return self.raw_output(teacher, plain[None].to(device)), getattr(image, "affine", None)

    @torch.no_grad()
    def targets(
        self,
        teacher: Teacher,
        record: Mapping[str, Any],
        device: torch.device | str = "cpu",
        student: Mapping[str, Any] | None = None,
        prepared: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """The KD target of one case in the student's grid.

        Args:
            teacher: the loaded teacher (its class mapping holds this task).
            record: ``{"image", "label", ...}`` as the data module's records.
            device: where the teacher runs.
            student: seg3d: the record through :attr:`student_transform`, when the caller has it
                already (else it is read here).
            prepared: :meth:`prepare`'s result, when a worker made it already.

        Returns:
            seg3d: ``(K_task, X, Y, Z)`` in the student's preprocessed grid; cls2d: ``(K_task,)``; fp32.
        """
        name = self.task["name"]
        prepared = prepared or self.prepare(record, student)
        raw, affine = self.teacher_output(teacher, prepared, device)
        if not getattr(self, "_checked", False):  # the first real input is the probe
            warning = teacher.check_output(raw)
            if warning:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"lorkd-pl: {warning}")
            self._checked = True
        targets = teacher.targets(raw, name)[0].cpu()
        if self.task["kind"] != "seg3d":
            return targets
        grid = prepared["grid"]
        teacher_grid = MetaTensor(targets, affine=affine)
        if _same_grid(teacher_grid, grid):
            return targets
        resample = mt.ResampleToMatch(mode="bilinear", padding_mode="border", dtype=torch.float32)
        probabilities = resample(
            MetaTensor(target_probabilities(targets, teacher.target_kind), affine=affine), grid
        )
        return targets_from_probabilities(probabilities.as_tensor()[None], teacher.target_kind)[0]


class NnUNetPipeline(TeacherPipeline):
    """An nnU-Net v2 folder's own pipeline for one seg3d task (:mod:`lorkd_pl.models.teacher.nnunet`):
    the image read in its file's voxel order, nnU-Net's preprocessing (in :meth:`prepare`, so
    DataLoader workers do it ahead), its sliding window with mirroring and folds, and its export to
    probabilities in the image's own grid, then resampled into the student's grid like any teacher's.
    """

    def __post_init__(self) -> None:
        if self.task["kind"] != "seg3d":
            raise TeacherError(
                f"task {self.task['name']!r} is {self.task['kind']}: an nnU-Net teacher segments 3D volumes "
                "(map only seg3d tasks to it)"
            )
        self.folder = nnunet.folder_of(self.spec)
        steps = seg3d_preprocessing(["image"], "other", None, [], None)  # the file's grid, raw values
        self.teacher_transform = mt.Compose([*steps, mt.EnsureTyped("image", dtype=torch.float32)])

    def description(self) -> dict[str, Any]:
        """The resolved nnU-Net pipeline and the student's preprocessing (part of the cache key)."""
        described = super().description()
        return {**described, "teacher_pipeline": self.folder.describe()}

    def prepare(self, record: Mapping[str, Any], student: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Read the case and run nnU-Net's preprocessing on it.

        Returns:
            ``{"image": the network's input (C, *S'), "case": nnunet.Preprocessed, "affine": the image
            file's affine, "grid": the student's preprocessed image}``.
        """
        image = self.teacher_transform({"image": record["image"]})["image"]
        if image.shape[0] != self.folder.input_channels:
            raise TeacherError(
                f"{record['image']}: {image.shape[0]} image channel(s), but the nnU-Net teacher "
                f"{self.folder.folder} reads {self.folder.input_channels} "
                f"({', '.join(map(str, self.folder.dataset.get('channel_names', {}).values()))})"
            )
        # SimpleITK's own spacing, as nnU-Net reads it (the affine's column norms drift for oblique images)
        spacing = [float(v) for v in image.meta.get("spacing", image.pixdim)[:3]]
        data, case = nnunet.preprocess(image.as_tensor().numpy(), spacing, self.folder)
        grid = (student or self.student_transform(dict(record)))["image"]
        return {"image": torch.from_numpy(data), "case": case, "affine": image.affine, "grid": grid}

    def teacher_output(
        self, teacher: Teacher, prepared: Mapping[str, Any], device: torch.device | str
    ) -> tuple[Tensor, Tensor | None]:
        """nnU-Net's sliding window and export: probabilities ``(1, K, X, Y, Z)`` in the image's grid."""
        logits = nnunet.sliding_window_logits(
            teacher, prepared["image"], self.folder.patch_size, self.folder.step, device
        )
        return nnunet.restore(logits, prepared["case"], self.folder)[None], prepared["affine"]


class BundleTeacherPipeline(TeacherPipeline):
    """A MONAI bundle's own preprocessing and inferer for one seg3d task
    (:mod:`lorkd_pl.models.teacher.bundle`): the case through the bundle's ``preprocessing`` (in
    :meth:`prepare`, so DataLoader workers do it ahead), the teacher through its ``inferer``, the output
    resampled into the student's grid by the two grids' affines like any teacher's."""

    def __post_init__(self) -> None:
        from lorkd_pl.models.teacher.bundle import read_bundle_pipeline

        bundle = read_bundle_pipeline(Path(self.spec.path))
        if bundle is None:
            raise TeacherError(f"MONAI bundle {self.spec.path} declares no preprocessing and inferer")
        self.bundle = bundle

    def description(self) -> dict[str, Any]:
        """The bundle's pipeline and the student's preprocessing (part of the cache key)."""
        return {**super().description(), "teacher_pipeline": self.bundle.description}

    def prepare(self, record: Mapping[str, Any], student: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The case through the bundle's preprocessing, and the student's grid."""
        key = self.bundle.image_key
        try:
            image = self.bundle.preprocessing({key: record["image"]})[key]
        except Exception as error:  # MONAI wraps a transform's error; its cause names the step
            reason = " ".join(str(error.__cause__ or error).split())[:300]
            raise TeacherError(f"{record['image']}: the bundle's preprocessing failed: {reason}") from None
        if not isinstance(image, MetaTensor):
            raise TeacherError(
                f"MONAI bundle {self.spec.path}: its preprocessing returns no image with an affine"
            )
        grid = (student or self.student_transform(dict(record)))["image"]
        return {"image": image, "grid": grid}

    def teacher_output(
        self, teacher: Teacher, prepared: Mapping[str, Any], device: torch.device | str
    ) -> tuple[Tensor, Tensor | None]:
        """The bundle's inferer on the whole preprocessed case: ``(1, K, *S)`` and the case's affine."""
        image = prepared["image"]
        try:
            raw = self.bundle.inferer(image.as_tensor()[None].float().to(device), teacher)
        except TeacherError:
            raise
        except Exception as error:  # the bundle's inferer refusing the case (roi_size, ...)
            reason = " ".join(str(error.__cause__ or error).split())[:300]
            raise TeacherError(f"MONAI bundle {self.spec.path}: its inferer failed: {reason}") from None
        raw = raw.as_tensor() if isinstance(raw, MetaTensor) else torch.as_tensor(raw)
        return raw, image.affine


@dataclass
class BuildReport:
    """What :func:`build_targets` did on this process."""

    built: int
    reused: int
    seconds: float
    cases: list[str]
    #: the teacher's resolved own pipeline (an nnU-Net folder's, or declared fields), printed at fit start
    pipeline: dict[str, Any] | None = None


class _Prepared(torch.utils.data.Dataset):
    """The cases to build, read and preprocessed by DataLoader workers (:meth:`TeacherPipeline.prepare`)."""

    def __init__(self, todo: Sequence[tuple[Mapping[str, Any], TeacherPipeline]]) -> None:
        self.todo = todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        record, pipeline = self.todo[index]
        return index, pipeline.prepare(record)


def build_targets(
    teacher: Teacher,
    spec: TeacherSpec,
    pipelines: Mapping[str, TeacherPipeline],
    records: Sequence[Mapping[str, Any]],
    store: TeacherTargetStore,
    device: torch.device | str = "cpu",
    workers: int = 0,
) -> BuildReport:
    """Make the cached target of every record that has no fresh one (this process's shard).

    Cases already stored under their key are reused, so an interrupted build resumes where it
    stopped. With ``workers`` > 0, DataLoader workers read and preprocess the next cases while the
    teacher runs on the current one.

    Args:
        teacher: the loaded teacher.
        spec: its description.
        pipelines: task name → :class:`TeacherPipeline`.
        records: tagged records ``{"image", "label", "case": "<task>/<id>", ...}``; tasks without a
            class mapping are skipped.
        store: the cache.
        device: where the teacher runs.
        workers: DataLoader workers for reading and preprocessing (0: in this process).
    """
    start = time.perf_counter()
    reused = 0
    cases, todo = [], []
    for record in records:
        task = record["case"].partition("/")[0]
        if task not in teacher.class_channels:
            continue
        pipeline = pipelines[task]
        parts = {
            "teacher": teacher.sha256,
            "classes": [list(g) for g in teacher.class_channels[task]],
            "stored": store.form,
            **pipeline.description(),
        }
        entry = store.entry(record["case"])
        digest, stat = image_digest(record["image"], entry)
        key = store.key(parts, digest)
        cases.append(record["case"])
        store.expected[record["case"]] = key
        store.tasks.add(task)
        if entry is not None and entry.get("key") == key:
            reused += 1
        else:
            todo.append((record, pipeline, key, digest, stat))
    loader = torch.utils.data.DataLoader(
        _Prepared([(record, pipeline) for record, pipeline, *_ in todo]),
        batch_size=None,
        num_workers=workers if len(todo) > 1 else 0,
        collate_fn=_as_it_is,
    )
    for index, prepared in loader:
        record, pipeline, key, digest, stat = todo[index]
        targets = pipeline.targets(teacher, record, device, prepared=prepared)
        store.write(record["case"], key, targets, digest, stat, teacher.target_kind)
    own = next(
        (
            p.description()["teacher_pipeline"]
            for p in pipelines.values()
            if isinstance(p, (NnUNetPipeline, BundleTeacherPipeline)) or spec.own_pipeline
        ),
        None,
    )
    return BuildReport(len(todo), reused, time.perf_counter() - start, cases, own)


def _as_it_is(item: Any) -> Any:
    return item


def evaluate_teacher(
    teacher: Teacher,
    pipelines: Mapping[str, TeacherPipeline],
    tasks: Sequence[Mapping[str, Any]],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    out: str | Path,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Test an outside teacher in its own pipeline; write ``<out>/summary/<task>.json`` per task.

    Predictions are the argmax of the teacher's target in the student's grid, compared with the label
    as the student's test reads it: the same ground truth and metrics as ``lorkd-pl test``.

    Args:
        teacher: the loaded teacher.
        pipelines: task name → :class:`TeacherPipeline`.
        tasks: the tasks' descriptions (``task_info``).
        records: task name → its test records.
        out: the run folder.
        device: where the teacher runs.

    Returns:
        The summary files written.
    """
    from lorkd_pl.evaluation.summaries import segmentation_case, task_summary

    for task in tasks:  # before any work: a test run's own summaries are never replaced
        earlier = Path(out) / "summary" / f"{task['name']}.json"
        if earlier.exists() and not _is_teacher_test_summary(earlier):
            raise TeacherError(
                f"{earlier} exists and was not written by lorkd-pl teacher-test (a test run's summary?); "
                "nothing was written: give teacher-test its own --out folder"
            )
    written = []
    for task in tasks:
        name = task["name"]
        if name not in teacher.class_channels:
            raise TeacherError(
                f"teacher {teacher.source} has no class mapping for task {name!r}: nothing to test; name "
                "its classes in teacher.classes (or the task's teacher_classes)"
            )
        pipeline, rows = pipelines[name], []
        for record in records[name]:
            if task["kind"] == "seg3d":  # one read of the case in the student's grid serves both
                student = pipeline.student_transform(dict(record))
                targets = pipeline.targets(teacher, record, device, student)
                label = student["label"][0].long()
                rows.append(segmentation_case(record["case"], targets.argmax(0), label.as_tensor(), task))
            else:
                targets = pipeline.targets(teacher, record, device)
                probabilities = target_probabilities(targets, teacher.target_kind)
                probabilities = probabilities / probabilities.sum()  # per-class sigmoids: normalised
                label = int(record["label"])
                rows.append({"case": record["case"], "probabilities": probabilities, "label": label})
        summary = task_summary(task, rows)
        summary["model"] = {
            "teacher": teacher.source,
            "sha256": teacher.sha256,
            "pipeline": pipeline.description(),
        }
        written.append(write_json_atomic(Path(out) / "summary" / f"{name}.json", summary, nan="keep"))
    return written


def _is_teacher_test_summary(path: Path) -> bool:
    """Whether ``path`` is a summary an earlier teacher-test wrote (its ``model`` names a teacher)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "teacher" in data["model"]


def task_pipelines(spec: TeacherSpec, datamodule: Any) -> dict[str, TeacherPipeline]:
    """One :class:`TeacherPipeline` per task of a :class:`~lorkd_pl.data.datamodule.MultiRegionDataModule`."""
    channels = int(datamodule.hparams.get("channels", 1))
    if nnunet.is_nnunet_folder(spec.path):  # it segments 3D volumes: the other tasks get no target
        return {
            info["name"]: NnUNetPipeline(spec, info, datamodule.preprocessing(task), channels)
            for info, task in zip(datamodule.task_info, datamodule.task_specs, strict=True)
            if info["kind"] == "seg3d"
        }
    bundle = (
        Path(spec.path).is_dir()
        and not spec.own_pipeline  # pipeline fields of the user's replace the bundle's pipeline
        and read_bundle_pipeline(Path(spec.path)) is not None
    )
    return {
        info["name"]: (BundleTeacherPipeline if bundle and info["kind"] == "seg3d" else TeacherPipeline)(
            spec, info, datamodule.preprocessing(task), channels
        )
        for info, task in zip(datamodule.task_info, datamodule.task_specs, strict=True)
    }


def prepare_targets(
    teacher: Teacher,
    spec: TeacherSpec,
    datamodule: Any,
    device: torch.device | str = "cpu",
    splits: Sequence[str] = ("train", "val"),
) -> tuple[TeacherTargetStore, BuildReport]:
    """Build this process's missing or stale targets of ``splits`` (after ``datamodule.setup``).

    Returns:
        The store (attach it with ``datamodule.use_teacher_targets``) and what was done.
    """
    if spec.cache is None:
        raise TeacherError("model.init_args.teacher.cache is not set: there is no target cache to build")
    channels = max(len(t["classes"]) for t in datamodule.task_info)
    store = TeacherTargetStore(spec.cache, spec.cache_dtype, channels, spec.cache_top_k)
    records = [r for split in splits for r in datamodule.shard_records(split)]
    workers = int(datamodule.hparams.get("num_workers", 0) or 0)
    report = build_targets(teacher, spec, task_pipelines(spec, datamodule), records, store, device, workers)
    return store, report


def describe_build(
    store: TeacherTargetStore,
    report: BuildReport,
    teacher: Teacher,
    datamodule: Any,
    splits: Sequence[str] = ("train", "val"),
) -> str:
    """One line: what this process built, and the cache's size on disk and case count over every
    process's cases of ``splits`` that the teacher distils."""
    cases = [c for split in splits for c in datamodule.all_cases(split)]
    cases = [c for c in cases if c.partition("/")[0] in teacher.class_channels]
    size = store.size_on_disk(cases)
    line = (
        f"lorkd-pl: teacher targets in {store.folder}: {report.built} built, {report.reused} reused "
        f"(this process) in {report.seconds:.1f} s; {len(cases)} cases, {size / 2**20:.1f} MiB on disk"
    )
    if report.pipeline is None:
        return line
    import json

    return f"{line}\nlorkd-pl: teacher pipeline ({teacher.source}): {json.dumps(report.pipeline)}"
