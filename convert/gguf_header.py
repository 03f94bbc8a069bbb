"""Check a GGUF file's header before ``mx.load`` reads it.

``mx.load`` (through gguflib) trusts the counts, lengths, dimensions and offsets a GGUF header
gives: absurd ones make it read outside the file, divide by zero or abort, which kills the
process. This walks the header as the GGUF spec lays it out and bounds every one of them by the
file's size first.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

from .files import CheckpointError, check_file

__all__ = ["check_gguf_header"]

_MAGIC = b"GGUF"
# v1 used 32-bit counts and lengths; gguflib reads every file with the v2/v3 layout
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_DIM = 2**31 - 1  # MLX shapes are int32
_DEFAULT_ALIGNMENT = 32

# metadata value type -> struct format of one value; 8 is a string, 9 an array
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_UINT32 = 4

# the float and quantized tensor types mx.load reads -> (name, values per block, bytes per
# block); integer types are left out, as every weight the converter reads is a float
_TENSOR_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 82),
    12: ("Q4_K", 256, 144),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}


class _Cursor:
    """Reads little-endian fields from a buffer, never past its end."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def skip(self, n: int, what: str) -> int:
        """Step over ``n`` bytes; their start."""
        if n > self.left():
            raise CheckpointError(f"{what} runs past the end of the file")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.skip(struct.calcsize(fmt), what)
        return struct.unpack_from(f"<{fmt}", self.data, start)[0]

    def string(self, what: str) -> str:
        start = self.skip(self.unpack("Q", what), what)
        try:
            return self.data[start : self.pos].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{what} is not UTF-8") from None


def check_gguf_header(path: Path) -> list[str]:
    """The tensor names of the GGUF file at ``path``, once its header is found sound (errors
    do not name the file)."""
    size = check_file(path)
    if size < 24:
        raise CheckpointError(f"{size} bytes is too short for a GGUF file")
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _check(_Cursor(data))
    except OSError as e:
        raise CheckpointError(f"cannot read it ({e.strerror or e})") from None


def _check(cursor: _Cursor) -> list[str]:
    if cursor.data[:4] != _MAGIC:
        raise CheckpointError("not a GGUF file (no GGUF magic)")
    cursor.skip(4, "magic")
    version = cursor.unpack("I", "version")
    if version not in _VERSIONS:
        supported = " and ".join(map(str, _VERSIONS))
        raise CheckpointError(f"unsupported GGUF version {version} (supported: {supported})")
    n_tensors, n_keys = cursor.unpack("Q", "tensor count"), cursor.unpack("Q", "key count")
    # the smallest key/value takes 13 bytes, the smallest tensor description 32
    if 13 * n_keys + 32 * n_tensors > cursor.left():
        raise CheckpointError(
            f"header claims {n_keys} keys and {n_tensors} tensors, more than the file can hold"
        )
    alignment = _check_metadata(cursor, n_keys)
    tensors = [_tensor_info(cursor) for _ in range(n_tensors)]
    names = [name for name, *_ in tensors]
    if len(set(names)) != len(names):
        raise CheckpointError("header names a tensor twice")
    data_start = cursor.pos + (-cursor.pos) % alignment  # rounded up to the alignment
    _check_data(tensors, data_start, len(cursor.data), alignment)
    return names


def _check_metadata(cursor: _Cursor, n_keys: int) -> int:
    """Step over the key/value pairs; the file's data alignment."""
    keys = set()
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_keys):
        key = cursor.string("metadata key")
        if key in keys:
            raise CheckpointError(f"metadata key {key!r:.100} appears twice")
        keys.add(key)
        kind = cursor.unpack("I", f"type of {key!r:.100}")
        value = _value(cursor, kind, key)
        if key == "general.alignment":
            if kind != _UINT32 or value == 0 or value & (value - 1):
                raise CheckpointError(f"general.alignment {value!r} is not a uint32 power of 2")
            alignment = value
    return alignment


def _value(cursor: _Cursor, kind: int, key: str) -> Any:
    """Step over one metadata value; it, for scalars (else None)."""
    what = f"metadata {key!r:.100}"
    if kind in _SCALARS:
        return cursor.unpack(_SCALARS[kind], what)
    if kind == _STRING:
        cursor.string(what)
    elif kind == _ARRAY:
        item_kind, count = cursor.unpack("I", what), cursor.unpack("Q", what)
        if item_kind in _SCALARS:
            cursor.skip(count * struct.calcsize(_SCALARS[item_kind]), what)
        elif item_kind == _STRING:
            if 8 * count > cursor.left():
                raise CheckpointError(f"{what} claims {count} strings, more than the file holds")
            for _ in range(count):
                cursor.string(what)
        else:
            raise CheckpointError(f"{what} is an array of unsupported type {item_kind}")
    else:
        raise CheckpointError(f"{what} has unknown type {kind}")
    return None


def _tensor_info(cursor: _Cursor) -> tuple[str, int, int]:
    """Step over one tensor description; (name, data offset, data bytes)."""
    name = cursor.string("tensor name")
    what = f"tensor {name!r:.100}"
    n_dims = cursor.unpack("I", what)
    if not 1 <= n_dims <= _MAX_DIMS:
        raise CheckpointError(f"{what} has {n_dims} dimensions (1 to {_MAX_DIMS} are allowed)")
    dims = [cursor.unpack("Q", what) for _ in range(n_dims)]
    if max(dims) > _MAX_DIM:
        raise CheckpointError(f"{what} has a dimension of {max(dims)}, over {_MAX_DIM}")
    kind = cursor.unpack("I", what)
    if kind not in _TENSOR_TYPES:
        raise CheckpointError(f"{what} has type {kind}, not a float type mx.load reads")
    type_name, block, block_bytes = _TENSOR_TYPES[kind]
    if dims[0] % block:
        raise CheckpointError(f"{what}: its rows of {dims[0]} are not whole {type_name} blocks")
    offset = cursor.unpack("Q", what)
    return name, offset, math.prod(dims) // block * block_bytes


def _check_data(
    tensors: list[tuple[str, int, int]], data_start: int, size: int, alignment: int
) -> None:
    """Every tensor's data is aligned, inside the file, and apart from the others'."""
    end = data_start
    for name, offset, nbytes in sorted(tensors, key=lambda t: t[1]):
        what = f"tensor {name!r:.100}"
        if offset % alignment:
            raise CheckpointError(f"{what} has offset {offset}, not a multiple of {alignment}")
        if data_start + offset < end:
            raise CheckpointError(f"{what} overlaps the tensor before it")
        end = data_start + offset + nbytes
        if end > size:
            raise CheckpointError(f"{what} runs past the end of the file")
