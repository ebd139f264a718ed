"""The main job on the embedded demo data: teacher → plain KD and LoRKD at equal budget → per-region
test → comparison table and ``runs/demo/results.json``.

``lorkd-pl demo`` (what ``make demo`` runs) does, for the 2D classification and the 3D segmentation
demo: fit the generalist teacher (``demo/teacher_*``, 4× the student backbone's parameters), then the
small student distilled from it WITHOUT experts (``demo/plain_kd_*``, the control) and WITH one LoRKD
expert per region (``demo/lorkd_*``), same data, steps and KD; test all three per task and print them
side by side with the parameters (teacher, students, one merged expert); the full comparison (per-class
tables, plots, learning curves) goes to ``runs/demo/report_<kind>/``, the numbers to
``runs/demo/results.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorkd_pl.app.configs import config_root
from lorkd_pl.app.lightning import lightning_cli
from lorkd_pl.checks import check_seed
from lorkd_pl.evaluation.comparison import (
    common_means,
    conflict_history,
    find_summaries,
    markdown_table,
    run_rows,
    validation_curve,
    write_comparison,
)
from lorkd_pl.evaluation.paired import bootstrap_interval, paired_differences
from lorkd_pl.evaluation.summaries import dice_per_class, nanmean
from lorkd_pl.io.atomic import write_json_atomic, write_text_atomic
from lorkd_pl.models.backbones import count_parameters

KINDS: dict[str, str] = {"cls": "accuracy", "seg": "dice"}
#: Where the packaged demo configs write their runs (relative to the working folder).
DEMO_ROOT = Path("runs/demo")
#: Validation every N epochs in the demo's fits, per kind (the test uses last.ckpt; the learning curves
#: get fewer points): a 3D validation runs the sliding window over every validation volume (and the
#: router), about 10 % of a 3D fit's time when run every epoch.
VALIDATE_EVERY: dict[str, int] = {"cls": 1, "seg": 5}
#: ``--quick``'s training samples per epoch, per kind.
QUICK_SAMPLES: dict[str, int] = {"cls": 64, "seg": 8}
#: ``--quick``: the whole pipeline on tiny budgets (one short epoch per fit, two batches per evaluation).
QUICK: dict[str, list[str]] = {
    kind: [
        "--trainer.max_epochs=1",
        f"--data.init_args.samples_per_epoch={samples}",
        # 2, not 1: through the CLI a limit of 1 is read as the float 1.0, i.e. 100 % of the batches
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.log_every_n_steps=1",
    ]
    for kind, samples in QUICK_SAMPLES.items()
}


def _test(config: Path, checkpoint: Path, extra: list[str]) -> tuple[Any, str]:
    """Test ``checkpoint``; return the model and the log dir holding ``summary/<task>.json``."""
    cli = lightning_cli(["test", "--config", str(config), "--ckpt_path", str(checkpoint), *extra])
    return cli.model, cli.trainer.log_dir


def merged_expert_parameters(student, task: int) -> int:
    """Parameters of the deployable network of a task's region: the merged backbone and every head of
    that region (what ``lorkd-pl export --region`` writes)."""
    from lorkd_pl.deploy.networks import expert_network

    network, _ = expert_network(student, student.tasks[task]["region"])
    return count_parameters(network)


def run_folder(root: Path, recipe: str, seed: int) -> Path:
    """The demo's run folder of ``recipe`` (e.g. ``lorkd_seg``) for ``seed``: ``root/<recipe>/seed<seed>``
    (every fit of the demo is named by its seed, so seeds sit side by side)."""
    return root / recipe / f"seed{seed}"


def export_and_predict(
    kind: str, student, root: Path = DEMO_ROOT, predict_task: str = "demo_brain_seg", seed: int = 0
) -> tuple[str, dict[str, Any] | None]:
    """Export every region's expert and the region router; for 3D, predict every test volume with
    ``--region auto`` (the router picks each volume's expert) and score the routing; return the report's
    text and the router's test result (``None`` without a router).

    2D: the router's test accuracy is the test run's (``<log_dir>/router.json``): every 2D region has the
    same input pipeline, so it is what ``--region auto`` decides on the same images.
    """
    from lorkd_pl.deploy.export import export_regions
    from lorkd_pl.deploy.folders import ROUTER_FOLDER

    checkpoint = run_folder(root, f"lorkd_{kind}", seed) / "checkpoints" / "last.ckpt"
    experts = root / "experts" / kind
    router = experts / ROUTER_FOLDER if student.router is not None else None
    outs = {region: experts / region for region in student.regions}
    export_regions(checkpoint, student.regions, outs, overwrite=True, student=student, router_out=router)
    text = (
        f"\nExported {len(student.regions)} merged experts to {experts}/<region> "
        "(model.pt2, state_dict.pt, metadata.json)"
        + (f" and the region router to {router}." if router else ".")
    )
    if kind == "seg":  # the same experts as MONAI bundles (run without lorkd-pl)
        bundles = {region: root / "bundles" / region for region in student.regions}
        export_regions(checkpoint, student.regions, bundles, overwrite=True, student=student, format="bundle")
        text += (
            f"\nMONAI bundles of the experts: {root / 'bundles'}/<region> (in a bundle folder: python -m "
            "monai.bundle run --config_file configs/inference.json --image SCAN.nii.gz --output_dir OUT)."
        )
    routing = None
    if kind == "cls" and student.router_summary is not None:
        routing = {**student.router_summary, "decided_on": "test run (one pipeline for every 2D region)"}
    if kind == "seg" and router is not None:
        routing, line = route_test_volumes(student, experts, root / "predictions", predict_task)
        text += line
    if routing is not None:
        text += (
            f"\nRegion router on the test split: accuracy {routing['accuracy']:.3f} over {routing['cases']} "
            f"{'volumes' if kind == 'seg' else 'images'}"
            + (
                f", {routing['below_threshold']} below its confidence threshold {routing['min_confidence']}"
                if "below_threshold" in routing
                else ""
            )
            + f" (target ≥ 0.95: {'met' if routing['accuracy'] >= 0.95 else 'MISSED'})."
        )
    return text, routing


def route_test_volumes(student, experts: Path, out: Path, predict_task: str) -> tuple[dict[str, Any], str]:
    """``lorkd-pl predict --region auto`` on every 3D test volume of the run's tasks with the exported
    experts and router; the routing accuracy and the Dice of ``predict_task``'s first volume, predicted
    by the expert its routing chose, in the input's own grid."""
    import csv

    import SimpleITK as sitk

    from lorkd_pl.deploy.card import RouterCard
    from lorkd_pl.deploy.folders import ROUTER_FOLDER
    from lorkd_pl.deploy.predict import output_stems, predict_files
    from lorkd_pl.registry import get_task

    labels = {  # test image → (task, label)
        record["image"]: (task["name"], record["label"])
        for task in student.tasks
        for record in get_task(task["name"]).records("test")
    }
    # every volume is routed and predicted (threshold 0); the threshold is scored from routing.csv
    predict_files(list(labels), experts, out, region="auto", min_confidence=0.0)
    threshold = RouterCard.from_json(experts / ROUTER_FOLDER / "metadata.json").min_confidence
    with open(out / "routing.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    routed = {str(Path(row["image"]).resolve()): row["region"] for row in rows}

    def routed_right(image: str) -> bool:
        return routed[str(Path(image).resolve())] == get_task(labels[image][0]).region

    confidences = [float(row["confidence"]) for row in rows if row["confidence"]]
    routing = {
        "accuracy": sum(map(routed_right, labels)) / len(labels),
        "cases": len(labels),
        "below_threshold": sum(c < threshold for c in confidences),
        "min_confidence": threshold,
        "mean_confidence": sum(confidences) / max(len(confidences), 1),
        "decided_on": "lorkd-pl predict --region auto on the test volumes (exported router)",
    }
    image = next((i for i, (task, _) in labels.items() if task == predict_task), None)
    if image is None:
        return routing, ""
    task, label = labels[image]
    text = f"\nPredicted the {len(labels)} test volumes with `--region auto` ({out / 'routing.csv'}); "
    if not routed_right(image):
        routed_to = routed[str(Path(image).resolve())]
        return routing, text + f"{Path(image).name} was routed to {routed_to}, not {get_task(task).region}."
    written = out / f"{output_stems(list(labels))[image]}_{task}.nii.gz"
    prediction = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(written))).astype("int64"))
    reference = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(label)).astype("int64"))
    dice = dice_per_class(prediction, reference, len(get_task(task).classes))
    return routing, text + (
        f"{Path(image).name} → {written} (input geometry kept; Dice per class in the original grid: "
        f"{', '.join(f'{d:.3f}' for d in dice)}; mean {nanmean(dice):.3f})."
    )


