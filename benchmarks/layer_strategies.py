"""``grouped`` vs ``by_region`` for the 3D U-Nets' transposed and one-input-channel convolutions, per layer.

``auto`` picks a strategy per layer from its kind, device and input size (``experts/strategies.py``).
For the two layer kinds where the choice is least obvious on a GPU — transposed 3D convolutions
(cuDNN's grouped transposed convolution) and the first convolution with one input channel (a
grouped convolution with one channel per group runs PyTorch's depthwise kernel) — this times each such
layer of the training-step benchmark's U-Nets alone: forward and backward (the input's gradient
included; ``expert_conv.py``'s step), with ``grouped`` and with ``by_region``, for 1 and 2 samples per
region, fp32 and bf16.
``LARGE_TRANSPOSED_INPUT`` in ``strategies.py`` comes from this table (docs/benchmarks.md).

Usage::

    python benchmarks/layer_strategies.py --device cuda [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
from torch import nn

from expert_conv import Variant, devices_for, emit, machine_name, make_step, time_steps
from lorkd_pl.experts import inject_experts
from lorkd_pl.models.backbones import build_module
from train_step import CUDA_SETUPS, SETUPS

STRATEGIES = ("grouped", "by_region")
#: (batch size, regions): 1 sample per region, 2 per region in N = 8, 2 per region in N = 16
BATCHES = ((8, 8), (8, 4), (16, 8))


def studied_layers(setup: dict) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """The setup's U-Net's transposed 3D convs and one-input-channel 3D convs, with the input shape
    ``(C, D, H, W)`` of one sample each gets (recorded on a forward of a zero crop)."""
    network = build_module(setup["backbone"])
    found: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def studied(module: nn.Module) -> bool:
        transposed = isinstance(module, nn.ConvTranspose3d)
        return transposed or (isinstance(module, nn.Conv3d) and module.in_channels == 1)

    def record(module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> None:
        found.append((name, module, tuple(args[0].shape[1:])))

    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: record(m, args, out, name))
        for name, module in network.named_modules()
        if studied(module)
    ]
    with torch.no_grad():
        network(torch.zeros(1, *setup["shape"]))
    for hook in hooks:
        hook.remove()
    return found


def run(device: torch.device, setups: dict[str, dict], rounds: int, budget: float) -> list[dict]:
    rows = []
    for net, setup in setups.items():
        for name, module, shape in studied_layers(setup):
            for batch, regions in BATCHES:
                region = (torch.arange(batch) % regions).sort().values.to(device)
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(batch, *shape, device=device, requires_grad=True)
                    with torch.no_grad():
                        grad_out = torch.randn_like(copy.deepcopy(module).to(device)(x))
                    steps = {
                        strategy: make_step(
                            Variant(
                                strategy,
                                inject_experts(
                                    copy.deepcopy(module).to(device), 8, rank=8, strategy=strategy
                                ),
                                region,
                            ),
                            x,
                            grad_out,
                            dtype,
                        )
                        for strategy in STRATEGIES
                    }
                    times = time_steps(steps, device, rounds, budget)
                    rows.append(
                        {
                            "net": net,
                            "layer": f"{name} {type(module).__name__} "
                            f"{module.in_channels}->{module.out_channels}",
                            "input": "×".join(map(str, shape[1:])),
                            "batch": batch,
                            "per_region": batch // regions,
                            "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
                            **{strategy: times[strategy] for strategy in STRATEGIES},
                        }
                    )
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| net | layer | input per sample | N | per region | dtype | grouped ms | by_region ms | "
        "by_region / grouped |",
        "|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['layer']} | {r['input']} | {r['batch']} | {r['per_region']} | {r['dtype']} | "
            f"{r['grouped'] * 1e3:.2f} | {r['by_region'] * 1e3:.2f} | {r['by_region'] / r['grouped']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--budget", type=float, default=0.4, help="seconds of timing per variant and row")
    parser.add_argument("--output", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    sections = []
    for device in devices_for(args.device):
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        setups = {"3D U-Net 40×40×24": SETUPS["3D U-Net"]}
        if device.type == "cuda":
            setups = {"3D U-Net 96³": CUDA_SETUPS["3D U-Net 96³"], **setups}
        title = f"{device.type.upper()}: {machine_name(device)} (torch {torch.__version__})"
        sections.append(markdown(run(device, setups, 5, args.budget), title))
    emit("\n\n".join(sections), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
