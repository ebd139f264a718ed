"""Atomic folder writes: all or nothing, the previous version kept on failure."""

from __future__ import annotations

import pytest

from lorkd_pl.atomic import atomic_folder


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
