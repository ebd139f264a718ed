"""Atomic folder and file writes: all or nothing, the previous version kept on failure."""

from __future__ import annotations

import json

import pytest

from lorkd_pl.evaluation.summaries import write_json_atomic
from lorkd_pl.io.atomic import atomic_file, atomic_folder, write_text_atomic


def test_replace_and_failure(tmp_path) -> None:
    out = tmp_path / "result"
    with atomic_folder(out) as work:
        (work / "a.txt").write_text("first")
        assert not out.exists()  # nothing visible until the block succeeds
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_folder(out):
        pass
    with pytest.raises(RuntimeError, match="crash"), atomic_folder(out, overwrite=True) as work:
        (work / "a.txt").write_text("second")
        raise RuntimeError("crash")
    assert (out / "a.txt").read_text() == "first"
    with atomic_folder(out, overwrite=True) as work:
        (work / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]  # no temporary folders left


def test_atomic_file_keeps_the_previous_version(tmp_path) -> None:
    out = tmp_path / "summary.json"
    write_json_atomic(out, {"version": 1})
    with pytest.raises(RuntimeError, match="crash"), atomic_file(out) as temporary:
        temporary.write_text('{"version": 2, "trunc')  # half written when the crash comes
        assert temporary.name.endswith(".summary.json") and temporary.parent == tmp_path
        raise RuntimeError("crash")
    assert json.loads(out.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # temporary removed
    write_text_atomic(out, '{"version": 3}')
    assert json.loads(out.read_text()) == {"version": 3}
