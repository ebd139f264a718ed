"""The input→region choice of ``lorkd-pl predict --region auto``: each input's expert from its manifest, its
DICOM tag or the region router.

For every input, in this order:

1. a manifest's ``region`` column, when given;
2. the DICOM ``BodyPartExamined`` tag (0018,0015), when present and known: it names one of the
   exported regions (compared without case and punctuation, ``HEAD_NECK`` = ``headneck``) or one of the
   DICOM defined terms of :data:`BODY_PART_REGIONS` that maps onto one (``CHEST`` → ``thorax``);
3. the region router (:mod:`lorkd_pl.models.router`): each region scored on the input prepared with
   that region's own pipeline (3D: window by window, averaged over the volume), the scores normalised
   over the regions. The confidence is the smaller of the top region's normalised score and its own
   probability; below the minimum confidence the run stops before any prediction, naming the input
   and its top regions with their probabilities: never a silent guess.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai import transforms as mt
from torch import Tensor

from lorkd_pl.data.readers import inspect_input
from lorkd_pl.data.transforms import cls2d_transforms, seg3d_preprocessing
from lorkd_pl.deploy.card import Preprocessing, RouterCard
from lorkd_pl.models.router import volume_probabilities

#: DICOM ``BodyPartExamined`` defined terms (PS3.16 CID 4031) and the region name each stands for; a
#: term counts only if that region is among the exported experts.
BODY_PART_REGIONS: dict[str, str] = {
    "brain": "brain",
    "head": "brain",
    "skull": "brain",
    "chest": "thorax",
    "thorax": "thorax",
    "lung": "thorax",
    "heart": "thorax",
    "abdomen": "abdomen",
    "liver": "abdomen",
    "kidney": "abdomen",
    "pancreas": "abdomen",
    "pelvis": "pelvis",
    "hip": "pelvis",
    "bladder": "pelvis",
    "prostate": "pelvis",
    "neck": "neck",
    "knee": "knee",
    "breast": "breast",
}


class RegionChoiceError(ValueError):
    """Inputs that cannot be routed with confidence; names each input and its top regions."""


@dataclass
class RegionChoice:
    """Where one input goes and why.

    Attributes:
        image: the input.
        region: the chosen region.
        decided_by: ``"manifest"``, ``"DICOM BodyPartExamined=<tag>"`` or ``"router"``.
        confidence: the smaller of ``region``'s normalised probability and its probability on its
            own pipeline (``None`` when the router was not asked).
        probabilities: the router's normalised probability of every region (empty when not asked).
    """

    image: str
    region: str
    decided_by: str
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def body_part_region(tag: str | None, regions: Sequence[str]) -> str | None:
    """The region a ``BodyPartExamined`` value names among ``regions``, or ``None`` (absent, unknown, or
    a term spanning regions such as ``ABDOMENPELVIS``)."""
    if not tag or not tag.strip():
        return None
    by_key = {_key(region): region for region in regions}
    key = _key(tag)
    if key in by_key:
        return by_key[key]
    return by_key.get(_key(BODY_PART_REGIONS.get(key, "")))


def _pipeline_key(prep: Preprocessing, kind: str) -> tuple[Any, ...]:
    if kind == "cls2d":
        return (tuple(prep.patch_size), prep.channels)
    spacing = tuple(prep.spacing) if prep.spacing else None
    return ((prep.modality or "other").upper(), spacing, tuple(prep.patch_size), prep.sw_batch_size)


def router_probabilities(
    network: Callable[[Tensor], Tensor], card: RouterCard, image: str, device: str = "cpu"
) -> dict[str, float]:
    """The router's probability of every region for one input file, each on its own pipeline.

    The input is prepared once per distinct pipeline of the card; region ``r``'s score is the router's
    probability of ``r`` on the input prepared with ``r``'s own pipeline (what the router saw of ``r``
    in training). With one pipeline these are the router's softmax itself; with several they need not
    sum to 1 (:func:`choose_regions` normalises them and gates on both).

    Args:
        network: ``(n, C, *S) → (n, R)`` region logits (an exported router or a student's).
        card: the router's card.
        image: a file or a DICOM series folder.
        device: where the network runs.

    Raises:
        RegionChoiceError: for an input with NaN or infinite values.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for region in card.regions:
        groups.setdefault(_pipeline_key(card.preprocessing[region], card.kind), []).append(region)
    scores: dict[str, float] = {}
    with torch.no_grad():
        for members in groups.values():
            prep = card.preprocessing[members[0]]
            if card.kind == "seg3d":
                steps = seg3d_preprocessing(["image"], prep.modality or "other", prep.spacing)
                x = mt.Compose(steps)({"image": image})["image"][None].float().to(device)
            else:
                transform = cls2d_transforms(False, prep.patch_size, prep.channels)
                x = transform({"image": image, "label": 0})["image"][None].float().to(device)
            if not torch.isfinite(x).all():
                raise RegionChoiceError(
                    f"{image} holds NaN or infinite values; fix or drop it (nothing was predicted)"
                )
            if card.kind == "seg3d":
                probabilities = volume_probabilities(network, x, prep.patch_size, prep.sw_batch_size)[0]
            else:
                probabilities = network(x).float().softmax(1)[0]
            for region in members:
                scores[region] = float(probabilities[card.regions.index(region)])
    return {region: scores[region] for region in card.regions}


def describe_top(probabilities: Mapping[str, float], count: int = 3) -> str:
    """``brain 0.48, thorax 0.31, abdomen 0.12``: the ``count`` most probable regions."""
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"{region} {value:.2f}" for region, value in ranked)


