"""Low-rank region experts and the knowledge-separation convolution (pure PyTorch).

May import: torch only. Nothing of lorkd-pl, Lightning, MONAI or files.
"""

from lorkd_pl.experts.inject import (
    expert_layers,
    expert_routing,
    inject_experts,
    layer_ranks,
    load_base_weights,
    merge_expert,
    shared_weights,
    strip_experts,
)
from lorkd_pl.experts.layers import LAYOUTS, ExpertConv, ExpertConvTranspose, ExpertLayer, ExpertLinear
from lorkd_pl.experts.routing import Routing, RoutingError
from lorkd_pl.experts.strategies import STRATEGIES

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "ExpertConv",
    "ExpertConvTranspose",
    "ExpertLayer",
    "ExpertLinear",
    "Routing",
    "RoutingError",
    "expert_layers",
    "expert_routing",
    "inject_experts",
    "layer_ranks",
    "load_base_weights",
    "merge_expert",
    "shared_weights",
    "strip_experts",
]
