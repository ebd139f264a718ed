"""Gradient-conflict diagnostics: do the regions pull the shared weights in different directions?

The papers motivate region experts by conflicting knowledge between regions in one model. This callback
makes that visible on a user's own data: every ``every_n_steps`` training steps it computes, on a fixed
probe batch (samples of every region, collected from the first training batches), the gradient of the
training loss of each region's samples alone, and logs the cosine similarity of every region pair:

* ``conflict/w0/<group>/<r1>~<r2>``: over the shared backbone weights W0 (for a generalist: all of its
  backbone), per layer group: ``encoder`` (layers up to the network's deepest, smallest-output point)
  and ``decoder`` (layers after it whose output grows again; absent for classifiers);
* ``conflict/w0_experts/<group>/<r1>~<r2>`` (LoRKD students): over W0 AND the expert factors. A region's
  expert only receives that region's gradient, so the more of it an expert absorbs, the closer the
  cosine gets to 0: ``|cos|`` here is never above the W0-only value;
* ``.../mean``: the mean over the pairs. A negative cosine is a conflict (one region's step undoes
  another's).

The full history goes to ``<log_dir>/conflicts.json`` (``{"regions": [...], "records": [{"step", "kind",
"group", "cosine": [[...]]}]}``). Off by default; add it to ``trainer.callbacks``::

    - class_path: lorkd_pl.models.conflicts.GradientConflict
      init_args: {every_n_steps: 50}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lorkd_pl.io.atomic import write_json_atomic
from lorkd_pl.models.backbones import module_mode, on_outputs

EXPERT_PARAMETERS: tuple[str, ...] = ("expert_A", "expert_B")
#: The probe collects samples from at most this many training batches.
PROBE_BATCHES = 50


def cosine_matrix(gradients: Sequence[Tensor]) -> Tensor:
    """Pairwise cosine similarities of flat gradients.

    Args:
        gradients: ``R`` vectors of the same length ``P``.

    Returns:
        ``(R, R)`` float64; ``nan`` where a gradient is zero.
    """
    stacked = torch.stack([g.double() for g in gradients])
    norms = stacked.norm(dim=1)
    cosine = (stacked @ stacked.T) / (norms[:, None] * norms[None, :])
    return torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cosine, torch.full_like(cosine, math.nan))


def backbone_of(module: nn.Module) -> nn.Module:
    """The shared network of a training module: a LoRKD student's ``student``, a generalist's
    ``backbone``."""
    network = getattr(module, "student", None) or getattr(module, "backbone", None)
    if not isinstance(network, nn.Module):
        raise TypeError(f"{type(module).__name__} has no `student` or `backbone` network to diagnose")
    return network


def layer_groups(network: nn.Module, run: Callable[[], Any]) -> dict[str, str]:
    """``parameter name → "encoder" | "decoder"`` from one forward of ``network`` (``run``).

    Layers run in order; the first one whose output has the fewest spatial elements is the deepest
    point; a later layer whose output is larger again belongs to the decoder, all others to the
    encoder (a classifier has no decoder). Parameters of layers that did not run count as encoder.
    """
    order: list[tuple[str, int]] = []

    def record(name: str, output: Any) -> None:
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(tensor, Tensor):
            order.append((name, math.prod(tensor.shape[2:]) if tensor.ndim > 2 else 1))

    layers = {
        name: lambda output, name=name: record(name, output)
        for name, child in network.named_modules()
        if any(True for _ in child.parameters(recurse=False)) or hasattr(child, "base_layer")
    }
    with on_outputs(network, layers):
        run()
    group_of_layer: dict[str, str] = {}
    if order:
        deepest = min(range(len(order)), key=lambda i: order[i][1])
        smallest = order[deepest][1]
        for index, (name, size) in enumerate(order):
            group_of_layer.setdefault(name, "decoder" if index > deepest and size > smallest else "encoder")
    groups = {}
    for name, _ in network.named_parameters():
        layer = name.rpartition(".")[0]
        # the nearest enclosing layer that ran: an expert layer runs its base layer's weight itself
        while layer and layer not in group_of_layer:
            layer = layer.rpartition(".")[0]
        groups[name] = group_of_layer.get(layer, "encoder")
    return groups


def region_rows(batch: Mapping[str, Any], rows: Tensor) -> dict[str, Any]:
    """The samples ``rows`` of a batch: every tensor and list with the batch's leading size is cut."""
    size = batch["image"].shape[0]
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == size:
            out[key] = value.index_select(0, rows.to(value.device))
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


