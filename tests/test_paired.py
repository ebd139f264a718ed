"""Paired differences over seeds × cases and their bootstrap interval, against independent oracles:
SciPy's bootstrap (one seed), the exact distribution by enumeration (seeds only), hand cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from lorkd_pl.evaluation.paired import bootstrap_interval, case_scores, paired_differences


def seg_summary(task: str, dice: dict[str, list[float]]) -> dict:
    return {
        "task": task,
        "kind": "seg3d",
        "cases": [
            {"case": c, **{f"dice_{i}": v for i, v in enumerate(values)}, "nsd_0": 0.0}
            for c, values in dice.items()
        ],
    }


def cls_summary(task: str, rows: dict[str, tuple[str, str]]) -> dict:
    return {
        "task": task,
        "kind": "cls2d",
        "cases": [{"case": c, "label": y, "prediction": p} for c, (y, p) in rows.items()],
    }


def test_case_scores_follow_the_dice_and_accuracy_rules() -> None:
    seg = case_scores(seg_summary("t", {"a": [0.5, 1.0], "b": [float("nan"), 0.2], "c": [float("nan")] * 2}))
    assert seg["a"] == 0.75 and seg["b"] == 0.2 and math.isnan(seg["c"])  # NaN classes left out
    assert case_scores(cls_summary("t", {"a": ("x", "x"), "b": ("x", "y")})) == {"a": 1.0, "b": 0.0}


def test_paired_differences_keep_pairs_over_common_tasks_and_cases() -> None:
    a = [
        {
            "t": seg_summary("t", {"a": [0.9], "b": [0.5], "c": [float("nan")]}),
            "only_a": seg_summary("only_a", {}),
        }
    ]
    b = [{"t": seg_summary("t", {"a": [0.7], "b": [0.6], "c": [0.1], "d": [0.3]})}]
    differences = paired_differences(a, b)
    assert list(differences) == ["t"]
    np.testing.assert_allclose(differences["t"], [[0.2, -0.1]])  # c (NaN in a) and d (not in a) dropped
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences(a, b + b)


def test_constant_differences_give_a_point_interval() -> None:
    difference, low, high = bootstrap_interval({"t": np.full((3, 7), 0.05), "u": np.full((3, 4), 0.15)})
    assert difference == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_one_seed_matches_scipys_percentile_bootstrap() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0.03, 0.1, size=40)
    difference, low, high = bootstrap_interval({"t": values[None]}, resamples=20_000)
    oracle = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=20_000, random_state=7)
    assert difference == pytest.approx(values.mean())
    assert low == pytest.approx(oracle.confidence_interval.low, abs=0.004)
    assert high == pytest.approx(oracle.confidence_interval.high, abs=0.004)


def test_seed_resampling_matches_the_exact_distribution() -> None:
    """Cases identical within a seed: only the seeds vary, and with 3 seeds the bootstrap distribution
    of the mean is the 27 equally likely draws, enumerated here."""
    offsets = np.array([-0.02, 0.01, 0.07])
    matrix = np.repeat(offsets[:, None], 5, axis=1)
    _, low, high = bootstrap_interval({"t": matrix}, level=0.8, resamples=40_000)
    draws = sorted(np.mean(combo) for combo in itertools.product(offsets, repeat=3))
    exact_low, exact_high = np.percentile(draws, [10, 90], method="inverted_cdf")
    assert low == pytest.approx(exact_low, abs=1e-9) and high == pytest.approx(exact_high, abs=1e-9)


def test_groups_weight_each_group_equally_and_draw_the_seeds_once_for_all() -> None:
    """Both kinds together: the mean of the groups' means (a 3-task group counts as much as a 1-task
    one), the seeds drawn jointly for every task — the 27 equally likely seed draws of each seed's
    combined value, enumerated; drawing the seeds per task would give a narrower interval."""
    constant = {"t": np.full((3, 4), 0.1), "u": np.full((3, 5), 0.3), "w": np.full((3, 2), 0.4)}
    groups = {"t": "seg3d", "u": "seg3d", "w": "cls2d"}
    difference, low, high = bootstrap_interval(constant, groups=groups)
    assert difference == pytest.approx((0.2 + 0.4) / 2) and low == pytest.approx(0.3) == high
    assert bootstrap_interval(constant)[0] == pytest.approx((0.1 + 0.3 + 0.4) / 3)  # ungrouped
    seg = np.array([-0.03, 0.02, 0.04])  # per seed, every case of the 3D task
    cls = np.array([0.05, -0.01, 0.0])  # per seed, both 2D tasks
    matrices = {
        "s": np.repeat(seg[:, None], 3, axis=1),
        "c1": np.repeat(cls[:, None], 4, axis=1),
        "c2": np.repeat(cls[:, None], 2, axis=1),
    }
    groups = {"s": "seg3d", "c1": "cls2d", "c2": "cls2d"}
    difference, low, high = bootstrap_interval(matrices, level=0.8, resamples=40_000, groups=groups)
    combined = (seg + cls) / 2  # each seed's mean of the two kinds
    assert difference == pytest.approx(combined.mean())
    draws = sorted(np.mean(combo) for combo in itertools.product(combined, repeat=3))
    exact_low, exact_high = np.percentile(draws, [10, 90], method="inverted_cdf")
    assert low == pytest.approx(exact_low, abs=1e-9) and high == pytest.approx(exact_high, abs=1e-9)
    with pytest.raises(ValueError, match="without a group"):
        bootstrap_interval(matrices, groups={"s": "seg3d"})
    with pytest.raises(ValueError, match=r"group\(s\) \['seg3d'\]"):  # a kind whose tasks all dropped out
        bootstrap_interval({"c1": matrices["c1"]}, groups=groups)


def test_seed_results_aggregate_per_run_and_pair_the_seeds_test_runs(tmp_path) -> None:
    """demo --seeds: mean ± sd per run over seeds, and paired differences read back from each seed's
    test runs (the difference of per-case means, i.e. of the runs' means when every case has a value)."""
    import json
    import statistics

    from lorkd_pl.app.demo import RUNS, run_seeds

    rng = np.random.default_rng(0)
    cases = [f"c{i}" for i in range(6)]

    def one_seed(seed: int):
        result = {"metric": "dice"}
        for offset, name in enumerate(RUNS):
            folder = tmp_path / f"{name}{seed}" / "summary"
            folder.mkdir(parents=True)
            dice = {
                c: [float(v)] for c, v in zip(cases, rng.uniform(0.4, 0.6, 6) + 0.05 * offset, strict=True)
            }
            (folder / "t.json").write_text(json.dumps(seg_summary("t", dice)))
            mean = float(np.mean([v[0] for v in dice.values()]))
            result[name] = {"mean": mean, "test_run": str(folder.parent)}
        return f"seed {seed}", {"seg3d": result}

    report, results = run_seeds([0, 1, 2], one_seed)
    assert results["per_seed"].keys() == {"0", "1", "2"} and "Over seeds 0, 1, 2" in report
    seg = results["seg3d"]
    for name in RUNS:
        means = [results["per_seed"][s]["seg3d"][name]["mean"] for s in ("0", "1", "2")]
        assert seg[name]["mean"] == pytest.approx(statistics.fmean(means))
        assert seg[name]["sd"] == pytest.approx(statistics.stdev(means))
    paired = seg["paired"]["lorkd-plain_kd"]
    assert paired["difference"] == pytest.approx(seg["lorkd"]["mean"] - seg["plain_kd"]["mean"])
    assert paired["low"] <= paired["difference"] <= paired["high"]
    assert paired["resolved"] == (paired["low"] > 0 or paired["high"] < 0)
    assert f"lorkd − plain_kd {paired['difference']:+.3f}" in report
    report, results = run_seeds([5], lambda seed: ("just this", {"seg3d": {"metric": "dice"}}))
    assert (report, results) == ("just this", {"seg3d": {"metric": "dice"}})  # one seed: as it is


def test_both_kinds_pair_the_mean_of_the_kinds_over_seeds_and_for_one_seed(tmp_path) -> None:
    """With 3D and 2D: each run's mean of the two kinds' means, and the paired difference of that mean
    (the kinds weighted equally however many tasks each has), for several seeds and for one."""
    import json

    from lorkd_pl.app.demo import RUNS, run_seeds

    rng = np.random.default_rng(3)

    def one_seed(seed: int):
        out = {}
        for kind, tasks, metric in (("seg3d", ["a_seg"], "dice"), ("cls2d", ["a_cls", "b_cls"], "accuracy")):
            result = {"metric": metric}
            for offset, name in enumerate(RUNS):
                folder = tmp_path / f"{kind}-{name}{seed}" / "summary"
                folder.mkdir(parents=True)
                task_means = []
                for task in tasks:
                    if kind == "seg3d":
                        dice = {f"c{i}": [float(rng.uniform(0.5, 0.7) + 0.03 * offset)] for i in range(5)}
                        summary = seg_summary(task, dice)
                        task_means.append(np.mean([v[0] for v in dice.values()]))
                    else:
                        hits = rng.random(8) < 0.6 + 0.1 * offset
                        rows = {f"c{i}": ("y", "y" if hit else "n") for i, hit in enumerate(hits)}
                        summary = cls_summary(task, rows)
                        task_means.append(hits.mean())
                    (folder / f"{task}.json").write_text(json.dumps(summary))
                result[name] = {"mean": float(np.mean(task_means)), "test_run": str(folder.parent)}
            out[kind] = result
        return f"seed {seed}", out

    report, results = run_seeds([0, 1, 2], one_seed)
    both = results["both_kinds"]
    for name in RUNS:
        per_seed = [
            (results["per_seed"][s]["seg3d"][name]["mean"] + results["per_seed"][s]["cls2d"][name]["mean"])
            / 2
            for s in ("0", "1", "2")
        ]
        assert both[name]["mean"] == pytest.approx(np.mean(per_seed))
        assert both[name]["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    paired = both["paired"]["lorkd-plain_kd"]
    assert paired["difference"] == pytest.approx(both["lorkd"]["mean"] - both["plain_kd"]["mean"])
    assert paired["low"] <= paired["difference"] <= paired["high"]
    assert "Both kinds (the mean of 3D Dice and 2D accuracy), mean ± sd over seeds:" in report
    report, results = run_seeds([7], one_seed)
    paired = results["both_kinds"]["paired"]["lorkd-teacher"]
    assert paired["difference"] == pytest.approx(
        (results["seg3d"]["lorkd"]["mean"] + results["cls2d"]["lorkd"]["mean"]) / 2
        - (results["seg3d"]["teacher"]["mean"] + results["cls2d"]["teacher"]["mean"]) / 2
    )
    assert "### Both kinds" in report and "± " not in report.split("### Both kinds")[1].split(". ")[0]


def test_over_seeds_is_the_sample_mean_and_sd_and_keeps_a_nan_seed_as_nan() -> None:
    """A run whose score is undefined in one seed (NaN) must not fail the summary after a long run."""
    import statistics

    from lorkd_pl.app.demo import over_seeds

    summary = over_seeds([0, 1, 2], [0.81, 0.78, 0.84])
    assert summary["mean"] == pytest.approx(statistics.fmean([0.81, 0.78, 0.84]))
    assert summary["sd"] == pytest.approx(statistics.stdev([0.81, 0.78, 0.84]))
    assert summary["per_seed"] == {"0": 0.81, "1": 0.78, "2": 0.84}
    assert over_seeds([4], [0.7]) == {"mean": 0.7, "sd": 0.0, "per_seed": {"4": 0.7}}
    with_nan = over_seeds([0, 1], [0.8, float("nan")])
    assert math.isnan(with_nan["mean"]) and math.isnan(with_nan["sd"])


def test_seeds_option_needs_two_distinct_seeds(capsys) -> None:
    from lorkd_pl.app.cli import main

    for value in ("0", "1,1", "a,b"):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--seeds", value])
        assert exit_info.value.code == 2
        assert "--seeds: invalid list of two or more distinct seeds" in capsys.readouterr().err


def test_the_per_region_control_trains_one_student_per_region_at_the_same_total_budget(
    tmp_path, monkeypatch
) -> None:
    """demo --per-region-control: each region's student saw only its region's tasks and 1/R of the
    samples per epoch; its test summaries are the control's; the reported size is their sum."""
    import torch

    from lorkd_pl.app.demo import QUICK, run_demo

    monkeypatch.chdir(tmp_path)
    _, results = run_demo(kinds=("cls",), quick=True, per_region_control=True)
    root = tmp_path / "runs" / "demo" / "per_region_cls"
    samples = int(next(a for a in QUICK["cls"] if "samples_per_epoch" in a).split("=")[1])
    students = sorted(p for p in root.glob("seed0-*") if p.is_dir())
    assert [p.name for p in students] == [f"seed0-{r}" for r in ("abdomen", "brain", "pelvis", "thorax")]
    total = 0
    for run in students:
        saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        tasks = [t["name"] for t in saved["hyper_parameters"]["task_info"]]
        assert tasks == [f"demo_{run.name.split('-')[1]}_cls"]  # its region's data only
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["data"]["init_args"]["samples_per_epoch"] == samples // 4
        buffers = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm state, not parameters
        total += sum(v.numel() for k, v in saved["state_dict"].items() if not k.endswith(buffers))
    result = results["cls2d"]
    assert result["per_region"]["params"] == total
    assert sorted(p.name for p in (root / "seed0" / "summary").glob("*.json")) == [
        f"demo_{r}_cls.json" for r in ("abdomen", "brain", "pelvis", "thorax")
    ]
    assert {"lorkd-per_region", "lorkd-plain_kd"} <= set(result["paired"])
