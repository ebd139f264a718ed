"""The expert card: one description of a deployable network, written by export and read by predict.

An :class:`ExpertCard` says what a network is for (region, tasks and their class names in output
order), how to feed it (the training preprocessing and sliding window), how to rebuild it (the backbone
config), how big it is and where it came from. ``lorkd-pl export`` writes it as ``metadata.json``;
``lorkd-pl predict`` builds its input pipeline and output files from it, whether the network comes from
an export folder, a LoRKD checkpoint (one region merged in memory) or a generalist checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lorkd_pl.data.transforms import describe_intensity
from lorkd_pl.io.atomic import write_text_atomic

#: 2: ``preprocessing.spatial_multiple`` and router cards; format-1 cards (without them) still read.
CARD_FORMAT = 2
READABLE_FORMATS: tuple[int, ...] = (1, 2)
VERSIONED_PACKAGES: tuple[str, ...] = ("lorkd-pl", "torch", "lightning", "monai", "torchmetrics", "SimpleITK")


class CardError(ValueError):
    """An expert card that cannot be read; names the file and the field."""


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for the network (the training pipeline, without augmentation).

    Attributes:
        channels: image channels C.
        patch_size: training crop (seg3d, sliding-window size) or image size (cls2d).
        spacing: seg3d: target voxel spacing (mm, x y z), ``None`` keeps the file's.
        modality: ``"CT"``, ``"MR"`` or ``"other"``: intensity normalisation.
        orientation: ``"RAS"`` for seg3d, ``None`` for cls2d.
        intensity: the intensity steps in words (for people; the code follows ``modality``).
        sw_overlap: seg3d: sliding-window overlap; ``sw_batch_size``: windows per forward.
        spatial_multiple: ``model.pt2`` accepts every spatial size that is a multiple of it (the
            network's total stride; 1: any size); 0: only ``patch_size`` (an export without dynamic
            spatial sizes, or one written before they existed).
    """

    channels: int
    patch_size: list[int]
    spacing: list[float] | None = None
    modality: str | None = None
    orientation: str | None = None
    intensity: str = ""
    sw_overlap: float = 0.5
    sw_batch_size: int = 4
    spatial_multiple: int = 0


