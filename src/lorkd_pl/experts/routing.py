"""Which region (expert) every sample of a batch belongs to.

A :class:`Routing` is built once per forward pass by :func:`lorkd_pl.experts.expert_routing` and
shared by every expert layer of the model, so the host-side bookkeeping (which regions are present,
how many samples each has, whether the batch is sorted by region) costs one device sync per
forward, not one per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


class RoutingError(ValueError):
    """A batch cannot be routed to region experts (bad region index, size or missing context)."""


#: How a layer's rows relate to the routed samples when a network folds several rows per sample into
#: the batch dimension: ``"leading"`` — each sample's rows are contiguous (row ``j`` belongs to sample
#: ``j // k``, e.g. Swin's window partition); ``"interleaved"`` — row ``j`` belongs to sample ``j % N``;
#: ``"sequence_first"`` — a linear's input is ``(L, N, ..., C)`` (``batch_first=False`` transformers).
FOLDS: tuple[str, ...] = ("leading", "interleaved", "sequence_first")


@dataclass
class Routing:
    """Per-sample region assignment of one batch.

    Attributes:
        region: ``(N,)`` int64 region index of every sample, or ``None`` when the whole batch,
            whatever its size, belongs to ``present[0]`` (routing by a single integer).
        present: the distinct regions in the batch, ascending.
        counts: number of samples of each region in ``present`` (empty for a single-integer routing).
        is_sorted: whether samples of one region are contiguous and in ascending region order, so
            a region's samples are a slice of the batch rather than a gather.
    """

    region: Tensor | None
    present: tuple[int, ...]
    counts: tuple[int, ...]
    is_sorted: bool
    _cache: dict[tuple[str, torch.device], object] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, region: Tensor | int | Sequence[int], num_experts: int) -> Routing:
        """Validate a region assignment and precompute its grouping.

        Args:
            region: ``(N,)`` integer tensor (or sequence) with one region index per sample, or a
                single ``int`` / 0-d tensor routing every sample of any batch to that region.
            num_experts: number of experts ``T``; valid indices are ``0 .. T-1``.

        Returns:
            The routing.

        Raises:
            RoutingError: if the indices are not integers, not 1-D, empty or outside ``[0, T)``.
        """
        if isinstance(region, int) or (isinstance(region, Tensor) and region.ndim == 0):
            index = int(region)
            _check_range([index], num_experts)
            return cls(region=None, present=(index,), counts=(), is_sorted=True)
        if not isinstance(region, Tensor):
            region = torch.as_tensor(list(region))
        if region.dtype.is_floating_point or region.dtype.is_complex or region.dtype == torch.bool:
            raise RoutingError(
                f"region indices must be an integer tensor, got dtype {region.dtype}; "
                "pass a LongTensor of shape (N,) with one region index per sample"
            )
        if region.ndim != 1 or region.numel() == 0:
            raise RoutingError(
                f"region indices must have shape (N,) with N >= 1, got shape {tuple(region.shape)}"
            )
        region = region.long()
        host = region.detach().cpu()
        present, counts = torch.unique(host, return_counts=True)
        _check_range(present.tolist(), num_experts)
        is_sorted = bool((host[1:] >= host[:-1]).all())
        return cls(
            region=region,
            present=tuple(present.tolist()),
            counts=tuple(counts.tolist()),
            is_sorted=is_sorted,
        )

    @property
    def batch_size(self) -> int | None:
        """Number of samples routed, or ``None`` for a single-integer routing (any batch size)."""
        return None if self.region is None else int(self.region.shape[0])

    def for_rows(self, rows: int, fold: str | None, layer_name: str) -> Routing:
        """The routing of a layer input with ``rows`` rows: this one, or its declared fold.

        Args:
            rows: the layer input's leading size (after moving a sequence-first batch dimension first).
            fold: the layer's declared fold (:data:`FOLDS`) or ``None``.
            layer_name: for messages.

        Raises:
            RoutingError: if ``rows`` differs from the routed batch and no fold explains it — naming
                the layer and the fix — never a silent guess.
        """
        expected = self.batch_size
        if expected is None or rows == expected:
            return self
        k, remainder = divmod(rows, expected)
        if fold in ("leading", "interleaved") and remainder == 0:
            key = ("fold", fold, k)
            if key not in self._cache:
                assert self.region is not None
                leading = fold == "leading"
                self._cache[key] = Routing(
                    region=self.region.repeat_interleave(k) if leading else self.region.repeat(k),
                    present=self.present,
                    counts=tuple(c * k for c in self.counts),
                    is_sorted=self.is_sorted if leading else len(self.present) == 1,
                )
            return self._cache[key]  # type: ignore[return-value]
        if remainder == 0 and k > 1:
            raise RoutingError(
                f"expert layer '{layer_name}' got {rows} rows, {k} × the {expected} routed samples: the "
                "network folds rows of each sample into the batch dimension (e.g. attention windows). "
                f"Declare the fold, model.fold: {{'<glob matching {layer_name}>': 'leading'}} when each "
                "sample's rows are contiguous (Swin's windows) or 'interleaved' when row j belongs to "
                "sample j mod N ('sequence_first' for a linear whose input is (sequence, batch, "
                "features)); or leave the layer out of the experts (model.exclude)"
            )
        raise RoutingError(
            f"expert layer '{layer_name}' got a batch of {rows} samples but the routing has {expected} "
            "region indices; pass one region index per sample of the batch"
            + (f" (its declared fold {fold!r} needs a multiple of them)" if fold else "")
        )

    def slot(self, device: torch.device, batch_size: int) -> Tensor:
        """Position of every sample's region within :attr:`present`.

        Args:
            device: device of the returned tensor.
            batch_size: ``N``, used for a single-integer routing.

        Returns:
            ``(N,)`` int64 tensor with values in ``[0, len(present))``.
        """
        if self.region is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        key = ("slot", device)
        if key not in self._cache:
            lookup = torch.full((max(self.present) + 1,), -1, dtype=torch.long)
            lookup[list(self.present)] = torch.arange(len(self.present))
            self._cache[key] = lookup.to(device)[self.region.to(device)]
        return self._cache[key]  # type: ignore[return-value]

    def sort_order(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The stable permutation that sorts the batch by region, and its inverse.

        Returns:
            ``(order, inverse)``, both ``(N,)`` int64: ``x[order]`` is region-sorted and
            ``x[order][inverse] == x``.
        """
        assert self.region is not None, "sort_order() needs a per-sample routing"
        key = ("order", device)
        if key not in self._cache:
            order = torch.argsort(self.region.detach().cpu(), stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel())
            self._cache[key] = (order.to(device), inverse.to(device))
        return self._cache[key]  # type: ignore[return-value]

    def present_index(self, device: torch.device) -> Tensor:
        """``(P,)`` int64 tensor of :attr:`present` on ``device``."""
        key = ("present", device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.present, dtype=torch.long, device=device)
        return self._cache[key]  # type: ignore[return-value]


def _check_range(indices: Sequence[int], num_experts: int) -> None:
    bad = [i for i in indices if not 0 <= i < num_experts]
    if bad:
        raise RoutingError(
            f"unknown region index {bad[0]}: the model has {num_experts} experts (indices 0.."
            f"{num_experts - 1}); check the region list the model was built with"
        )
