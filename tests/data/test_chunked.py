"""Chunked files: any box reads back exactly what numpy slicing of the written array gives."""

from __future__ import annotations

import numpy as np
import pytest

from lorkd_pl.data.chunked import ChunkedFileError, read_box, read_header, write_chunked


def numpy_box(array: np.ndarray, start, stop) -> np.ndarray:
    """The oracle: ``array[:, start:stop]`` with zeros where the box leaves the grid."""
    out = np.zeros((array.shape[0], *(b - a for a, b in zip(start, stop, strict=True))), array.dtype)
    source = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(start, stop, array.shape[1:], strict=True))
    target = tuple(
        slice(max(a, 0) - a, min(b, n) - a) for a, b, n in zip(start, stop, array.shape[1:], strict=True)
    )
    if all(s.stop > s.start for s in source):
        out[(slice(None), *target)] = array[(slice(None), *source)]
    return out


BOXES = [
    ((0, 0, 0), (37, 41, 29)),  # all
    ((-5, 3, 7), (10, 45, 20)),  # out of the grid on two sides
    ((30, 40, 28), (40, 50, 35)),  # a corner
    ((-3, -3, -3), (-1, -1, -1)),  # wholly outside
    ((5, 5, 5), (5, 9, 9)),  # empty
    ((8, 16, 5), (16, 32, 10)),  # exactly one chunk
]


def test_any_box_reads_what_numpy_slicing_gives(tmp_path) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 37, 41, 29)).astype(np.float16)
    index = rng.integers(0, 200, (3, 37, 41, 29)).astype(np.uint8)
    path = write_chunked(
        tmp_path / "a.lkc", {"values": values, "index": index}, {"key": "k"}, chunk=(8, 16, 5)
    )
    assert read_header(path)["meta"] == {"key": "k"}
    for start, stop in BOXES:
        got = read_box(path, start, stop)
        np.testing.assert_array_equal(got["values"], numpy_box(values, start, stop))
        np.testing.assert_array_equal(got["index"], numpy_box(index, start, stop))
    whole = read_box(path)
    np.testing.assert_array_equal(whole["values"], values)
    vector = write_chunked(tmp_path / "v.lkc", {"p": np.arange(5, dtype=np.float32)}, {})
    np.testing.assert_array_equal(read_box(vector)["p"], np.arange(5, dtype=np.float32))


def test_a_box_reads_only_its_chunks(tmp_path, monkeypatch) -> None:
    import lorkd_pl.data.chunked as chunked

    values = np.random.default_rng(1).standard_normal((2, 64, 64, 64)).astype(np.float32)
    path = write_chunked(tmp_path / "a.lkc", {"v": values}, {}, chunk=16)
    decompressed = []
    original = chunked.zlib.decompressobj
    monkeypatch.setattr(chunked.zlib, "decompressobj", lambda: decompressed.append(1) or original())
    read_box(path, (16, 16, 16), (32, 40, 33))  # 1 x 2 x 2 chunks of 16³
    assert len(decompressed) == 1 * 2 * 2


def test_damage_is_a_clear_error(tmp_path) -> None:
    values = np.random.default_rng(2).standard_normal((2, 20, 20, 20)).astype(np.float32)
    path = write_chunked(tmp_path / "a.lkc", {"v": values}, {}, chunk=8)
    data = bytearray(path.read_bytes())
    (tmp_path / "truncated.lkc").write_bytes(bytes(data[: len(data) - 10]))
    with pytest.raises(ChunkedFileError, match="truncated"):
        read_box(tmp_path / "truncated.lkc")
    data[-20:-10] = b"\x00" * 10  # inside the last chunk's zlib stream
    (tmp_path / "flipped.lkc").write_bytes(bytes(data))
    with pytest.raises(ChunkedFileError, match="damaged"):
        read_box(tmp_path / "flipped.lkc")
    (tmp_path / "other.lkc").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(ChunkedFileError, match="not a lorkd-pl chunked file"):
        read_header(tmp_path / "other.lkc")
    header = path.read_bytes().replace(b'"offsets": [', b'"offsets": ["x", ', 1)
    (tmp_path / "header.lkc").write_bytes(header)
    with pytest.raises(ChunkedFileError, match="header is damaged"):
        read_header(tmp_path / "header.lkc")


def test_a_chunk_never_inflates_beyond_its_declared_size(tmp_path) -> None:
    """A crafted chunk (a zlib bomb, or one of another size than the header says) is refused before it
    is decompressed further than the chunk's own bytes."""
    import json
    import struct
    import zlib

    from lorkd_pl.data.chunked import MAGIC

    path = write_chunked(tmp_path / "a.lkc", {"v": np.zeros((1, 4, 4, 4), np.float32)}, {}, chunk=4)
    header = read_header(path)
    bomb = zlib.compress(b"\x00" * (64 * 2**20))  # 64 MiB of zeros where 256 bytes belong
    header["offsets"] = [0, len(bomb)]
    text = json.dumps(header).encode()
    (tmp_path / "bomb.lkc").write_bytes(MAGIC + struct.pack("<Q", len(text)) + text + bomb)
    with pytest.raises(ChunkedFileError, match="another size than its header says"):
        read_box(tmp_path / "bomb.lkc")