@dataclass(frozen=True)
class ExpertCard:
    """One deployable network: a region's merged expert, or a generalist.

    Attributes:
        region: the expert's region; ``None`` for a generalist (tasks of several regions).
        kind: ``"seg3d"`` or ``"cls2d"``.
        tasks: ``[{"name", "region", "classes", "output_index"}]`` in the network's output order.
        preprocessing: see :class:`Preprocessing`.
        backbone: ``{"class_path", "init_args"}`` of the backbone (to rebuild from ``state_dict.pt``).
        model: the training module it came from (``"LoRKDModule"`` or ``"GeneralistModule"``).
        parameters: parameters of the network; ``expert_free_backbone_parameters``: of the backbone
            without experts (equal to the merged backbone's).
        source_checkpoint: ``{"path", "sha256"}`` of the training checkpoint.
        versions: package versions at export time.
    """

    region: str | None
    kind: str
    tasks: list[dict[str, Any]]
    preprocessing: Preprocessing
    backbone: dict[str, Any]
    model: str = "LoRKDModule"
    parameters: int = 0
    expert_free_backbone_parameters: int = 0
    source_checkpoint: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """What to call it in messages and file names: the region, or ``"generalist"``."""
        return self.region or "generalist"

    @classmethod
    def from_module(
        cls,
        module: Any,
        tasks: list[dict[str, Any]],
        region: str | None,
        parameters: int,
        source: dict[str, Any] | None = None,
    ) -> ExpertCard:
        """The card of a network cut from a trained :class:`~lorkd_pl.models.base.TaskModule`.

        Args:
            module: the LoRKD student or generalist (its hyper-parameters give preprocessing and
                backbone).
            tasks: the task descriptions the network outputs, in output order.
            region: the merged expert's region (``None`` for a generalist).
            parameters: parameters of the deployable network.
            source: ``{"path", "sha256"}`` of the checkpoint it came from.

        Raises:
            CardError: if the tasks need different preprocessing (modality, spacing or patch size).
        """
        pipelines = {_pipeline(t) for t in tasks}
        if len(pipelines) > 1:
            described = "; ".join(
                f"{t['name']}: modality {t.get('modality')}, spacing {t.get('spacing')}, "
                f"patch {list(t['patch_size'])}"
                for t in tasks
            )
            raise CardError(
                f"the tasks {[t['name'] for t in tasks]} need different preprocessing ({described}), so one "
                "input pipeline cannot serve them all; choose one region (--region) whose tasks share it"
            )
        first = tasks[0]
        seg = module.kind == "seg3d"
        preprocessing = Preprocessing(
            channels=int(module.hparams.in_channels),
            patch_size=[int(v) for v in first["patch_size"]],
            spacing=[float(v) for v in first["spacing"]] if first.get("spacing") else None,
            modality=first.get("modality"),
            orientation="RAS" if seg else None,
            intensity=describe_intensity(module.kind, first.get("modality")),
            sw_overlap=float(module.hparams.sw_overlap),
            sw_batch_size=int(module.hparams.sw_batch_size),
        )
        return cls(
            region=region,
            kind=module.kind,
            tasks=[
                {"name": t["name"], "region": t["region"], "classes": list(t["classes"]), "output_index": i}
                for i, t in enumerate(tasks)
            ],
            preprocessing=preprocessing,
            backbone=dict(module.hparams.backbone) if module.hparams.get("backbone") else {},
            model=type(module).__name__,
            parameters=int(parameters),
            expert_free_backbone_parameters=int(getattr(module, "expert_free_parameters", 0) or 0),
            source_checkpoint=dict(source or {}),
            versions=package_versions(),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the content of ``metadata.json``)."""
        return {"format": CARD_FORMAT, **asdict(self)}

    def to_json(self, path: str | Path) -> Path:
        """Write the card to ``path`` atomically."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "expert card") -> ExpertCard:
        """The card of :meth:`to_dict`'s data.

        Raises:
            CardError: naming ``source`` and the missing or malformed field.
        """
        try:
            data = dict(data)
            if "format" not in data and "input" in data:  # an export written before the card existed
                data = _from_first_export_layout(data)
            check_format(data.pop("format", None), source)
            data["preprocessing"] = Preprocessing(**data["preprocessing"])
            card = cls(**data)
        except CardError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CardError(f"{source}: malformed expert card ({type(error).__name__}: {error})") from None
        missing = sorted({k for t in card.tasks for k in ("name", "classes", "output_index") if k not in t})
        if missing:
            raise CardError(f"{source}: malformed expert card (tasks lack {missing})")
        return card

    @classmethod
    def from_json(cls, path: str | Path) -> ExpertCard:
        """Read a card written by :meth:`to_json`.

        Raises:
            CardError: naming the file for an unreadable or malformed card.
        """
        path = Path(path)
        return cls.from_dict(read_card_json(path, "expert card"), str(path))


#: The router's default minimum confidence: below it ``predict --region auto`` stops and names the
#: top regions instead of guessing.
DEFAULT_MIN_CONFIDENCE = 0.6


