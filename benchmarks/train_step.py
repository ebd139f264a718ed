"""Training-step throughput and peak memory of the LoRKD student, side by side in one run.

A full optimisation step (forward, per-task heads and losses, backward, AdamW step) on a batch that
mixes 8 regions (one task each, sorted by region as the data module delivers it), for:

* the same backbone and heads without experts (the baseline),
* the LoRKD student with the ``auto`` strategy (the default), with ``grouped`` (the paper's) and with
  ``by_region`` (the strategies ``auto`` chooses between),
* and, separately, the frozen teacher's forward (the KD cost on top of a student step);
* KD from a teacher 4× the student's size (3D U-Net): the step without KD, with cached teacher targets
  (``teacher.cache``: the target rides in the batch) and with the live teacher (a forward per step).

Usage::

    python benchmarks/train_step.py            # 3D U-Net and 2D CNN, CPU (+ CUDA if available)
    python benchmarks/train_step.py --quick
    python benchmarks/train_step.py --kd-only   # KD: no KD vs cached teacher targets vs live teacher
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from expert_conv import devices_for, emit, machine_name, peak_memory, time_steps
from lorkd_pl.experts import merge_expert
from lorkd_pl.models.backbones import build_module, count_parameters
from lorkd_pl.models.generalist import GeneralistModule
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.teacher.loading import Teacher
from lorkd_pl.registry import DEFAULT_REGIONS

BASELINE = "expert-free student"


def unet3d_setup(channels: list[int], shape: tuple[int, ...]) -> dict:
    """A 3D segmentation setup: a MONAI U-Net of ``channels`` (stride 2 between levels, one residual
    unit), N = 8 crops of ``shape`` ``(1, X, Y, Z)`` over 8 regions, 4 classes."""
    return {
        "backbone": {
            "class_path": "monai.networks.nets.UNet",
            "init_args": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 16,
                "channels": channels,
                "strides": [2] * (len(channels) - 1),
                "num_res_units": 1,
            },
        },
        "kind": "seg3d",
        "batch": 8,
        "shape": shape,
        "classes": 4,
    }


SETUPS = {
    "3D U-Net": unet3d_setup([16, 32, 64], (1, 40, 40, 24)),
    "2D CNN": {
        "backbone": {
            "class_path": "lorkd_pl.models.backbones.ConvNet2d",
            "init_args": {"in_channels": 1, "channels": [32, 64, 128]},
        },
        "kind": "cls2d",
        "batch": 128,
        "shape": (1, 28, 28),
        "classes": 3,
    },
}
# On a GPU the CPU setups above are bound by kernel launches; this one is a training crop of the size
# a CT segmenter is trained on (96³, one sample per region, a 4-level U-Net).
CUDA_SETUPS = {"3D U-Net 96³": unet3d_setup([32, 64, 128, 256], (1, 96, 96, 96))}


def setups_for(device: torch.device) -> dict[str, dict]:
    """The benchmark setups of ``device``: the CPU ones, plus the GPU-sized one on CUDA."""
    return SETUPS | (CUDA_SETUPS if device.type == "cuda" else {})


class ExpertFreeStudent(LoRKDModule):
    """The same training step with the plain backbone (expert 0 merged, experts removed)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.student = merge_expert(self.student, 0)

    def features(self, images, region):
        return self.student(images)


def run_info(setup: dict) -> dict:
    tasks = [
        {
            "name": f"{region}_task",
            "region": region,
            "kind": setup["kind"],
            "classes": [f"c{i}" for i in range(setup["classes"])],
            "patch_size": list(setup["shape"][1:]),
        }
        for region in DEFAULT_REGIONS
    ]
    return {"task_info": tasks, "regions": list(DEFAULT_REGIONS)}


def make_batch(setup: dict, device: torch.device) -> dict:
    n = setup["batch"]
    region = (torch.arange(n) % len(DEFAULT_REGIONS)).sort().values
    label_shape = (n, 1, *setup["shape"][1:]) if setup["kind"] == "seg3d" else (n,)
    return {
        "image": torch.randn(n, *setup["shape"], device=device),
        "label": torch.randint(0, setup["classes"], label_shape, device=device),
        "region": region.to(device),
        "task": region.to(device),
    }


def make_step(module, batch: dict, dtype: torch.dtype) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    device = batch["image"].device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()

    return step


