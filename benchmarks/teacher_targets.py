"""Cached teacher targets of a CT-sized case: bytes on disk, bytes and time per training crop, build time.

One synthetic case in the student's grid of a 512×512×300 CT at 0.8×0.8×1.5 mm resampled to 1.5 mm
(274×274×300 voxels), with a synthetic teacher of K classes (14 and 117): K−1 ellipsoid organs in a
body, soft boundaries (log-softmax of 6 × a smoothed one-hot, plus a fixed random confusion of every
structure with the others, so the probability outside the top classes is uneven, as a trained
segmenter's is). Side by side, for random 128³ training crops:

* ``dense .npz (before)``: the earlier store, one compressed ``.npz`` per case, fp16; a crop
  decompresses the whole case and converts it to float32 (what the data pipeline did; not timed when
  that float32 copy would exceed 4 GiB: ``nan``);
* ``dense chunked``: the same fp16 values in the chunked store (32³ chunks, zlib);
* ``top-k chunked``: the k most likely classes (uint8) and their fp16 log-probabilities;
* ``image crop (floor)``: the case's preprocessed CT image (float32) in the same chunked store: what
  reading the training crop of the image alone costs.

Reported per row: bytes on disk, bytes read and milliseconds per crop (median), peak memory of one
crop read (numpy allocations, tracemalloc), the store's write time for the case, and for top-k the
KD difference (:func:`kd_difference`) at k, 2k and 4k: of the loss value, and of its gradient w.r.t. the
student's logits (what training uses), for three students (at initialisation; on its way; close to the
teacher), at τ = 1. ``--kd``: only that, on 64³ crops, for each class count (nothing is stored).

``--pipeline``: the same through the data pipeline a fit runs. One CT (512×512×300 int16 at
0.8×0.8×1.5 mm, NIfTI) as a task with spacing 1.5 mm and 128³ crops, a pointwise TorchScript teacher of
14 classes, targets built by :func:`lorkd_pl.models.teacher.pipeline.prepare_targets`; then the training
sample (read, resample, crop, and with cached targets the crop's target) timed with and without the
targets attached, and the sample's own bytes (what a worker holds per sample).

``--fit``: whole ``lorkd-pl fit`` runs (fresh processes, ``--steps`` training steps, no validation) of a
384×384×240 CT at 0.8×0.8×1.5 mm (student grid 1.5 mm, 96³ crops, a MONAI UNet student), without a
teacher and with the targets ``lorkd-pl teacher-targets`` built before (dense and top-k).

Usage::

    python benchmarks/teacher_targets.py [--classes 14 117] [--top-k 4] [--crops 12] [--quick]
    python benchmarks/teacher_targets.py --kd [--classes 14 117] [--top-k 4]
    python benchmarks/teacher_targets.py --pipeline [--top-k 4] [--crops 6]
    python benchmarks/teacher_targets.py --fit [--top-k 4] [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from expert_conv import emit, machine_name
from lorkd_pl.data.chunked import read_box, read_header, write_chunked
from lorkd_pl.models.losses import kd_kl, kd_kl_top_k

#: The synthetic teacher's confusion logits: −4 a peaked (trained) segmenter, 0 a soft one.
CONFUSION_MEAN = -4.0
GRID = (274, 274, 300)  # 512×512×300 at 0.8×0.8×1.5 mm, resampled to 1.5 mm
CROP = (128, 128, 128)
QUICK_GRID, QUICK_CROP = (72, 64, 60), (32, 32, 32)


def phantom(grid: tuple[int, ...], classes: int, seed: int = 0) -> np.ndarray:
    """Labels ``(X, Y, Z)`` uint8: a body ellipsoid, ``classes − 1`` organ ellipsoids inside it."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in grid]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    labels = np.zeros(grid, np.uint8)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1.0
    for organ in range(1, classes):
        centre = rng.uniform(-0.5, 0.5, 3)
        radius = rng.uniform(0.04, 0.25, 3) * (1.5 if organ < 8 else 1.0)
        inside = sum(((c - m) / r) ** 2 for c, m, r in zip((x, y, z), centre, radius, strict=True)) < 1.0
        labels[inside & body] = organ
    return labels


