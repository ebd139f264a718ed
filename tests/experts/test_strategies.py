"""Every strategy equals an independent per-sample oracle, in outputs and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorkd_pl.experts import (
    ExpertLayer,
    RoutingError,
    expert_routing,
    inject_experts,
    merge_expert,
    strategies,
)

NUM_EXPERTS = 4

# name -> (layer factory, input shape)
LAYERS = {
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, padding=1), (7, 3, 11)),
    "conv2d": (
        lambda: nn.Conv2d(3, 5, (3, 2), stride=2, dilation=(1, 2), padding=2, padding_mode="reflect"),
        (7, 3, 10, 9),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1, bias=False), (7, 2, 5, 6, 4)),
    "conv2d_1x1": (lambda: nn.Conv2d(4, 6, 1), (7, 4, 5, 5)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 5, 3, stride=2, padding=1), (7, 3, 6)),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(3, 4, (2, 3), stride=2, output_padding=1, dilation=(1, 2)),
        (7, 3, 5, 4),
    ),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(4, 2, 2, stride=2, bias=False), (7, 4, 3, 4, 2)),
    "linear": (lambda: nn.Linear(6, 5), (7, 6)),
    "linear_tokens": (lambda: nn.Linear(6, 5), (7, 3, 6)),
}
CASES = [
    (layer, layout, strategy)
    for layer in LAYERS
    for layout in ("paper", "factorized")
    for strategy in ("grouped", "by_region", "auto", "factorized")
    if not (strategy == "factorized" and layout == "paper")
]
# Regions 0, 1 and 3 present (expert 2 absent), unsorted and sorted.
REGIONS = {
    "unsorted": torch.tensor([3, 0, 1, 3, 0, 0, 1]),
    "sorted": torch.tensor([0, 0, 0, 1, 1, 3, 3]),
}


def reference_weight(layer: ExpertLayer, t: int) -> Tensor:
    """W0 + s_t ΔW_t written from the method's definition (independent of the library's merge)."""
    rank = layer.ranks[t]
    rows = rank * layer._rows_per_rank
    a = layer.expert_A[t, :rows]
    b = layer.expert_B[t][:, :rows]
    scale = layer.alpha / rank
    if layer.layout == "factorized" and a.ndim > 2:  # ΔW[d0, d1, ...] = Σ_j B[d0, j] A[j, d1, ...]
        delta = torch.einsum("oj,j...->o...", b, a)
    else:  # paper layout (and every linear): reshape(B A)
        delta = (b @ a).reshape(layer.weight.shape)
    return layer.weight + scale * delta


def reference_forward(layer: ExpertLayer, x: Tensor, region: Tensor) -> Tensor:
    """Per-sample loop through torch's own layer implementation with the region's weight."""
    base = layer.base_layer
    outputs = []
    for i, t in enumerate(region.tolist()):
        weight = reference_weight(layer, t)
        if isinstance(base, nn.Linear):
            outputs.append(F.linear(x[i : i + 1], weight, base.bias))
        elif isinstance(base, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            function = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.ndim - 2]
            args = (base.stride, base.padding, base.output_padding, base.groups, base.dilation)
            outputs.append(function(x[i : i + 1], weight, base.bias, *args))
        else:
            outputs.append(base._conv_forward(x[i : i + 1], weight, base.bias))
    return torch.cat(outputs)


def make_layer(name: str, layout: str, strategy: str, rank) -> tuple[ExpertLayer, Tensor]:
    factory, shape = LAYERS[name]
    layer = inject_experts(
        factory(), NUM_EXPERTS, rank=rank, alpha=6.0, layout=layout, strategy=strategy, b_init_std=0.3
    )
    return layer, torch.randn(shape)


def assert_rel_close(got: Tensor, want: Tensor, tol: float = 1e-5, msg: str = "") -> None:
    """Norm-relative error ‖got − want‖ / ‖want‖ ≤ tol (sums of many fp32 terms differ elementwise)."""
    error = (got - want).norm() / want.norm().clamp_min(1e-12)
    assert error <= tol, f"{msg}: relative error {error:.2e} > {tol:.0e}"


def grads_of(layer: ExpertLayer, output: Tensor, probe: Tensor) -> dict[str, Tensor]:
    layer.zero_grad(set_to_none=True)
    (output * probe).sum().backward()
    return {name: p.grad.clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("order", list(REGIONS))
@pytest.mark.parametrize("rank", [3, [2, 4, 1, 3]], ids=["rank3", "ranks_per_expert"])
@pytest.mark.parametrize(("name", "layout", "strategy"), CASES)
def test_mixed_batch_matches_per_sample_oracle(name, layout, strategy, rank, order) -> None:
    layer, x = make_layer(name, layout, strategy, rank)
    region = REGIONS[order]
    with expert_routing(layer, region):
        out = layer(x)
    expected = reference_forward(layer, x, region)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    probe = torch.randn_like(expected)
    got = grads_of(layer, out, probe)
    want = grads_of(layer, reference_forward(layer, x, region), probe)
    assert set(got) == {"base_layer.weight", "expert_A", "expert_B"} | (
        {"base_layer.bias"} if layer.bias is not None else set()
    )
    for key in got:
        assert_rel_close(got[key], want[key], msg=key)
    # Expert 2 is absent from the batch: its factors get exactly zero gradient.
    assert torch.count_nonzero(got["expert_A"][2]) == 0
    assert torch.count_nonzero(got["expert_B"][2]) == 0
    # Rank padding (per-expert ranks) never receives gradient.
    if isinstance(rank, list):
        for t, r in enumerate(rank):
            assert torch.count_nonzero(got["expert_A"][t, r * layer._rows_per_rank :]) == 0


@pytest.mark.parametrize(("name", "layout", "strategy"), CASES)
def test_expert_gradient_comes_only_from_its_region(name, layout, strategy) -> None:
    layer, x = make_layer(name, layout, strategy, 2)
    region = REGIONS["unsorted"]
    with expert_routing(layer, region):
        out = layer(x)
    probe = torch.randn_like(out)
    full = grads_of(layer, out, probe)
    total_w0 = torch.zeros_like(layer.weight)
    for t in region.unique().tolist():
        keep = region == t
        with expert_routing(layer, region[keep]):
            part = grads_of(layer, layer(x[keep]), probe[keep])
        assert_rel_close(full["expert_A"][t], part["expert_A"][t], msg=f"A[{t}]")
        assert_rel_close(full["expert_B"][t], part["expert_B"][t], msg=f"B[{t}]")
        total_w0 += part["base_layer.weight"]
    # W0's gradient is the sum over all samples (all regions).
    assert_rel_close(full["base_layer.weight"], total_w0, msg="W0")


@pytest.mark.parametrize("layout", ["paper", "factorized"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_homogeneous_batch(name, layout) -> None:
    layer, x = make_layer(name, layout, "homogeneous", 2)
    region = torch.full((x.shape[0],), 1)
    with expert_routing(layer, region):
        out = layer(x)
    torch.testing.assert_close(out, reference_forward(layer, x, region), rtol=1e-5, atol=1e-5)
    with expert_routing(layer, 1):  # one int routes a batch of any size
        torch.testing.assert_close(layer(x), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "layout", "strategy"), CASES)
def test_merge_expert_equals_routed_layer(name, layout, strategy) -> None:
    layer, x = make_layer(name, layout, strategy, [1, 2, 3, 4])
    for t in range(NUM_EXPERTS):
        merged = merge_expert(layer, t)
        assert type(merged) is type(layer.base_layer)
        with expert_routing(layer, t):
            torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["paper", "factorized"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_auto_with_one_sample_per_region(name, layout) -> None:
    """auto switches to the grouped computation on CPU here; still equal to the oracle."""
    layer, x = make_layer(name, layout, "auto", [1, 2, 3, 4])
    x, region = x[:3], torch.tensor([3, 0, 1])
    with expert_routing(layer, region):
        out = layer(x)
    torch.testing.assert_close(out, reference_forward(layer, x, region), rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(out)
    got, want = grads_of(layer, out, probe), grads_of(layer, reference_forward(layer, x, region), probe)
    for key in got:
        assert_rel_close(got[key], want[key], msg=key)


@pytest.mark.parametrize("name", list(LAYERS))
def test_auto_with_a_single_sample_region_among_others(name, monkeypatch) -> None:
    """Regions 0, 0, 1, 3: a 3D conv takes the grouped computation on CPU (PyTorch's single-sample 3D conv
    is its slow native kernel), every other layer by_region; both equal the oracle."""
    layer, x = make_layer(name, "paper", "auto", [1, 2, 3, 4])
    x, region = x[:4], torch.tensor([0, 0, 1, 3])
    taken = []
    for strategy in ("grouped", "by_region"):
        function = strategies._STRATEGY_FUNCTIONS[strategy]
        monkeypatch.setattr(
            strategies, f"forward_{strategy}", lambda *a, f=function, s=strategy: taken.append(s) or f(*a)
        )
    with expert_routing(layer, region):
        out = layer(x)
    assert taken[0] == ("grouped" if name in ("conv3d", "conv_transpose3d") else "by_region")
    torch.testing.assert_close(out, reference_forward(layer, x, region), rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(out)
    got, want = grads_of(layer, out, probe), grads_of(layer, reference_forward(layer, x, region), probe)
    for key in got:
        assert_rel_close(got[key], want[key], msg=key)


@pytest.mark.parametrize("fold", ["leading", "interleaved"])
@pytest.mark.parametrize(
    ("layout", "strategy"),
    [("paper", "grouped"), ("paper", "by_region"), ("paper", "auto"), ("factorized", "factorized")],
)
def test_declared_fold_routes_rows_to_their_samples(fold, layout, strategy) -> None:
    """k rows per sample (attention windows folded into the batch): the oracle routes the expanded
    region list — sample i's rows are i·k..i·k+k−1 ('leading') or i, i+N, … ('interleaved')."""
    region, k = REGIONS["unsorted"], 3
    layer = inject_experts(
        nn.Linear(6, 5),
        NUM_EXPERTS,
        rank=[1, 2, 3, 4],
        layout=layout,
        strategy=strategy,
        b_init_std=0.3,
        fold={"*": fold},
    )
    x = torch.randn(len(region) * k, 4, 6)
    rows = region.repeat_interleave(k) if fold == "leading" else region.repeat(k)
    with expert_routing(layer, region):
        out = layer(x)
    expected = reference_forward(layer, x, rows)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(out)
    got, want = grads_of(layer, out, probe), grads_of(layer, reference_forward(layer, x, rows), probe)
    for key in got:
        assert_rel_close(got[key], want[key], msg=key)
    with expert_routing(layer, region), pytest.raises(RoutingError, match="needs a multiple"):
        layer(x[:-1])