def operator_calls(step: Callable[[], None], device: torch.device) -> int:
    """Operator calls of one step: on CUDA the kernels it launches, on CPU the ATen operators it
    runs (nested ones included), a proxy for launches: the KD of a launch-bound GPU step costs what
    its calls cost."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    if device.type == "cuda":
        return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def measured_rows(
    setup: str, batch: int, dtype: torch.dtype, times: dict, memory: dict, baseline: str
) -> list[dict]:
    """One table row per variant, with time and memory as ratios to ``baseline``'s."""
    return [
        {
            "setup": setup,
            "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "variant": label,
            "ms": times[label] * 1e3,
            "samples_s": batch / times[label],
            "time_ratio": times[label] / times[baseline],
            "mb": memory[label] / 2**20,
            "memory_ratio": memory[label] / memory[baseline],
        }
        for label in times
    ]


def run(device: torch.device, dtypes: list[torch.dtype], rounds: int, budget: float) -> list[dict]:
    rows = []
    for name, setup in setups_for(device).items():
        for dtype in dtypes:
            torch.manual_seed(0)
            info = run_info(setup)
            common = {"backbone": setup["backbone"], "kd": "none", "rank": 8, "alpha": 16}
            modules = {
                BASELINE: ExpertFreeStudent(**info, **common),
                "LoRKD student (auto)": LoRKDModule(**info, **common),
                "LoRKD student (grouped, paper)": LoRKDModule(**info, **common, strategy="grouped"),
                "LoRKD student (by_region)": LoRKDModule(**info, **common, strategy="by_region"),
            }
            batch = make_batch(setup, device)
            steps = {label: make_step(m.to(device).train(), batch, dtype) for label, m in modules.items()}
            teacher = GeneralistModule(**info, backbone=setup["backbone"]).to(device).eval()

            def teacher_forward(teacher=teacher, batch=batch, dtype=dtype) -> None:
                with (
                    torch.no_grad(),
                    torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
                ):
                    teacher(batch["image"])

            steps["teacher forward (KD cost)"] = teacher_forward
            memory = {label: peak_memory(step, device) for label, step in steps.items()}
            times = time_steps(steps, device, rounds, budget)
            setup_name = f"{name}, N={setup['batch']}, 8 regions"
            rows += measured_rows(setup_name, setup["batch"], dtype, times, memory, BASELINE)
            print(f"  measured {name} {rows[-1]['dtype']} on {device.type}", file=sys.stderr)
    return rows


def kd_teacher(setup: dict) -> dict:
    """The KD teacher of a 3D U-Net setup: the student's U-Net at 3× its widths, one output per class."""
    args = setup["backbone"]["init_args"]
    widths = [3 * c for c in args["channels"]]
    return {
        "class_path": "monai.networks.nets.UNet",
        "init_args": {**args, "out_channels": setup["classes"], "channels": widths},
    }


NO_KD = "LoRKD step, no KD"
CACHED = "KD, cached teacher targets"
TOP_K = 2  # fewer than the setup's 4 classes: the sparse path with a remainder runs
CACHED_TOP_K = f"KD, cached top-{TOP_K} targets"


def run_kd(device: torch.device, dtypes: list[torch.dtype], rounds: int, budget: float) -> list[dict]:
    """No KD vs cached targets vs the live teacher, one LoRKD training step each (3D U-Nets)."""
    rows = []
    for name, setup in setups_for(device).items():
        if setup["kind"] == "seg3d":
            rows += run_kd_setup(name, setup, device, dtypes, rounds, budget)
    return rows


