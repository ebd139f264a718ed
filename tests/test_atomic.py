"""Atomic folder and file writes: all or nothing, the previous version kept on failure."""

from __future__ import annotations

import json

import pytest

from lorkd_pl.io.atomic import atomic_file, atomic_folder, write_json_atomic, write_text_atomic


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


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path) -> None:
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f".result.tmp-{host}-{int(dead.stdout)}-abc"  # a folder a killed export left
    live = tmp_path / f".result.tmp-{host}-{os.getpid()}-xyz"  # a writer still running
    other_host = tmp_path / f".result.tmp-othernode-{int(dead.stdout)}-q"  # another node's: unknown
    for folder in (stale, live, other_host):
        folder.mkdir()
    with atomic_folder(tmp_path / "result") as work:
        (work / "a.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["result", live.name, other_host.name])


def test_written_files_follow_the_umask(tmp_path) -> None:
    import os
    import stat

    previous = os.umask(0o002)  # a group-shared cluster folder
    try:
        write_text_atomic(tmp_path / "shared.txt", "x")
        with atomic_folder(tmp_path / "folder") as work:
            (work / "inner.txt").write_text("y")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o775
    assert stat.S_IMODE((tmp_path / "folder" / "inner.txt").stat().st_mode) == 0o664


def test_json_writes_null_for_nan_and_inf_unless_asked_to_keep_them(tmp_path) -> None:
    import json
    import math

    path = write_json_atomic(
        tmp_path / "r.json", {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": 0.25}}
    )
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": 0.25}}
    kept = json.loads(
        write_json_atomic(tmp_path / "k.json", {"a": math.nan, "b": math.inf}, nan="keep").read_text()
    )
    assert math.isnan(kept["a"]) and kept["b"] == math.inf
    with pytest.raises(ValueError, match="nan must be"):
        write_json_atomic(tmp_path / "x.json", {}, nan="drop")
