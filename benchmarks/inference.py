"""Inference time of an exported (merged) region expert against the expert-free network, side by side.

For the demo-sized 3D U-Net and 2D CNN: the plain backbone + heads without experts, the exported
``model.pt2`` of one region (``W0 + s·ΔW`` merged, loaded with ``torch.export.load``), and the training
student routed to that region. The merged expert should cost what the expert-free network costs.

Usage::

    python benchmarks/inference.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from expert_conv import devices_for, emit, machine_name, time_steps
from lorkd_pl.deploy.export import export_region
from lorkd_pl.deploy.folders import load_exported
from lorkd_pl.deploy.networks import ExpertNetwork
from lorkd_pl.experts import strip_experts
from lorkd_pl.models.lorkd import LoRKDModule
from train_step import run_info, setups_for

BASELINE = "expert-free network"


def build(setup: dict, folder: Path, device: torch.device) -> dict:
    """The three variants for ``setup`` and an input batch."""
    info = run_info(setup)
    student = LoRKDModule(**info, backbone=setup["backbone"], kd="none", rank=8, alpha=16).eval()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("expert_B"):
                p.normal_(0, 0.05)
    checkpoint = folder / "student.ckpt"
    data = {"state_dict": student.state_dict(), "hyper_parameters": dict(student.hparams)}
    student.on_save_checkpoint(data)
    torch.save(data, checkpoint)
    region = "brain"
    out = export_region(checkpoint, region, folder / region, student=student)
    exported = torch.export.load(str(out / "model.pt2")).module().to(device)
    rebuilt = load_exported(out)[0].to(device)  # what `lorkd-pl predict` runs
    tasks = [i for i, t in enumerate(student.tasks) if t["region"] == region]
    plain_backbone = strip_experts(student.student)  # the expert-free network: W0 only
    plain = ExpertNetwork(plain_backbone, [copy.deepcopy(student.heads[i]) for i in tasks]).eval().to(device)
    student = student.to(device)
    images = torch.randn(setup["batch"], *setup["shape"], device=device)
    return {
        BASELINE: lambda: plain(images),
        "exported merged expert (model.pt2)": lambda: exported(images),
        "exported merged expert (state_dict.pt, as predict loads it)": lambda: rebuilt(images),
        "student routed to the region": lambda: student.task_logits(images, tasks[0]),
    }


def run(device: torch.device, rounds: int, budget: float) -> list[dict]:
    rows = []
    for name, setup in setups_for(device).items():
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            variants = build(setup, Path(folder), device)
            times = time_steps(variants, device, rounds, budget)
        for label, seconds in times.items():
            rows.append(
                {
                    "setup": f"{name}, N={setup['batch']}",
                    "variant": label,
                    "ms": seconds * 1e3,
                    "ratio": seconds / times[BASELINE],
                }
            )
        print(f"  measured {name} on {device.type}", file=sys.stderr)
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| setup | variant | ms / batch | time × expert-free |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['setup']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    rounds, budget = (3, 0.5) if args.quick else (7, 2.0)
    sections = [
        markdown(
            run(device, rounds, budget),
            f"{device.type.upper()}: {machine_name(device)} (torch {torch.__version__})",
        )
        for device in devices_for(args.device)
    ]
    emit("\n\n".join(sections), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
