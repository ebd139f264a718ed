"""The per-layer strategy benchmark runs end to end on a tiny U-Net, and its two strategies agree."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_rows_cover_every_studied_layer_and_the_strategies_agree(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import layer_strategies
    from lorkd_pl.experts import expert_routing, inject_experts
    from train_step import unet3d_setup

    setup = unet3d_setup([4, 8], (1, 8, 8, 6))
    layers = layer_strategies.studied_layers(setup)
    kinds = sorted(type(m).__name__ for _, m, _ in layers)
    assert kinds == ["Conv3d", "Conv3d", "ConvTranspose3d"]  # first conv, its residual, one up-conv
    assert [tuple(shape) for _, m, shape in layers if m.in_channels == 1] == [(1, 8, 8, 6)] * 2

    rows = layer_strategies.run(torch.device("cpu"), {"tiny": setup}, rounds=1, budget=0.001)
    assert len(rows) == len(layers) * len(layer_strategies.BATCHES) * 2
    assert all(r["grouped"] > 0 and r["by_region"] > 0 for r in rows)
    report = layer_strategies.markdown(rows, "CPU")
    assert report.count("\n| tiny |") == len(rows)

    torch.manual_seed(0)
    _, module, shape = next(layer for layer in layers if isinstance(layer[1], torch.nn.ConvTranspose3d))
    x, region = torch.randn(4, *shape), torch.tensor([0, 0, 1, 2])
    outputs = []
    for strategy in layer_strategies.STRATEGIES:
        torch.manual_seed(1)
        layer = inject_experts(copy.deepcopy(module), 8, rank=2, strategy=strategy, b_init_std=0.1)
        with expert_routing(layer, region):
            outputs.append(layer(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
