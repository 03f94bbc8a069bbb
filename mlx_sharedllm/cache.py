"""The tree cache: one preallocated key/value buffer per injection layer, and the
attention that reads it.

Keys are stored already rotated to their chunk position. Storage is a float dtype,
or mx.quantize's affine format (bits 4 or 8) along head_dim, the format mlx-lm's
QuantizedKVCache uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .io import FLOAT_DTYPES

TREE_BITS = (4, 8)
TREE_GROUP_SIZES = (32, 64, 128)
# Bytes of float32 scores one attention block may hold; bounds the prompt's peak.
SCORE_BLOCK_BYTES = 1 << 25
# One stored array in a TreeFormat: (float,) or mx.quantize's (weight, scales, biases).
Parts = tuple[mx.array, ...]


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

    def store(self, x: mx.array) -> Parts:
        """x in this format: (cast x,), or mx.quantize's (weight, scales, biases)."""
        x = x.astype(FLOAT_DTYPES[self.dtype])
        if self.bits is None:
            return (x,)
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def load(self, parts: Parts) -> mx.array:
        """The float array that `parts` store (the inverse of `store`, up to rounding)."""
        if self.bits is None:
            return parts[0]
        if not parts[0].size:  # an empty tree (mx.dequantize refuses it)
            *lead, packed = parts[0].shape
            return mx.zeros((*lead, packed * 32 // self.bits), FLOAT_DTYPES[self.dtype])
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits)

    def matmul(self, x: mx.array, parts: Parts, transpose: bool) -> mx.array:
        """x @ the stored array, transposed on its last two axes when `transpose`."""
        if self.bits is None:
            stored = parts[0].swapaxes(-1, -2) if transpose else parts[0]
            return x @ stored.astype(x.dtype)
        return mx.quantized_matmul(
            x, *parts, transpose=transpose, group_size=self.group_size, bits=self.bits
        )

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


def _empty(shape: tuple[int, ...], fmt: TreeFormat) -> Parts:
    return tuple(mx.zeros(part, dtype) for part, dtype in fmt.stored_parts(shape))


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
    """One injection layer's tree: keys and values of shape (1, kv_heads, capacity, head_dim),
    each stored as the parts `fmt.store` makes (float and quantized trees alike)."""

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, fmt: TreeFormat):
        if fmt.bits is not None and head_dim % fmt.group_size:
            raise ValueError(
                f"head_dim {head_dim} is not a multiple of group size {fmt.group_size}"
            )
        self.fmt = fmt
        self.shape = (1, kv_heads, capacity, head_dim)
        self.key_parts = _empty(self.shape, fmt)
        self.value_parts = _empty(self.shape, fmt)

    @classmethod
    def from_parts(
        cls, fmt: TreeFormat, shape: tuple[int, ...], keys: Parts, values: Parts
    ) -> TreeCache:
        """A cache of keys and values already stored in `fmt`."""
        cache = cls.__new__(cls)
        cache.fmt, cache.shape = fmt, tuple(shape)
        cache.key_parts, cache.value_parts = tuple(keys), tuple(values)
        return cache

    @classmethod
    def from_arrays(
        cls, fmt: TreeFormat, shape: tuple[int, ...], keys: mx.array, values: mx.array
    ) -> TreeCache:
        """A cache of float keys and values, stored in `fmt`."""
        return cls.from_parts(fmt, shape, fmt.store(keys), fmt.store(values))

    @classmethod
    def concatenate(cls, caches: Sequence[TreeCache]) -> TreeCache:
        """The entries of `caches` (one format and head shape), one cache after another."""
        first = caches[0]
        if any(c.fmt != first.fmt or _heads(c) != _heads(first) for c in caches):
            raise ValueError("only caches of one format and head shape can be joined")
        shape = (*first.shape[:2], sum(c.capacity for c in caches), first.shape[3])
        keys = _joined([c.key_parts for c in caches])
        return cls.from_parts(first.fmt, shape, keys, _joined([c.value_parts for c in caches]))

    @property
    def capacity(self) -> int:
        return self.shape[2]

    @property
    def keys(self) -> mx.array:
        """Float keys (dequantized when stored quantized)."""
        return self.fmt.load(self.key_parts)

    @property
    def values(self) -> mx.array:
        """Float values (dequantized when stored quantized)."""
        return self.fmt.load(self.value_parts)

    def dequantized(self) -> tuple[mx.array, mx.array]:
        """Float (1, kv_heads, capacity, head_dim) keys and values."""
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.key_parts, *self.value_parts))

    def check_stored(self) -> None:
        """Refuse stored keys or values that do not fit this cache's shape and format, or
        that hold inf or NaN (a file read from disk may hold anything)."""
        if self.fmt.bits is not None and self.shape[3] % self.fmt.group_size:
            raise ValueError(
                f"head_dim {self.shape[3]} is not a multiple of group size {self.fmt.group_size}"
            )
        expected = self.fmt.stored_parts(self.shape)
        for kind, parts in (("keys", self.key_parts), ("values", self.value_parts)):
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

    def write_stored(
        self, dest: Sequence[int], n: int, keys: Sequence[mx.array], values: Sequence[mx.array]
    ) -> None:
        """Write entries already in this cache's format, (kv_heads, B * n, ...) each, so
        that batch row b lands at entries dest[b] .. dest[b] + n - 1."""
        starts = np.asarray(dest, dtype=np.int64).reshape(-1)
        if starts.size and (starts.min() < 0 or starts.max() + n > self.capacity):
            raise ValueError(
                f"tree cache overflow: {starts.max() + n} entries > capacity {self.capacity}"
            )
        index = mx.array((starts[:, None] + np.arange(n)[None]).reshape(-1).astype(np.int32))
        for buffers, parts in ((self.key_parts, keys), (self.value_parts, values)):
            for buffer, part in zip(buffers, parts):
                buffer[:, :, index] = part[None]

    def take(self, index: mx.array | slice) -> TreeCache:
        """A cache of only the entries `index` (in that order), in this format."""
        keys, values = _entries(self.key_parts, index), _entries(self.value_parts, index)
        shape = (*self.shape[:2], keys[0].shape[-2], self.shape[3])
        return TreeCache.from_parts(self.fmt, shape, keys, values)

    def stored_as(self, fmt: TreeFormat) -> TreeCache:
        """This cache's entries in another format (quantized, or back to float)."""
        return TreeCache.from_arrays(fmt, self.shape, self.keys, self.values)