def image_of(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A CT-like float32 image ``(1, X, Y, Z)``: HU per structure, noise, normalised as the student's
    CT preprocessing would (clip to [−500, 1000], z-score)."""
    rng = np.random.default_rng(seed)
    hu = rng.uniform(-100, 300, 256).astype(np.float32)
    hu[0] = -1000.0
    image = hu[labels] + rng.normal(0, 20, labels.shape).astype(np.float32)
    image = np.clip(image, -500, 1000)
    return ((image - image.mean()) / image.std())[None].astype(np.float32)


def teacher_slab(labels: np.ndarray, classes: int, confusion_mean: float = CONFUSION_MEAN) -> torch.Tensor:
    """Log-probabilities ``(K, X, Y, z)`` of a slab: log-softmax of 6 × a smoothed one-hot plus a fixed
    random confusion per structure (``N(confusion_mean, 1)`` logits of every other class, one row per
    true class; the default −4 leaves about 1 % of the mass to the other 116 classes of 117, 0 about 30 %),
    so the mass outside the top classes is uneven and structured, as a trained segmenter's is (an even
    tail would flatter top-k targets: their KD keeps only the tail's total mass)."""
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), classes).permute(3, 0, 1, 2)
    smooth = torch.nn.functional.avg_pool3d(one_hot[None].float(), 3, stride=1, padding=1)[0]
    confusion = (
        torch.randn(classes, classes, generator=torch.Generator().manual_seed(classes)) + confusion_mean
    )
    confusion.fill_diagonal_(0.0)  # the true class: 6 × its smoothed one-hot alone
    tails = confusion[torch.from_numpy(labels).long()].permute(3, 0, 1, 2)
    return (6.0 * smooth + tails).log_softmax(0)


def build_case(
    grid: tuple[int, ...], classes: int, top_k: int, confusion_mean: float = CONFUSION_MEAN
) -> dict[str, np.ndarray]:
    """Labels, image, dense fp16 targets and top-k targets of the case, made slab by slab."""
    labels = phantom(grid, classes)
    dense = np.empty((classes, *grid), np.float16)
    index = np.empty((top_k, *grid), np.uint8)
    top = np.empty((top_k, *grid), np.float16)
    step = 32
    for begin in range(0, grid[2], step):
        lo, hi = max(begin - 1, 0), min(begin + step + 1, grid[2])  # a 1-voxel halo for the smoothing
        slab = teacher_slab(labels[..., lo:hi], classes, confusion_mean)[
            ..., begin - lo : begin - lo + min(step, grid[2] - begin)
        ]
        dense[..., begin : begin + step] = slab.numpy()
        values, slots = slab.topk(top_k, dim=0)
        index[..., begin : begin + step] = slots.numpy()
        top[..., begin : begin + step] = values.numpy()
    return {"labels": labels, "image": image_of(labels), "dense": dense, "index": index, "top": top}


