"""A file of arrays cut into spatial chunks, each compressed on its own: a box reads only its chunks.

One case's cached teacher target is tens of MiB to GiB in a CT-sized grid; a training crop needs a
small box of it. In a ``.npz`` every read decompresses the whole array; here the arrays are stored
chunk by chunk (zlib), with a table of every chunk's byte range in the header, so reading a box
decompresses only the chunks it overlaps (a 128³ crop over 32³ chunks: at most 5³ of them).

Layout (little-endian)::

    b"LKDCHUNK1\\n" | uint64 header length | header (UTF-8 JSON) | chunk 0 | chunk 1 | ...

The header holds ``spatial`` (the grid, ``[]`` for a vector), ``chunk`` (chunk size per spatial axis),
``arrays`` (``{name: {"dtype", "channels"}}``: every array is ``(channels, *spatial)``), ``offsets``
(byte offset of every chunk and of the end, C order over the chunk grid) and ``meta`` (the caller's
plain data). A chunk is the zlib stream of its arrays' bytes, one after the other in header order, each
``(channels, *chunk box)`` in C order. Files are plain data: nothing is unpickled.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorkd_pl.io.atomic import atomic_file

MAGIC = b"LKDCHUNK1\n"
#: Chunk edge (voxels per spatial axis) unless the caller chooses: a 128³ crop touches ≤ 5³ chunks
#: (≤ 1.95× its own voxels decompressed), and a 274×274×300 grid has 810 chunks.
DEFAULT_CHUNK = 32
#: Bounds a header must keep (a crafted header cannot ask for an absurd allocation).
MAX_EXTENT, MAX_CHANNELS, MAX_DIMS = 65536, 65536, 4
#: The most bytes one chunk may inflate to (a 32³ chunk of 255 fp32 channels is 32 MiB).
MAX_CHUNK_BYTES = 64 * 2**20
ZLIB_LEVEL = 1  # fast: the targets are mostly near-constant; level 6 saves little and costs 3×


class ChunkedFileError(ValueError):
    """A chunked file is damaged, truncated or not one; names the file."""


def write_chunked(
    path: str | Path,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    chunk: int | Sequence[int] = DEFAULT_CHUNK,
) -> Path:
    """Write ``arrays`` (each ``(channels, *spatial)``, one spatial shape) chunk by chunk, atomically.

    Args:
        path: the file.
        arrays: name → array; all share their spatial shape (``()`` for vectors: one chunk).
        meta: plain data stored in the header (read back by :func:`read_header`).
        chunk: chunk edge per spatial axis (one number for all).

    Returns:
        ``path``.
    """
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    spatial = next(iter(arrays.values())).shape[1:]
    if any(a.shape[1:] != spatial for a in arrays.values()):
        raise ValueError(
            f"arrays of one chunked file share their spatial shape, got {[a.shape for a in arrays.values()]}"
        )
    edges = _edges(chunk, len(spatial))
    blobs = []
    for box in _chunk_boxes(spatial, edges):
        index = (slice(None), *(slice(a, b) for a, b in box))
        raw = b"".join(np.ascontiguousarray(a[index]).tobytes() for a in arrays.values())
        blobs.append(zlib.compress(raw, ZLIB_LEVEL))
    offsets = [0, *itertools.accumulate(len(b) for b in blobs)]
    header = {
        "spatial": list(spatial),
        "chunk": list(edges),
        "arrays": {name: {"dtype": a.dtype.str, "channels": int(a.shape[0])} for name, a in arrays.items()},
        "offsets": offsets,
        "meta": dict(meta),
    }
    text = json.dumps(header).encode()
    path = Path(path)
    with atomic_file(path) as partial, open(partial, "wb") as handle:
        handle.write(MAGIC + struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            handle.write(blob)
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a chunked file (``spatial``, ``chunk``, ``arrays``, ``offsets``, ``meta``).

    Raises:
        ChunkedFileError: for a file that is not one, or whose header is damaged.
        FileNotFoundError: for a missing file.
    """
    with open(path, "rb") as handle:
        header, _ = _header(handle, path)
    return header


