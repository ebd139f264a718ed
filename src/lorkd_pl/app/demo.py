"""The main job on the embedded demo data: teacher → LoRKD → per-region test → comparison table.

``lorkd-pl demo`` (what ``make demo`` runs) does, for the 2D classification and the 3D segmentation
demo: fit the generalist teacher (packaged config ``demo/teacher_*``), fit the LoRKD student
(``demo/lorkd_*``), test both per task, and print per task the teacher's and the
expert's metrics plus the parameters of the teacher, the student with all experts and one merged expert;
the full comparison (per-class tables, plots) goes to ``runs/demo/report_<kind>/``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lorkd_pl.app.configs import config_root
from lorkd_pl.app.lightning import lightning_cli
from lorkd_pl.evaluation.comparison import comparison_rows, find_summaries, markdown_table, write_comparison
from lorkd_pl.evaluation.summaries import dice_per_class, nanmean
from lorkd_pl.experts import merge_expert
from lorkd_pl.io.atomic import write_text_atomic
from lorkd_pl.models.backbones import count_parameters

KINDS: dict[str, str] = {"cls": "accuracy", "seg": "dice"}
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
    for kind, samples in (("cls", 64), ("seg", 8))
}


def _test(config: Path, checkpoint: Path, extra: list[str]) -> tuple[Any, str]:
    """Test ``checkpoint``; return the model and the log dir holding ``summary/<task>.json``."""
    cli = lightning_cli(["test", "--config", str(config), "--ckpt_path", str(checkpoint), *extra])
    return cli.model, cli.trainer.log_dir


def merged_expert_parameters(student, task: int) -> int:
    """Parameters of the deployable network for one task: merged backbone + that task's head."""
    region = student.regions.index(student.tasks[task]["region"])
    return count_parameters(merge_expert(student.student, region)) + count_parameters(student.heads[task])


def export_and_predict(kind: str, student) -> str:
    """Export every region's expert; for 3D, predict one test volume with the exported brain expert."""
    from lorkd_pl.deploy.export import export_region

    checkpoint = Path("runs/demo") / f"lorkd_{kind}" / "checkpoints" / "last.ckpt"
    root = Path("runs/demo/experts") / kind
    for region in student.regions:
        export_region(checkpoint, region, root / region, overwrite=True, student=student)
    text = (
        f"\nExported {len(student.regions)} merged experts to {root}/<region> "
        "(model.pt2, state_dict.pt, metadata.json)."
    )
    if kind != "seg" or "brain" not in student.regions:
        return text
    import SimpleITK as sitk

    from lorkd_pl.deploy.predict import predict_files
    from lorkd_pl.registry import get_task

    record = get_task("demo_brain_seg").records("test")[0]
    written = predict_files([record["image"]], root / "brain", Path("runs/demo/predictions"))[0]
    prediction = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(written))).astype("int64"))
    truth = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(record["label"])).astype("int64"))
    dice = dice_per_class(prediction, truth, len(get_task("demo_brain_seg").classes))
    return text + (
        f"\nPredicted {Path(record['image']).name} with the exported brain expert → {written} "
        f"(input geometry kept; Dice per class in the original grid: {', '.join(f'{d:.3f}' for d in dice)}; "
        f"mean {nanmean(dice):.3f})."
    )


def run_demo(
    configs: Path | None = None,
    kinds: Sequence[str] = ("cls", "seg"),
    progress: bool = False,
    quick: bool = False,
) -> str:
    """Run the demo in the current folder (writes ``runs/demo/...``) and return the report.

    Args:
        configs: folder of ``teacher_<kind>.yaml`` / ``lorkd_<kind>.yaml`` (default: the packaged
            ``demo/`` configs).
        kinds: ``"cls"`` and/or ``"seg"``.
        progress: show progress bars.
        quick: tiny budgets (:data:`QUICK`): checks the whole pipeline, the numbers mean nothing.
    """
    configs = configs or config_root() / "demo"
    sections = []
    for kind in kinds:
        quiet = [
            *(
                []
                if progress
                else ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
            ),
            *(QUICK[kind] if quick else []),
        ]
        metric = KINDS[kind]
        teacher_cfg, student_cfg = configs / f"teacher_{kind}.yaml", configs / f"lorkd_{kind}.yaml"
        timings = {}
        for name, config in (("teacher", teacher_cfg), ("lorkd", student_cfg)):
            start = time.perf_counter()
            lightning_cli(["fit", "--config", str(config), "--overwrite", *quiet])  # the demo owns runs/demo
            timings[name] = time.perf_counter() - start
        runs = Path("runs/demo")
        last = Path("checkpoints") / "last.ckpt"
        teacher, teacher_log = _test(teacher_cfg, runs / f"teacher_{kind}" / last, quiet)
        student, student_log = _test(student_cfg, runs / f"lorkd_{kind}" / last, quiet)
        summaries = find_summaries(teacher_log), find_summaries(student_log)  # read once
        report = write_comparison(summaries, runs / f"report_{kind}", sources=(teacher_log, student_log))
        rows = comparison_rows(*summaries)
        merged = [merged_expert_parameters(student, index) for index in range(len(student.tasks))]
        lines = [
            f"### {'2D classification' if kind == 'cls' else '3D segmentation'} (test split)",
            "",
            *markdown_table(rows),
            "",
            f"Parameters: teacher {count_parameters(teacher):,}; "
            f"student with all {len(student.regions)} experts "
            f"and {len(student.heads)} heads {count_parameters(student):,}; expert-free backbone "
            f"{student.expert_free_parameters:,}; one merged expert + its head "
            f"{min(merged):,}–{max(merged):,}. Fit time: teacher {timings['teacher']:.0f} s, "
            f"LoRKD {timings['lorkd']:.0f} s. Full report with per-class tables and plots: {report}.",
            "",
        ]
        teacher_mean, student_mean = (nanmean([row[metric][i] for row in rows]) for i in (0, 1))
        verdict = "reach" if student_mean >= teacher_mean else "do NOT reach"
        lines.append(f"LoRKD experts {verdict} the teacher's mean {metric}.")
        lines.append(export_and_predict(kind, student))
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def main(workdir: str | None = None, kinds: Sequence[str] = ("cls", "seg"), quick: bool = False) -> str:
    """Run the demo in ``workdir`` (default: the current folder), print and save the report."""
    torch.set_float32_matmul_precision("high")
    start = time.perf_counter()
    previous = Path.cwd()
    try:
        if workdir:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            os.chdir(workdir)
        report = run_demo(kinds=kinds, quick=quick)
        report += f"\n\nTotal: {time.perf_counter() - start:.0f} s on {os.cpu_count()} CPU cores.\n"
        write_text_atomic("runs/demo/report.md", report)
    finally:
        os.chdir(previous)
    print(report)
    return report