def bytes_read(path: Path, start: list[int], stop: list[int]) -> int:
    """Header plus the compressed chunks a box overlaps (what :func:`read_box` reads)."""
    header = read_header(path)
    edges, spatial, offsets = header["chunk"], header["spatial"], header["offsets"]
    grid = [math.ceil(s / e) for s, e in zip(spatial, edges, strict=True)]
    ranges = [
        range(max(a, 0) // e, min(math.ceil(min(b, s) / e), n))
        for a, b, s, e, n in zip(start, stop, spatial, edges, grid, strict=True)
    ]
    total = 0
    for position in np.ndindex(*[len(r) for r in ranges]):
        flat = int(np.ravel_multi_index([r[p] for r, p in zip(ranges, position, strict=True)], grid))
        total += offsets[flat + 1] - offsets[flat]
    return total + len(str(header))


def timed(read) -> tuple[float, int]:
    """Milliseconds and peak numpy bytes of one call."""
    tracemalloc.start()
    begin = time.perf_counter()
    read()
    seconds = time.perf_counter() - begin
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds * 1e3, peak


def random_boxes(grid: tuple[int, ...], crop: tuple[int, ...], count: int) -> list[tuple[list, list]]:
    """``count`` random crop boxes ``(start, stop)`` of ``crop`` inside ``grid`` (a fixed seed)."""
    rng = np.random.default_rng(1)
    boxes = []
    for _ in range(count):
        start = [int(rng.integers(0, n - c + 1)) for n, c in zip(grid, crop, strict=True)]
        boxes.append((start, [s + c for s, c in zip(start, crop, strict=True)]))
    return boxes


def measure(
    grid: tuple[int, ...],
    crop: tuple[int, ...],
    classes: int,
    top_k: int,
    crops: int,
    confusion_mean: float = CONFUSION_MEAN,
) -> list[dict]:
    """The rows of one class count."""
    case = build_case(grid, classes, top_k, confusion_mean)
    boxes = random_boxes(grid, crop, crops)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        begin = time.perf_counter()
        npz = folder / "dense.npz"
        np.savez_compressed(npz, targets=case["dense"])
        npz_write = time.perf_counter() - begin
        stores = {}
        for name, arrays in (
            ("dense chunked (fp16)", {"targets": case["dense"]}),
            (f"top-{top_k} chunked", {"index": case["index"], "log_probs": case["top"]}),
            ("image crop (floor, float32 chunked)", {"image": case["image"]}),
        ):
            begin = time.perf_counter()
            stores[name] = (
                write_chunked(folder / f"{len(stores)}.lkc", arrays, {}),
                time.perf_counter() - begin,
            )

        def npz_crop(start, stop):
            with np.load(npz) as data:  # the earlier store: the whole case, as float32
                whole = data["targets"].astype(np.float32)
            return whole[(slice(None), *(slice(a, b) for a, b in zip(start, stop, strict=True)))].copy()

        # each read holds the whole case as float32: above 4 GiB it is not tried (the row says so)
        affordable = case["dense"].size * 4 <= 4 * 2**30
        old = [timed(lambda b=b: npz_crop(*b)) for b in boxes[: max(2, crops // 4)]] if affordable else []
        rows.append(
            row(classes, "dense .npz (before)", npz.stat().st_size, npz.stat().st_size, old, npz_write)
        )
        for name, (path, write_seconds) in stores.items():
            results = [timed(lambda b=b, p=path: read_box(p, *b)) for b in boxes]
            read = statistics.median(bytes_read(path, *b) for b in boxes)
            rows.append(row(classes, name, path.stat().st_size, read, results, write_seconds))
        rows[2]["kd_difference"] = kd_difference(case, boxes, classes, (top_k, 2 * top_k, 4 * top_k))
    return rows


def row(classes: int, name: str, disk: int, read: float, results, write_seconds: float) -> dict:
    return {
        "classes": classes,
        "store": name,
        "disk_mib": disk / 2**20,
        "read_mib": read / 2**20,
        "ms": statistics.median(ms for ms, _ in results) if results else math.nan,
        "peak_mib": max(peak for _, peak in results) / 2**20 if results else math.nan,
        "write_s": write_seconds,
    }


#: ``--kd``'s crop.
KD_CROP = (64, 64, 64)


def kd_even_tail(student: torch.Tensor, index: torch.Tensor, top: torch.Tensor, tau: float) -> torch.Tensor:
    """Dense KD of the top-k target with its remainder spread evenly over the other classes.

    Args:
        student: ``(N, K, *S)`` logits.
        index: ``(N, k, *S)`` the stored classes; ``top`` the same shape: their log-probabilities.
        tau: the temperature.
    """
    classes = student.shape[1]
    remainder = (1 - top.exp().sum(1, keepdim=True)).clamp_min(1e-12) / max(classes - index.shape[1], 1)
    dense = remainder.log().expand(-1, classes, *top.shape[2:]).scatter(1, index, top)
    return kd_kl(student, dense, tau)


def kd_difference(
    case: dict, boxes, classes: int, ks: tuple[int, ...]
) -> dict[str, dict[int, tuple[float, float]]]:
    """For two students and each k: ``(|KD(top-k) − KD(dense)| / KD(dense),
    ‖∇KD(top-k) − ∇KD(dense)‖₁ / ‖∇KD(dense)‖₁)`` over the crops, at τ = 1: the loss values (they also
    differ by the teacher's entropy, a constant of training) and the gradients w.r.t. the student's
    logits (what training uses). Students: ``"start"``, logits N(0, 1) (a student at initialisation),
    ``"near"``, the teacher's log-probabilities + N(0, 1) (a student on its way), and ``"close"``, + 0.3 ×
    N(0, 1) (a student close to the teacher: the hardest case, since its own distance to the teacher is
    small and the tail's shape is most of it). Beside lorkd-pl's top-k KD (the stored classes and one
    bucket of the rest), ``", even tail"``: the alternative of spreading the remainder evenly over the
    other classes (dense KD of that reconstruction), whose minimiser is not the teacher. Computed in
    float64 (the stored top-k values still rounded to fp16 as stored), so float32 rounding — which
    reaches ~1e-4 of the loss of a student this close — is not counted as the sparse form's error."""
    generator = torch.Generator().manual_seed(0)
    students = {"start": (0.0, 1.0), "near": (1.0, 1.0), "close": (1.0, 0.3)}  # teacher weight, noise sd
    variants = {"": kd_kl_top_k, ", even tail": kd_even_tail}
    totals = {who + v: {k: [0.0, 0.0, 0.0, 0.0] for k in ks} for who in students for v in variants}
    for start, stop in boxes[:4]:
        where = (slice(None), *(slice(a, b) for a, b in zip(start, stop, strict=True)))
        dense = torch.from_numpy(case["dense"][where].astype(np.float64))[None]
        noise = torch.randn(dense.shape, generator=generator, dtype=torch.float64)
        for who, (weight, sd) in students.items():
            student = (weight * dense + sd * noise).requires_grad_(True)
            loss = kd_kl(student, dense, 1.0)
            (grad,) = torch.autograd.grad(loss, student)
            for (variant, kd_of), k in itertools.product(variants.items(), ks):
                top, index = dense.topk(min(k, classes), dim=1)
                sparse = kd_of(student, index, top.half().double(), 1.0)  # stored in fp16
                (sparse_grad,) = torch.autograd.grad(sparse, student)
                sums = totals[who + variant][k]
                sums[0] += abs(float(sparse.detach()) - float(loss.detach()))
                sums[1] += float(loss.detach())
                sums[2] += float((sparse_grad - grad).abs().sum())
                sums[3] += float(grad.abs().sum())
    return {who: {k: (t[0] / t[1], t[2] / t[3]) for k, t in by_k.items()} for who, by_k in totals.items()}


def render(rows: list[dict], crop: tuple[int, ...]) -> str:
    lines = [
        f"crop {'×'.join(map(str, crop))}; ratios against the image crop (floor) of the same class count",
        "",
        "| K | store | on disk MiB | read per crop MiB (× floor) | ms per crop (× floor) | peak MiB | "
        "write s | KD difference, loss / gradient (student at start; near; close to the teacher) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for classes in sorted({r["classes"] for r in rows}):
        group = [r for r in rows if r["classes"] == classes]
        floor = next(r for r in group if r["store"].startswith("image"))
        before = group[0]
        for r in group:
            kd = (
                "<br>".join(
                    f"{who}: "
                    + "; ".join(f"k={k} {100 * a:.2f} / {100 * g:.2f} %" for k, (a, g) in by_k.items())
                    for who, by_k in r["kd_difference"].items()
                )
                if "kd_difference" in r
                else ""
            )
            smaller = f" ({before['disk_mib'] / r['disk_mib']:.1f}× smaller)" if r is not before else ""
            lines.append(
                f"| {classes} | {r['store']} | {r['disk_mib']:.1f}{smaller} | "
                f"{r['read_mib']:.2f} ({r['read_mib'] / floor['read_mib']:.2f}×) | "
                f"{r['ms']:.1f} ({r['ms'] / floor['ms']:.2f}×) | {r['peak_mib']:.0f} | "
                f"{r['write_s']:.1f} | {kd} |"
            )
    return "\n".join(lines)


def write_ct_task(
    folder: Path,
    size: tuple[int, int, int],
    spacing: tuple[float, ...],
    grid: float,
    crop: int,
    classes: list[str],
) -> Path:
    """A task plugin folder with one synthetic CT case (``size`` voxels (x, y, z) at ``spacing`` mm),
    its labels, a manifest with the case in train and val, and the spec ``bench_ct`` (student grid
    ``grid`` mm, ``crop``³ patches); written once per folder. Returns the plugin folder."""
    import json as jsonlib

    import SimpleITK as sitk
    import yaml

    case = folder / "ct"
    if not (case / "ct_image.nii").is_file():
        case.mkdir(parents=True, exist_ok=True)
        labels = phantom(size[::-1], len(classes))  # SimpleITK arrays are (z, y, x)
        hu = np.random.default_rng(0).uniform(-100, 300, 256).astype(np.int16)
        hu[0] = -1000
        for name, array in (("image", hu[labels]), ("label", labels)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(spacing)
            sitk.WriteImage(image, str(case / f"ct_{name}.nii"))
        rows = [
            {"image": "ct_image.nii", "label": "ct_label.nii", "split": split} for split in ("train", "val")
        ]
        (case / "manifest.jsonl").write_text("\n".join(jsonlib.dumps(r) for r in rows) + "\n")
        spec = {
            "name": "bench_ct",
            "region": "abdomen",
            "kind": "seg3d",
            "classes": classes,
            "manifest": "manifest.jsonl",
            "modality": "CT",
            "spacing": [grid] * 3,
            "patch_size": [crop] * 3,
        }
        (case / "bench_ct.yaml").write_text(yaml.safe_dump(spec))
    return case


def pointwise_teacher(path: Path, classes: int) -> Path:
    """A TorchScript 1×1×1 convolution ``(1 → classes)`` (the teacher's cost is not what is measured)."""
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, classes, 1)), str(path))
    return path


def pipeline_rows(folder: Path, top_k: int | None, samples: int, quick: bool) -> list[dict]:
    """Seconds and bytes of training samples through MultiRegionDataModule, without and with targets."""
    from lorkd_pl.data.datamodule import MultiRegionDataModule
    from lorkd_pl.data.plugins import load_plugins
    from lorkd_pl.models.teacher.loading import load_teacher
    from lorkd_pl.models.teacher.pipeline import prepare_targets
    from lorkd_pl.models.teacher.spec import parse_teacher

    size, crop = ((96, 96, 60), 32) if quick else ((512, 512, 300), 128)
    classes = [f"c{i}" for i in range(14)]
    spacing, grid = ((2.0, 2.0, 2.0), 2.0) if quick else ((0.8, 0.8, 1.5), 1.5)
    case = write_ct_task(folder, size, spacing, grid, crop, classes)
    load_plugins([case], use_entry_points=False)
    teacher_file = pointwise_teacher(folder / "pointwise.pt", len(classes))
    data = MultiRegionDataModule(
        ["bench_ct"], validate=False, allow_duplicates=True, batch_size=1, cache="none"
    )
    data.setup("fit")
    description = {
        "path": str(teacher_file),
        "classes": {c: i for i, c in enumerate(classes)},
        "cache": str(folder / f"targets_{top_k}"),
        "cache_top_k": top_k,
    }
    spec = parse_teacher(description)
    teacher = load_teacher(spec, data.task_info)
    begin = time.perf_counter()
    store, _ = prepare_targets(teacher, spec, data)
    build = time.perf_counter() - begin
    dataset = data.dataset("train", 0)

    def draw() -> tuple[float, int]:
        begin = time.perf_counter()
        sample = dataset[0]
        sample = sample[0] if isinstance(sample, list) else sample
        seconds = time.perf_counter() - begin
        tensors = [v for v in sample.values() if isinstance(v, torch.Tensor)]
        return seconds, sum(t.numel() * t.element_size() for t in tensors)

    rows = []
    for name, attached in (
        ("without KD", None),
        (f"cached targets ({'dense' if top_k is None else f'top-{top_k}'})", store),
    ):
        data.use_teacher_targets(attached)
        draw()  # warm-up (page cache)
        results = [draw() for _ in range(samples)]
        rows.append(
            {
                "pipeline": name,
                "s": statistics.median(r[0] for r in results),
                "sample_mib": results[0][1] / 2**20,
                "disk_mib": store.size_on_disk([c for c in data.all_cases("train")]) / 2**20
                if attached
                else 0.0,
                "build_s": build if attached else 0.0,
            }
        )
    return rows


def fit_rows(folder: Path, top_k: int | None, steps: int, rounds: int, quick: bool) -> list[dict]:
    """Seconds of ``lorkd-pl fit`` (``steps`` training steps, fresh processes) of a 384×384×240 CT task,
    without a teacher and with cached teacher targets built before by ``lorkd-pl teacher-targets``;
    ``rounds`` interleaved rounds after a warm-up round, medians."""
    import shutil
    import subprocess

    import yaml

    size, crop = ((64, 64, 40), 32) if quick else ((384, 384, 240), 96)
    classes = [f"c{i}" for i in range(14)]
    spacing, grid = ((2.0, 2.0, 2.0), 2.0) if quick else ((0.8, 0.8, 1.5), 1.5)
    tasks = write_ct_task(folder, size, spacing, grid, crop, classes)
    teacher = {
        "path": str(pointwise_teacher(folder / "pointwise.pt", len(classes))),
        "classes": {c: i for i, c in enumerate(classes)},
        "cache": str(folder / f"fit_targets_{top_k}"),
        "cache_top_k": top_k,
    }
    backbone = {
        "class_path": "monai.networks.nets.UNet",
        "init_args": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": len(classes),
            "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
        },
    }  # fmt: skip
    script = shutil.which("lorkd-pl", path=str(Path(sys.executable).parent)) or "lorkd-pl"
    configs = {}
    for name, kd in (
        ("without a teacher", None),
        (f"cached targets ({'dense' if top_k is None else f'top-{top_k}'})", teacher),
    ):
        config = {
            "seed_everything": 0,
            "trainer": {
                "accelerator": "cpu", "devices": 1, "max_steps": steps, "limit_val_batches": 0,
                "num_sanity_val_steps": 0, "enable_progress_bar": False, "logger": False,
                "default_root_dir": str(folder / "runs"),
            },
            "model": {
                "class_path": "lorkd_pl.models.lorkd.LoRKDModule",
                "init_args": {
                    "backbone": backbone, "rank": 4, "teacher": kd, "kd_weight": 0.5 if kd else 0.0,
                },
            },
            "data": {
                "class_path": "lorkd_pl.data.datamodule.MultiRegionDataModule",
                "init_args": {
                    "tasks": ["bench_ct"], "batch_size": 1, "samples_per_epoch": steps, "cache": "none",
                    "allow_duplicates": True,
                },
            },
        }  # fmt: skip
        path = folder / f"fit_{len(configs)}.yaml"
        path.write_text(yaml.safe_dump(config))
        configs[name] = [script, "fit", "--config", str(path), "--tasks-dir", str(tasks), "--overwrite"]
    begin = time.perf_counter()
    build = [script, "teacher-targets", "--config", configs[list(configs)[1]][3], "--tasks-dir", str(tasks)]
    done = subprocess.run(build, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"teacher-targets: {done.stderr[-2000:]}")
    build_seconds = time.perf_counter() - begin
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(rounds + 1):
        for name, command in configs.items() if round_index % 2 else reversed(configs.items()):
            begin = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
            if round_index:  # round 0 warms the page cache
                times[name].append(time.perf_counter() - begin)
    return [
        {"fit": name, "s": statistics.median(values), "build_s": build_seconds if i else 0.0}
        for i, (name, values) in enumerate(times.items())
    ]


def render_fit(rows: list[dict], steps: int) -> str:
    base = rows[0]["s"]
    lines = [
        f"`lorkd-pl fit`, {steps} training steps (fresh process, start-up included), "
        "median of interleaved rounds",
        "",
        "| fit | s | × without a teacher | targets built (s) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        build = f"{row['build_s']:.1f}" if row["build_s"] else "–"
        lines.append(f"| {row['fit']} | {row['s']:.1f} | {row['s'] / base:.2f} | {build} |")
    worst = max(row["s"] for row in rows[1:]) / base
    lines += [
        "",
        f"Target: {'ok' if worst <= 1.2 else 'MISSED'}: "
        f"fit with cached targets ≤ 1.2× without ({worst:.2f}×)",
    ]
    return "\n".join(lines)


def render_pipeline(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| data pipeline (one training sample) | s per sample (× without KD) | sample MiB (× without KD) | "
        "targets on disk MiB | build s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['s']:.2f} ({r['s'] / base['s']:.2f}×) | "
            f"{r['sample_mib']:.1f} ({r['sample_mib'] / base['sample_mib']:.2f}×) | {r['disk_mib']:.1f} | "
            f"{r['build_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[14, 117])
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--crops", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="a small grid (tests)")
    parser.add_argument("--pipeline", action="store_true", help="through the data pipeline of a fit")
    parser.add_argument("--fit", action="store_true", help="whole `lorkd-pl fit` runs of a 384×384×240 CT")
    parser.add_argument("--kd", action="store_true", help="only the KD difference of top-k targets")
    parser.add_argument("--steps", type=int, default=6, help="--fit: training steps per fit")
    parser.add_argument("--rounds", type=int, default=2, help="--fit: timed rounds")
    parser.add_argument(
        "--confusion", type=float, default=CONFUSION_MEAN, help="teacher confusion logits (-4 peaked, 0 soft)"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.fit:
        with tempfile.TemporaryDirectory() as folder:
            rows = []
            for top_k in (None, args.top_k):
                found = fit_rows(Path(folder), top_k, args.steps, args.rounds, args.quick)
                rows += found if not rows else found[1:]
        emit(f"### {machine_name(torch.device('cpu'))}\n\n{render_fit(rows, args.steps)}\n", args.output)
        return 0
    if args.pipeline:
        with tempfile.TemporaryDirectory() as folder:
            rows = []
            for top_k in (None, args.top_k):
                found = pipeline_rows(Path(folder), top_k, args.crops, args.quick)
                rows += found if not rows else found[1:]
        emit(f"### {machine_name(torch.device('cpu'))}\n\n{render_pipeline(rows)}\n", args.output)
        return 0
    grid, crop = (QUICK_GRID, QUICK_CROP) if args.quick else (GRID, CROP)
    if args.kd:  # 64³ crops: the KD differences are voxel averages, and 128³ × 117 classes is 1 GiB a tensor
        crop = QUICK_CROP if args.quick else KD_CROP
        lines = [f"{'×'.join(map(str, crop))} crops, τ = 1", "", "| K | student | " + " | ".join(
            f"k={k} loss / gradient" for k in (args.top_k, 2 * args.top_k, 4 * args.top_k)
        ) + " |", "|---:|---|" + "---:|" * 3]  # fmt: skip
        for classes in args.classes:
            case = build_case(grid, classes, args.top_k, args.confusion)
            found = kd_difference(
                case, random_boxes(grid, crop, 4), classes, (args.top_k, 2 * args.top_k, 4 * args.top_k)
            )
            for who, by_k in found.items():
                cells = " | ".join(f"{100 * a:.2f} / {100 * g:.2f} %" for a, g in by_k.values())
                lines.append(f"| {classes} | {who} | {cells} |")
        emit(f"### {machine_name(torch.device('cpu'))}\n\n" + "\n".join(lines) + "\n", args.output)
        return 0
    rows = [r for k in args.classes for r in measure(grid, crop, k, args.top_k, args.crops, args.confusion)]
    title = f"### {machine_name(torch.device('cpu'))}, teacher confusion {args.confusion:g}"
    emit(f"{title}\n\n{render(rows, crop)}\n", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