#: The runs of each demo, in report order: the foundation model, the control, LoRKD.
RUNS: tuple[str, ...] = ("teacher", "plain_kd", "lorkd")
#: With ``--per-region-control``: also one plain-KD student per region (trained on its region only).
RUNS_WITH_CONTROL: tuple[str, ...] = ("teacher", "plain_kd", "per_region", "lorkd")


def derive_configs(
    source: Path, dest: Path, root: Path, kinds: Sequence[str], tasks: Sequence[str] | None = None
) -> Path:
    """Copy the demo configs of ``kinds`` into ``dest`` with their run folders under ``root`` (every
    ``runs/demo`` path) and, if given, another task list; return ``dest``.

    The derived files are what the runs use, kept for the user to rerun or inspect.
    """
    import yaml

    prefix = DEMO_ROOT.as_posix()

    def moved(value: Any) -> Any:  # every string value naming a path under runs/demo
        if isinstance(value, str) and (value == prefix or value.startswith(prefix + "/")):
            return root.as_posix() + value[len(prefix) :]
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        if isinstance(value, list):
            return [moved(item) for item in value]
        return value

    dest.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        for name in RUNS:
            config = moved(yaml.safe_load((source / f"{name}_{kind}.yaml").read_text(encoding="utf-8")))
            if tasks is not None:
                config["data"]["init_args"]["tasks"] = list(tasks)
            write_text_atomic(dest / f"{name}_{kind}.yaml", yaml.safe_dump(config, sort_keys=False))
    return dest


