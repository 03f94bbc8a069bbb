"""The tree cache: one preallocated key/value buffer per injection layer, and the
attention that reads it.

Keys are stored already rotated to their chunk position. Storage is a float dtype,
or mx.quantize's affine format (bits 4 or 8) along head_dim, the format mlx-lm's
QuantizedKVCache uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .io import FLOAT_DTYPES

TREE_BITS = (4, 8)
TREE_GROUP_SIZES = (32, 64, 128)
# Bytes of float32 scores one attention block may hold; bounds the prompt's peak.
SCORE_BLOCK_BYTES = 1 << 25


@dataclass(frozen=True)
class TreeFormat:
    """How tree entries are stored: a float dtype, or affine quantized bits/group_size."""

    dtype: str = "float32"
    bits: int | None = None
    group_size: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"tree dtype must be one of {sorted(FLOAT_DTYPES)}, got {self.dtype}")
        if self.bits is not None and (type(self.bits) is not int or self.bits not in TREE_BITS):
            raise ValueError(f"tree bits must be one of {TREE_BITS}, got {self.bits}")
        bad_group = type(self.group_size) is not int or self.group_size not in TREE_GROUP_SIZES
        if self.bits is not None and bad_group:
            raise ValueError(
                f"tree group size must be one of {TREE_GROUP_SIZES}, got {self.group_size}"
            )

    def store(self, x: mx.array) -> list[mx.array]:
        """x in this format: [cast x], or mx.quantize's [weight, scales, biases]."""
        x = x.astype(FLOAT_DTYPES[self.dtype])
        if self.bits is None:
            return [x]
        return list(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def stored_parts(self, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], mx.Dtype]]:
        """(shape, dtype) of each array that stores a float array of `shape` (last axis
        head_dim) in this format."""
        dtype = FLOAT_DTYPES[self.dtype]
        if self.bits is None:
            return [(tuple(shape), dtype)]
        *lead, d = shape
        groups = (*lead, d // self.group_size)
        return [((*lead, d * self.bits // 32), mx.uint32), (groups, dtype), (groups, dtype)]

    def entry_bytes(self, head_dim: int) -> float:
        """Bytes one stored vector of `head_dim` values takes."""
        scalar = FLOAT_DTYPES[self.dtype].size
        if self.bits is None:
            return head_dim * scalar
        return head_dim * self.bits / 8 + 2 * scalar * head_dim / self.group_size


def _empty(shape: tuple[int, ...], fmt: TreeFormat) -> mx.array | tuple[mx.array, ...]:
    parts = tuple(mx.zeros(part, dtype) for part, dtype in fmt.stored_parts(shape))
    return parts[0] if fmt.bits is None else parts


# Per float dtype, the unsigned int of its width and its exponent bits: a value whose
# exponent bits are all set is inf or NaN.
_EXPONENT_BITS = {
    mx.float32: (np.uint32, 0x7F800000),
    mx.float16: (np.uint16, 0x7C00),
    mx.bfloat16: (np.uint16, 0x7F80),
}


def all_finite(x: mx.array) -> bool:
    """True when a float array holds no inf or NaN (read as bits in numpy, which on the
    CPU is several times faster than MLX's reductions)."""
    width, exponent = _EXPONENT_BITS[x.dtype]
    bits = np.frombuffer(memoryview(mx.contiguous(x)), width)
    return not np.any((bits & exponent) == exponent)


class TreeCache:
    """One injection layer's tree: keys and values of shape (1, kv_heads, capacity, head_dim)."""

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, fmt: TreeFormat):
        if fmt.bits is not None and head_dim % fmt.group_size:
            raise ValueError(
                f"head_dim {head_dim} is not a multiple of group size {fmt.group_size}"
            )
        self.fmt = fmt
        self.shape = (1, kv_heads, capacity, head_dim)
        self.keys = _empty(self.shape, fmt)
        self.values = _empty(self.shape, fmt)

    @classmethod
    def from_arrays(cls, fmt: TreeFormat, shape: tuple[int, ...], keys, values) -> TreeCache:
        cache = cls.__new__(cls)
        cache.fmt, cache.shape, cache.keys, cache.values = fmt, tuple(shape), keys, values
        return cache

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def check_stored(self) -> None:
        """Refuse stored keys or values that do not fit this cache's shape and format, or
        that hold inf or NaN (a file read from disk may hold anything)."""
        if self.fmt.bits is not None and self.shape[3] % self.fmt.group_size:
            raise ValueError(
                f"head_dim {self.shape[3]} is not a multiple of group size {self.fmt.group_size}"
            )
        expected = self.fmt.stored_parts(self.shape)
        for kind, stored in (("keys", self.keys), ("values", self.values)):
            parts = stored if isinstance(stored, tuple) else (stored,)
            if len(parts) != len(expected):
                raise ValueError(f"{kind} have {len(parts)} parts, the format {len(expected)}")
            for part, (shape, dtype) in zip(parts, expected):
                if tuple(part.shape) != shape or part.dtype != dtype:
                    raise ValueError(
                        f"{kind} stored as {tuple(part.shape)} {part.dtype}, expected "
                        f"{shape} {dtype} for a layer of shape {self.shape}"
                    )
                if dtype != mx.uint32 and not all_finite(part):
                    raise ValueError(f"{kind} hold inf or NaN")

    def write(self, offset: int, keys: mx.array, values: mx.array) -> None:
        """Store (kv_heads, n, head_dim) keys and values at entries offset..offset+n."""
        n = keys.shape[-2]
        self.write_stored([offset], n, self.fmt.store(keys), self.fmt.store(values))

    def write_stored(self, dest, n: int, keys: list[mx.array], values: list[mx.array]) -> None:
        """Write entries already in this cache's format, (kv_heads, B * n, ...) each, so
        that batch row b lands at entries dest[b] .. dest[b] + n - 1."""
        starts = np.asarray(dest, dtype=np.int64).reshape(-1)
        if starts.size and (starts.min() < 0 or starts.max() + n > self.capacity):
            raise ValueError(
                f"tree cache overflow: {starts.max() + n} entries > capacity {self.capacity}"
            )
        index = mx.array((starts[:, None] + np.arange(n)[None]).reshape(-1).astype(np.int32))
        self.keys = _scatter(self.keys, index, keys)
        self.values = _scatter(self.values, index, values)

    def take(self, index: mx.array) -> TreeCache:
        """A cache of only the entries `index` (in that order), in this format."""
        shape = (*self.shape[:2], index.size, self.shape[3])
        return TreeCache.from_arrays(
            self.fmt, shape, _entries(self.keys, index), _entries(self.values, index)
        )

    def stored_as(self, fmt: TreeFormat) -> TreeCache:
        """This cache's entries in another format (quantized, or back to float)."""
        stored = [fmt.store(x) for x in self.dequantized()]
        keys, values = (x[0] if fmt.bits is None else tuple(x) for x in stored)
        return TreeCache.from_arrays(fmt, self.shape, keys, values)

    def dequantized(self) -> tuple[mx.array, mx.array]:
        """Float (1, kv_heads, capacity, head_dim) keys and values."""
        return self._float(self.keys), self._float(self.values)

    def _float(self, stored) -> mx.array:
        if self.fmt.bits is None:
            return stored
        if not self.capacity:  # an idle layer's empty tree (mx.dequantize refuses it)
            return mx.zeros(self.shape, FLOAT_DTYPES[self.fmt.dtype])
        return mx.dequantize(*stored, group_size=self.fmt.group_size, bits=self.fmt.bits)

    @property
    def nbytes(self) -> int:
        stored = [self.keys, self.values]
        if self.fmt.bits is not None:
            stored = [a for t in stored for a in t]
        return sum(a.nbytes for a in stored)


def _scatter(stored, index: mx.array, parts: list[mx.array]):
    buffers = stored if isinstance(stored, tuple) else (stored,)
    for buffer, part in zip(buffers, parts):
        buffer[:, :, index] = part[None]
    return buffers if isinstance(stored, tuple) else buffers[0]


def _entries(stored, index):
    """Entries `index` (a slice or an index array) of stored keys or values, any format."""
    if isinstance(stored, tuple):
        return tuple(a[..., index, :] for a in stored)
    return stored[..., index, :]


def _scores(q: mx.array, keys, fmt: TreeFormat) -> mx.array:
    if fmt.bits is None:
        return q @ keys.swapaxes(-1, -2).astype(q.dtype)
    return mx.quantized_matmul(q, *keys, transpose=True, group_size=fmt.group_size, bits=fmt.bits)


def _weighted(p: mx.array, values, fmt: TreeFormat) -> mx.array:
    if fmt.bits is None:
        return p @ values.astype(p.dtype)
    return mx.quantized_matmul(
        p, *values, transpose=False, group_size=fmt.group_size, bits=fmt.bits
    )


def _expand(stored):
    """(1, kv, S, x) -> (1, kv, 1, S, x): broadcast over the query heads of a group."""
    if isinstance(stored, tuple):
        return tuple(mx.expand_dims(a, 2) for a in stored)
    return mx.expand_dims(stored, 2)


def tree_attention(
    queries: mx.array, cache: TreeCache, scale: float, block: int | None = None
) -> mx.array:
    """Attention of (B, heads, L, D) queries over the tree, without a mask.

    Keys are read in blocks with an online softmax, so no (L x tree length) score
    matrix is ever held whole; quantized trees are read with mx.quantized_matmul.
    """
    b, heads, length, d = queries.shape
    kv = cache.shape[1]
    q = (queries * scale).reshape(b, kv, heads // kv, length, d)
    keys, values = _expand(cache.keys), _expand(cache.values)
    total = cache.capacity
    block = block or max(256, SCORE_BLOCK_BYTES // (4 * b * heads * length))
    top = denom = out = None
    for start in range(0, total, block):
        end = min(start + block, total)
        s = _scores(q, _entries(keys, slice(start, end)), cache.fmt).astype(mx.float32)
        block_top = s.max(axis=-1, keepdims=True)
        new_top = block_top if top is None else mx.maximum(top, block_top)
        p = mx.exp(s - new_top)
        part = _weighted(p.astype(queries.dtype), _entries(values, slice(start, end)), cache.fmt)
        if top is None:
            denom, out = p.sum(axis=-1, keepdims=True), part.astype(mx.float32)
        else:
            fix = mx.exp(top - new_top)
            denom = denom * fix + p.sum(axis=-1, keepdims=True)
            out = out * fix + part
        top = new_top
        if end < total:
            # MLX would otherwise schedule several blocks at once, holding their scores.
            mx.eval(top, denom, out)
    return (out / denom).astype(queries.dtype).reshape(b, heads, length, d)
