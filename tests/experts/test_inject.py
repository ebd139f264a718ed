"""inject_experts / expert_routing / merge_expert on real MONAI networks, and their errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import Classifier, DenseNet, UNet
from torch import nn

from lorkd_pl.experts import (
    ExpertConv,
    ExpertConvTranspose,
    ExpertLayer,
    ExpertLinear,
    RoutingError,
    expert_layers,
    expert_routing,
    inject_experts,
    layer_ranks,
    load_base_weights,
    merge_expert,
    strip_experts,
)

T = 3


def unet3d() -> nn.Module:
    return UNet(
        spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1
    )


def classifier2d() -> nn.Module:
    return Classifier(in_shape=(1, 16, 16), classes=5, channels=(4, 8), strides=(2, 2))


def densenet2d() -> nn.Module:
    return DenseNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=4,
        init_features=8,
        growth_rate=4,
        block_config=(2, 2),
        bn_size=2,
    )


NETWORKS = {
    "unet3d": (unet3d, (4, 1, 16, 16, 16)),
    "classifier2d": (classifier2d, (4, 1, 16, 16)),
    "densenet2d": (densenet2d, (4, 1, 16, 16)),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("layout", ["paper", "factorized"])
@pytest.mark.parametrize("net", list(NETWORKS))
def test_merged_network_is_plain_and_equals_expert(net, layout) -> None:
    build, shape = NETWORKS[net]
    original = build().eval()
    plain_count, plain_keys = n_params(original), set(original.state_dict())
    eligible = [
        m
        for m in original.modules()
        if (isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and m.groups == 1)
        or type(m) is nn.Linear
    ]
    model = inject_experts(original, T, rank=[2, 4, 3], alpha=8, layout=layout, b_init_std=0.2).eval()
    wrapped = [layer for _, layer in expert_layers(model)]
    assert len(wrapped) == len(eligible)
    x = torch.randn(shape)
    region = torch.tensor([2, 0, 2, 1])
    with torch.no_grad(), expert_routing(model, region):
        mixed = model(x)
    for t in range(T):
        plain = merge_expert(model, t)
        assert n_params(plain) == plain_count
        assert set(plain.state_dict()) == plain_keys
        assert not any(isinstance(m, ExpertLayer) for m in plain.modules())
        with torch.no_grad(), expert_routing(model, t):
            routed = model(x)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), routed, rtol=1e-5, atol=1e-5)
            keep = region == t
            torch.testing.assert_close(mixed[keep], plain(x)[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("net", list(NETWORKS))
def test_strip_experts_gives_back_the_plain_network(net) -> None:
    build, shape = NETWORKS[net]
    original = build().eval()
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    model = inject_experts(original, T, rank=2, alpha=4, b_init_std=0.3).eval()  # experts ≠ 0
    plain = strip_experts(model)
    assert not any(isinstance(m, ExpertLayer) for m in plain.modules())
    assert plain.state_dict().keys() == reference.keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)  # W0 untouched
    assert any(isinstance(m, ExpertLayer) for m in model.modules())  # the model keeps its experts
    x = torch.randn(shape)
    with torch.no_grad(), expert_routing(model, 0):
        assert not torch.allclose(model(x), plain(x))  # the experts do change the output


def test_experts_start_equal_to_the_shared_weights() -> None:
    model = classifier2d().eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
    inject_experts(model, T)
    with torch.no_grad(), expert_routing(model, torch.tensor([0, 2, 1])):
        torch.testing.assert_close(model(x), before)


def test_include_exclude_and_kinds() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.Conv2d(4, 4, 3, groups=4),
        nn.ConvTranspose2d(4, 4, 2),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    shared_transposed = inject_experts(
        nn.Sequential(nn.ConvTranspose2d(4, 4, 2), nn.Conv2d(4, 4, 1)), T, transposed=False
    )
    assert type(shared_transposed[0]) is nn.ConvTranspose2d
    inject_experts(model, T, include=["0", "1", "2", "4"], exclude=["4"])
    assert isinstance(model[0], ExpertConv) and isinstance(model[2], ExpertConvTranspose)
    assert type(model[1]) is nn.Conv2d and type(model[4]) is nn.Linear
    attention = nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4))
    inject_experts(attention, T)
    assert type(attention[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(attention[1], ExpertLinear)


def test_wrapper_keeps_base_layer_settings() -> None:
    conv = nn.Conv3d(
        2, 3, (3, 1, 3), stride=(2, 1, 1), padding=(1, 0, 2), dilation=(1, 1, 2), padding_mode="circular"
    )
    layer = inject_experts(conv, T, b_init_std=0.1)
    assert layer.base_layer is conv and layer.weight is conv.weight and layer.bias is conv.bias
    x = torch.randn(2, 2, 6, 5, 7)
    with expert_routing(layer, 0):
        out = layer(x)
    torch.testing.assert_close(out, merge_expert(layer, 0)(x))
    assert out.shape == conv(x).shape


def test_train_eval_and_forward_never_change_weights() -> None:
    model = inject_experts(unet3d(), T, b_init_std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 16, 16, 16)
    for mode in (False, True, False):
        model.train(mode)
        with torch.no_grad(), expert_routing(model, torch.tensor([0, 1])):
            model(x)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_bf16_autocast_merges_in_fp32() -> None:
    layer = inject_experts(nn.Conv2d(4, 8, 3, padding=1), T, b_init_std=0.2)
    x = torch.randn(6, 4, 12, 12)
    region = torch.tensor([0, 1, 2, 0, 1, 2])
    with expert_routing(layer, region):
        reference = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            delta = layer.delta_weights(torch.tensor([0, 1]))
            out = layer(x)
    assert delta.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert layer.expert_A.grad is not None and layer.expert_A.grad.dtype == torch.float32


def test_every_trainable_parameter_gets_a_gradient_with_absent_regions() -> None:
    """Stacked factors stay in the graph, so DDP sees no unused parameter."""
    model = inject_experts(classifier2d(), T)
    with expert_routing(model, torch.tensor([1, 1])):
        model(torch.randn(2, 1, 16, 16)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_nested_routing_restores_previous() -> None:
    layer = inject_experts(nn.Linear(3, 2), T)
    with expert_routing(layer, 0) as outer:
        with expert_routing(layer, torch.tensor([1, 2])):
            assert layer._routing is not outer
        assert layer._routing is outer
    assert layer._routing is None


# ----------------------------------------------------------------------------- errors
def test_unknown_region_index() -> None:
    layer = inject_experts(nn.Linear(3, 2), T)
    with (
        pytest.raises(RoutingError, match=r"unknown region index 3.*3 experts"),
        expert_routing(layer, torch.tensor([0, 3])),
    ):
        pass
    with pytest.raises(RoutingError, match="unknown region index -1"), expert_routing(layer, -1):
        pass
    with pytest.raises(RoutingError, match="unknown region index 5"):
        merge_expert(layer, 5)


def test_missing_routing_context() -> None:
    model = inject_experts(nn.Sequential(nn.Linear(3, 2)), T)
    with pytest.raises(RoutingError, match=r"'0' was called outside a routing context.*expert_routing"):
        model(torch.randn(2, 3))


def test_region_length_must_match_batch() -> None:
    layer = inject_experts(nn.Conv2d(2, 2, 1), T)
    with (
        expert_routing(layer, torch.tensor([0, 1, 2])),
        pytest.raises(RoutingError, match="batch of 2 samples"),
    ):
        layer(torch.randn(2, 2, 4, 4))


@pytest.mark.parametrize(
    ("region", "match"),
    [
        (torch.tensor([0.0, 1.0]), "integer tensor"),
        (torch.zeros(2, 2, dtype=torch.long), r"shape \(N,\)"),
        (torch.zeros(0, dtype=torch.long), r"shape \(N,\)"),
    ],
)
def test_malformed_region_tensor(region, match) -> None:
    layer = inject_experts(nn.Linear(3, 2), T)
    with pytest.raises(RoutingError, match=match), expert_routing(layer, region):
        pass


def test_unbatched_conv_input() -> None:
    layer = inject_experts(nn.Conv2d(2, 2, 1), T)
    with expert_routing(layer, 0), pytest.raises(RoutingError, match="batched input"):
        layer(torch.randn(2, 4, 4))


def test_homogeneous_strategy_refuses_mixed_batch() -> None:
    layer = inject_experts(nn.Linear(3, 2), T, strategy="homogeneous")
    with expert_routing(layer, torch.tensor([0, 1])), pytest.raises(RoutingError, match="mixes regions"):
        layer(torch.randn(2, 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "factorized", "layout": "paper"}, "needs layout='factorized'"),
        ({"strategy": "fastest"}, "unknown expert strategy"),
        ({"layout": "lora"}, "unknown expert layout"),
        ({"rank": [2, 2]}, "one rank per expert"),
        ({"rank": 0}, "positive integers"),
        ({"include": ["decoder.*"]}, "no Conv1d/2d/3d"),
    ],
)
def test_invalid_injection_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        inject_experts(nn.Sequential(nn.Linear(3, 2)), T, **kwargs)


def test_inject_twice_is_an_error() -> None:
    model = inject_experts(nn.Sequential(nn.Linear(3, 2)), T)
    with pytest.raises(ValueError, match="already carries experts"):
        inject_experts(model, T)


def test_routing_needs_experts() -> None:
    with pytest.raises(RoutingError, match="no expert layers"), expert_routing(nn.Linear(2, 2), 0):
        pass


def test_float64_experts_merge_in_float64() -> None:
    """The merge math widens to the weights' dtype: fp32 math would lose ~1e-7 of a float64 weight."""
    torch.manual_seed(0)
    model = inject_experts(nn.Sequential(nn.Linear(64, 32)).double(), 2, rank=4, alpha=8, b_init_std=0.3)
    layer = model[0]
    merged = merge_expert(model, 1)[0].weight
    a, b = layer.expert_A[1].double(), layer.expert_B[1].double()  # the definition, in float64
    expected = layer.base_layer.weight + layer.scaling[1].double() * (b @ a).view_as(layer.base_layer.weight)
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, expected, rtol=1e-13, atol=1e-13)


