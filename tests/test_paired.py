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
