"""Programs of a deployable network: ``torch.export`` with dynamic shapes, and ONNX converted from it.

:func:`export_program` exports with a dynamic batch and dynamic spatial sizes and measures the spatial
multiple the program accepts (the card's ``preprocessing.spatial_multiple``); :func:`onnx_graph` converts
the same program to ONNX (input ``images`` ``(N, C, *S)`` float32; one output ``logits_<task>`` per
task; needs the ``onnx`` extra: ``pip install "lorkd-pl[onnx]"``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lorkd_pl.deploy.card import ExpertCard

#: The largest total stride :func:`export_program` looks for.
MAX_SPATIAL_MULTIPLE = 64


def export_program(
    network: nn.Module, channels: int, patch_size: Sequence[int]
) -> tuple[torch.export.ExportedProgram, int]:
    """``torch.export`` ``network`` with a dynamic batch AND dynamic spatial sizes.

    The spatial dimensions are exported as ``Dim.AUTO``: torch.export records the constraints the
    network imposes (a U-Net with strides 2, 2 needs sizes divisible by 4), so the program accepts
    other sliding-window sizes and whole volumes, not only the training patch. The multiple is then
    measured on the program: the smallest ``m`` for which ``patch + m`` in every spatial dimension
    passes its guards, reproduces the eager network and (segmentation) returns logits on the input's
    grid — a MONAI U-Net with strides 2, 2 runs a size of 43 but returns 44 (most wrong sizes fail on
    the guards, before any compute).

    Args:
        network: the deployable network (eval mode).
        channels: input channels C.
        patch_size: the training patch / image size (spatial dims).

    Returns:
        The program and the spatial multiple (``0``: the network could not be exported with dynamic
        spatial sizes, or the sizes it takes are not the multiples of one number: then rely on the
        training patch only).
    """
    example = torch.randn(2, channels, *patch_size)
    # batch: DYNAMIC (export fails loudly if the network fixes it); spatial: AUTO (the network's own
    # constraints, e.g. divisibility, are recorded as guards)
    dims = {0: torch.export.Dim.DYNAMIC, **{2 + i: torch.export.Dim.AUTO for i in range(len(patch_size))}}
    try:
        program = torch.export.export(network, (example,), dynamic_shapes=(dims,))
    except Exception:  # data-dependent shapes: fall back to the fixed patch
        batch = torch.export.Dim("batch", min=1, max=1024)
        return torch.export.export(network, (example,), dynamic_shapes=({0: batch},)), 0
    module = program.module()
    for multiple in range(1, MAX_SPATIAL_MULTIPLE + 1):
        probe = torch.randn(1, channels, *[size + multiple for size in patch_size])
        try:
            with torch.no_grad():
                got, want = _as_tuple(module(probe)), _as_tuple(network(probe))
        except Exception:  # a guard of the program: not a valid size
            continue
        if not all(g.shape[2:] == probe.shape[2:] for g in got if g.ndim == probe.ndim):
            continue  # runs, but not on the input's grid (43 → 44 in a U-Net)
        if all(torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, want, strict=True)):
            # sizes patch + k·m pass; they are the multiples of m only if the patch is one
            return program, multiple if all(size % multiple == 0 for size in patch_size) else 0
    return program, 0


def _as_tuple(outputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """A network's outputs as a tuple (a router answers one tensor, an expert one per task)."""
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


class OnnxError(ValueError):
    """An expert that cannot be converted to ONNX (missing extra, unsupported operator)."""


def onnx_graph(network: nn.Module, card: ExpertCard) -> tuple[bytes, int]:
    """The ONNX graph of a deployable network and its spatial multiple.

    Args:
        network: the merged expert (eval mode), ``(N, C, *S) → tuple`` of one logits tensor per task.
        card: its card (input channels, training patch, task names).

    Returns:
        The serialised ``ModelProto`` and the spatial multiple (see
        :func:`export_program`).

    Raises:
        OnnxError: without the ``onnx`` extra, or when a layer has no ONNX conversion.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise OnnxError(
            "--format onnx needs the onnx extra: pip install 'lorkd-pl[onnx]' (onnx, onnxscript, onnxruntime)"
        ) from None
    prep = card.preprocessing
    program, multiple = export_program(network, prep.channels, prep.patch_size)
    example = torch.randn(2, prep.channels, *prep.patch_size)
    outputs = [f"logits_{task['name']}" for task in card.tasks]
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the converter logs every skipped torchvision operator
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = torch.onnx.export(
                program, (example,), dynamo=True, input_names=["images"], output_names=outputs, verbose=False
            )
    except Exception as error:  # the converter raises many types; the message names the operator
        raise OnnxError(
            f"the {card.name} expert cannot be converted to ONNX: {str(error).strip().splitlines()[0][:300]}"
        ) from None
    finally:
        quiet.setLevel(level)
    return converted.model_proto.SerializeToString(), multiple