def read_box(
    path: str | Path,
    start: Sequence[int] | None = None,
    stop: Sequence[int] | None = None,
    fill: Mapping[str, float] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of a box of the grid, reading and decompressing only the chunks it overlaps.

    A box may reach outside the grid (a crop of a padded volume): those voxels are 0, or an array's
    ``fill`` value.

    Args:
        path: the file.
        start: first voxel per spatial axis (default: 0).
        stop: one past the last voxel per spatial axis (default: the grid's size).
        fill: name → the value of voxels outside the grid (default 0).
        check: called with the file's header before anything is allocated or decompressed (the
            caller's own checks of its contents; it raises to refuse the file).

    Returns:
        name → ``(channels, *box size)`` array, in the dtype it was written with.

    Raises:
        ChunkedFileError: naming the file, for a damaged header or chunk.
    """
    with open(path, "rb") as handle:
        own, base = _header(handle, path)
        if check is not None:
            check(own)
        spatial, edges = own["spatial"], own["chunk"]
        start = [0] * len(spatial) if start is None else [int(v) for v in start]
        stop = list(spatial) if stop is None else [int(v) for v in stop]
        if (
            len(start) != len(spatial)
            or len(stop) != len(spatial)
            or any(b < a for a, b in zip(start, stop, strict=True))
        ):
            raise ValueError(f"box {start}..{stop} does not fit the {len(spatial)}-D grid of {path}")
        shape = [b - a for a, b in zip(start, stop, strict=True)]
        out = {
            name: np.full((spec["channels"], *shape), (fill or {}).get(name, 0), np.dtype(spec["dtype"]))
            for name, spec in own["arrays"].items()
        }
        grid = [math.ceil(s / e) for s, e in zip(spatial, edges, strict=True)]
        ranges = [
            range(max(a, 0) // e, min(math.ceil(min(b, s) / e), n)) if min(b, s) > max(a, 0) else range(0)
            for a, b, s, e, n in zip(start, stop, spatial, edges, grid, strict=True)
        ]
        offsets = own["offsets"]
        for position in itertools.product(*ranges):
            flat = int(np.ravel_multi_index(position, grid)) if grid else 0
            handle.seek(base + offsets[flat])
            blob = handle.read(offsets[flat + 1] - offsets[flat])
            box = [(p * e, min((p + 1) * e, s)) for p, e, s in zip(position, edges, spatial, strict=True)]
            _place(path, blob, box, own["arrays"], out, start, stop)
    return out


def _place(
    path: str | Path,
    blob: bytes,
    box: Sequence[tuple[int, int]],
    specs: Mapping[str, Mapping[str, Any]],
    out: dict[str, np.ndarray],
    start: Sequence[int],
    stop: Sequence[int],
) -> None:
    """Decompress one chunk (never beyond its declared size: a crafted chunk cannot inflate to gigabytes)
    and copy its part inside ``start..stop`` into ``out``."""
    size = [b - a for a, b in box]
    expected = sum(
        spec["channels"] * math.prod(size) * np.dtype(spec["dtype"]).itemsize for spec in specs.values()
    )
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(blob, expected + 1)
    except zlib.error:
        raise ChunkedFileError(f"{path}: a chunk is damaged (zlib: invalid data)") from None
    if len(raw) != expected or inflater.unconsumed_tail or inflater.unused_data:
        raise ChunkedFileError(
            f"{path}: a chunk holds another size than its header says (altered or damaged)"
        )
    cut = tuple(
        slice(max(a, s0) - a, min(b, s1) - a) for (a, b), s0, s1 in zip(box, start, stop, strict=True)
    )
    into = tuple(
        slice(max(a, s0) - s0, min(b, s1) - s0) for (a, b), s0, s1 in zip(box, start, stop, strict=True)
    )
    position = 0  # the arrays' bytes, one after the other (their total was checked above)
    for name, spec in specs.items():
        dtype = np.dtype(spec["dtype"])
        count = spec["channels"] * math.prod(size)
        part = np.frombuffer(raw, dtype, count, position).reshape(spec["channels"], *size)
        out[name][(slice(None), *into)] = part[(slice(None), *cut)]
        position += count * dtype.itemsize


def _header(handle: Any, path: str | Path) -> tuple[dict[str, Any], int]:
    """The header and the byte offset of the first chunk."""
    prefix = handle.read(len(MAGIC) + 8)
    if len(prefix) < len(MAGIC) + 8 or not prefix.startswith(MAGIC):
        raise ChunkedFileError(f"{path} is not a lorkd-pl chunked file (or it is truncated)")
    (length,) = struct.unpack("<Q", prefix[len(MAGIC) :])
    size = handle.seek(0, 2)
    if length > size - len(prefix):  # a crafted length: never read (or allocate) past the file
        raise ChunkedFileError(f"{path}: its header is damaged (longer than the file)")
    handle.seek(len(prefix))
    try:
        header = json.loads(handle.read(length).decode())
        valid = _valid_header(header)
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        UnicodeDecodeError,
        OverflowError,
        RecursionError,
    ):
        valid = False
    if not valid:
        raise ChunkedFileError(f"{path}: its header is damaged")
    base = len(MAGIC) + 8 + length
    if size < base + header["offsets"][-1]:
        raise ChunkedFileError(f"{path} is truncated ({size} bytes, its header says more)")
    return header, base


def _valid_header(header: Any) -> bool:
    """Whether a parsed header describes a file lorkd-pl could have written: types, ranges and a chunk size
    that bounds what one chunk may inflate to (checked before any size is computed from it)."""
    if not isinstance(header, dict):
        return False
    spatial, edges, offsets, arrays = header["spatial"], header["chunk"], header["offsets"], header["arrays"]
    if not (isinstance(spatial, list) and isinstance(edges, list) and isinstance(offsets, list)):
        return False
    if len(spatial) != len(edges) or len(spatial) > MAX_DIMS:
        return False
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_EXTENT for v in [*spatial, *edges]
    ):
        return False
    if not isinstance(arrays, dict) or not arrays or not isinstance(header.get("meta", {}), dict):
        return False
    for spec in arrays.values():
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("channels"), int)
            and 0 < spec["channels"] <= MAX_CHANNELS
            and isinstance(spec.get("dtype"), str)
            and np.dtype(spec["dtype"]).kind in "fiub"
        ):
            return False
    chunk_bytes = sum(s["channels"] * np.dtype(s["dtype"]).itemsize for s in arrays.values()) * math.prod(
        edges
    )
    chunks = math.prod(math.ceil(s / e) for s, e in zip(spatial, edges, strict=True))
    return (
        chunk_bytes <= MAX_CHUNK_BYTES
        and len(offsets) == chunks + 1
        and all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)
        and offsets[0] == 0
        and all(b >= a for a, b in itertools.pairwise(offsets))
    )


def _edges(chunk: int | Sequence[int], dims: int) -> list[int]:
    edges = [int(chunk)] * dims if isinstance(chunk, (int, np.integer)) else [int(c) for c in chunk]
    if len(edges) != dims or any(e < 1 for e in edges):
        raise ValueError(f"chunk must be {dims} sizes >= 1, got {chunk!r}")
    return edges


def _chunk_boxes(spatial: Sequence[int], edges: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Every chunk's ``[(start, stop)]`` per axis, in C order over the chunk grid."""
    axes = [[(a, min(a + e, s)) for a in range(0, s, e)] for s, e in zip(spatial, edges, strict=True)]
    return [list(box) for box in itertools.product(*axes)]
