"""The export folder format, written and read in one place.

An expert folder (``lorkd-pl export --region R --out DIR``):

* ``model.pt2`` — a ``torch.export`` program (batch and spatial dimensions dynamic: any spatial size
  that is a multiple of the network's total stride, the card's ``preprocessing.spatial_multiple``):
  ``torch.export.load(path).module()(x)`` returns one logits tensor per task, with plain PyTorch only;
* ``state_dict.pt`` — the same weights as a state dict (``backbone.*``, ``heads.<i>.*``) for rebuilding
  the network from the card's ``backbone`` (``class_path``/``init_args``, e.g. MONAI);
* ``metadata.json`` — the :class:`~lorkd_pl.deploy.card.ExpertCard`; ``README.md``.

``export --all-regions --out DIR`` writes one such folder per region (``DIR/<region>/``) and the region
router in ``DIR/router/`` (the same three files, a :class:`~lorkd_pl.deploy.card.RouterCard`). An ONNX
folder holds ``model.onnx`` instead of ``model.pt2`` and ``state_dict.pt``.

lorkd-pl reads a folder back from its card and ``state_dict.pt`` (``weights_only=True``), never from
``model.pt2`` (``torch.export.load`` may unpickle objects): only the backbone class named in the card is
imported, after the trust check, as a config's ``class_path`` would be.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorkd_pl.deploy.card import CardError, ExpertCard, Preprocessing, RouterCard
from lorkd_pl.deploy.networks import (
    ExpertNetwork,
    ExportError,
    deployable,
    load_module,
    router_card,
    router_network,
)
from lorkd_pl.io.atomic import holds_only
from lorkd_pl.io.checkpoints import CheckpointError, load_checkpoint_file
from lorkd_pl.io.hashing import sha256sum
from lorkd_pl.io.trust import check_file_network
from lorkd_pl.models.backbones import build_module, feature_channels, make_head
from lorkd_pl.models.lorkd import LoRKDModule
from lorkd_pl.models.router import RegionClassifier, RouterNetwork, tap_width

#: The files of an expert or router folder.
CARD_FILE = "metadata.json"
WEIGHTS_FILE = "state_dict.pt"
PROGRAM_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
README_FILE = "README.md"
#: The subfolder of ``export --all-regions`` holding the region router.
ROUTER_FOLDER = "router"
#: Every name an export folder holds (the torch folder, ONNX, a MONAI bundle's configs/models/docs).
EXPORT_NAMES: tuple[str, ...] = (
    CARD_FILE,
    WEIGHTS_FILE,
    PROGRAM_FILE,
    ONNX_FILE,
    README_FILE,
    "configs",
    "models",
    "docs",
)


def is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` is an earlier export (only an export's names, with its card or bundle
    config): what ``export --overwrite`` may replace."""
    return holds_only(folder, EXPORT_NAMES) and (
        (folder / CARD_FILE).is_file() or (folder / "configs" / "metadata.json").is_file()
    )


def write_folder(
    work: Path,
    network: nn.Module,
    card: ExpertCard | RouterCard,
    program: torch.export.ExportedProgram | None = None,
    onnx: bytes | None = None,
) -> None:
    """Write an expert or router folder's files into ``work`` (an empty folder, renamed into place by
    the caller): the program (or the ONNX graph), the weights, the card and the README."""
    if onnx is not None:
        (work / ONNX_FILE).write_bytes(onnx)
        readme = _onnx_readme(card)
    else:
        torch.export.save(program, str(work / PROGRAM_FILE))
        torch.save(network.state_dict(), work / WEIGHTS_FILE)
        readme = _router_readme(card) if isinstance(card, RouterCard) else _readme(card)
    card.to_json(work / CARD_FILE)
    (work / README_FILE).write_text(readme, encoding="utf-8")


def _sizes(card: ExpertCard) -> str:
    """What spatial sizes ``model.pt2`` accepts, in words."""
    multiple = card.preprocessing.spatial_multiple
    if multiple == 1:
        return "`model.pt2` accepts any spatial size."
    if multiple > 1:
        return (
            f"`model.pt2` accepts any spatial size that is a multiple of {multiple} in every dimension "
            "(other sliding-window sizes, whole volumes)."
        )
    return f"`model.pt2` accepts the training size {card.preprocessing.patch_size} only."