def routed_equals_per_sample_merged_loop(model: nn.Module, x: torch.Tensor, region: torch.Tensor) -> None:
    """Oracle: sample i through ``merge_expert(model, region[i])``, a plain network, one at a time."""
    model.eval()
    with torch.no_grad(), expert_routing(model, region):
        routed = model(x)
    expected = torch.cat([merge_expert(model, int(t))(x[i : i + 1]) for i, t in enumerate(region)])
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


def test_layer_rank_rules_first_match_wins_and_stay_exact() -> None:
    torch.manual_seed(0)
    model = inject_experts(
        unet3d(),
        T,
        rank=[2, 4, 3],
        b_init_std=0.2,
        layer_rank={"model.2*": "2x", "model.1.submodule*": 5, "*": "0.5x"},
    )
    ranks = {name: layer.ranks for name, layer in expert_layers(model)}
    decoder = [name for name in ranks if name.startswith("model.2")]
    middle = [name for name in ranks if name.startswith("model.1.submodule")]
    rest = [name for name in ranks if name not in decoder + middle]
    assert decoder and middle and rest
    assert all(ranks[name] == (4, 8, 6) for name in decoder)
    assert all(ranks[name] == (5, 5, 5) for name in middle)
    assert all(ranks[name] == (1, 2, 2) for name in rest)  # round(1.5) = 2, never below 1
    routed_equals_per_sample_merged_loop(model, torch.randn(4, 1, 16, 16, 16), torch.tensor([2, 0, 1, 2]))