@dataclass(frozen=True)
class RouterCard:
    """The exported region router: which regions it tells apart and how to feed it.

    Attributes:
        kind: ``"seg3d"`` or ``"cls2d"``.
        regions: region names in the router's output order (the experts' folder names).
        preprocessing: each region's input pipeline (the one its training samples had): a volume is
            prepared in every distinct pipeline and each region scored on its own one.
        backbone: ``{"class_path", "init_args"}`` of the backbone (the shared weights ``W0``).
        taps: the backbone's layers whose pooled outputs the router reads (with the output);
            ``grid_taps``: those also averaged on a coarse grid (the deepest ones).
        min_confidence: the default threshold of ``predict --region auto``.
        parameters, source_checkpoint, versions: as in :class:`ExpertCard`.
    """

    kind: str
    regions: list[str]
    preprocessing: dict[str, Preprocessing]
    backbone: dict[str, Any]
    taps: list[str] = field(default_factory=list)
    grid_taps: list[str] = field(default_factory=list)
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    parameters: int = 0
    source_checkpoint: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the content of the router's ``metadata.json``)."""
        return {"format": CARD_FORMAT, "role": "router", **asdict(self)}

    def to_json(self, path: str | Path) -> Path:
        """Write the card to ``path`` atomically."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> RouterCard:
        """Read a card written by :meth:`to_json`.

        Raises:
            CardError: naming the file and the missing or malformed field.
        """
        path = Path(path)
        data = read_card_json(path, "router card")
        try:
            if data.pop("role", None) != "router":
                raise CardError(f'{path} is not a region router\'s card (no "role": "router")')
            check_format(data.pop("format", None), str(path))
            data["preprocessing"] = {r: Preprocessing(**p) for r, p in data["preprocessing"].items()}
            card = cls(**data)
            if sorted(card.preprocessing) != sorted(card.regions):
                raise CardError(f"{path}: malformed router card (preprocessing does not name every region)")
            if not 0 <= card.min_confidence <= 1:
                raise CardError(
                    f"{path}: malformed router card (min_confidence {card.min_confidence} not in [0, 1])"
                )
            return card
        except CardError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CardError(f"{path}: malformed router card ({type(error).__name__}: {error})") from None


def check_format(found: Any, source: str) -> None:
    """Refuse a card of a format this lorkd-pl cannot read.

    Raises:
        CardError: naming the card, its format and the readable ones.
    """
    if found not in READABLE_FORMATS:
        raise CardError(
            f"{source}: card format {found!r}, this lorkd-pl reads formats {list(READABLE_FORMATS)}; "
            "export it again with this version"
        )


def read_card_json(path: Path, what: str) -> dict[str, Any]:
    """A card file's JSON object.

    Raises:
        CardError: naming the file when it cannot be read, is not JSON or not an object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CardError(f"cannot read {what} {path}: {error}") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: an {what} is a JSON object, got {type(data).__name__}")
    return data


def _from_first_export_layout(data: dict[str, Any]) -> dict[str, Any]:
    """The card of a ``metadata.json`` written by lorkd-pl 0.1's first export (``input`` block, no format)."""
    inputs = dict(data["input"])
    window = inputs.get("sliding_window") or {}
    return {
        "format": CARD_FORMAT,
        "region": data["region"],
        "kind": data["kind"],
        "tasks": [{"region": data["region"], **task} for task in data["tasks"]],
        "preprocessing": {
            "channels": inputs["channels"],
            "patch_size": inputs["patch_size"],
            "spacing": inputs.get("spacing"),
            "modality": inputs.get("modality"),
            "orientation": inputs.get("orientation"),
            "intensity": inputs.get("intensity") or "",
            "sw_overlap": window.get("overlap", 0.5),
        },
        "backbone": data["backbone"],
        "parameters": data.get("parameters", 0),
        "expert_free_backbone_parameters": data.get("expert_free_backbone_parameters", 0),
        "source_checkpoint": data.get("source_checkpoint") or {},
        "versions": data.get("versions") or {},
    }


def _pipeline(task: dict[str, Any]) -> tuple[Any, ...]:
    """What a task's input preprocessing depends on: seg3d modality, spacing and patch size; cls2d
    image size (2D images are scaled and z-scored whatever the modality)."""
    patch = tuple(int(v) for v in task["patch_size"])
    if task.get("kind") == "cls2d":
        return (patch,)
    spacing = tuple(float(v) for v in task["spacing"]) if task.get("spacing") else None
    return (str(task.get("modality") or "other").upper(), spacing, patch)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages an export depends on."""
    return {package: package_version(package) for package in VERSIONED_PACKAGES}


def package_version(package: str) -> str:
    """The installed version of ``package``, or ``"not installed"``."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
