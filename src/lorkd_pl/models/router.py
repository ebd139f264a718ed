"""The region router: which region's expert should read an image whose region is not known.

Every expert needs its region at inference, but NIfTI files carry none and the DICOM
``BodyPartExamined`` tag is often missing or wrong. The router is a small classifier on the pooled
features of the shared backbone (the output and every convolution's output, mean and max over space;
the deepest convolution's output also on a coarse 2-per-axis grid, which keeps the layout)
with the shared weights ``W0`` ONLY (no expert: the region is what it
must find), trained in the same fit as the experts (``model.init_args.router_weight > 0``).

Its features are computed without gradient, in eval mode (as at inference), so the router changes
nothing of the student: ``W0``, the experts and the heads receive exactly the gradients they would
without it, BatchNorm statistics and the random stream are untouched. Only the router's own
parameters learn from its loss (cross-entropy on the samples' regions).

3D volumes are routed window by window (the training patch, as the experts see them) and the region
probabilities averaged over the windows: :func:`volume_probabilities`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorkd_pl.models.backbones import on_outputs

#: Hidden width of the router's two-layer classifier.
ROUTER_HIDDEN = 64
#: The layers whose outputs the router reads (besides the network's output): every convolution, plain
#: or carrying experts (a transformer's linears are left out: their channels are not dimension 1).
TAP_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def tap_names(network: nn.Module) -> list[str]:
    """The names of the convolutions the router reads, in module order; a layer carrying experts counts
    once, under its own name (the name its merged or stripped copy has)."""
    names: list[str] = []
    for name, module in network.named_modules():
        if any(name.startswith(f"{tapped}.") for tapped in names):
            continue  # the base layer inside an expert layer
        base = getattr(module, "base_layer", None)
        if isinstance(module, TAP_TYPES) or isinstance(base, TAP_TYPES):
            names.append(name)
    return names


#: Cells per axis of the coarse grid the deepest taps are also averaged on (their layout).
GRID = 2


def _spatial_dims(module: nn.Module) -> int:
    return len(getattr(module, "base_layer", module).kernel_size)


def deepest_taps(
    network: nn.Module, taps: Sequence[str], run: Callable[[Tensor], object], patch_size: Sequence[int]
) -> list[str]:
    """The last tap (in forward order) among those whose outputs have the fewest spatial elements — the
    network's deepest layer; its output is also averaged on a ``GRID``-per-axis grid, which keeps the
    coarse layout of the input (where the organs lie) that global pooling loses. Empty when that output
    is smaller than the grid at the training patch.

    Found from one forward (``run(images)``) on a small input first (at most 64 per axis: cheap for a
    large network), on the patch itself if the network refuses it (e.g. UNETR's fixed size).

    Args:
        network: the backbone.
        taps: its tapped layers (:func:`tap_names`).
        run: one forward of ``network`` on ``(1, C, *size)`` zeros (whatever routing it needs).
        patch_size: the training patch.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    patch = [int(p) for p in patch_size]
    probe = [min(p, 64) for p in patch]
    measure = {
        name: lambda output, name=name: shapes.setdefault(name, tuple(output.shape[2:])) for name in taps
    }
    with torch.no_grad(), on_outputs(network, measure):
        try:
            run(probe)
        except (RuntimeError, ValueError, AssertionError):
            shapes.clear()
            probe = patch
            run(probe)
    if not shapes:
        return []
    smallest = min(math.prod(shape) for shape in shapes.values())
    last = [name for name, shape in shapes.items() if math.prod(shape) == smallest][-1]  # in the order run
    # its size at the training patch (a probe smaller than the patch scales every axis down alike)
    at_patch = [size * p // q for size, p, q in zip(shapes[last], patch, probe, strict=False)]
    return [last] if all(size >= GRID for size in at_patch) else []


def tap_width(
    network: nn.Module, taps: Sequence[str], out_channels: int, kind: str, grid_taps: Sequence[str] = ()
) -> int:
    """Length of the pooled feature vector :func:`tapped_features` returns."""
    width = 0
    for name in taps:
        module = network.get_submodule(name)
        channels = int(getattr(module, "base_layer", module).out_channels)
        width += 2 * channels + (channels * GRID ** _spatial_dims(module) if name in grid_taps else 0)
    return width + (2 * out_channels if kind == "seg3d" else out_channels)


def pool(tensor: Tensor, grid: bool = False) -> Tensor:
    """``(N, C, *S)`` → ``(N, 2C)``: mean and max over space (with ``grid``, then the means of the
    ``GRID``-per-axis cells too: ``(N, 2C + C·GRID^d)``); ``(N, C)`` stays as it is."""
    if tensor.ndim <= 2:
        return tensor
    flat = tensor.flatten(2)
    parts = [flat.mean(2), flat.amax(2)]
    if grid:
        adaptive = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[tensor.ndim - 3]
        parts.append(adaptive(tensor, GRID).flatten(1))
    return torch.cat(parts, dim=1)


def tapped_features(
    network: nn.Module, taps: Sequence[str], images: Tensor, grid_taps: Sequence[str] = ()
) -> Tensor:
    """One forward of ``network``; the pooled outputs of its ``taps`` and of the network, concatenated.

    Args:
        network: the backbone (whatever routing or mode the caller set).
        taps: layer names (:func:`tap_names`).
        images: ``(N, C, *S)``.
        grid_taps: the taps also averaged on the coarse grid (:func:`deepest_taps`).

    Returns:
        ``(N, D)``, D = :func:`tap_width`.
    """
    pooled: list[Tensor] = []
    keep = {name: lambda output, grid=name in grid_taps: pooled.append(pool(output, grid)) for name in taps}
    with on_outputs(network, keep):
        output = network(images)
    return torch.cat([*pooled, pool(output)], dim=1)


class RegionClassifier(nn.Module):
    """Pooled features → region logits: LayerNorm, Linear, GELU, Linear.

    Args:
        features: length D of the pooled feature vector (:func:`tap_width`).
        num_regions: R, in the run's region order.
        hidden: hidden width.
    """

    def __init__(self, features: int, num_regions: int, hidden: int = ROUTER_HIDDEN) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, num_regions)
        )

    def forward(self, features: Tensor) -> Tensor:
        """``features`` ``(N, D)`` → ``(N, R)`` region logits."""
        return self.layers(features)