@pytest.mark.parametrize("value", ["2", "x2", 0, "-1x", 1.5])
def test_bad_layer_rank_rule(value) -> None:
    with pytest.raises(ValueError, match="layer_rank rule"):
        inject_experts(unet3d(), T, layer_rank={"*": value})
    with pytest.raises(ValueError, match=r"rule\(s\) \['decoder\.\*'\] decide no layer"):
        inject_experts(unet3d(), T, layer_rank={"decoder.*": 2})
    with pytest.raises(ValueError, match=r"rule\(s\) \['model\.0\*'\] decide no layer.*first matching"):
        inject_experts(unet3d(), T, layer_rank={"*": "2x", "model.0*": 8})  # shadowed by "*"


def test_rank_multipliers_round_half_up() -> None:
    assert layer_ranks("a", [5, 3, 1], {"*": "0.5x"}, 3) == (3, 2, 1)
    assert layer_ranks("a", [3, 5, 2], {"*": "1.5x"}, 3) == (5, 8, 3)
    assert layer_ranks("b", [3, 5, 2], {"a": 7}, 3) == (3, 5, 2)  # no rule matches: the region ranks


def test_unet_decoder_transposed_convs_carry_experts() -> None:
    model = inject_experts(unet3d(), T, b_init_std=0.2)
    transposed = [name for name, layer in expert_layers(model) if isinstance(layer, ExpertConvTranspose)]
    assert len(transposed) == 2  # MONAI's UNet mixes decoder channels in its transposed convs
    routed_equals_per_sample_merged_loop(model, torch.randn(3, 1, 16, 16, 16), torch.tensor([1, 0, 2]))


def test_transposed_output_size_is_honoured() -> None:
    conv = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    layer = inject_experts(conv, T, b_init_std=0.2)
    x = torch.randn(2, 3, 5, 5)
    with expert_routing(layer, torch.tensor([0, 2])):
        out = layer(x, output_size=[10, 10])
    merged = [merge_expert(layer, t)(x[i : i + 1], output_size=[10, 10]) for i, t in enumerate([0, 2])]
    assert out.shape == (2, 2, 10, 10)
    torch.testing.assert_close(out, torch.cat(merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["grouped", "by_region", "homogeneous", "auto"])
def test_bf16_output_dtype_does_not_depend_on_the_strategy(strategy) -> None:
    layer = inject_experts(nn.Linear(8, 4), T, strategy=strategy, b_init_std=0.2)
    x = torch.randn(3, 8)
    region = torch.tensor([1, 1, 1]) if strategy == "homogeneous" else torch.tensor([0, 1, 2])
    with expert_routing(layer, region), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        plain = layer.base_layer(x)
    assert out.dtype == plain.dtype == torch.bfloat16


def test_load_base_weights_into_a_bare_wrapped_layer() -> None:
    plain = nn.Conv2d(2, 3, 3)
    layer = inject_experts(nn.Conv2d(2, 3, 3), T)
    assert load_base_weights(layer, plain.state_dict()) == 2
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.bias, plain.bias)
