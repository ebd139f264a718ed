"""Teacher-vs-expert report: values read back from summaries, deltas by hand, plots, errors."""

from __future__ import annotations

import math
import os

import pytest

from lorkd_pl.evaluation.comparison import (
    REPORT_MARK,
    ReportError,
    comparison_rows,
    find_summaries,
    write_report,
    write_runs_report,
)
from lorkd_pl.io.atomic import write_json_atomic


def seg_summary(task: str, region: str, dice: list[float], nsd: list[float], hd95: list[float]) -> dict:
    classes = [f"c{i}" for i in range(1, len(dice) + 1)]
    return {
        "task": task,
        "region": region,
        "kind": "seg3d",
        "nsd_tolerance_mm": 2.0,
        "mean": {
            "dice": sum(dice) / len(dice),
            "nsd": sum(nsd) / len(nsd),
            "hd95": sum(hd95) / len(hd95),
        },
        "per_class": {
            c: {"dice": d, "nsd": n, "hd95": h} for c, d, n, h in zip(classes, dice, nsd, hd95, strict=True)
        },
    }


def cls_summary(task: str, region: str, counts: list[list[int]]) -> dict:
    classes = [f"k{i}" for i in range(len(counts))]
    total = sum(map(sum, counts))
    return {
        "task": task,
        "region": region,
        "kind": "cls2d",
        "accuracy": sum(counts[i][i] for i in range(len(counts))) / total,
        "auroc_macro": 0.5,
        "per_class": {
            c: {"recall": counts[i][i] / sum(counts[i]), "support": sum(counts[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": {"rows_truth_columns_prediction": classes, "counts": counts},
    }


def write_run(folder, summaries: list[dict]) -> None:
    for summary in summaries:
        write_json_atomic(
            folder / "logs" / "version_1" / "summary" / f"{summary['task']}.json", summary, nan="keep"
        )


def table_row(report: str, region: str, task: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {region} | {task} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_segmentation_report_by_hand(tmp_path) -> None:
    write_run(
        tmp_path / "teacher",
        [
            seg_summary("brain_seg", "brain", [0.5, 0.7], [0.4, 0.6], [8.0, 6.0]),
            seg_summary("liver_seg", "abdomen", [0.8], [0.9], [3.0]),
        ],
    )
    write_run(
        tmp_path / "student",
        [
            seg_summary("brain_seg", "brain", [0.6, 0.9], [0.5, 0.5], [4.0, 4.0]),
            seg_summary("liver_seg", "abdomen", [0.7], [0.9], [5.0]),
        ],
    )
    path = write_report(tmp_path / "teacher", tmp_path / "student", tmp_path / "out")
    report = path.read_text()
    brain = table_row(report, "brain", "brain_seg")
    # teacher Dice, expert Dice, Δ, teacher NSD, expert NSD, Δ, teacher HD95, expert HD95, Δ
    assert brain[2:] == [
        "0.600",
        "0.750",
        "+0.150 ✓",
        "0.500",
        "0.500",
        "+0.000",
        "7.000",
        "4.000",
        "-3.000 ✓",
    ]
    liver = table_row(report, "abdomen", "liver_seg")
    assert liver[2:5] == ["0.800", "0.700", "-0.100"] and liver[8:] == ["3.000", "5.000", "+2.000"]
    mean = table_row(report, "**mean**", "")
    assert mean[2:4] == ["**0.700**", "**0.725**"]  # means over tasks: (0.6+0.8)/2, (0.75+0.7)/2
    assert "| c2 | 0.700 | 0.900 | 0.600 | 0.500 |" in report  # per-class Dice and NSD
    assert "NSD tolerance 2 mm" in report
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert plots == ["dice_by_region.png", "hd95_by_region.png", "nsd_by_region.png"]
    assert all(f"](plots/{name})" in report for name in plots)


def test_classification_report_and_confusion_plot(tmp_path) -> None:
    write_run(tmp_path / "t", [cls_summary("chest_cls", "thorax", [[5, 5], [2, 8]])])
    write_run(tmp_path / "s", [cls_summary("chest_cls", "thorax", [[9, 1], [2, 8]])])
    report = write_report(tmp_path / "t", tmp_path / "s", tmp_path / "out").read_text()
    assert table_row(report, "thorax", "chest_cls")[2:5] == ["0.650", "0.850", "+0.200 ✓"]
    assert "| k0 | 0.500 | 0.900 |" in report  # recall of class k0, teacher vs expert
    png = (tmp_path / "out" / "plots" / "confusion_chest_cls.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_rewrite_replaces_an_earlier_report_and_keeps_every_other_file(tmp_path, capsys) -> None:
    from lorkd_pl.app.cli import main

    write_run(tmp_path / "t", [cls_summary("chest_cls", "thorax", [[5, 5], [2, 8]])])
    write_run(tmp_path / "s", [cls_summary("chest_cls", "thorax", [[9, 1], [2, 8]])])
    first = write_report(tmp_path / "t", tmp_path / "s", tmp_path / "out").read_text()
    assert first.startswith(REPORT_MARK)  # how a later run knows the folder is a report
    (tmp_path / "out" / "report.md").write_text(f"{REPORT_MARK}\nold")
    assert write_report(tmp_path / "t", tmp_path / "s", tmp_path / "out").read_text() == first  # replaced
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    run = tmp_path / "s"  # a run folder: checkpoints, logs, a note of the user's
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (run / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    args = ["report", "--teacher", str(tmp_path / "t"), "--student", str(run), "--out", str(run)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "is not an earlier report: it holds checkpoints, logs, notes.txt" in capsys.readouterr().err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # refused: nothing written
    assert main([*args, "--overwrite"]) == 0  # beside them: every file kept
    after = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert set(before) <= set(after) and "report.md" in after
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"weights" and (
        run / "notes.txt"
    ).read_text() == "mine"

    figures = tmp_path / "figures"  # PNGs of the user's, no report.md: not a report
    (figures / "plots").mkdir(parents=True)
    (figures / "plots" / "fig1.png").write_bytes(b"precious")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit):
            main(
                [
                    "report",
                    "--teacher",
                    str(tmp_path / "t"),
                    "--student",
                    str(run),
                    "--out",
                    str(figures),
                    *extra,
                ]
            )
    assert (figures / "plots" / "fig1.png").read_bytes() == b"precious"
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(ReportError, match="is a file"):
        write_report(tmp_path / "t", tmp_path / "s", tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep"


def test_errors_name_the_fix(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="lorkd-pl test --config"):
        find_summaries(tmp_path / "empty")
    write_run(tmp_path / "t", [cls_summary("a_cls", "thorax", [[1, 0], [0, 1]])])
    write_run(tmp_path / "s", [seg_summary("a_cls", "thorax", [0.5], [0.5], [1.0])])
    with pytest.raises(ReportError, match=r"task 'a_cls' is cls2d of region 'thorax' in one run and seg3d"):
        write_report(tmp_path / "t", tmp_path / "s", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad" / "summary"
    bad.mkdir(parents=True)
    (bad / "x.json").write_text("{")
    with pytest.raises(ReportError, match=r"x\.json: not a lorkd-pl test summary"):
        find_summaries(tmp_path / "bad")


def test_newest_summary_folder_is_used(tmp_path) -> None:
    old = cls_summary("a_cls", "thorax", [[1, 1], [1, 1]])
    new = cls_summary("a_cls", "thorax", [[2, 0], [0, 2]])
    write_json_atomic(tmp_path / "logs" / "version_0" / "summary" / "a_cls.json", old, nan="keep")
    write_json_atomic(tmp_path / "logs" / "version_1" / "summary" / "a_cls.json", new, nan="keep")
    os.utime(tmp_path / "logs" / "version_0" / "summary" / "a_cls.json", (1e9, 1e9))  # older
    rows = comparison_rows(find_summaries(tmp_path), find_summaries(tmp_path / "logs" / "version_0"))
    assert rows[0]["accuracy"] == (1.0, 0.5)
    assert math.isnan(
        comparison_rows(
            {"a": {**seg_summary("a", "brain", [0.1], [0.1], [1.0]), "mean": {"dice": None}}},
            {"a": seg_summary("a", "brain", [0.1], [0.1], [1.0])},
        )[0]["nsd"][0]
    )


def test_three_runs_side_by_side_through_the_cli(tmp_path, capsys) -> None:
    from lorkd_pl.app.cli import main

    write_run(tmp_path / "t", [seg_summary("brain_seg", "brain", [0.5, 0.7], [0.4, 0.6], [8.0, 6.0])])
    write_run(tmp_path / "p", [seg_summary("brain_seg", "brain", [0.4, 0.6], [0.3, 0.5], [9.0, 7.0])])
    write_run(tmp_path / "l", [seg_summary("brain_seg", "brain", [0.7, 0.7], [0.5, 0.6], [5.0, 5.0])])
    runs = ["--run", f"teacher={tmp_path / 't'}", "--run", f"plain_kd={tmp_path / 'p'}"]
    assert main(["report", *runs, "--run", f"lorkd={tmp_path / 'l'}", "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| region |"))
    assert "| teacher Dice | plain_kd Dice | Δ | lorkd Dice | Δ |" in header
    # Dice: teacher 0.6, plain KD 0.5 (-0.1), LoRKD 0.7 (+0.1); HD95 lower is better
    row = table_row(report, "brain", "brain_seg")
    assert row[2:7] == ["0.600", "0.500", "-0.100", "0.700", "+0.100 ✓"]
    assert row[12:] == ["7.000", "8.000", "+1.000", "5.000", "-2.000 ✓"]
    assert "| c1 | 0.500 | 0.400 | 0.700 |" in report  # per-class Dice of the three runs
    assert (tmp_path / "out" / "plots" / "dice_by_region.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--run", f"teacher={tmp_path / 't'}", "--out", str(tmp_path / "o2")])
    assert exit_info.value.code == 2 and "at least two test runs" in capsys.readouterr().err


def test_means_compare_the_same_tasks_and_a_resumed_fit_keeps_its_curve(tmp_path) -> None:
    from lorkd_pl.evaluation.comparison import common_means, markdown_table, run_rows, validation_curve

    nan = float("nan")
    teacher = {
        "a": seg_summary("a", "abdomen", [0.5], [0.5], [nan]),
        "b": seg_summary("b", "brain", [0.7], [0.7], [3.0]),
    }
    student = {
        "a": seg_summary("a", "abdomen", [0.6], [0.6], [2.0]),
        "b": seg_summary("b", "brain", [nan], [nan], [2.0]),
    }
    rows = run_rows([teacher, student], ["teacher", "expert"])
    assert common_means(rows, "dice") == ([0.5, 0.6], 1)  # task b has no student Dice: left out
    assert common_means(rows, "hd95") == ([3.0, 2.0], 1)
    mean = table_row("\n".join(markdown_table(rows)), "**mean**", "over the tasks every run has (1 of 2)")
    assert mean[2:5] == ["**0.500**", "**0.600**", "+0.100 ✓"]

    fit = tmp_path / "logs"
    for version, text in enumerate(["epoch,val/score\n0,0.25\n1,0.5\n", "epoch,val/score\n1,0.55\n2,0.75\n"]):
        (fit / f"version_{version}").mkdir(parents=True)
        (fit / f"version_{version}" / "metrics.csv").write_text(text)
        os.utime(fit / f"version_{version}" / "metrics.csv", (version + 1, version + 1))
    assert validation_curve(tmp_path) == [(0, 0.25), (1, 0.55), (2, 0.75)]  # the resume's epoch 1 wins


def test_report_draws_the_gradient_conflicts_of_runs_that_logged_them(tmp_path) -> None:
    from lorkd_pl.app.cli import main
    from lorkd_pl.evaluation.plots import _mean_off_diagonal

    write_run(tmp_path / "t", [seg_summary("brain_seg", "brain", [0.5], [0.4], [8.0])])
    write_run(tmp_path / "l", [seg_summary("brain_seg", "brain", [0.7], [0.5], [5.0])])
    regions = ["abdomen", "brain", "thorax"]
    records = [
        {"step": step, "kind": kind, "group": "encoder", "regions": regions,
         "cosine": [[1.0, c, None], [c, 1.0, -c], [None, -c, 1.0]]}
        for step, c in ((0, 0.5), (50, -0.25)) for kind in ("w0", "w0_experts")
    ]  # fmt: skip
    write_json_atomic(
        tmp_path / "l" / "logs" / "version_0" / "conflicts.json", {"regions": regions, "records": records}
    )
    assert main(["report", "--run", f"teacher={tmp_path / 't'}", "--run", f"lorkd={tmp_path / 'l'}",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").glob("conflicts_*.png"))
    assert plots == ["conflicts_1_lorkd.png"]  # only the run that logged them
    assert "plots/conflicts_1_lorkd.png" in (tmp_path / "out" / "report.md").read_text()
    # the trend plots the mean over the finite pairs: (0.5 + 0.5 - 0.5 - 0.5) / 4 = 0 at step 0
    assert _mean_off_diagonal(records[0]["cosine"]) == 0.0
    assert _mean_off_diagonal([[1.0, None], [None, 1.0]]) != _mean_off_diagonal([[1.0, None], [None, 1.0]])


def test_every_task_of_any_run_is_listed_and_a_run_without_it_is_marked(tmp_path) -> None:
    """A brain-only run beside runs of four regions: no row vanishes; its missing tasks show "—" and
    the means compare the tasks every run has, said in the table."""
    regions = ["abdomen", "brain", "pelvis", "thorax"]
    for name in ("teacher", "lorkd"):
        write_run(tmp_path / name, [seg_summary(f"{r}_seg", r, [0.6], [0.5], [3.0]) for r in regions])
    write_run(tmp_path / "brain_only", [seg_summary("brain_seg", "brain", [0.9], [0.8], [1.0])])
    runs = {n: tmp_path / n for n in ("teacher", "lorkd", "brain_only")}
    text = write_runs_report(runs, tmp_path / "report").read_text()
    for region in regions:
        row = table_row(text, region, f"{region}_seg")
        assert row[2] == "0.600", row  # the teacher's Dice
        if region != "brain":
            assert row[5] == "—" and row[6] == "—", row  # the brain-only run: not tested
    brain = table_row(text, "brain", "brain_seg")
    assert brain[5] == "0.900" and brain[6] == "+0.300 ✓"
    assert "over the tasks every run has (1 of 4)" in text
    assert "#### abdomen_seg (abdomen)" in text  # per-class tables of every task too


def test_a_report_never_deletes_a_file_a_user_added_to_its_plots(tmp_path) -> None:
    regions = ["brain", "thorax"]
    for name in ("teacher", "lorkd"):
        write_run(tmp_path / name, [seg_summary(f"{r}_seg", r, [0.6], [0.5], [3.0]) for r in regions])
    runs = {n: tmp_path / n for n in ("teacher", "lorkd")}
    report = write_runs_report(runs, tmp_path / "report")
    (report.parent / "plots" / "my_figure.png").write_bytes(b"mine")
    for overwrite in (False, True):
        with pytest.raises(ReportError, match="plots"):
            write_runs_report(runs, tmp_path / "report", overwrite=overwrite)
        assert (report.parent / "plots" / "my_figure.png").read_bytes() == b"mine"
    (report.parent / "plots" / "my_figure.png").unlink()
    assert write_runs_report(runs, tmp_path / "report") == report  # its own plots only: replaced
