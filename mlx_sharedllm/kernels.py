"""Custom Metal kernels for the tree cache, each beside the MLX ops path it must match.

- `tree_compress`: gathers the kept positions of one layer's keys and values, rotates
  the keys to their chunk position and stores both in the tree cache's format
  (affine quantized, bit-compatible with `mx.quantize`, or a float dtype).
- `inject_attention`: attention from queries over the whole tree, dequantizing on the
  fly, with an online softmax, GQA and no mask; one variant for a single query token,
  one for blocks of query rows (the prompt).

A kernel runs when Metal is available, the GPU is the default device, the shapes are
supported, and the environment variable MLX_SHAREDLLM_KERNELS is not "0"; otherwise
the ops path answers. A kernel that fails to build or run logs one warning and the
ops path takes over for the rest of the process.

The kernel bodies are `metal_kernels/*.metal` (package `mlx_sharedllm.metal_kernels`).
Where there is no Apple GPU, `tests/emulator` runs them on the CPU: every call is
described by a `Launch`, which the emulator runs exactly as `mx.fast.metal_kernel`
would.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import FLOAT_DTYPES, Parts, TreeCache, TreeFormat, tree_attention

logger = logging.getLogger(__name__)

ENV_FLAG = "MLX_SHAREDLLM_KERNELS"
# First cache entry of each batch row: an array or a list of ints.
Starts = mx.array | np.ndarray | list
COMPUTE_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
COMPRESS_THREADS = 256  # threads per threadgroup of tree_compress, at most
TOKEN_SIMD_GROUPS = 8  # SIMD groups sharing the keys for one query token
BLOCK_ROWS = 8  # query rows (one per SIMD group) of a prompt threadgroup
TILE_VALUES = 2048  # floats of keys (and as many of values) in one prompt tile


def _metal_file(name: str) -> str:
    return resources.files("mlx_sharedllm.metal_kernels").joinpath(name).read_text()


@dataclass(frozen=True)
class KernelSpec:
    """One `mx.fast.metal_kernel`: its body file, argument names and storage format."""

    name: str
    body: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    quantized: bool

    @property
    def source(self) -> str:
        return _metal_file(self.body)

    @property
    def header(self) -> str:
        return f"#define TREE_QUANT {int(self.quantized)}\n" + _metal_file("tree_common.metal")


def _stored(name: str, quantized: bool) -> tuple[str, ...]:
    """Argument names of one stored tensor: packed words, scales, biases; or the floats."""
    return (f"{name}_w", f"{name}_s", f"{name}_b") if quantized else (name,)


def _specs() -> dict[tuple[str, bool], KernelSpec]:
    specs = {}
    for quantized in (False, True):
        fmt = "quant" if quantized else "float"
        tree = _stored("k", quantized) + _stored("v", quantized)
        specs["compress", quantized] = KernelSpec(
            f"tree_compress_{fmt}",
            "tree_compress.metal",
            ("keys", "values", "keep", "chunk_pos", "rope_base", "rope_scale"),
            tree,
            quantized,
        )
        for variant in ("token", "block"):
            specs[variant, quantized] = KernelSpec(
                f"inject_attention_{variant}_{fmt}",
                f"inject_attention_{variant}.metal",
                ("queries", *tree, "scale"),
                ("out",),
                quantized,
            )
    return specs


SPECS = _specs()


@dataclass
class Launch:
    """Everything one kernel call takes, so that the emulator can make the same call."""

    spec: KernelSpec
    inputs: list[Any]
    template: list[tuple[str, Any]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]


def kernels_enabled() -> bool:
    """Whether kernels may run: Metal and the GPU are there and MLX_SHAREDLLM_KERNELS != 0."""
    return os.environ.get(ENV_FLAG, "1") != "0" and _metal_ready()


def _metal_ready() -> bool:
    return mx.metal.is_available() and mx.default_device() == mx.gpu


@functools.cache
def _kernel(spec: KernelSpec):
    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=spec.header,
    )


_failed: set[str] = set()
_built: set[tuple] = set()


def run_kernel(launch: Launch) -> list[mx.array] | None:
    """Run `launch` on Metal; None if the kernel fails (one warning per kernel).

    The first call of each generated source is evaluated at once, so that a kernel
    that does not build fails here, where the ops path can still take over.
    """
    spec = launch.spec
    if spec.name in _failed:
        return None
    try:
        out = _kernel(spec)(
            inputs=launch.inputs,
            template=launch.template,
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            output_shapes=launch.output_shapes,
            output_dtypes=launch.output_dtypes,
        )
        # MLX generates one source per template and per input placement (constant or device).
        small = tuple(x.size < 8 if isinstance(x, mx.array) else True for x in launch.inputs)
        key = (spec.name, repr(launch.template), small)
        if key not in _built:
            mx.eval(out)
            _built.add(key)
        return out
    except Exception as err:  # any failure: fall back rather than leave the user an error
        _failed.add(spec.name)
        logger.warning("Metal kernel %s failed; using the MLX ops path: %s", spec.name, err)
        return None


# -- tree_compress ---------------------------------------------------------------------


def plain_rope(rope: nn.Module, head_dim: int) -> tuple[int, float, float] | None:
    """(dims, log2 base, scale) of a plain rotate-half nn.RoPE; None for any other kind."""
    if type(rope) is not nn.RoPE or rope.traditional or rope.dims % 2 or rope.dims > head_dim:
        return None
    return rope.dims, math.log2(rope.base), float(rope.scale)


def _compress_group_rows(width: int, entries: int) -> int:
    """Entries per threadgroup: the largest divisor of `entries` that keeps it small."""
    cap = max(1, COMPRESS_THREADS // width)
    return max(k for k in range(1, min(cap, entries) + 1) if entries % k == 0)


def compress_launch(
    keys: mx.array,
    values: mx.array,
    keep: mx.array,
    chunk_pos: mx.array,
    rope: nn.Module,
    fmt: TreeFormat,
) -> Launch | None:
    """The tree_compress kernel call for these inputs; None where the kernel does not apply."""
    params = plain_rope(rope, keys.shape[-1])
    if (
        params is None
        or keys.ndim != 4
        or keys.shape != values.shape
        or keys.dtype != values.dtype
        or keys.dtype not in COMPUTE_DTYPES
        or keep.size == 0
    ):
        return None
    b, kv, length, d = keys.shape
    t = keep.shape[0]
    bits, store = fmt.bits or 0, FLOAT_DTYPES[fmt.dtype]
    per = 32 // bits if bits else 1
    if bits:
        groups = (kv, b * t, d // fmt.group_size)
        shapes, dtypes = [(kv, b * t, d // per), groups, groups], [mx.uint32, store, store]
    else:
        shapes, dtypes = [(kv, b * t, d)], [store]
    dims, log2_base, scale = params
    width = d // per
    return Launch(
        spec=SPECS["compress", bool(bits)],
        inputs=[keys, values, keep.astype(mx.int32), chunk_pos.astype(mx.int32), log2_base, scale],
        template=[
            ("T", keys.dtype),
            ("S", store),
            ("D", d),
            ("L", length),
            ("NT", t),
            ("B", b),
            ("KV", kv),
            ("ROT", dims),
            ("BITS", bits),
            ("GS", fmt.group_size),
            ("PER", per),
        ],
        grid=(width, t, 2 * b * kv),
        threadgroup=(width, _compress_group_rows(width, t), 1),
        output_shapes=shapes * 2,  # keys, then values
        output_dtypes=dtypes * 2,
    )


def rotate_at(x: mx.array, rope: nn.Module, positions: mx.array) -> mx.array:
    """Rotate every vector of x (B, heads, L, D) to one position per batch row."""
    b, h, length, d = x.shape
    return rope(x.reshape(b, h * length, 1, d), offset=positions).reshape(b, h, length, d)


def compress_entries_ops(
    keys: mx.array,
    values: mx.array,
    keep: mx.array,
    chunk_pos: mx.array,
    rope: nn.Module,
    fmt: TreeFormat,
) -> tuple[Parts, Parts]:
    """What the kernel outputs, with MLX ops: stored keys and values, (KV, B * t, ...) each."""
    k = rotate_at(keys[:, :, keep], rope, chunk_pos)
    return fmt.store(chunk_major(k)), fmt.store(chunk_major(values[:, :, keep]))


def chunk_major(x: mx.array) -> mx.array:
    """(B, KV, t, D) -> (KV, B * t, D), batch row after batch row."""
    b, kv, t, d = x.shape
    return x.transpose(1, 0, 2, 3).reshape(kv, b * t, d)


def tree_compress_ops(
    keys: mx.array,
    values: mx.array,
    keep: mx.array,
    chunk_pos: mx.array,
    dest: Starts,
    rope: nn.Module,
    cache: TreeCache,
) -> None:
    """The ops path of `tree_compress`."""
    k, v = compress_entries_ops(keys, values, keep, chunk_pos, rope, cache.fmt)
    cache.write_stored(dest, keep.shape[0], k, v)


def tree_compress(
    keys: mx.array,
    values: mx.array,
    keep: mx.array,
    chunk_pos: mx.array,
    dest: Starts,
    rope: nn.Module,
    cache: TreeCache,
) -> None:
    """Store one layer's encoded segments in its tree cache.

    keys, values: (B, kv_heads, L, head_dim), keys at local RoPE positions; keep: (t,)
    positions kept by downsampling; chunk_pos: (B,) chunk-level RoPE position of each
    row; dest: (B,) first cache entry of each row's t entries. Afterwards entries
    dest[b] .. dest[b] + t - 1 hold cache.fmt.store(rope(keys[b][:, keep], chunk_pos[b]))
    and likewise the values, unrotated.
    """
    launch = (
        compress_launch(keys, values, keep, chunk_pos, rope, cache.fmt)
        if kernels_enabled()
        else None
    )
    out = run_kernel(launch) if launch is not None else None
    if out is None:
        tree_compress_ops(keys, values, keep, chunk_pos, dest, rope, cache)
        return
    half = len(out) // 2
    cache.write_stored(dest, keep.shape[0], out[:half], out[half:])


# -- inject_attention ------------------------------------------------------------------


def inject_launch(queries: mx.array, cache: TreeCache, scale: float) -> Launch | None:
    """The inject_attention kernel call for these inputs; None where no kernel applies."""
    b, heads, length, d = queries.shape
    kv, n = cache.shape[1], cache.capacity
    if d % 32 or not 32 <= d <= 256 or heads % kv or n == 0 or queries.dtype not in COMPUTE_DTYPES:
        return None
    fmt = cache.fmt
    bits = fmt.bits or 0
    stored = [*cache.key_parts, *cache.value_parts]
    template = [
        ("T", queries.dtype),
        ("S", FLOAT_DTYPES[fmt.dtype]),
        ("D", d),
        ("H", heads),
        ("KV", kv),
        ("L", length),
        ("N", n),
        ("BITS", bits),
        ("GS", fmt.group_size),
    ]
    if length == 1:
        variant, threads = "token", 32 * TOKEN_SIMD_GROUPS
        grid = (threads, b * heads, 1)
        template.append(("NSG", TOKEN_SIMD_GROUPS))
    else:
        variant, threads = "block", 32 * BLOCK_ROWS
        rows = heads // kv * length
        grid = (threads * -(-rows // BLOCK_ROWS), b * kv, 1)
        template += [("BQ", BLOCK_ROWS), ("BK", TILE_VALUES // d)]
    return Launch(
        spec=SPECS[variant, bool(bits)],
        inputs=[queries, *stored, float(scale)],
        template=template,
        grid=grid,
        threadgroup=(threads, 1, 1),
        output_shapes=[queries.shape],
        output_dtypes=[queries.dtype],
    )


def inject_attention(queries: mx.array, cache: TreeCache, scale: float) -> mx.array:
    """softmax(q K^T * scale) V over the whole tree for (B, heads, L, head_dim) queries.

    The ops path is `mlx_sharedllm.cache.tree_attention`.
    """
    launch = inject_launch(queries, cache, scale) if kernels_enabled() else None
    out = run_kernel(launch) if launch is not None else None
    return out[0] if out is not None else tree_attention(queries, cache, scale)