def _heads(cache: TreeCache) -> tuple[int, int]:
    return cache.shape[1], cache.shape[3]


def _joined(stored: list[Parts]) -> Parts:
    return tuple(mx.concatenate(parts, axis=-2) for parts in zip(*stored))


def _entries(parts: Parts, index: mx.array | slice) -> Parts:
    """Entries `index` (a slice or an index array) of stored keys or values."""
    return tuple(a[..., index, :] for a in parts)


def tree_attention(
    queries: mx.array, cache: TreeCache, scale: float, block: int | None = None
) -> mx.array:
    """Attention of (B, heads, L, D) queries over the tree, without a mask.

    Keys are read in blocks with an online softmax, so no (L x tree length) score
    matrix is ever held whole; quantized trees are read with mx.quantized_matmul.
    """
    b, heads, length, d = queries.shape
    kv, fmt = cache.shape[1], cache.fmt
    q = (queries * scale).reshape(b, kv, heads // kv, length, d)
    # (1, kv, S, x) -> (1, kv, 1, S, x): broadcast over the query heads of a group.
    keys = tuple(mx.expand_dims(a, 2) for a in cache.key_parts)
    values = tuple(mx.expand_dims(a, 2) for a in cache.value_parts)
    total = cache.capacity
    block = block or max(256, SCORE_BLOCK_BYTES // (4 * b * heads * length))
    top = denom = out = None
    for start in range(0, total, block):
        span = slice(start, min(start + block, total))
        s = fmt.matmul(q, _entries(keys, span), transpose=True).astype(mx.float32)
        block_top = s.max(axis=-1, keepdims=True)
        new_top = block_top if top is None else mx.maximum(top, block_top)
        p = mx.exp(s - new_top)
        part = fmt.matmul(p.astype(queries.dtype), _entries(values, span), transpose=False)
        if top is None:
            denom, out = p.sum(axis=-1, keepdims=True), part.astype(mx.float32)
        else:
            fix = mx.exp(top - new_top)
            denom = denom * fix + p.sum(axis=-1, keepdims=True)
            out = out * fix + part
        top = new_top
        if span.stop < total:
            # MLX would otherwise schedule several blocks at once, holding their scores.
            mx.eval(top, denom, out)
    return (out / denom).astype(queries.dtype).reshape(b, heads, length, d)