class RouterNetwork(nn.Module):
    """A plain backbone holding the shared weights ``W0`` and the router: what ``lorkd-pl export`` writes.

    Shapes:
        ``(N, C, *S) → (N, R)`` region logits (one per window for a 3D volume's sliding windows).
    """

    def __init__(
        self, backbone: nn.Module, router: nn.Module, taps: Sequence[str], grid_taps: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.router = router
        self.taps = list(taps)
        self.grid_taps = list(grid_taps)

    def forward(self, images: Tensor) -> Tensor:
        """``images`` ``(N, C, *S)`` → ``(N, R)`` region logits."""
        return self.router(tapped_features(self.backbone, self.taps, images, self.grid_taps))


def window_starts(size: int, window: int) -> list[int]:
    """Start of every window along one axis: non-overlapping from 0, the last one flush with the end
    (MONAI's sliding-window grid at overlap 0)."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, window))
    return starts + ([size - window] if starts[-1] != size - window else [])


def volume_probabilities(
    logits: Callable[[Tensor], Tensor], images: Tensor, roi_size: Sequence[int], sw_batch_size: int = 4
) -> Tensor:
    """Region probabilities of whole volumes: the mean of the router's probabilities over the volume's
    windows (the training patch; non-overlapping, the last one per axis flush with the end; a volume
    smaller than the window is zero-padded, as MONAI's sliding window does). Nothing of the volume's
    size is kept on the device but the windows of one forward.

    Args:
        logits: ``(n, C, *roi) → (n, R)`` region logits of windows.
        images: ``(N, C, *S)`` preprocessed volumes (any size).
        roi_size: the window (the training patch).
        sw_batch_size: windows per forward.

    Returns:
        ``(N, R)`` float32 probabilities (rows sum to 1).
    """
    roi = [int(r) for r in roi_size]
    padding: list[int] = []
    for size, window in zip(reversed(images.shape[2:]), reversed(roi), strict=True):
        missing = max(window - size, 0)
        padding += [missing // 2, missing - missing // 2]
    images = F.pad(images, padding) if any(padding) else images
    corners = list(
        itertools.product(*[window_starts(s, w) for s, w in zip(images.shape[2:], roi, strict=True)])
    )
    out = []
    for volume in images:
        total = None
        for first in range(0, len(corners), sw_batch_size):
            windows = torch.stack(
                [
                    volume[(slice(None), *[slice(c, c + w) for c, w in zip(corner, roi, strict=True)])]
                    for corner in corners[first : first + sw_batch_size]
                ]
            )
            part = logits(windows).float().softmax(1).sum(0)
            total = part if total is None else total + part
        out.append(total / len(corners))
    return torch.stack(out)