def region_gradient_cosines(
    module: L.LightningModule, batch: Mapping[str, Any], regions: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-region gradients of the training loss on ``batch`` and their pairwise cosines.

    Args:
        module: a LoRKD student or generalist (its ``compute_loss`` is the loss: no logging, no
            collective, no state touched).
        batch: a training batch with ``region`` ``(N,)`` indices into ``regions``.
        regions: the run's region names.

    Returns:
        Records ``{"kind": "w0" | "w0_experts", "group", "regions": [names present], "cosine": (R, R)}``.
    """
    network = backbone_of(module)
    parameters = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    shared = [(n, p) for n, p in parameters if n.rpartition(".")[2] not in EXPERT_PARAMETERS]
    experts = [(n, p) for n, p in parameters if n.rpartition(".")[2] in EXPERT_PARAMETERS]
    present = sorted(set(batch["region"].tolist()))
    groups: dict[str, str] = {}
    gradients: list[dict[str, Tensor]] = []
    if any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        raise ValueError(
            "GradientConflict: SyncBatchNorm synchronises every forward across processes, so a probe on "
            "one process would stall the others; remove the callback or train without sync_batchnorm"
        )
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}  # BatchNorm statistics
    devices = [batch["image"].device.index or 0] if batch["image"].is_cuda else []
    try:
        # the probe must not change training: modes, norm statistics and the random stream are restored
        with (
            module_mode(module, True),
            torch.random.fork_rng(devices=devices),
            torch.enable_grad(),
        ):
            for index, region in enumerate(present):
                rows = (batch["region"] == region).nonzero().squeeze(1)
                sub = region_rows(batch, rows)

                def loss(sub: dict[str, Any] = sub) -> Tensor:
                    return module.compute_loss(sub).loss

                holder: list[Tensor] = []
                if index == 0:  # the first forward also finds the layer groups
                    groups = layer_groups(network, lambda holder=holder, loss=loss: holder.append(loss()))
                else:
                    holder.append(loss())
                value = holder[0]
                grads = torch.autograd.grad(value, [p for _, p in parameters], allow_unused=True)
                gradients.append(
                    {
                        n: (g if g is not None else torch.zeros_like(p)).detach().flatten()
                        for (n, p), g in zip(parameters, grads, strict=True)
                    }
                )
    finally:
        with torch.no_grad():
            for name, value in module.named_buffers():
                value.copy_(buffers[name])
    names = [regions[r] for r in present]
    records = []
    kinds = [("w0", shared)] + ([("w0_experts", shared + experts)] if experts else [])
    for kind, chosen in kinds:
        for group in sorted({groups.get(n, "encoder") for n, _ in chosen}):
            keys = [n for n, _ in chosen if groups.get(n, "encoder") == group]
            vectors = [torch.cat([g[n] for n in keys]) for g in gradients]
            records.append({"kind": kind, "group": group, "regions": names, "cosine": cosine_matrix(vectors)})
    return records


class GradientConflict(L.Callback):
    """Logs per-region gradient cosines of the shared weights every ``every_n_steps`` steps (see the
    module docstring); the history goes to ``<log_dir>/conflicts.json``.

    Args:
        every_n_steps: how often (optimiser steps; from the first one at which the probe is complete).
        probe_samples_per_region: the probe batch keeps at most this many samples of each region.
    """

    def __init__(self, every_n_steps: int = 50, probe_samples_per_region: int = 8) -> None:
        if every_n_steps < 1 or probe_samples_per_region < 1:
            raise ValueError("GradientConflict: every_n_steps and probe_samples_per_region must be ≥ 1")
        self.every_n_steps = every_n_steps
        self.probe_samples_per_region = probe_samples_per_region
        self.probe: dict[str, Any] | None = None
        self.frozen = False
        self.batches_seen = 0
        self.last_step = -1
        self.records: list[dict[str, Any]] = []

    def _grow_probe(self, batch: Mapping[str, Any], regions: int) -> None:
        """Add the samples of regions the probe still lacks; freeze it once every region has
        ``probe_samples_per_region`` samples or after :data:`PROBE_BATCHES` batches."""
        have = self.probe["region"].bincount(minlength=regions) if self.probe is not None else None
        rows = []
        for region in range(regions):
            missing = self.probe_samples_per_region - (int(have[region]) if have is not None else 0)
            if missing > 0:
                rows.append((batch["region"] == region).nonzero().squeeze(1)[:missing])
        if rows and sum(len(r) for r in rows):
            new = region_rows(batch, torch.cat(rows))
            self.probe = new if self.probe is None else _concatenate(self.probe, new)
        self.batches_seen += 1
        complete = self.probe is not None and bool(
            (self.probe["region"].bincount(minlength=regions) >= self.probe_samples_per_region).all()
        )
        self.frozen = complete or self.batches_seen >= PROBE_BATCHES

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if not self.frozen:
            self._grow_probe(batch, len(pl_module.regions))
        step = trainer.global_step - 1  # the optimiser step just taken
        # measured once per step (not per accumulated micro-batch), once the probe is complete
        if (
            not self.frozen
            or self.probe is None
            or step < 0
            or step % self.every_n_steps
            or step == self.last_step
        ):
            return
        self.last_step = step
        regions = list(pl_module.regions)
        for record in region_gradient_cosines(pl_module, self.probe, regions):
            matrix, names = record["cosine"], record["regions"]
            prefix = f"conflict/{record['kind']}/{record['group']}"
            pairs = {}
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    pairs[f"{prefix}/{names[i]}~{names[j]}"] = float(matrix[i, j])
            if pairs:
                finite = [v for v in pairs.values() if math.isfinite(v)]
                pairs[f"{prefix}/mean"] = sum(finite) / len(finite) if finite else math.nan
                for logger in trainer.loggers:  # straight to the loggers: one row per measured step
                    logger.log_metrics(pairs, step=step)
            self.records.append(
                {"step": step, "kind": record["kind"], "group": record["group"], "regions": names,
                 "cosine": [[float(v) for v in row] for row in matrix.tolist()]}
            )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The history so far, saved in every checkpoint: a resumed fit continues it (the probe batch
        itself is not saved, it can be large; after a resume it is collected anew)."""
        return {"records": self.records, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the history of a checkpoint (see :meth:`state_dict`)."""
        self.records = list(state_dict.get("records", []))
        self.last_step = int(state_dict.get("last_step", -1))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # on every process: it broadcasts under DDP
        if trainer.is_global_zero and log_dir and self.records:
            history = {"regions": list(pl_module.regions), "records": self.records}
            write_json_atomic(Path(log_dir) / "conflicts.json", history)


def _concatenate(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """Two cut batches as one (tensors and lists with a batch dimension joined; the rest from ``first``)."""
    size = first["image"].shape[0]
    out = {}
    for key, value in first.items():
        other = second.get(key)
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == size and isinstance(other, Tensor):
            out[key] = torch.cat([value, other])
        elif isinstance(value, list) and len(value) == size and isinstance(other, list):
            out[key] = value + other
        else:
            out[key] = value
    return out
