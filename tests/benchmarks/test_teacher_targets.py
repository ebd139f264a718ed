"""The teacher-target benchmark runs end to end on a small grid, and its KD check is exact at k = K."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark():
    sys.path.insert(0, str(BENCHMARKS))  # it imports expert_conv's helpers, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location(
            "teacher_targets_benchmark", BENCHMARKS / "teacher_targets.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_rows_are_complete_and_top_k_of_every_class_is_dense_kd(capsys) -> None:
    bench = load_benchmark()
    rows = bench.measure((40, 36, 34), (16, 16, 16), classes=5, top_k=5, crops=2)
    assert [r["store"] for r in rows] == [
        "dense .npz (before)",
        "dense chunked (fp16)",
        "top-5 chunked",
        "image crop (floor, float32 chunked)",
    ]
    differences = rows[2]["kd_difference"]
    students = ("start", "near", "close")
    assert set(differences) == {*students, *(f"{s}, even tail" for s in students)}
    assert all(max(v) < 1e-5 for by_k in differences.values() for v in by_k.values())  # every class kept
    assert all(r["disk_mib"] > 0 and r["read_mib"] > 0 for r in rows)
    assert "× floor" in bench.render(rows, (16, 16, 16))