def _readme(card: ExpertCard) -> str:
    tasks = ", ".join(f"{t['name']} ({len(t['classes'])} classes)" for t in card.tasks)
    shape = ", ".join(map(str, [card.preprocessing.channels, *card.preprocessing.patch_size]))
    return f"""# lorkd-pl expert: {card.region}

Plain network (the region's low-rank expert merged into the shared weights) with the heads of: {tasks}.
Parameters: {card.parameters:,}. Source checkpoint sha256: {card.source_checkpoint.get("sha256")}.

```python
import torch
network = torch.export.load("model.pt2").module()      # plain PyTorch, no lorkd-pl needed
outputs = network(images)   # images: (N, {shape}); one logits tensor per task
```

{_sizes(card)}

Preprocessing: {json.dumps(card.to_dict()["preprocessing"])}. `state_dict.pt` holds the same weights for
the backbone in `metadata.json` (`backbone`) plus one head per task.
"""


def _router_readme(card: RouterCard) -> str:
    first = card.preprocessing[card.regions[0]]
    shape = ", ".join(map(str, [first.channels, *first.patch_size]))
    windows = (
        "3D volumes are routed window by window (the training patch), the probabilities averaged over the "
        "volume. "
        if card.kind == "seg3d"
        else ""
    )
    return f"""# lorkd-pl region router: {", ".join(card.regions)}

The shared weights W0 of the student (every expert dropped) and a small classifier on their pooled
features. Parameters: {card.parameters:,}. Source checkpoint sha256: {card.source_checkpoint.get("sha256")}.

```python
import torch
router = torch.export.load("model.pt2").module()   # plain PyTorch, no lorkd-pl needed
logits = router(images)   # images: (N, {shape}); (N, {len(card.regions)}) region logits, columns as `regions`
```

{windows}Each region is scored on an input prepared with its own pipeline (`preprocessing` in
`metadata.json`). `lorkd-pl predict --source <this folder's parent> --region auto` does all of this and
stops below the confidence {card.min_confidence} instead of guessing.
"""


def _onnx_readme(card: ExpertCard) -> str:
    names = ", ".join(f"`logits_{t['name']}`" for t in card.tasks)
    return f"""# lorkd-pl expert: {card.region} (ONNX)

```python
import onnxruntime
session = onnxruntime.InferenceSession("model.onnx")
outputs = session.run(None, {{"images": images}})   # images: float32 (N, {card.preprocessing.channels}, ...)
```

Outputs: {names} (one logits array per task, classes in `metadata.json`).
{_sizes(card).replace("model.pt2", "model.onnx")}
Preprocessing: {json.dumps(card.to_dict()["preprocessing"])}.
"""


@dataclass
class Expert:
    """A network to run and its card (what it outputs and how to feed it).

    ``network`` maps images ``(N, C, *S)`` to one logits tensor per task of ``card.tasks``.
    """

    network: Callable[[Tensor], Sequence[Tensor]]
    card: ExpertCard


@dataclass
class DeployedRouter:
    """An exported (or in-memory) region router to run and its card: ``network`` maps windows
    ``(n, C, *S)`` to ``(n, R)`` logits."""

    network: Callable[[Tensor], Tensor]
    card: RouterCard


def load_exported(folder: str | Path) -> tuple[ExpertNetwork, ExpertCard]:
    """Rebuild an exported expert from its card and ``state_dict.pt`` (``weights_only=True``).

    This is how lorkd-pl itself loads exports (``lorkd-pl predict``): unlike ``torch.export.load`` on
    ``model.pt2``, which may unpickle objects, it runs no code from the folder — only the backbone class
    named in the card is imported, as a config's ``class_path`` would be.

    Raises:
        ExportError: naming the folder and the fix.
    """
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise ExportError(f"{folder} is not an exported expert (no metadata.json); run lorkd-pl export first")
    card, backbone = _card_and_backbone(card_path, ExpertCard.from_json)
    width = feature_channels(backbone, card.preprocessing.channels, card.preprocessing.patch_size)
    network = ExpertNetwork(backbone, [make_head(card.kind, width, len(t["classes"])) for t in card.tasks])
    return _load_weights(network, folder), card


def load_exported_router(folder: str | Path) -> tuple[RouterNetwork, RouterCard]:
    """Rebuild an exported region router from its card and ``state_dict.pt`` (``weights_only=True``;
    only the backbone class named in the card is imported, after the trust check).

    Raises:
        ExportError: naming the folder and the fix.
    """
    folder = Path(folder)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise ExportError(
            f"{folder} holds no region router (no metadata.json); export the student with --all-regions "
            "(a student trained with model.init_args.router_weight > 0) or give --region"
        )
    card, backbone = _card_and_backbone(card_path, RouterCard.from_json)
    first: Preprocessing = card.preprocessing[card.regions[0]]
    width = feature_channels(backbone, first.channels, first.patch_size)
    try:
        features = tap_width(backbone, card.taps, width, card.kind, card.grid_taps)
    except AttributeError as error:  # a tap the backbone does not have
        raise ExportError(f"{card_path}: its taps do not match the backbone ({error})") from None
    classifier = RegionClassifier(features, len(card.regions))
    network = RouterNetwork(backbone, classifier, card.taps, card.grid_taps)
    return _load_weights(network, folder), card


