"""How an expert layer computes a batch that mixes regions (the knowledge-separation convolution).

Every strategy returns ``y_i = op(x_i, W0 + s_{r(i)} ΔW_{r(i)})`` for all samples ``i`` in one module
call, so the gradient of expert ``t`` comes only from region-``t`` samples and ``W0``'s from all of
them. They differ only in cost:

* ``"grouped"`` — the paper's: gather one merged weight per sample and run one grouped conv with
  ``groups = N`` (a batched matmul for a linear). Keeps ``N`` weight copies for backward.
* ``"by_region"`` — merge each present region's weight once, one dense call per present region on
  its samples: slices of a region-sorted batch; an unsorted batch is permuted into region order
  once (a row gather) and back afterwards, costing two copies of the activations.
* ``"homogeneous"`` — the batch holds one region: merge once, one dense call (base speed).
* ``"factorized"`` — factorized layout only: ``op(x, W0)`` + one call with the present experts'
  ``A`` stacked as output channels + a per-sample ``B`` (batched 1×1 mixing). Activation space.
* ``"auto"`` — ``"homogeneous"`` for a one-region batch; ``"by_region"`` for a large transposed 3D
  convolution on a GPU; ``"grouped"`` when every region in the batch has one sample, and for 3D
  convolutions on a GPU or (CPU) with a single-sample region; else ``"by_region"``: the fastest
  exact choices measured by ``benchmarks/`` on CPU and on an H200 (see ``docs/benchmarks.md`` and
  :func:`forward_auto`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lorkd_pl.experts.routing import Routing, RoutingError

if TYPE_CHECKING:
    from lorkd_pl.experts.layers import ExpertLayer

STRATEGIES: tuple[str, ...] = ("auto", "grouped", "by_region", "homogeneous", "factorized")
#: Voxels per sample and channel from which ``auto`` runs a transposed 3D conv ``by_region`` on a GPU
#: (2^16: between 24³, where ``grouped`` and ``by_region`` trade places, and 48³, where ``by_region``
#: took 0.63–0.78× the time; per-layer sweep on an H200, ``docs/benchmarks.md``).
LARGE_TRANSPOSED_INPUT = 2**16


def check_strategy(strategy: str, layout: str) -> str:
    """Validate a strategy name for a factor layout and return it.

    Raises:
        ValueError: for an unknown name, or ``"factorized"`` with the ``"paper"`` layout.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown expert strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "factorized" and layout != "factorized":
        raise ValueError(
            "strategy 'factorized' computes experts in activation space and needs layout='factorized'; "
            f"got layout={layout!r} (use strategy 'auto', 'by_region' or 'grouped' with it)"
        )
    return strategy


def forward_homogeneous(layer: ExpertLayer, x: Tensor, routing: Routing) -> Tensor:
    """One region in the batch: merge its expert once, one dense call.

    Args:
        layer: the expert layer.
        x: layer input ``(N, Cin, *S)`` (conv) or ``(N, *, Cin)`` (linear), all of region
            ``routing.present[0]``.
        routing: the batch's routing.
    """
    if len(routing.present) != 1:
        raise RoutingError(
            f"expert layer '{layer.expert_name}' uses strategy 'homogeneous', which needs a batch of one "
            f"region, but the batch mixes regions {list(routing.present)}; use 'by_region' or 'auto'"
        )
    weight = layer.merged_weights(routing.present_index(x.device))[0]
    return layer.base_forward(x, weight, layer.bias)


def forward_by_region(layer: ExpertLayer, x: Tensor, routing: Routing) -> Tensor:
    """One dense call per present region, each with that region's merged weight.

    Args:
        layer: the expert layer.
        x: layer input ``(N, Cin, *S)`` (conv) or ``(N, *, Cin)`` (linear).
        routing: the batch's routing.
    """
    if len(routing.present) == 1:
        return forward_homogeneous(layer, x, routing)
    weights = layer.merged_weights(routing.present_index(x.device))
    if not routing.is_sorted:  # sort once, run the sorted path, undo: two row gathers, no scatters
        order, inverse = routing.sort_order(x.device)
        y = _forward_sorted(layer, _PermuteRows.apply(x, order, inverse), routing.counts, weights)
        return _PermuteRows.apply(y, inverse, order)
    return _forward_sorted(layer, x, routing.counts, weights)


