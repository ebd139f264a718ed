"""Layers that carry one low-rank expert per region: ``W_t = W0 + s_t · B_t A_t``.

The wrapper keeps the original layer as ``base_layer`` (its weight is the shared ``W0``, its bias,
stride, padding, dilation and padding mode are used unchanged) and stores the experts' factors as
two stacked parameters ``expert_A`` and ``expert_B`` of leading size ``T``: every expert lives in one
tensor that is always part of the autograd graph, so DDP never sees an unused parameter, and experts
absent from a batch receive an exact zero gradient.

Factor layouts for a weight of shape ``(D0, D1, k0, k1, ...)`` — ``(Cout, Cin, k…)`` for a conv,
``(Cin, Cout, k…)`` for a transposed conv:

* ``"paper"`` (the authors' loralib-style ConvLoRA):
  ``A_t`` is ``(r·k0, D1·k1·…)``, ``B_t`` is ``(D0·k0, r·k0)``, ``ΔW_t = reshape(B_t A_t)``.
* ``"factorized"`` (peft-style): ``A_t`` is a weight ``(r, D1, k0, k1, …)``, ``B_t`` a 1×1 mixing
  ``(D0, r)``, ``ΔW_t[d0, d1, …] = Σ_j B_t[d0, j] A_t[j, d1, …]``. Computable in activation space (a
  conv: ``A`` then ``B``; a transposed conv: ``B`` then ``A``).

For a ``Linear`` both layouts are the classic LoRA: ``A_t`` ``(r, Cin)``, ``B_t`` ``(Cout, r)``.

Experts may have different ranks; factors are then zero-padded to the largest rank ``R`` and a
fixed mask keeps the padding out of the forward pass and out of the gradients.

Forward passes never modify a weight; merging one expert into ``W0`` is the explicit
:func:`lorkd_pl.experts.merge_expert` step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorkd_pl.experts.routing import FOLDS, Routing, RoutingError
from lorkd_pl.experts.strategies import check_strategy, run_strategy

Layout = Literal["paper", "factorized"]
LAYOUTS: tuple[str, ...] = ("paper", "factorized")

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: The routing that runs every expert layer with its shared weights ``W0`` only (no expert), for any
#: batch: what :func:`lorkd_pl.experts.shared_weights` installs (e.g. for a region router, which must
#: run before the region is known).
SHARED_WEIGHTS = Routing(region=None, present=(), counts=(), is_sorted=True)
_CONV_TRANSPOSE_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ExpertLayer(nn.Module):
    """Base class of the expert-carrying wrappers (:class:`ExpertConv`, :class:`ExpertConvTranspose`,
    :class:`ExpertLinear`).

    Args:
        base_layer: the layer whose weight becomes the shared ``W0``.
        num_experts: number of experts ``T`` (one per region).
        rank: rank of every expert, or a sequence of ``T`` ranks.
        alpha: LoRA scaling numerator; expert ``t`` is scaled by ``alpha / rank_t``.
        layout: ``"paper"`` or ``"factorized"`` (see the module docstring).
        strategy: how a mixed-region batch is computed; see :mod:`lorkd_pl.experts.strategies`.
        b_init_std: standard deviation of a normal init of ``B``; ``0`` (the method's init) makes
            every expert start equal to ``W0``. Non-zero values are for tests.
        name: qualified name of the layer in its model, used in error messages.
        fold: how the layer's rows map to the routed samples when they differ (:data:`FOLDS`);
            ``None``: one row per sample, anything else is an error.
    """

    channel_dim: int
    #: the weight's leading dimension is the INPUT channels (a transposed conv): B mixes before A
    transposed: bool = False
    expert_A: nn.Parameter
    expert_B: nn.Parameter
    scaling: Tensor
    rank_mask: Tensor | None

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        rank: int | Sequence[int],
        alpha: float,
        layout: Layout = "paper",
        strategy: str = "auto",
        b_init_std: float = 0.0,
        name: str = "",
        fold: str | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown expert layout {layout!r}; choose one of {LAYOUTS}")
        if fold is not None and fold not in FOLDS:
            raise ValueError(f"layer '{name}': unknown fold {fold!r}; choose one of {FOLDS}")
        if fold == "sequence_first" and not isinstance(base_layer, nn.Linear):
            raise ValueError(f"layer '{name}': fold 'sequence_first' applies to Linear layers only")
        self.fold = fold
        self.base_layer = base_layer
        self.num_experts = int(num_experts)
        self.ranks = normalize_ranks(rank, self.num_experts)
        self.alpha = float(alpha)
        self.layout: Layout = layout
        self.strategy = check_strategy(strategy, layout)
        self.expert_name = name
        self._routing: Routing | None = None

        a_shape, b_shape, rows_per_rank = self._factor_shapes(max(self.ranks))
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.expert_A = nn.Parameter(torch.zeros(self.num_experts, *a_shape, **factory))
        self.expert_B = nn.Parameter(torch.zeros(self.num_experts, *b_shape, **factory))
        self.register_buffer(
            "scaling",
            torch.tensor([self.alpha / r for r in self.ranks], dtype=torch.float32, device=weight.device),
        )
        if len(set(self.ranks)) > 1:
            mask = torch.zeros(self.num_experts, a_shape[0], dtype=weight.dtype, device=weight.device)
            for t, r in enumerate(self.ranks):
                mask[t, : r * rows_per_rank] = 1
            self.register_buffer(
                "rank_mask", mask.view(self.num_experts, a_shape[0], *[1] * (len(a_shape) - 1))
            )
        else:
            self.rank_mask = None
        self._rows_per_rank = rows_per_rank
        self.reset_expert_parameters(b_init_std)

    # ----------------------------------------------------------------- subclass hooks
    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """Shapes of one expert's ``A`` and ``B`` at ``rank`` and how many ``A`` rows one rank adds."""
        raise NotImplementedError

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The base layer's operation with another weight (dense, one weight for the whole batch).

        Args:
            x: layer input, ``(N, Cin, *spatial)`` for a conv, ``(N, *, Cin)`` for a linear.
            weight: a weight of the base layer's kind, e.g. ``(Cout, Cin, *kernel)``; may have
                another number of output channels (used for the stacked ``A`` convolution).
            bias: ``(Cout,)`` or ``None``.
        """
        raise NotImplementedError

    def per_sample_forward(self, x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
        """The base layer's operation with one weight per sample, in one call.

        Args:
            x: layer input with ``N`` samples.
            weights: ``(N, *W0.shape)`` per-sample weights.
            bias: ``(Cout,)`` or ``None``.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- parameters
    @property
    def weight(self) -> Tensor:
        """The shared weight ``W0`` (the base layer's)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias (shared by all experts)."""
        return self.base_layer.bias

    def reset_expert_parameters(self, b_init_std: float = 0.0) -> None:
        """Initialise ``A_t`` Kaiming-uniform (a = √5) and ``B_t`` to zero (or ``N(0, b_init_std²)``)."""
        with torch.no_grad():
            self.expert_A.zero_()
            for t, r in enumerate(self.ranks):
                rows = self.expert_A[t, : r * self._rows_per_rank]
                nn.init.kaiming_uniform_(rows.reshape(rows.shape[0], -1), a=math.sqrt(5))
            if b_init_std:
                self.expert_B.normal_(0.0, b_init_std)
            else:
                self.expert_B.zero_()

    def masked_A(self, experts: Tensor | int) -> Tensor:
        """Factors ``A`` of some experts with rank padding zeroed.

        Args:
            experts: ``(P,)`` int64 expert indices, or one ``int``.

        Returns:
            ``(P, *A_shape)`` (or ``A_shape`` for an ``int``).
        """
        a = self.expert_A[experts]
        if self.rank_mask is not None:
            a = a * self.rank_mask[experts]
        return a

    @property
    def math_dtype(self) -> torch.dtype:
        """The dtype of merge math: fp32, or the weights' own dtype when it is wider (float64)."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def delta_weights(self, experts: Tensor) -> Tensor:
        """Scaled weight deltas ``s_t · ΔW_t`` of some experts, computed in :attr:`math_dtype`.

        Args:
            experts: ``(P,)`` int64 expert indices.

        Returns:
            ``(P, *W0.shape)`` tensor of :attr:`math_dtype` (fp32, or float64 for float64 weights).
        """
        dtype = self.math_dtype
        with torch.autocast(device_type=self.expert_A.device.type, enabled=False):
            a = self.masked_A(experts).to(dtype).flatten(2)  # (P, Ra, Ca)
            b = self.expert_B[experts].to(dtype)  # (P, Rb, Ra)
            delta = torch.bmm(b, a) * self.scaling[experts].to(dtype).view(-1, 1, 1)
        return delta.view(len(experts), *self.weight.shape)

    def merged_weights(self, experts: Tensor) -> Tensor:
        """Expert weights ``W0 + s_t ΔW_t`` (fp32 math, float64 for float64 weights; in ``W0``'s dtype).

        Args:
            experts: ``(P,)`` int64 expert indices.

        Returns:
            ``(P, *W0.shape)``.
        """
        with torch.autocast(device_type=self.expert_A.device.type, enabled=False):
            merged = self.weight.to(self.math_dtype).unsqueeze(0) + self.delta_weights(experts)
        return merged.to(self.weight.dtype)

    def merged_weight(self, expert: int) -> Tensor:
        """``W0 + s_t ΔW_t`` of one expert, shape ``W0.shape``."""
        index = torch.tensor([expert], dtype=torch.long, device=self.weight.device)
        return self.merged_weights(index)[0]

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Compute every sample with its own region's weights.

        Args:
            x: ``(N, Cin, *spatial)`` for a conv, ``(N, *, Cin)`` for a linear; sample ``i`` uses
                expert ``region[i]`` of the active :func:`expert_routing` context.

        Returns:
            The base layer's output shape, e.g. ``(N, Cout, *spatial_out)``.
        """
        routing = self._routing
        if routing is SHARED_WEIGHTS:  # the shared weights W0 alone (experts.shared_weights)
            return self.base_layer(x)
        if routing is None:
            raise RoutingError(
                f"expert layer '{self.expert_name}' was called outside a routing context; wrap the "
                "forward in `with expert_routing(model, region_idx): model(x)`"
            )
        self._check_input(x)
        if self.fold == "sequence_first":  # (L, N, ..., C): samples along dim 1
            x = x.transpose(0, 1)
        routing = routing.for_rows(x.shape[0], self.fold, self.expert_name)
        y = run_strategy(self.strategy, self, x, routing)
        return y.transpose(0, 1) if self.fold == "sequence_first" else y

    def _check_input(self, x: Tensor) -> None:
        pass

    def extra_repr(self) -> str:
        """Experts, ranks, alpha, layout and strategy, shown in ``print(model)``."""
        ranks = self.ranks[0] if len(set(self.ranks)) == 1 else list(self.ranks)
        return (
            f"num_experts={self.num_experts}, rank={ranks}, alpha={self.alpha}, "
            f"layout={self.layout!r}, strategy={self.strategy!r}"
            + (f", fold={self.fold!r}" if self.fold else "")
        )


class ExpertConv(ExpertLayer):
    """Region experts on an ``nn.Conv1d``/``Conv2d``/``Conv3d`` with ``groups == 1``."""

    channel_dim = 1

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        if not isinstance(base_layer, CONVS) or base_layer.groups != 1:
            raise TypeError(
                f"ExpertConv wraps Conv1d/2d/3d with groups == 1, got {base_layer!r}; grouped and "
                "depthwise convolutions stay shared (transposed ones: ExpertConvTranspose)"
            )
        super().__init__(base_layer, *args, **kwargs)
        self.spatial_dims = len(base_layer.kernel_size)

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        conv = self.base_layer  # weight (Cout, Cin, *k)
        return kernel_factor_shapes(self.layout, rank, conv.out_channels, conv.in_channels, conv.kernel_size)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise RoutingError(
                f"expert layer '{self.expert_name}' expects a batched input of shape (N, C, "
                f"{', '.join('*' * self.spatial_dims)}) ({self.spatial_dims + 2} dims), got {tuple(x.shape)}"
            )

    def _padded(self, x: Tensor) -> tuple[Tensor, str | tuple[int, ...]]:
        conv = self.base_layer
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            return x, (0,) * self.spatial_dims
        return x, conv.padding

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``conv(x, weight, bias)`` with the base conv's stride/padding/dilation (``(N, Cin, *S)`` in)."""
        conv = self.base_layer
        x, padding = self._padded(x)
        return _CONV_FUNCTIONS[self.spatial_dims](x, weight, bias, conv.stride, padding, conv.dilation, 1)

    def per_sample_forward(self, x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
        """One grouped conv (``groups = N``): ``x`` ``(N, Cin, *S)``, ``weights`` ``(N, Cout, Cin, *k)``."""
        conv = self.base_layer
        n = x.shape[0]
        x, padding = self._padded(x)
        y = _CONV_FUNCTIONS[self.spatial_dims](
            *_samples_as_groups(x, weights, bias), conv.stride, padding, conv.dilation, n
        )
        return y.view(n, weights.shape[1], *y.shape[2:])


class ExpertConvTranspose(ExpertLayer):
    """Region experts on an ``nn.ConvTranspose1d``/``2d``/``3d`` with ``groups == 1``.

    Its weight is ``(Cin, Cout, *kernel)``: the factors follow the module docstring with
    ``D0 = Cin`` and ``D1 = Cout``. An ``output_size`` passed to the forward sets the output padding as
    the base layer would.
    """

    channel_dim = 1
    transposed = True

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        if not isinstance(base_layer, CONV_TRANSPOSES) or base_layer.groups != 1:
            raise TypeError(
                f"ExpertConvTranspose wraps ConvTranspose1d/2d/3d with groups == 1, got {base_layer!r}"
            )
        super().__init__(base_layer, *args, **kwargs)
        self.spatial_dims = len(base_layer.kernel_size)
        self._output_padding: list[int] = list(base_layer.output_padding)  # set by each forward

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        conv = self.base_layer  # weight (Cin, Cout, *k)
        return kernel_factor_shapes(self.layout, rank, conv.in_channels, conv.out_channels, conv.kernel_size)

    def forward(self, x: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        """Every sample through its region's weights; ``x`` ``(N, Cin, *S)`` → ``(N, Cout, *S')``.

        Args:
            x: layer input ``(N, Cin, *S)``.
            output_size: as for ``nn.ConvTranspose*d``: the wanted spatial output size.
        """
        conv = self.base_layer
        if self._routing is SHARED_WEIGHTS:
            return conv(x, output_size)
        self._output_padding = conv._output_padding(
            x, output_size, conv.stride, conv.padding, conv.kernel_size, self.spatial_dims, conv.dilation
        )
        return super().forward(x)

    _check_input = ExpertConv._check_input

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``conv_transpose(x, weight, bias)`` with the base layer's settings (``(N, Cin, *S)`` in)."""
        conv = self.base_layer
        return _CONV_TRANSPOSE_FUNCTIONS[self.spatial_dims](
            x, weight, bias, conv.stride, conv.padding, self._output_padding, 1, conv.dilation
        )

    def per_sample_forward(self, x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
        """One grouped transposed conv (``groups = N``): ``x`` ``(N, D, *S)``, ``weights``
        ``(N, D, Cout, *k)`` (``D`` = Cin, or the rank for the factorized strategy's ``A``)."""
        conv = self.base_layer
        n = x.shape[0]
        y = _CONV_TRANSPOSE_FUNCTIONS[self.spatial_dims](
            *_samples_as_groups(x, weights, bias),
            conv.stride,
            conv.padding,
            self._output_padding,
            n,
            conv.dilation,
        )
        return y.view(n, weights.shape[2], *y.shape[2:])


class ExpertLinear(ExpertLayer):
    """Region experts on an ``nn.Linear`` (input ``(N, *, Cin)``, region per leading index)."""

    channel_dim = -1

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"ExpertLinear wraps nn.Linear, got {base_layer!r}")
        super().__init__(base_layer, *args, **kwargs)

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        return (rank, self.base_layer.in_features), (self.base_layer.out_features, rank), 1

    def _check_input(self, x: Tensor) -> None:
        if x.ndim < 2:
            raise RoutingError(
                f"expert layer '{self.expert_name}' expects a batched input (N, *, Cin), got {tuple(x.shape)}"
            )

    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear``: ``x`` ``(N, *, Cin)``, ``weight`` ``(Cout, Cin)`` → ``(N, *, Cout)``."""
        return F.linear(x, weight, bias)

    def per_sample_forward(self, x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
        """One ``bmm``: ``x`` ``(N, *, Cin)``, ``weights`` ``(N, Cout, Cin)`` → ``(N, *, Cout)``."""
        n = x.shape[0]
        y = torch.bmm(x.reshape(n, -1, x.shape[-1]), weights.transpose(1, 2))
        if bias is not None:  # in y's dtype: under autocast an fp32 bias would promote y to fp32
            y = y + bias.to(y.dtype)
        return y.view(*x.shape[:-1], weights.shape[1])


def _samples_as_groups(
    x: Tensor, weights: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A batch as one sample of ``N`` channel groups, for one grouped (transposed) conv with
    ``groups = N``: ``x`` ``(N, C, *S)`` → ``(1, N·C, *S)``, ``weights`` ``(N, W1, W2, *k)`` →
    ``(N·W1, W2, *k)``, ``bias`` ``(Cout,)`` → ``(N·Cout,)``."""
    n = x.shape[0]
    grouped_b = None if bias is None else bias.repeat(n)
    return (
        x.reshape(1, n * x.shape[1], *x.shape[2:]),
        weights.reshape(n * weights.shape[1], *weights.shape[2:]),
        grouped_b,
    )


def kernel_factor_shapes(
    layout: Layout, rank: int, d0: int, d1: int, kernel: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Shapes of one expert's ``A`` and ``B`` for a weight ``(D0, D1, *kernel)`` (module docstring), and
    how many ``A`` rows one rank adds."""
    kernel = tuple(kernel)
    if layout == "paper":
        k0, rest = kernel[0], math.prod(kernel[1:])
        return (rank * k0, d1 * rest), (d0 * k0, rank * k0), k0
    return (rank, d1, *kernel), (d0, rank), 1


def normalize_ranks(rank: int | Sequence[int], num_experts: int) -> tuple[int, ...]:
    """Expand ``rank`` to one positive integer per expert.

    Raises:
        ValueError: if ``num_experts < 1``, a rank is not a positive integer, or a rank list has
            the wrong length.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    ranks = [rank] * num_experts if isinstance(rank, int) else list(rank)
    if len(ranks) != num_experts:
        raise ValueError(f"rank lists one rank per expert: got {len(ranks)} ranks for {num_experts} experts")
    if any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    return tuple(ranks)
