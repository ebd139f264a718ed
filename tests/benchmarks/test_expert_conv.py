"""The benchmark runs end to end on a tiny shape, and its variants compute the same function."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "expert_conv.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("expert_conv_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_variants_agree_and_report_is_complete() -> None:
    bench = load_benchmark()
    shape = bench.Shape(2, 8, 4, 6, 2)
    cpu = torch.device("cpu")
    variants = bench.build_variants(shape, cpu, b_init_std=0.0)
    x = torch.randn(8, 4, 6, 6)
    outputs = {}
    for variant in variants[1:]:  # B = 0: every expert variant equals W0's conv
        with (
            torch.no_grad(),
            bench.expert_routing(
                variant.module.layer if isinstance(variant.module, bench.PerSampleLoop) else variant.module,
                variant.region,
            ),
        ):
            outputs[variant.name] = variant.module(x)
    reference = variants[0].module(x)
    for name, out in outputs.items():
        torch.testing.assert_close(out, reference, msg=name)

    rows = bench.run(cpu, [shape], [torch.float32], rounds=1, budget_s=0.01)
    assert {r["variant"] for r in rows} == {v.name for v in variants}
    assert all(r["ms"] > 0 and r["mb"] > 0 for r in rows)
    report = bench.markdown(rows, "tiny")
    assert report.count("\n| 2D N=8") == len(variants)
    targets = bench.check_targets(rows)
    assert len(targets) == 3 and all(line.startswith(("- ok", "- MISSED")) for line in targets)
