"""Networks users bring: folded window attention (SwinUNETR), transformer layers, shared submodules.

Oracle everywhere: sample ``i`` through ``merge_expert(model, region[i])`` (a plain network), one at a
time, in train mode with autograd on AND in eval under ``no_grad``.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet, SwinUNETR
from torch import nn

from lorkd_pl.experts import (
    RoutingError,
    expert_layers,
    expert_routing,
    inject_experts,
    load_base_weights,
    merge_expert,
)

REGION = torch.tensor([2, 0, 2, 1])


def assert_routed_equals_merged_loop(model: nn.Module, x: torch.Tensor, region: torch.Tensor, dim=0) -> None:
    for training in (True, False):
        model.train(training)
        with torch.set_grad_enabled(training), expert_routing(model, region):
            routed = model(x)
        samples = []
        for i, t in enumerate(region.tolist()):
            merged = merge_expert(model, t).train(training)
            with torch.set_grad_enabled(training):
                samples.append(merged(x.narrow(dim, i, 1)))
        torch.testing.assert_close(
            routed, torch.cat(samples, dim), rtol=1e-4, atol=1e-4, msg=f"train={training}"
        )


def swin() -> nn.Module:
    torch.manual_seed(0)
    return SwinUNETR(
        in_channels=1,
        out_channels=2,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4),
        feature_size=12,
        spatial_dims=3,
    )


def test_swin_window_attention_needs_a_declared_fold() -> None:
    model = inject_experts(swin(), 3, rank=2, b_init_std=0.05)
    message = r"attn\.qkv' got \d+ rows, \d+ × the 4 routed samples.*'leading'"
    with pytest.raises(RoutingError, match=message), expert_routing(model, REGION):
        model(torch.randn(4, 1, 32, 32, 32))


def test_swin_with_folded_windows_is_exact() -> None:
    model = inject_experts(swin(), 3, rank=2, b_init_std=0.05, fold={"*.attn.*": "leading"})
    folded = [name for name, layer in expert_layers(model) if layer.fold == "leading"]
    assert any(name.endswith("attn.qkv") for name in folded) and any(
        name.endswith("attn.proj") for name in folded
    )
    assert_routed_equals_merged_loop(model, torch.randn(4, 1, 64, 64, 64), REGION)


def encoder(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first)


def test_transformer_encoder_layers_use_their_experts_in_eval() -> None:
    """Their eval fast path reads linear1/linear2.weight (W0) directly: injection turns it off."""
    model = inject_experts(encoder(batch_first=True), 3, rank=2, b_init_std=0.3)
    assert len(list(expert_layers(model))) == 4  # linear1, linear2 per layer (attention stays shared)
    assert_routed_equals_merged_loop(model, torch.randn(4, 5, 8), REGION)


def test_sequence_first_transformers_are_refused_unless_declared() -> None:
    with pytest.raises(ValueError, match=r"batch_first=False.*'layers\.0\.\*': 'sequence_first'"):
        inject_experts(encoder(batch_first=False), 3, rank=2)
    model = inject_experts(
        encoder(batch_first=False), 3, rank=2, b_init_std=0.3, fold={"layers.*": "sequence_first"}
    )
    assert_routed_equals_merged_loop(model, torch.randn(5, 4, 8), REGION, dim=1)  # (L, N, C)


def test_a_fold_rule_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fold rule\(s\) \['\*\.atn\.\*'\] decide no layer"):
        inject_experts(swin(), 3, fold={"*.atn.*": "leading"})


def dynunet(deep_supervision: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=4,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[4, 8, 16],
        deep_supervision=deep_supervision,
        deep_supr_num=1,
    )


def test_dynunet_shared_submodules_load_base_weights_and_stay_exact() -> None:
    """DynUNet reaches its blocks under two names (skip_layers): plain weights load under both."""
    plain = dynunet()
    model = inject_experts(dynunet(), 3, rank=2, b_init_std=0.2)
    assert load_base_weights(model, plain.state_dict()) == len(plain.state_dict())
    for name, layer in expert_layers(model):
        torch.testing.assert_close(layer.weight, plain.get_submodule(name).weight)
    assert_routed_equals_merged_loop(model, torch.randn(4, 1, 16, 16, 16), REGION)