def choose_regions(
    rows: Sequence[Mapping[str, Any]],
    regions: Sequence[str],
    router: Callable[[str], dict[str, float]] | None,
    min_confidence: float,
    modalities: Mapping[str, str | None] | None = None,
) -> list[RegionChoice]:
    """Decide every input's region (see the module docstring) before anything is predicted.

    Args:
        rows: ``{"image", "region"?}`` inputs (a manifest's ``region`` is taken as given).
        regions: the exported regions.
        router: ``image → {region: probability}`` (``None``: no router was exported; then every input
            needs a region from its manifest or DICOM tag).
        min_confidence: the router's lowest acceptable probability of its top region.
        modalities: each region's expert modality (its card's): a DICOM tag that names a region whose
            expert has another modality than the input's DICOM ``Modality`` (a CT ``HEAD`` and an MR
            brain expert) decides nothing; the next rule does, and ``decided_by`` says why.

    Raises:
        RegionChoiceError: listing every input routed below ``min_confidence`` with its top regions, or the
            inputs left without a region when there is no router.
    """
    decided, unsure, unrouted = [], [], []
    for row in rows:
        image = str(row["image"])
        if row.get("region"):
            decided.append(RegionChoice(image, str(row["region"]), "manifest"))
            continue
        info = inspect_input(image)
        tag = info.body_part
        region = body_part_region(tag, regions)
        passed_over = ""
        if region is not None:
            expert = ((modalities or {}).get(region) or "").upper()
            if expert in ("CT", "MR") and info.modality in ("CT", "MR") and info.modality != expert:
                passed_over = (
                    f" (DICOM BodyPartExamined={tag} names {region}, an {expert} expert; "
                    f"this is {info.modality})"
                )
                region = None
        if region is not None:
            decided.append(RegionChoice(image, region, f"DICOM BodyPartExamined={tag}"))
            continue
        if router is None:
            unrouted.append(image + passed_over)
            continue
        scores = router(image)  # each region on its own pipeline
        total = sum(scores.values())
        probabilities = {r: v / total for r, v in scores.items()} if total > 0 else dict(scores)
        best = max(probabilities, key=probabilities.__getitem__)
        # both the share among the regions AND the region's own probability must reach the threshold
        # (normalising across pipelines alone could make a router that rejects every region look sure);
        # a NaN never passes
        confidence = min(probabilities[best], scores[best])
        if not confidence >= min_confidence:
            unsure.append(f"{image}: {describe_top(probabilities)} (own-pipeline {best} {scores[best]:.2f})")
        decided.append(RegionChoice(image, best, "router" + passed_over, confidence, probabilities))
    if unrouted:
        raise RegionChoiceError(
            f"no region router in this export and no known DICOM BodyPartExamined for {unrouted[:3]}"
            f"{' and others' if len(unrouted) > 3 else ''}: give --region REGION (one of {list(regions)}) "
            "or a manifest with a region column, or export a student trained with a router"
        )
    if unsure:
        raise RegionChoiceError(
            f"the region router is not confident enough (below --min-confidence {min_confidence:g}) for "
            f"{len(unsure)} input(s); nothing was predicted. Top regions: {'; '.join(unsure[:5])}"
            f"{'; …' if len(unsure) > 5 else ''}. Give their region (--region REGION, or a manifest's "
            "region column), or lower --min-confidence"
        )
    return decided