class _CudaInput:
    """Stands for a CUDA input of ``shape`` in ``forward_auto``'s choice (no GPU needed to test it)."""

    device = torch.device("cuda")

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.tensor = torch.empty(shape, device="meta")
        self.shape = self.tensor.shape

    def dim(self) -> int:
        return self.tensor.dim()

    def __getitem__(self, index):
        return self.tensor[index]


@pytest.mark.parametrize(
    ("layer", "spatial", "expected"),
    [
        (nn.ConvTranspose3d(2, 3, 3, stride=2), (41, 40, 40), "by_region"),  # 65,600 voxels per channel
        (nn.ConvTranspose3d(2, 3, 3, stride=2), (40, 40, 40), "grouped"),  # 64,000
        (nn.Conv3d(2, 3, 3), (48, 48, 48), "grouped"),
        (nn.Conv2d(2, 3, 3), (256, 256), "by_region"),
    ],
)
def test_auto_on_a_gpu_runs_only_large_transposed_3d_convs_by_region(
    layer, spatial, expected, monkeypatch
) -> None:
    from lorkd_pl.experts.routing import Routing

    expert = inject_experts(layer, NUM_EXPERTS, rank=2, strategy="auto")
    taken = []
    for strategy in ("grouped", "by_region"):
        monkeypatch.setattr(strategies, f"forward_{strategy}", lambda *a, s=strategy: taken.append(s))
    strategies.forward_auto(expert, _CudaInput((4, 2, *spatial)), Routing.build([0, 0, 1, 2], NUM_EXPERTS))
    assert taken == [expected]
