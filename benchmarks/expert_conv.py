"""Speed and memory of the knowledge-separation convolution, side by side in one run.

For each shape, every strategy runs forward + backward on a batch that mixes T = 8 regions and is
compared with the same convolution without experts and with a per-sample loop. Times are medians
over interleaved rounds; peak memory is what one forward + backward allocates on top of its inputs
(CPU: from the profiler's allocation events; CUDA: ``max_memory_allocated``). Everything is printed
as ratios to the expert-free conv, then the issue's targets are checked.

Usage::

    python benchmarks/expert_conv.py            # full CPU set (+ CUDA if available)
    python benchmarks/expert_conv.py --quick    # two shapes, for `make demo`
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from lorkd_pl.experts import expert_routing, inject_experts

NUM_REGIONS = 8
BASELINE = "expert-free conv"
NOISE = 1.05  # repeated runs of one variant differ by up to ~5 % on a shared 2-core machine


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: ``dims``-D conv, ``batch`` samples, ``channels`` in/out, cubic ``size``."""

    dims: int
    batch: int
    channels: int
    size: int
    rank: int

    def __str__(self) -> str:
        spatial = "×".join([str(self.size)] * self.dims)
        return f"{self.dims}D N={self.batch} C={self.channels} {spatial} r={self.rank}"


QUICK = [Shape(2, 64, 64, 28, 8), Shape(3, 4, 32, 32, 8)]
CPU_FULL = [
    Shape(2, 64, 64, 56, 8),
    Shape(2, 64, 128, 28, 4),
    Shape(2, 64, 256, 28, 16),
    Shape(3, 2, 32, 64, 8),
    Shape(3, 4, 64, 32, 16),
    Shape(3, 8, 32, 32, 4),
]
CUDA_FULL = [
    Shape(2, 64, 64, 56, 8),
    Shape(2, 64, 128, 28, 4),
    Shape(2, 64, 256, 28, 16),
    Shape(3, 2, 64, 64, 8),
    Shape(3, 4, 128, 32, 16),
    Shape(3, 8, 32, 64, 4),
]


@dataclass
class Variant:
    """A module, the routing it runs under and the input it gets."""

    name: str
    module: nn.Module
    region: Tensor | None


def mixed_regions(batch: int, device: torch.device, sort: bool) -> Tensor:
    """Round-robin regions over the batch (all 8 present when N >= 8), optionally sorted."""
    region = torch.arange(batch, device=device) % NUM_REGIONS
    if not sort:
        region = region[torch.randperm(batch, generator=torch.Generator().manual_seed(0)).to(device)]
    return region.sort().values if sort else region


def build_variants(shape: Shape, device: torch.device, b_init_std: float = 0.01) -> list[Variant]:
    conv_cls = {2: nn.Conv2d, 3: nn.Conv3d}[shape.dims]
    base = conv_cls(shape.channels, shape.channels, 3, padding=1).to(device)

    def experts(layout: str, strategy: str) -> nn.Module:
        layer = conv_cls(shape.channels, shape.channels, 3, padding=1).to(device)
        layer.load_state_dict(base.state_dict())
        return inject_experts(
            layer,
            NUM_REGIONS,
            rank=shape.rank,
            alpha=16,
            layout=layout,
            strategy=strategy,
            b_init_std=b_init_std,
        )

    sorted_mix = mixed_regions(shape.batch, device, sort=True)
    unsorted_mix = mixed_regions(shape.batch, device, sort=False)
    one_region = torch.zeros(shape.batch, dtype=torch.long, device=device)
    loop = experts("paper", "by_region")
    return [
        Variant(BASELINE, base, None),
        Variant("per-sample loop", PerSampleLoop(loop), sorted_mix),
        Variant("grouped (paper)", experts("paper", "grouped"), sorted_mix),
        Variant("by_region", experts("paper", "by_region"), sorted_mix),
        Variant("factorized", experts("factorized", "factorized"), sorted_mix),
        Variant("auto", experts("paper", "auto"), sorted_mix),
        Variant("auto, unsorted batch", experts("paper", "auto"), unsorted_mix),
        Variant("homogeneous, one-region batch", experts("paper", "homogeneous"), one_region),
    ]


