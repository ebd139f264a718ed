"""Put region experts into any network, route a batch through them, and merge one expert out.

>>> model = inject_experts(model, num_experts=8, rank=8, alpha=16)
>>> with expert_routing(model, region_idx):  # (N,) LongTensor, one region per sample
...     y = model(x)
>>> plain = merge_expert(model, 3)  # a new plain network: W0 + s·ΔW_3, no expert layers
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lorkd_pl.experts.layers import (
    CONV_TRANSPOSES,
    CONVS,
    SHARED_WEIGHTS,
    ExpertConv,
    ExpertConvTranspose,
    ExpertLayer,
    ExpertLinear,
    Layout,
    normalize_ranks,
)
from lorkd_pl.experts.routing import Routing, RoutingError

#: The tensors an expert layer adds to its base layer's (state-dict leaf names).
EXPERT_TENSORS: tuple[str, ...] = ("expert_A", "expert_B", "scaling", "rank_mask")
_MULTIPLIER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[x×]\s*$")


def _is_target(module: nn.Module, transposed: bool) -> bool:
    if isinstance(module, CONVS) or (transposed and isinstance(module, CONV_TRANSPOSES)):
        return module.groups == 1
    # MultiheadAttention reads out_proj.weight directly and never calls it: leave it shared.
    return isinstance(module, nn.Linear) and not isinstance(
        module, nn.modules.linear.NonDynamicallyQuantizableLinear
    )


def _wrapper_class(module: nn.Module) -> type[ExpertLayer]:
    if isinstance(module, nn.Linear):
        return ExpertLinear
    return ExpertConvTranspose if isinstance(module, CONV_TRANSPOSES) else ExpertConv


def _first_match(name: str, rules: Iterable[str] | None) -> str | None:
    """The first glob of ``rules`` (patterns, or a mapping's keys) that matches ``name``, or ``None``."""
    return next((glob for glob in rules or () if fnmatch.fnmatchcase(name, glob)), None)


def layer_ranks(
    name: str, ranks: int | Sequence[int], rules: Mapping[str, int | str] | None, num_experts: int
) -> tuple[int, ...]:
    """The ranks of one layer's experts: the first rule whose glob matches ``name`` decides.

    Args:
        name: the layer's qualified name.
        ranks: the per-region ranks (one int, or one per expert).
        rules: ordered ``{glob: rank}``: an int sets every expert's rank on matching layers; a
            multiplier string ``"2x"`` (or ``"0.5x"``) scales the per-region ranks (rounded half up,
            at least 1).
            ``None``/no match: the per-region ranks.
        num_experts: ``T``.

    Raises:
        ValueError: naming the rule for a value that is neither a positive int nor ``"<number>x"``.
    """
    base = normalize_ranks(ranks, num_experts)
    pattern = _first_match(name, rules)
    if pattern is None:
        return base
    value = rules[pattern]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return (value,) * num_experts
    match = _MULTIPLIER.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"layer_rank rule {pattern!r}: {value!r} is neither a rank (an integer >= 1) nor a "
            "multiplier of the region ranks such as '2x'"
        )
    factor = float(match.group(1))
    return tuple(max(1, math.floor(r * factor + 0.5)) for r in base)  # half up: 2.5 → 3


