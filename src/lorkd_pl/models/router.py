"""The region router: which region's expert should read an image whose region is not known.

Every expert needs its region at inference, but NIfTI files carry none and the DICOM
``BodyPartExamined`` tag is often missing or wrong. The router is a small classifier on the pooled
features of the shared backbone with the shared weights ``W0`` ONLY (no expert: the region is what it
must find), trained in the same fit as the experts (``model.init_args.router_weight > 0``).

Its features are computed without gradient, in eval mode (as at inference), so the router changes
nothing of the student: ``W0``, the experts and the heads receive exactly the gradients they would
without it, BatchNorm statistics and the random stream are untouched. Only the router's own
parameters learn from its loss (cross-entropy on the samples' regions).

3D volumes are routed window by window (the training patch, as the experts see them) and the region
probabilities averaged over the volume (each voxel weighted by the windows covering it):
:func:`volume_probabilities`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

#: Hidden width of the router's two-layer classifier.
ROUTER_HIDDEN = 64


class RegionRouter(nn.Module):
    """Pooled features → region logits: LayerNorm, Linear, GELU, Linear.

    Args:
        kind: ``"seg3d"`` (features ``(N, F, *S)``, pooled by mean and max over space) or ``"cls2d"``
            (features ``(N, F)``).
        width: feature width F.
        num_regions: R, in the run's region order.
        hidden: hidden width.
    """

    def __init__(self, kind: str, width: int, num_regions: int, hidden: int = ROUTER_HIDDEN) -> None:
        super().__init__()
        inputs = 2 * width if kind == "seg3d" else width
        self.layers = nn.Sequential(
            nn.LayerNorm(inputs), nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, num_regions)
        )

    def forward(self, features: Tensor) -> Tensor:
        """Region logits.

        Args:
            features: ``(N, F, *S)`` (pooled here) or ``(N, F)``.

        Returns:
            ``(N, R)``.
        """
        if features.ndim > 2:
            flat = features.flatten(2)
            features = torch.cat([flat.mean(2), flat.amax(2)], dim=1)
        return self.layers(features)


class RouterNetwork(nn.Module):
    """A plain backbone holding the shared weights ``W0`` and the router: what ``lorkd-pl export`` writes.

    Shapes:
        ``(N, C, *S) → (N, R)`` region logits (one per window for a 3D volume's sliding windows).
    """

    def __init__(self, backbone: nn.Module, router: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.router = router

    def forward(self, images: Tensor) -> Tensor:
        """``images`` ``(N, C, *S)`` → ``(N, R)`` region logits."""
        return self.router(self.backbone(images))


def volume_probabilities(
    logits: Callable[[Tensor], Tensor], images: Tensor, roi_size: Sequence[int], sw_batch_size: int = 4
) -> Tensor:
    """Region probabilities of whole volumes: the router's window probabilities averaged over the volume.

    MONAI's sliding window (no overlap, constant weighting) spreads every window's probabilities over
    its voxels; their mean over the volume weights each window by the voxels it alone covers.

    Args:
        logits: ``(n, C, *roi) → (n, R)`` region logits of windows.
        images: ``(N, C, *S)`` preprocessed volumes (any size).
        roi_size: the window (the training patch).
        sw_batch_size: windows per forward.

    Returns:
        ``(N, R)`` float32 probabilities (rows sum to 1).
    """

    def spread(windows: Tensor) -> Tensor:
        probabilities = logits(windows).float().softmax(1)  # (n, R)
        view = probabilities[(...,) + (None,) * (windows.ndim - 2)]
        return view.expand(-1, -1, *windows.shape[2:]).contiguous()  # MONAI scales it in place

    maps = sliding_window_inference(
        images, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=spread, overlap=0.0
    )
    assert isinstance(maps, Tensor)
    return maps.float().flatten(2).mean(2)
