"""Read ``.safetensors`` files with ``mx.load``, after checking their header.

``mx.load`` lets overlapping tensors and duplicate names through, and its errors do not name the
file; here the header is checked against the format first, so each problem is one line that does.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx

from .files import MAX_HEADER_BYTES, CheckpointError, check_file

__all__ = ["load_safetensors"]

# the dtypes mx.load reads (its float8 types come back as raw uint8, so they are left out)
_DTYPE_SIZES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
}
_MAX_DIM = 2**31 - 1  # MLX shapes are int32


def load_safetensors(path: str | Path) -> dict[str, mx.array]:
    """The tensors of a ``.safetensors`` file, by name (loaded lazily, as ``mx.load`` does)."""
    path = Path(path)
    try:
        _check_header(path, check_file(path))
        return mx.load(str(path), format="safetensors")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def _check_header(path: Path, size: int) -> None:
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"header length {length} does not fit the file ({size} bytes)")
        header = _parse(f.read(length))
    spans = [_check_entry(name, entry, size - 8 - length) for name, entry in header.items()]
    _check_disjoint(sorted(span for span in spans if span is not None))


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object")
    return header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise CheckpointError(f"header names {duplicate!r:.100} twice")
    return dict(pairs)


def _check_entry(name: str, entry: Any, data_size: int) -> tuple[int, int, str] | None:
    """The byte span of tensor ``name`` in the data section (None for ``__metadata__``)."""
    if name == "__metadata__":  # mx.save_safetensors writes null for none
        if entry is not None and not (
            isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
        ):
            raise CheckpointError("__metadata__ is not an object of strings")
        return None
    label = f"tensor {name!r:.100}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{label} is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_SIZES:
        raise CheckpointError(f"{label} has unsupported dtype {dtype!r:.20}")
    if not _ints(shape, _MAX_DIM) or len(shape) > 8:
        raise CheckpointError(f"{label} has an invalid shape {shape!r:.100}")
    if not _ints(offsets, data_size) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(
            f"{label} has data_offsets {offsets!r:.100} outside the {data_size}-byte data section"
        )
    begin, end = offsets
    if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
        raise CheckpointError(
            f"{label} spans {end - begin} bytes, but {dtype} {tuple(shape)} needs "
            f"{math.prod(shape) * _DTYPE_SIZES[dtype]}"
        )
    return begin, end, label


def _ints(values: Any, bound: int) -> bool:
    """Whether ``values`` is a list of integers in [0, bound]."""
    return isinstance(values, list) and all(type(v) is int and 0 <= v <= bound for v in values)


def _check_disjoint(spans: list[tuple[int, int, str]]) -> None:
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{first} and {second} overlap in the file")