def expert_layers(model: nn.Module) -> Iterator[tuple[str, ExpertLayer]]:
    """Yield ``(qualified_name, layer)`` for every expert layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ExpertLayer):
            yield name, module


def inject_experts(
    model: nn.Module,
    num_experts: int,
    rank: int | Sequence[int] = 8,
    alpha: float = 16.0,
    layout: Layout = "paper",
    strategy: str = "auto",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    b_init_std: float = 0.0,
    layer_rank: Mapping[str, int | str] | None = None,
    transposed: bool = True,
    fold: Mapping[str, str] | None = None,
) -> nn.Module:
    """Wrap every ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` with ``groups == 1`` and every
    ``Linear`` with region experts.

    Grouped/depthwise convolutions, norms and other layers stay shared. The model is changed in place
    (its forward is untouched) and returned; a bare layer is returned wrapped.

    Args:
        model: any network.
        num_experts: number of experts ``T`` (one per region, index = region order).
        rank: rank of every expert, or ``T`` ranks (one per expert).
        alpha: scaling numerator; expert ``t`` is scaled by ``alpha / rank_t`` (its own rank, after
            ``layer_rank``).
        layout: factor layout, ``"paper"`` or ``"factorized"``.
        strategy: ``"auto"``, ``"grouped"``, ``"by_region"``, ``"homogeneous"`` or ``"factorized"``.
        include: glob patterns on qualified module names (``fnmatch``, e.g. ``"encoder.*"``);
            only matching layers get experts. ``None`` means all eligible layers.
        exclude: glob patterns of layers to leave shared (applied after ``include``).
        b_init_std: normal init std of ``B`` (``0``: experts start equal to ``W0``; tests use ``> 0``).
        layer_rank: per-layer ranks on top of ``rank``, ``{glob: rank or "2x"}``, first match wins
            (see :func:`layer_ranks`); e.g. ``{"*up*": "2x"}`` doubles the decoder's ranks.
        transposed: also wrap transposed convolutions (the decoders of most U-Nets mix channels there).
        fold: ``{glob: kind}``, first match wins: layers whose rows are not one per sample
            (:data:`~lorkd_pl.experts.routing.FOLDS`), e.g. ``{"*.attn.*": "leading"}`` for Swin's
            window attention, ``{"encoder.*": "sequence_first"}`` for ``batch_first=False``
            transformer layers (whose linears are refused otherwise). Modules that would bypass the
            wrapped weights in eval (the fast path of ``nn.TransformerEncoderLayer``) are switched to
            their regular path, so the experts are always used.

    Returns:
        The model with expert layers.

    Raises:
        ValueError: if the model already has experts, no layer matches, a ``layer_rank`` rule matches
            no layer, or an argument is invalid.
    """
    if any(True for _ in expert_layers(model)):
        raise ValueError("the model already carries experts; inject_experts must be called once")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if _is_target(module, transposed)
        and (include is None or _first_match(name, include) is not None)
        and _first_match(name, exclude) is None
    ]
    if not targets:
        raise ValueError(
            "inject_experts found no Conv1d/2d/3d, ConvTranspose1d/2d/3d (groups == 1) or Linear layer "
            "to wrap"
            + (f" matching include={list(include)}" if include is not None else "")
            + (f" and exclude={list(exclude)}" if exclude else "")
        )
    options = {
        "num_experts": num_experts,
        "alpha": alpha,
        "layout": layout,
        "strategy": strategy,
        "b_init_std": b_init_std,
    }
    names = [name for name, _ in targets]
    for option, rules in (("layer_rank", layer_rank), ("fold", fold)):
        deciding = {_first_match(name, rules) for name in names}
        unused = [rule for rule in rules or {} if rule not in deciding]
        if unused:  # a typo (or a rule behind a broader one) would silently leave layers at their default
            raise ValueError(
                f"{option} rule(s) {unused} decide no layer with experts: they match none, or only "
                f"layers an earlier rule decides (the first matching rule wins); names look like "
                f"{names[:4]} (glob patterns, e.g. 'decoder.*')"
            )
    ranks = {name: layer_ranks(name, rank, layer_rank, num_experts) for name in names}
    folds = {name: (fold or {}).get(_first_match(name, fold)) for name in names}
    _check_sequence_first(model, folds)
    for name, module in targets:
        wrapper = _wrapper_class(module)(
            module, name=name or type(module).__name__, rank=ranks[name], fold=folds[name], **options
        )
        if not name:
            return wrapper
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
    _use_regular_paths(model)
    return model


def _check_sequence_first(model: nn.Module, folds: Mapping[str, str | None]) -> None:
    """Refuse experts inside a ``batch_first=False`` transformer layer unless declared sequence-first:
    their input is ``(L, N, C)``, and routing positions as samples would be silently wrong."""
    for owner, module in model.named_modules():
        attention = getattr(module, "self_attn", None)
        if not isinstance(attention, nn.MultiheadAttention) or attention.batch_first:
            continue
        prefix = f"{owner}." if owner else ""
        undeclared = [n for n, kind in folds.items() if n.startswith(prefix) and kind != "sequence_first"]
        if undeclared:
            raise ValueError(
                f"layers {undeclared[:3]} are inside {owner or 'the model'} ({type(module).__name__}, "
                f"batch_first=False): their input is (sequence, batch, features). Declare it, fold: "
                f"{{'{prefix}*': 'sequence_first'}}, build the network with batch_first=True, or leave "
                "the layers out of the experts (exclude)"
            )


def _use_regular_paths(model: nn.Module) -> None:
    """Switch off fast paths that read a wrapped layer's ``weight`` (``W0``) directly: there the experts
    would be ignored in eval/no_grad. The regular path computes the same function through the layers."""
    for module in model.modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(isinstance(m, ExpertLayer) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = 0  # read only by the fused fast path's eligibility test
        else:
            module.use_nested_tensor = False  # nested tensors would take the fused path too


def _num_experts(model: nn.Module) -> tuple[list[ExpertLayer], int]:
    layers = [layer for _, layer in expert_layers(model)]
    if not layers:
        raise RoutingError("the model has no expert layers; call inject_experts(model, ...) first")
    counts = {layer.num_experts for layer in layers}
    if len(counts) != 1:
        raise RoutingError(f"expert layers disagree on the number of experts: {sorted(counts)}")
    return layers, counts.pop()


@contextmanager
def expert_routing(model: nn.Module, region_idx: Tensor | int | Sequence[int]) -> Iterator[Routing]:
    """Route every sample of the next forward passes to its region's expert.

    Args:
        model: a model with expert layers (a DDP-wrapped model works too).
        region_idx: ``(N,)`` int64 tensor with the region index of every sample of the batch, or
            one ``int`` routing every sample of any batch size to that region (e.g. sliding-window
            inference on one volume).

    Yields:
        The validated :class:`Routing`.

    Raises:
        RoutingError: on an unknown region index or a malformed region tensor; a layer called with
            a batch whose size differs from ``N`` raises when it is called.
    """
    layers, num_experts = _num_experts(model)
    routing = Routing.build(region_idx, num_experts)
    with _installed(layers, routing):
        yield routing


@contextmanager
def shared_weights(model: nn.Module) -> Iterator[None]:
    """Run the next forward passes of ``model`` with the shared weights ``W0`` only, every expert off.

    The same function as :func:`strip_experts`'s network, without a copy: what the shared backbone
    computes before the region is known (a region router's features). Gradients reach ``W0`` only.

    Args:
        model: a model with expert layers (a DDP-wrapped model works too).
    """
    layers, _ = _num_experts(model)
    with _installed(layers, SHARED_WEIGHTS):
        yield


@contextmanager
def _installed(layers: Sequence[ExpertLayer], routing: Routing) -> Iterator[None]:
    """``routing`` in every expert layer for the block, then each layer's previous one (nesting works)."""
    previous = [layer._routing for layer in layers]
    for layer in layers:
        layer._routing = routing
    try:
        yield
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer._routing = old


@torch.no_grad()
def merge_expert(model: nn.Module, region: int) -> nn.Module:
    """A new plain network with expert ``region`` merged into the shared weights.

    Every expert layer is replaced by a copy of its base layer whose weight is
    ``W0 + s_region ΔW_region`` (computed in fp32). The result has exactly the original network's
    parameters and no expert modules; ``model`` itself is not changed.

    Args:
        model: a model with expert layers.
        region: expert index in ``[0, T)``.

    Returns:
        The merged network.
    """
    _, num_experts = _num_experts(model)
    Routing.build(int(region), num_experts)  # validates the index

    def merge(layer: ExpertLayer) -> nn.Module:
        layer.base_layer.weight.copy_(layer.merged_weight(int(region)))
        return layer.base_layer

    return _unwrapped_copy(model, merge)


def strip_experts(model: nn.Module) -> nn.Module:
    """A new plain network with the shared weights ``W0`` only (every expert dropped).

    The expert-free network the experts were added to: the baseline of the benchmarks, and what the
    shared backbone alone computes. ``model`` itself is not changed.
    """
    return _unwrapped_copy(model, lambda layer: layer.base_layer)


@torch.no_grad()
def _unwrapped_copy(model: nn.Module, replace: Callable[[ExpertLayer], nn.Module]) -> nn.Module:
    """Deep copy of ``model`` with every expert layer replaced by ``replace(layer)``."""
    copied = copy.deepcopy(model)
    for name, layer in list(expert_layers(copied)):
        plain = replace(layer)
        if not name:
            return plain
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, child, plain)
    return copied


@torch.no_grad()
def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the plain network inside a model with experts: ``W0`` under the plain layer
    names (``<layer>.weight``, not ``<layer>.base_layer.weight``), no expert tensors; what
    :func:`load_base_weights` loads back."""
    wrapped = {n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, ExpertLayer)}
    plain = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in wrapped and leaf in EXPERT_TENSORS:  # owner "": a bare wrapped layer
            continue
        layer, _, parameter = owner.rpartition(".")
        if parameter == "base_layer" and layer in wrapped:
            key = f"{layer}.{leaf}"
        elif owner == "base_layer" and "" in wrapped:
            key = leaf
        plain[key] = value
    return plain


def load_base_weights(model: nn.Module, state_dict: dict[str, Tensor]) -> int:
    """Load a plain network's ``state_dict`` into a model with experts (into ``W0``; experts untouched).

    Keys of wrapped layers (``<layer>.weight``/``.bias``) go to ``<layer>.base_layer.*``.

    Args:
        model: the network after :func:`inject_experts`.
        state_dict: weights of the same network without experts.

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: if a key is missing or unexpected or a shape differs (the networks differ).
    """
    # every name of every expert layer: a network may reach one layer under two names (DynUNet's
    # skip_layers hold its input_block/downsamples), and its state dict lists both
    wrapped = {n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, ExpertLayer)}
    target = model.state_dict()
    mapped = {}
    for key, value in state_dict.items():
        owner, _, leaf = key.rpartition(".")
        if owner in wrapped:  # owner "" is a bare wrapped layer: its keys are base_layer.*
            key = f"{owner}.base_layer.{leaf}" if owner else f"base_layer.{leaf}"
        mapped[key] = value
    own = {f"{name}.{leaf}" if name else leaf for name in wrapped for leaf in EXPERT_TENSORS}
    expected = set(target) - own
    if set(mapped) != expected:
        missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
        raise ValueError(
            f"the plain weights do not fit this network: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in mapped.items():
        if target[key].shape != value.shape:
            raise ValueError(
                f"shape of {key}: network {tuple(target[key].shape)}, weights {tuple(value.shape)}"
            )
        target[key].copy_(value)
    return len(mapped)