def run_demo(
    configs: Path | None = None,
    kinds: Sequence[str] = ("cls", "seg"),
    progress: bool = False,
    quick: bool = False,
    seed: int = 0,
    root: Path = DEMO_ROOT,
    predict_task: str = "demo_brain_seg",
    per_region_control: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Run the demo in the current folder (writes ``root``, default ``runs/demo/``); return the report and
    the results.

    Per kind: fit the teacher (a generalist 4× the student backbone's size), then at equal budget the
    small student distilled from it without experts (plain KD, the control) and with one LoRKD expert
    per region; test all three per task; report them side by side.

    Args:
        configs: folder of ``teacher_<kind>.yaml``, ``plain_kd_<kind>.yaml`` and ``lorkd_<kind>.yaml``
            (default: the packaged ``demo/`` configs).
        kinds: ``"cls"`` and/or ``"seg"``.
        progress: show progress bars.
        quick: tiny budgets (:data:`QUICK`): checks the whole pipeline, the numbers mean nothing.
        seed: the seed of every fit (weights, sampling and augmentation); the data stay the same.
        root: the runs' folder, the one the configs write to.
        predict_task: the 3D task whose first test volume the exported brain expert predicts.
        per_region_control: also fit and test the per-region control (:func:`fit_per_region`).

    Returns:
        The markdown report and the results (what :func:`save_results` writes to ``root/results.json``).
    """
    configs = configs or config_root() / "demo"
    sections, results = [], {}
    for kind in kinds:
        quiet = [
            *(
                []
                if progress
                else ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
            ),
            *(QUICK[kind] if quick else [f"--trainer.check_val_every_n_epoch={VALIDATE_EVERY[kind]}"]),
            f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}",
        ]
        metric = KINDS[kind]
        names = RUNS_WITH_CONTROL if per_region_control else RUNS
        timings, models, logs, runs = {}, {}, {}, {}
        for name in names:
            start = time.perf_counter()
            if name == "per_region":
                config = configs / f"plain_kd_{kind}.yaml"
                models[name], logs[name], runs[name] = fit_per_region(config, root, kind, seed, quick, quiet)
                timings[name] = time.perf_counter() - start
                continue
            config = configs / f"{name}_{kind}.yaml"
            # the demo owns root: a rerun of a seed moves the earlier run aside (<run>.replaced-<time>)
            lightning_cli(["fit", "--config", str(config), f"--run_name=seed{seed}", "--overwrite", *quiet])
            timings[name] = time.perf_counter() - start
            runs[name] = run_folder(root, f"{name}_{kind}", seed)
            models[name], logs[name] = _test(config, runs[name] / "checkpoints" / "last.ckpt", quiet)
        summaries = [find_summaries(logs[name]) for name in names]  # read once
        curves = {name: validation_curve(runs[name]) for name in names}
        conflicts = {name: conflict_history(runs[name]) for name in names}
        report = write_comparison(
            summaries,
            root / f"report_{kind}",
            names,
            [str(logs[n]) for n in names],
            curves=curves,
            conflicts=conflicts,
        )
        rows = run_rows(summaries, names)
        student = models["lorkd"]
        merged = [merged_expert_parameters(student, index) for index in range(len(student.tasks))]
        result = kind_results(rows, metric, models, merged, timings, names)
        for name in names:  # where its test summaries are (paired comparisons re-read them)
            result[name]["test_run"] = str(logs[name])
        result["paired"] = paired_comparisons([[s] for s in summaries], names)
        results["seg3d" if kind == "seg" else "cls2d"] = result
        means = {name: result[name]["mean"] for name in names}
        control = ""
        if per_region_control:
            control = (
                f" Per-region control: {len(models['per_region'])} plain-KD students of one region each, "
                f"{result['per_region']['params']:,} parameters together, mean {metric} "
                f"{means['per_region']:.3f}."
            )
        lines = [
            f"### {'2D classification' if kind == 'cls' else '3D segmentation'} (test split)",
            "",
            *markdown_table(rows, names),
            "",
            f"Parameters: teacher {result['teacher']['params']:,}; plain-KD student "
            f"{result['plain_kd']['params']:,}; LoRKD student with all {len(student.regions)} experts and "
            f"{len(student.heads)} heads {result['lorkd']['params_all_experts']:,} (+ region router "
            f"classifier {result['lorkd']['params_router_head']:,}); one merged expert + its "
            f"head {min(merged):,}–{max(merged):,} (teacher / merged expert: "
            f"{result['size_ratio_teacher_to_merged_expert']:.1f}×). Fit time: "
            + ", ".join(f"{name} {timings[name]:.0f} s" for name in names)
            + f". Full report with per-class tables, plots and learning curves: {report}."
            + control,
            "",
            f"Mean {metric}: teacher {means['teacher']:.3f}, plain KD {means['plain_kd']:.3f}, LoRKD "
            f"{means['lorkd']:.3f}. LoRKD experts "
            + ("reach" if means["lorkd"] >= means["teacher"] else "do NOT reach")
            + " the teacher's mean and "
            + ("beat" if means["lorkd"] > means["plain_kd"] else "do NOT beat")
            + " the plain-KD student's.",
            "",
            paired_line(result["paired"], "test cases"),
        ]
        text, routing = export_and_predict(kind, student, root, predict_task, seed)
        lines.append(text)
        if routing is not None:
            result["lorkd"]["router"] = routing
        sections.append("\n".join(lines))
    return "\n\n".join(sections), results


#: The paired comparisons reported: (run, reference).
PAIRS: tuple[tuple[str, str], ...] = (
    ("lorkd", "plain_kd"),
    ("lorkd", "per_region"),
    ("lorkd", "teacher"),
    ("plain_kd", "teacher"),
)


def paired_comparisons(
    summaries: Sequence[Sequence[Mapping[str, Any]]],
    names: Sequence[str] = RUNS,
    groups: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each pair of :data:`PAIRS` among ``names``: the paired difference over seeds × test cases and
    its 95 % bootstrap interval (:mod:`lorkd_pl.evaluation.paired`).

    Args:
        summaries: per run of ``names``, per seed, its test summaries by task.
        names: the runs.
        groups: ``{task: kind}`` to weight the kinds equally (the mean of the kinds' means); default:
            the mean over tasks.
    """
    by_run = dict(zip(names, summaries, strict=True))
    out = {}
    for run, reference in PAIRS:
        if run not in by_run or reference not in by_run:
            continue
        differences = paired_differences(by_run[run], by_run[reference])
        difference, low, high = bootstrap_interval(differences, groups=groups)
        out[f"{run}-{reference}"] = {
            "difference": difference,
            "low": low,
            "high": high,
            "resolved": low > 0 or high < 0,  # the interval excludes 0
        }
    return out


def paired_line(paired: Mapping[str, Mapping[str, Any]], over: str) -> str:
    """The headline of :func:`paired_comparisons`: each difference, its interval, resolved or not."""
    parts = []
    for key, value in paired.items():
        run, reference = key.split("-")
        verdict = "resolved" if value["resolved"] else "not resolved: the interval holds 0"
        interval = f"[{value['low']:+.3f}, {value['high']:+.3f}]"
        parts.append(f"{run} − {reference} {value['difference']:+.3f} {interval} ({verdict})")
    return f"Paired differences over {over}, 95 % bootstrap interval: " + "; ".join(parts) + "."


def over_seeds(seeds: Sequence[int], means: Sequence[float]) -> dict[str, Any]:
    """One run's score over seeds: ``{"mean", "sd", "per_seed"}`` (sample sd; 0 for one seed). A NaN
    seed (a run with no defined score) makes the mean and sd NaN instead of failing the report."""
    values = np.asarray(means, dtype=float)
    return {
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "per_seed": dict(zip(map(str, seeds), map(float, values), strict=True)),
    }


def seeds_results(per_seed: Mapping[int, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Several seeds' results: per run the mean ± sd over seeds, the paired differences over seeds ×
    test cases with their intervals (re-read from each seed's test runs), and the headline."""
    from lorkd_pl.evaluation.comparison import find_summaries

    seeds = list(per_seed)
    lines, out = [f"### Over seeds {', '.join(map(str, seeds))}"], {}
    for kind in next(iter(per_seed.values())):
        if kind not in ("seg3d", "cls2d"):
            continue
        results = [per_seed[seed][kind] for seed in seeds]
        metric = results[0]["metric"]
        names = [name for name in RUNS_WITH_CONTROL if name in results[0]]
        summary: dict[str, Any] = {"metric": metric}
        for name in names:
            summary[name] = over_seeds(seeds, [r[name]["mean"] for r in results])
        summaries = [[find_summaries(r[name]["test_run"]) for r in results] for name in names]
        summary["paired"] = paired_comparisons(summaries, names)
        out[kind] = summary
        title = "3D segmentation" if kind == "seg3d" else "2D classification"
        lines += [
            "",
            f"{title}, mean {metric} ± sd over seeds: "
            + ", ".join(f"{name} {summary[name]['mean']:.3f} ± {summary[name]['sd']:.3f}" for name in names)
            + ".",
            paired_line(summary["paired"], f"{len(seeds)} seeds × test cases"),
        ]
    both = both_kinds(per_seed)
    if both is not None:
        line, out["both_kinds"] = both
        lines += ["", line]
    return "\n".join(lines), out


def both_kinds(per_seed: Mapping[int, Mapping[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The runs over both kinds (3D Dice and 2D accuracy weighted equally): per run the mean of the two
    kinds' means (± sd over seeds), the paired differences over seeds × both kinds' test cases (each
    kind's tasks grouped, the same seeds drawn for both kinds) and their report line; ``None`` unless
    both kinds ran.

    Args:
        per_seed: ``{seed: results}``, each holding ``seg3d`` and ``cls2d`` with every run's ``mean``
            and ``test_run`` (:func:`run_demo`'s results).
    """
    from lorkd_pl.evaluation.comparison import find_summaries

    kinds = ("seg3d", "cls2d")
    results = list(per_seed.values())
    if not all(kind in result for result in results for kind in kinds):
        return None
    names = [name for name in RUNS_WITH_CONTROL if all(name in r[kind] for r in results for kind in kinds)]
    out: dict[str, Any] = {"metric": "mean of 3D Dice and 2D accuracy"}
    summaries, groups = [], {}
    for name in names:
        out[name] = over_seeds(
            list(per_seed), [np.mean([r[kind][name]["mean"] for kind in kinds]) for r in results]
        )
        per_run = []
        for result in results:
            merged: dict[str, Any] = {}
            for kind in kinds:
                found = find_summaries(result[kind][name]["test_run"])
                groups.update(dict.fromkeys(found, kind))
                merged.update(found)
            per_run.append(merged)
        summaries.append(per_run)
    out["paired"] = paired_comparisons(summaries, names, groups)
    over = f"{len(results)} seeds × test cases" if len(results) > 1 else "test cases"
    line = (
        "Both kinds (the mean of 3D Dice and 2D accuracy)"
        + (", mean ± sd over seeds: " if len(results) > 1 else ": ")
        + ", ".join(
            f"{name} {out[name]['mean']:.3f}" + (f" ± {out[name]['sd']:.3f}" if len(results) > 1 else "")
            for name in names
        )
        + ". "
        + paired_line(out["paired"], f"{over} of both kinds")
    )
    return line, out


def kind_results(
    rows: Sequence[dict[str, Any]],
    metric: str,
    models: Mapping[str, Any],
    merged: Sequence[int],
    timings: dict[str, float],
    names: Sequence[str] = RUNS,
) -> dict[str, Any]:
    """One demo kind's entry of ``results.json``: each run's parameters, mean and per-region score.

    Args:
        rows: :func:`~lorkd_pl.evaluation.comparison.run_rows` of ``names``.
        models: the tested model of each run (``per_region``: the list of its students).
        merged: parameters of each task's merged LoRKD expert.
        timings: fit seconds of each run.
        names: the runs, in ``rows``' order.
    """

    means, _ = common_means(rows, metric)  # over the tasks every run has a value for, as the table

    def scores(index: int) -> tuple[float, dict[str, float]]:
        per_region: dict[str, list[float]] = {}
        for row in rows:
            per_region.setdefault(row["region"], []).append(row[metric][index])
        return means[index], {r: nanmean(v) for r, v in per_region.items()}

    out: dict[str, Any] = {"metric": metric, "seconds": round(sum(timings.values()), 1)}
    for index, name in enumerate(names):
        mean, per_region = scores(index)
        out[name] = {"mean": mean, "per_region": per_region, "fit_seconds": round(timings[name], 1)}
    teacher, student = models["teacher"], models["lorkd"]
    out["teacher"]["params"] = count_parameters(teacher)
    out["plain_kd"]["params"] = count_parameters(models["plain_kd"])
    if "per_region" in names:  # the summed size of the per-region students
        out["per_region"]["params"] = sum(count_parameters(m) for m in models["per_region"])
    from lorkd_pl.deploy.networks import student_parameters

    out["lorkd"]["params_all_experts"] = student_parameters(student)  # W0, experts, heads
    # the router's classifier (it reads W0's features)
    out["lorkd"]["params_router_head"] = count_parameters(student) - student_parameters(student)
    out["lorkd"]["params_merged_expert"] = max(merged)
    out["size_ratio_teacher_to_merged_expert"] = count_parameters(teacher) / max(merged)
    return out


def fit_per_region(
    config: Path, root: Path, kind: str, seed: int, quick: bool, quiet: Sequence[str]
) -> tuple[list[Any], Path, Path]:
    """The per-region control: the plain-KD student (``config``) fitted once per region on that region's
    tasks only, at the same total budget as one demo run, each tested; their test summaries gathered.

    Budget: a demo run draws ``samples_per_epoch`` samples per epoch over all regions (equally over
    regions); each region's student draws ``samples_per_epoch / R`` per epoch for the same epochs, so the
    R students together see the same samples in the same number of optimiser steps (up to a partial
    batch per region). Without ``samples_per_epoch`` an epoch is every training record: each student's
    epoch is its region's records, the same total.

    Returns:
        The R tested students, the folder holding the gathered ``summary/<task>.json`` and the run
        folder (``root/per_region_<kind>/seed<N>/``; each region's run is ``seed<N>-<region>``).
    """
    import shutil

    import yaml

    from lorkd_pl.registry import get_task

    data = yaml.safe_load(config.read_text(encoding="utf-8"))["data"]["init_args"]
    regions: dict[str, list[str]] = {}
    for task in data["tasks"]:
        regions.setdefault(get_task(task).region, []).append(task)
    samples = QUICK_SAMPLES[kind] if quick else data.get("samples_per_epoch")
    batch = int(data.get("batch_size", 1))
    folder = root / f"per_region_{kind}"
    gathered = run_folder(root, f"per_region_{kind}", seed)
    (gathered / "summary").mkdir(parents=True, exist_ok=True)
    for earlier in (gathered / "summary").glob("*.json"):  # the demo's own, of an earlier run
        earlier.unlink()
    models = []
    for region, tasks in regions.items():
        budget = [f"--data.init_args.tasks=[{', '.join(tasks)}]", f"--trainer.default_root_dir={folder}"]
        if samples:
            share = max(samples // len(regions), 1)
            budget += [
                f"--data.init_args.samples_per_epoch={share}",
                f"--data.init_args.batch_size={min(batch, share)}",
            ]
        name = f"--run_name=seed{seed}-{region}"
        lightning_cli(["fit", "--config", str(config), name, "--overwrite", *quiet, *budget])
        checkpoint = folder / f"seed{seed}-{region}" / "checkpoints" / "last.ckpt"
        model, log_dir = _test(config, checkpoint, [*quiet, *budget[:1]])
        models.append(model)
        for summary in Path(log_dir, "summary").glob("*.json"):
            shutil.copyfile(summary, gathered / "summary" / summary.name)
    return models, gathered, gathered


def main(
    workdir: str | None = None,
    kinds: Sequence[str] = ("cls", "seg"),
    quick: bool = False,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    per_region_control: bool = False,
) -> str:
    """Run the demo in ``workdir`` (default: the current folder) for ``seeds`` (default: ``[seed]``),
    with the per-region control if asked, print and save the report."""
    seeds = list(seeds or [seed])
    for value in seeds:
        check_seed(value, "--seeds" if len(seeds) > 1 else "--seed")
    torch.set_float32_matmul_precision("high")
    start = time.perf_counter()
    previous = Path.cwd()
    try:
        if workdir:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            os.chdir(workdir)
        report, results = run_seeds(
            seeds,
            lambda value: run_demo(
                kinds=kinds, quick=quick, seed=value, per_region_control=per_region_control
            ),
        )
        report = save_results(DEMO_ROOT, report, results, time.perf_counter() - start, seeds)
    finally:
        os.chdir(previous)
    print(report)
    return report


def run_seeds(seeds: Sequence[int], run_one) -> tuple[str, dict[str, Any]]:
    """``run_one(seed) -> (report, results)`` for each seed; one seed's report and results as they are,
    several seeds' with :func:`seeds_results` first and each seed's under ``per_seed``."""
    reports, per_seed = [], {}
    for value in seeds:
        report, per_seed[value] = run_one(value)
        reports.append(f"## Seed {value}\n\n{report}" if len(seeds) > 1 else report)
    if len(seeds) == 1:
        report, results = reports[0], per_seed[seeds[0]]
        both = both_kinds(per_seed)
        if both is not None:
            line, results["both_kinds"] = both
            report += "\n\n### Both kinds\n\n" + line
        return report, results
    headline, results = seeds_results(per_seed)
    results["per_seed"] = {str(value): result for value, result in per_seed.items()}
    return "\n\n".join([headline, *reports]), results


def save_results(
    root: Path, report: str, results: dict[str, Any], seconds: float, seeds: int | Sequence[int]
) -> str:
    """Write ``root/report.md`` (the report with the total time appended, which is returned) and
    ``root/results.json`` (strict JSON: NaN as null)."""
    report += f"\n\nTotal: {seconds:.0f} s on {os.cpu_count()} CPU cores.\n"
    results["total_seconds"] = round(seconds, 1)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    results["seed" if len(seeds) == 1 else "seeds"] = seeds[0] if len(seeds) == 1 else seeds
    write_text_atomic(root / "report.md", report)
    write_json_atomic(root / "results.json", results)
    return report
