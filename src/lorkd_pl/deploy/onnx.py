"""``lorkd-pl export --format onnx``: an expert as an ONNX graph for ONNX Runtime and other runtimes.

The graph is converted from the same ``torch.export`` program as ``model.pt2``
(:func:`lorkd_pl.deploy.export.export_program`), so it has the same dynamic batch and spatial sizes
(any multiple of the network's total stride; the card's ``preprocessing.spatial_multiple``). Input
``images`` ``(N, C, *S)`` float32; one output ``logits_<task>`` per task. Needs the ``onnx`` extra
(``pip install "lorkd-pl[onnx]"``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from lorkd_pl.deploy.card import ExpertCard


class OnnxError(ValueError):
    """An expert that cannot be converted to ONNX (missing extra, unsupported operator)."""


def onnx_graph(network: nn.Module, card: ExpertCard) -> tuple[bytes, int]:
    """The ONNX graph of a deployable network and its spatial multiple.

    Args:
        network: the merged expert (eval mode), ``(N, C, *S) → tuple`` of one logits tensor per task.
        card: its card (input channels, training patch, task names).

    Returns:
        The serialised ``ModelProto`` and the spatial multiple (see
        :func:`~lorkd_pl.deploy.export.export_program`).

    Raises:
        OnnxError: without the ``onnx`` extra, or when a layer has no ONNX conversion.
    """
    from lorkd_pl.deploy.export import export_program

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