class PerSampleLoop(nn.Module):
    """Reference: merge each present region once, then one conv call per sample."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        routing = self.layer._routing
        weights = self.layer.merged_weights(routing.present_index(x.device))
        slot = routing.slot(x.device, x.shape[0]).tolist()
        bias = self.layer.bias
        return torch.cat(
            [self.layer.base_forward(x[i : i + 1], weights[s], bias) for i, s in enumerate(slot)]
        )


def make_step(variant: Variant, x: Tensor, grad_out: Tensor, dtype: torch.dtype) -> Callable[[], None]:
    routed = variant.module.layer if isinstance(variant.module, PerSampleLoop) else variant.module
    use_autocast = dtype != torch.float32

    def step() -> None:
        variant.module.zero_grad(set_to_none=True)
        x.grad = None
        routing = (
            expert_routing(routed, variant.region) if variant.region is not None else contextlib.nullcontext()
        )
        with routing, torch.autocast(x.device.type, dtype=dtype, enabled=use_autocast):
            y = variant.module(x)
        y.backward(grad_out)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes allocated at the peak of one step, on top of what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def time_steps(
    steps: dict[str, Callable[[], None]], device: torch.device, rounds: int, budget_s: float
) -> dict[str, float]:
    """Median seconds per step of each variant, over interleaved rounds."""
    for step in steps.values():  # warm-up (allocator, cuDNN autotuning, oneDNN primitives)
        step()
        step()
    synchronize(device)
    calls = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        synchronize(device)
        calls[name] = max(1, int(budget_s / rounds / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                step()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def run(
    device: torch.device, shapes: list[Shape], dtypes: list[torch.dtype], rounds: int, budget_s: float
) -> list[dict]:
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            torch.manual_seed(0)
            variants = build_variants(shape, device)
            x = torch.randn(
                shape.batch, shape.channels, *[shape.size] * shape.dims, device=device, requires_grad=True
            )
            out_dtype = dtype if dtype != torch.float32 else torch.float32
            grad_out = torch.randn(x.shape, device=device, dtype=out_dtype)
            steps = {v.name: make_step(v, x, grad_out, dtype) for v in variants}
            memory = {name: peak_memory(step, device) for name, step in steps.items()}
            times = time_steps(steps, device, rounds, budget_s)
            for name in steps:
                rows.append(
                    {
                        "device": device.type,
                        "shape": shape,
                        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
                        "variant": name,
                        "ms": times[name] * 1e3,
                        "time_ratio": times[name] / times[BASELINE],
                        "mb": memory[name] / 2**20,
                        "memory_ratio": memory[name] / memory[BASELINE],
                    }
                )
            done = [r for r in rows if r["shape"] == shape and r["dtype"] == rows[-1]["dtype"]]
            print(
                f"  measured {shape} {rows[-1]['dtype']} on {device.type}: "
                + ", ".join(f"{r['variant']} {r['time_ratio']:.2f}×" for r in done),
                file=sys.stderr,
            )
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| shape | dtype | strategy | ms / step | time × expert-free | peak MB | memory × expert-free |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['variant']} | {r['ms']:.2f} | {r['time_ratio']:.2f} "
            f"| {r['mb']:.1f} | {r['memory_ratio']:.2f} |"
        )
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets on a mixed 8-region batch, one line each (``ok`` or ``MISSED``)."""
    report = []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], str(r["shape"]), r["dtype"]), {})[r["variant"]] = r
    for (device, shape, dtype), by_name in groups.items():
        auto, grouped = by_name["auto"], by_name["grouped (paper)"]
        checks = [
            ("auto time ≤ 1.3× expert-free", auto["time_ratio"] <= 1.3, f"{auto['time_ratio']:.2f}×"),
            (
                "auto ≤ grouped time (within the 5 % timing noise)",
                auto["ms"] <= NOISE * grouped["ms"],
                f"{auto['ms']:.2f} vs {grouped['ms']:.2f} ms",
            ),
            (
                "auto peak memory ≤ 1.2× expert-free",
                auto["memory_ratio"] <= 1.2,
                f"{auto['memory_ratio']:.2f}×",
            ),
        ]
        if device == "cuda" and shape.startswith("3D"):
            speedup = grouped["ms"] / auto["ms"]
            checks.append(("auto ≥ 2× faster than grouped (CUDA 3D)", speedup >= 2, f"{speedup:.2f}×"))
        for label, ok, value in checks:
            report.append(f"- {'ok' if ok else 'MISSED'}: {device} {shape} {dtype}: {label} ({value})")
    return report


def parse_shape(text: str) -> Shape:
    """``"DIMS,N,C,SIZE,RANK"`` → :class:`Shape`."""
    try:
        dims, batch, channels, size, rank = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected DIMS,N,C,SIZE,RANK (five integers), got {text!r}"
        ) from None
    return Shape(dims, batch, channels, size, rank)


def devices_for(choice: str) -> list[torch.device]:
    """``auto``: the CPU, plus CUDA when available; ``cpu``/``cuda``: that one."""
    devices = [torch.device("cpu")] if choice in ("auto", "cpu") else []
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    return devices


def emit(report: str, output: str | None) -> None:
    """Print the report and, if asked, write it to ``output``."""
    print(report)
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(report + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="two small shapes (about a minute on 2 CPU cores)"
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CPU always, CUDA too when available",
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per variant and shape")
    parser.add_argument("--output", help="also write the markdown report to this file")
    parser.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        help="DIMS,N,C,SIZE,RANK instead of the built-in shapes (repeatable), e.g. 3,16,32,64,4",
    )
    args = parser.parse_args(argv)

    devices = devices_for(args.device)
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[
        args.dtype
    ]
    if args.quick:
        args.rounds, args.budget = min(args.rounds, 3), min(args.budget, 0.5)

    sections, targets = [], []
    for device in devices:
        shapes = args.shape or (QUICK if args.quick else (CUDA_FULL if device.type == "cuda" else CPU_FULL))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        rows = run(device, shapes, dtypes, args.rounds, args.budget)
        title = (
            f"{device.type.upper()}: {machine_name(device)} (torch {torch.__version__}, T = {NUM_REGIONS})"
        )
        sections.append(markdown(rows, title))
        targets += check_targets(rows)
    report = (
        "\n\n".join(sections) + "\n\nTargets (mixed 8-region batch, sorted by region):\n" + "\n".join(targets)
    )
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
