"""Backbones built from config (``class_path`` + ``init_args``) and per-task heads.

A backbone maps images to features: ``(N, C_in, *S) → (N, F, *S)`` for segmentation (e.g. a MONAI
U-Net whose ``out_channels`` is the feature width F) or ``(N, C_in, H, W) → (N, F)`` for
classification (e.g. :class:`ConvNet2d`). Heads turn features into one task's logits:
segmentation a 1×1 convolution, classification a linear layer (on pooled features).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lorkd_pl.io.trust import import_attribute, is_training_module


class ConvNet2d(nn.Module):
    """A compact 2D CNN for classification: stages of two 3×3 conv-BN-ReLU, stride 2 between stages.

    Args:
        in_channels: image channels.
        channels: width of each stage; the last is the feature width F.

    Shapes:
        ``(N, in_channels, H, W) → (N, F)`` (global average pooling).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            stride = 1 if index == 0 else 2
            layers += [
                nn.Conv2d(previous, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.out_channels = previous

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``(N, F)`` of images ``x`` ``(N, C, H, W)``."""
        return self.features(x).mean(dim=(2, 3))


def build_module(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``{"class_path": "pkg.Class", "init_args": {...}}`` (plain data, as in YAML).

    The class must be a ``torch.nn.Module`` subclass: nothing else is called. Names read from files are
    checked against the trusted modules before this (:func:`lorkd_pl.io.trust.check_file_network`).

    Raises:
        ValueError: naming the config if ``class_path`` is missing, not a module class, or the class
            cannot be built.
    """
    if not isinstance(config, Mapping) or "class_path" not in config:
        raise ValueError(f"a backbone needs {{'class_path': ..., 'init_args': {{...}}}}, got {config!r}")
    name, init_args = str(config["class_path"]), dict(config.get("init_args") or {})
    try:
        target = import_attribute(name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import {name}: {error}") from None
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise ValueError(f"{name} is not a torch.nn.Module class; a backbone's class_path must name one")
    if is_training_module(target):
        raise ValueError(f"{name} is a training module (LightningModule), not a network to use as a backbone")
    try:
        return target(**init_args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot build {name} with init_args {init_args}: {error}") from None


def feature_channels(backbone: nn.Module, in_channels: int, patch_size: Sequence[int]) -> int:
    """Feature width F of a backbone, from ``out_channels`` or an eval-mode probe forward.

    The probe tries small inputs first (at most 32, then 64 per axis: cheap even for a large network)
    and the task's patch last (transformer networks such as UNETR are built for their input size).

    Args:
        backbone: the network.
        in_channels: image channels.
        patch_size: an input size the backbone accepts (the task's patch).

    Raises:
        ValueError: if the backbone fails on all of them, naming the patch size and its error.
    """
    width = getattr(backbone, "out_channels", None)
    if isinstance(width, int):
        return width
    sizes = dict.fromkeys([tuple(min(int(p), cap) for p in patch_size) for cap in (32, 64)])
    sizes[tuple(int(p) for p in patch_size)] = None
    was_training = backbone.training
    backbone.eval()
    errors = []
    try:
        for size in sizes:
            try:
                with torch.no_grad():
                    return int(backbone(torch.zeros(1, in_channels, *size)).shape[1])
            except (RuntimeError, ValueError, AssertionError) as error:
                errors.append(str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
    finally:
        backbone.train(was_training)
    raise ValueError(
        f"the backbone {type(backbone).__name__} fails on an input of the task's patch size "
        f"{list(patch_size)} ({errors[-1]}); choose a patch size it accepts (SwinUNETR: multiples of 32, "
        "at least 64 per axis with instance norm; UNETR: its configured img_size)"
    )


def make_head(kind: str, in_channels: int, num_classes: int) -> nn.Module:
    """Default head of a task.

    seg3d: a 1×1×1 convolution ``(N, F, *S) → (N, K, *S)``; cls2d: a linear layer ``(N, F) → (N, K)``.
    """
    if kind == "seg3d":
        return nn.Conv3d(in_channels, num_classes, kernel_size=1)
    return nn.Linear(in_channels, num_classes)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


@contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Put ``module`` in train (``True``) or eval mode for the block, then give every submodule back
    its own mode (a frozen part may have been in eval mode inside a training module)."""
    modes = {child: child.training for child in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        for child, mode in modes.items():
            child.training = mode


@contextmanager
def on_outputs(network: nn.Module, hooks: Mapping[str, Callable[[Any], object]]) -> Iterator[None]:
    """During the block, call ``hooks[name](output)`` after every forward of ``network``'s submodule
    ``name`` (its output is left as it is); the hooks are removed afterwards, also on an error."""

    def hook_of(call: Callable[[Any], object]) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: Any) -> None:  # None: the output is kept
            call(output)

        return hook

    handles = [
        network.get_submodule(name).register_forward_hook(hook_of(call)) for name, call in hooks.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