def _card_and_backbone(card_path: Path, read: Callable[[Path], Any]) -> tuple[Any, nn.Module]:
    """An export folder's card (``read``) and its backbone, built only after the card's class path
    passed the trust check.

    Raises:
        ExportError: naming the card and the reason.
    """
    try:
        card = read(card_path)
        check_file_network(card.backbone, str(card_path), card.backbone)  # before anything is imported
        return card, build_module(card.backbone)
    except (CardError, ValueError) as error:
        raise ExportError(f"{card_path}: {error}") from None


def _load_weights(network: nn.Module, folder: Path) -> nn.Module:
    """``folder/state_dict.pt`` (``weights_only=True``) loaded into ``network``, in eval mode.

    Raises:
        ExportError: for an unsafe file, or weights that do not match the card's network.
    """
    try:
        network.load_state_dict(load_checkpoint_file(folder / WEIGHTS_FILE))
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    except RuntimeError as error:  # keys or shapes do not match the card
        first = " ".join(str(error).strip().splitlines()[:2])[:300]
        raise ExportError(f"{folder / WEIGHTS_FILE} does not match {folder / CARD_FILE}: {first}") from None
    return network.eval()


def load_expert(source: str | Path, region: str | None = None, device: str = "cpu") -> Expert:
    """An exported expert folder, a LoRKD checkpoint plus ``region`` (merged in memory), or a
    generalist checkpoint (all its tasks, or ``region``'s).

    Everything is read with ``weights_only=True`` (a folder through
    :func:`load_exported`, not its ``model.pt2`` program), so an untrusted file
    cannot run code.

    Raises:
        ExportError: for a region the source does not hold, naming the source.
    """
    source = Path(source)
    if source.is_dir():
        network, card = load_exported(source)
        if region is not None and region != card.region:
            raise ExportError(f"{source} is the {card.region!r} expert, not {region!r}")
    else:
        module, _ = load_module(source)
        network, card = deployable(module, region, _described(source))
    return Expert(network.to(device), card)


def load_experts_and_router(
    source: str | Path, device: str = "cpu"
) -> tuple[dict[str, Expert], DeployedRouter | None]:
    """Every region's expert and the region router (``None`` if none was exported) of a folder written by
    ``lorkd-pl export --all-regions`` (``<region>/`` and ``router/``) or of a LoRKD checkpoint.

    Raises:
        ExportError: for a source that holds no experts, naming it and the fix.
    """
    source = Path(source)
    if source.is_dir():
        if (source / CARD_FILE).is_file():
            raise ExportError(
                f"{source} is one exported expert; --region auto needs the folder of all experts "
                "(`lorkd-pl export --all-regions --out FOLDER`), or drop --region auto"
            )
        experts = {}
        for folder in sorted(p for p in source.iterdir() if (p / CARD_FILE).is_file()):
            if folder.name == ROUTER_FOLDER:
                continue
            network, card = load_exported(folder)
            region = card.region or folder.name
            if region in experts:
                raise ExportError(
                    f"{source} holds two experts of region {region!r} ({folder.name} and another); keep "
                    "one export per region in the folder given to --region auto"
                )
            experts[region] = Expert(network.to(device), card)
        if not experts:
            raise ExportError(
                f"{source} holds no exported experts (<region>/metadata.json); run "
                "`lorkd-pl export --ckpt RUN/last.ckpt --all-regions --out FOLDER` and give FOLDER"
            )
        router = None
        if (source / ROUTER_FOLDER).is_dir():
            network, card = load_exported_router(source / ROUTER_FOLDER)
            router = DeployedRouter(network.to(device), card)
        sources = {e.card.source_checkpoint.get("sha256") for e in experts.values()}
        if router is not None:
            sources.add(router.card.source_checkpoint.get("sha256"))
        if len(sources) > 1:
            raise ExportError(
                f"the experts{' and the router' if router else ''} in {source} come from different "
                "checkpoints (their cards' source_checkpoint sha256 differ); export them together "
                "(lorkd-pl export --all-regions) into an empty folder"
            )
        return experts, router
    module, _ = load_module(source, (LoRKDModule,))
    described = _described(source)
    experts = {}
    for region in module.regions:
        network, card = deployable(module, region, described)
        experts[region] = Expert(network.to(device), card)
    if module.router is None:
        return experts, None
    network = router_network(module)
    return experts, DeployedRouter(network.to(device), router_card(module, network, described))


def _described(checkpoint: Path) -> dict[str, Any]:
    """``{"path", "sha256"}`` of a checkpoint, for a card's ``source_checkpoint``."""
    return {"path": str(checkpoint), "sha256": sha256sum(checkpoint)}