def _forward_sorted(layer: ExpertLayer, x: Tensor, counts: tuple[int, ...], weights: Tensor) -> Tensor:
    """Region-sorted batch: each region's samples are a slice (a view); ``cat``'s backward is free."""
    chunks = x.split(list(counts))
    return torch.cat([layer.base_forward(c, w, layer.bias) for c, w in zip(chunks, weights, strict=True)])


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` whose backward is the gather ``grad[inverse]`` (``index_select``'s is a scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def forward_grouped(layer: ExpertLayer, x: Tensor, routing: Routing) -> Tensor:
    """The paper's way: one merged weight per sample (gathered), one grouped call.

    Args:
        layer: the expert layer.
        x: layer input ``(N, Cin, *S)`` (conv) or ``(N, *, Cin)`` (linear).
        routing: the batch's routing.
    """
    weights = layer.merged_weights(routing.present_index(x.device))
    per_sample = weights.index_select(0, routing.slot(x.device, x.shape[0]))
    return layer.per_sample_forward(x, per_sample, layer.bias)


def forward_factorized(layer: ExpertLayer, x: Tensor, routing: Routing) -> Tensor:
    """``op(x, W0)`` plus the experts in activation space: ``s_t B_t (A_t ⊛ x)``.

    The present experts' ``A`` run as one call with ``P·R`` output channels; each sample then keeps
    its own region's ``R`` channels and mixes them with its region's ``B`` (a batched matmul).

    Args:
        layer: the expert layer (factorized layout).
        x: layer input ``(N, Cin, *S)`` (conv) or ``(N, *, Cin)`` (linear).
        routing: the batch's routing.
    """
    if layer.layout != "factorized":
        raise ValueError(f"strategy 'factorized' needs layout='factorized', got {layer.layout!r}")
    n = x.shape[0]
    present = routing.present_index(x.device)
    slot = routing.slot(x.device, n)
    base = layer.base_forward(x, layer.weight, layer.bias)
    if layer.transposed:
        return base + _factorized_transposed_delta(layer, x, present, slot)
    a = layer.masked_A(present)  # (P, R, Cin, *kernel) or (P, R, Cin)
    rank = a.shape[1]
    hidden = layer.base_forward(x, a.flatten(0, 1), None)
    scaled_b = _scaled_B(layer, present)
    b = scaled_b.index_select(0, slot)  # (N, Cout, R)
    rows = torch.arange(n, device=x.device)
    if layer.channel_dim == 1:  # conv: hidden (N, P·R, *S)
        spatial = hidden.shape[2:]
        h = hidden.reshape(n, -1, rank, spatial.numel())[rows, slot]  # (N, R, L)
        delta = torch.bmm(b.to(h.dtype), h).view(n, -1, *spatial)
    else:  # linear: hidden (N, *, P·R)
        h = hidden.reshape(n, -1, hidden.shape[-1] // rank, rank)[rows, :, slot]  # (N, M, R)
        delta = torch.bmm(h, b.to(h.dtype).transpose(1, 2)).view(*hidden.shape[:-1], -1)
    return base + delta


def _scaled_B(layer: ExpertLayer, present: Tensor) -> Tensor:
    """``s_t B_t`` of the present experts ``(P,)``: ``(P, D0, R)``."""
    return layer.expert_B[present] * layer.scaling[present].view(-1, 1, 1).to(layer.expert_B.dtype)


def _factorized_transposed_delta(layer: ExpertLayer, x: Tensor, present: Tensor, slot: Tensor) -> Tensor:
    """A transposed conv's experts in activation space: ``B`` mixes first (``(N, Cin, *S)`` →
    ``(N, R, *S)``, per sample), then one grouped transposed conv with each sample's ``A``
    ``(R, Cout, *k)``; returns ``(N, Cout, *S')``."""
    n = x.shape[0]
    scaled_b = _scaled_B(layer, present)
    b = scaled_b.index_select(0, slot)  # (N, Cin, R)
    hidden = torch.bmm(b.transpose(1, 2).to(x.dtype), x.reshape(n, x.shape[1], -1))  # (N, R, L)
    a = layer.masked_A(present).index_select(0, slot)  # (N, R, Cout, *k)
    return layer.per_sample_forward(hidden.view(n, -1, *x.shape[2:]), a.to(hidden.dtype), None)


def forward_auto(layer: ExpertLayer, x: Tensor, routing: Routing) -> Tensor:
    """The fastest exact strategy measured (``benchmarks/``, ``docs/benchmarks.md``).

    * ``homogeneous`` for a one-region batch;
    * ``grouped`` when every present region has a single sample (both keep the same P weights, and
      one grouped call beats P single-sample calls: the training step of a 3D U-Net with N = 8 over
      8 regions, × the expert-free step, 1.05× vs 1.47× on CPU, 1.69× vs 2.14× on an H200);
    * ``by_region`` for a transposed 3D convolution on a GPU whose input has at least
      :data:`LARGE_TRANSPOSED_INPUT` voxels per sample: cuDNN's grouped transposed 3D conv is slow
      there (on an H200, the 96³ U-Net's last up-convolution, 48³ in: ``by_region`` 0.63–0.78× the
      time of ``grouped``, 1 or 2 samples per region; at 10³–24³ in: 0.71–1.95×, mostly slower);
    * ``grouped`` for any other 3D convolution (5-D input) on a GPU (on an H200 faster than or level
      with ``by_region`` at every measured shape, 1–4 samples per region, at ≤ 0.81× the expert-free
      conv's memory), and on CPU when a region has a single sample: PyTorch runs a small
      single-sample 3D conv through its slow native kernel (not oneDNN), which made ``by_region``
      cost 2.1× ``grouped`` in the demo's 3D step;
    * otherwise ``by_region`` (2D: ``grouped`` took up to 4.7× the time on CPU and 6.4× the memory
      on the H200 with several samples per region).

    Args:
        layer: the expert layer.
        x: layer input ``(N, Cin, *S)`` (conv) or ``(N, *, Cin)`` (linear).
        routing: the batch's routing.
    """
    if len(routing.present) > 1:
        conv3d = layer.channel_dim == 1 and x.dim() == 5
        on_gpu = x.device.type != "cpu"
        if conv3d and on_gpu and layer.transposed and x[0, 0].numel() >= LARGE_TRANSPOSED_INPUT:
            return forward_by_region(layer, x, routing)
        if max(routing.counts) == 1 or (conv3d and (on_gpu or min(routing.counts) == 1)):
            return forward_grouped(layer, x, routing)
    return forward_by_region(layer, x, routing)


_STRATEGY_FUNCTIONS: dict[str, Callable[[ExpertLayer, Tensor, Routing], Tensor]] = {
    "auto": forward_auto,
    "grouped": forward_grouped,
    "by_region": forward_by_region,
    "homogeneous": forward_homogeneous,
    "factorized": forward_factorized,
}


def run_strategy(strategy: str, layer: ExpertLayer, x: Tensor, routing: Routing) -> Tensor:
    """Compute ``layer`` on ``x`` (``(N, Cin, *S)`` or ``(N, *, Cin)``) with the named strategy.

    Returns:
        ``(N, Cout, *S')`` (conv) or ``(N, *, Cout)`` (linear), as the base layer would.
    """
    return _STRATEGY_FUNCTIONS[strategy](layer, x, routing)