def run_kd_setup(
    name: str, setup: dict, device: torch.device, dtypes: list[torch.dtype], rounds: int, budget: float
) -> list[dict]:
    """:func:`run_kd` for one setup."""
    rows = []
    for dtype in dtypes:
        torch.manual_seed(0)
        info = run_info(setup)
        common = {"backbone": setup["backbone"], "rank": 8, "alpha": 16}
        network = build_module(kd_teacher(setup)).to(device)
        channels = {t["name"]: [(k,) for k in range(setup["classes"])] for t in info["task_info"]}
        modules = {NO_KD: LoRKDModule(**info, **common, kd="none")}
        for label in (CACHED, CACHED_TOP_K, "KD, live teacher"):
            module = LoRKDModule(**info, **common, kd="logits", teacher="benchmark-teacher")
            module.__dict__["_teacher"] = Teacher(network, channels, "benchmark-teacher", "")
            modules[label] = module
        batch = make_batch(setup, device)
        cached = dict(batch)
        classes = setup["classes"]
        cached["teacher"] = torch.randn(
            setup["batch"], classes, *setup["shape"][1:], device=device
        ).log_softmax(1)
        top = dict(batch)  # the store's top-k form (cache_top_k), as a TotalSegmentator-sized teacher uses
        values, index = cached["teacher"].topk(min(TOP_K, classes), dim=1)
        top["teacher_index"], top["teacher_log_probs"] = index.to(torch.uint8), values.half()
        batches = {NO_KD: batch, CACHED: cached, CACHED_TOP_K: top, "KD, live teacher": batch}
        steps = {
            label: make_step(m.to(device).train(), batches[label], dtype) for label, m in modules.items()
        }
        memory = {label: peak_memory(step, device) for label, step in steps.items()}
        calls = {label: operator_calls(step, device) for label, step in steps.items()}
        times = time_steps(steps, device, rounds, budget)
        student = modules[NO_KD]
        teacher_size = count_parameters(network)
        deployed = teacher_size / (student.expert_free_parameters + count_parameters(student.heads[0]))
        trained = teacher_size / (count_parameters(student.student) + count_parameters(student.heads))
        setup_name = (
            f"{name}, N={setup['batch']}, teacher {deployed:.1f}× an exported expert "
            f"({trained:.1f}× the student with all 8 experts)"
        )
        measured = measured_rows(setup_name, setup["batch"], dtype, times, memory, NO_KD)
        rows += [
            row | {"calls": calls[row["variant"]], "calls_ratio": calls[row["variant"]] / calls[NO_KD]}
            for row in measured
        ]
        print(f"  measured KD rows {rows[-1]['dtype']} on {device.type}", file=sys.stderr)
    return rows


def kd_markdown(rows: list[dict]) -> str:
    lines = [
        "| setup | dtype | variant | ms / step | time × no KD | peak MB | memory × no KD "
        "| operator calls (× no KD) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['dtype']} | {r['variant']} | {r['ms']:.1f} | {r['time_ratio']:.2f} "
            f"| {r['mb']:.1f} | {r['memory_ratio']:.2f} | {r['calls']} ({r['calls_ratio']:.2f}×) |"
        )
    checks = [
        f"- {'ok' if r['time_ratio'] <= 1.1 else 'MISSED'}: {r['dtype']}: {r['variant']} "
        f"≤ 1.1× the no-KD step ({r['time_ratio']:.2f}×)"
        for r in rows
        if r["variant"] in (CACHED, CACHED_TOP_K)
    ]
    calls = "operator calls: CUDA kernels launched per step on a GPU, ATen operators (nested included) on CPU"
    return "\n".join([*lines, "", calls, "", "Target:", *checks])


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| setup | dtype | variant | ms / step | samples/s | time × expert-free "
        "| peak MB | memory × expert-free |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['dtype']} | {r['variant']} | {r['ms']:.1f} | {r['samples_s']:.1f} "
            f"| {r['time_ratio']:.2f} | {r['mb']:.1f} | {r['memory_ratio']:.2f} |"
        )
    checks = [
        f"- {'ok' if r['time_ratio'] <= 1.25 else 'MISSED'}: {r['setup']} {r['dtype']}: LoRKD student step "
        f"≤ 1.25× the expert-free step ({r['time_ratio']:.2f}×)"
        for r in rows
        if r["variant"] == "LoRKD student (auto)"
    ]
    return "\n".join([*lines, "", "Target:", *checks])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fp32 only, shorter timing")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output", help="also write the markdown report to this file")
    parser.add_argument("--kd-only", action="store_true", help="only the KD rows (no KD / cached / live)")
    parser.add_argument("--budget", type=float, help="seconds of timing per variant (default 3, --quick 1)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    devices = devices_for(args.device)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rounds, budget = (3, 1.0) if args.quick else (5, 3.0)
    budget = args.budget or budget
    sections = []
    for device in devices:
        title = f"{device.type.upper()}: {machine_name(device)} (torch {torch.__version__})"
        if not args.kd_only:
            sections.append(markdown(run(device, dtypes, rounds, budget), title))
        sections.append(f"### KD cost, {title}\n\n" + kd_markdown(run_kd(device, dtypes, rounds, budget)))
    report = "\n\n".join(sections)
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
