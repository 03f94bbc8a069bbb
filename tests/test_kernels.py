"""The Metal kernels of mlx_sharedllm.kernels, against their MLX ops paths.

Without an Apple GPU the kernels run in the emulator (tests/emulator: the .metal
bodies compiled as C++ with g++). On a Mac the Metal tests compare the real kernels.
"""

from __future__ import annotations

import logging
import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import assert_close
from emulator.harness import Emulator, EmulatorError
from mlx_lm.models.rope_utils import Llama3RoPE

from mlx_sharedllm import kernels
from mlx_sharedllm.cache import TreeCache, TreeFormat, tree_attention
from mlx_sharedllm.kernels import chunk_major, rotate_at

ATOL = 1e-4
QUANT_FORMATS = [(4, 32), (4, 64), (8, 64), (4, 128), (8, 128)]
needs_metal = pytest.mark.skipif(
    not mx.metal.is_available(),
    reason="no Metal GPU here: the emulator tests run these kernel sources on the CPU",
)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> Emulator:
    if not sys.platform.startswith("linux"):
        pytest.skip("the emulator is built for Linux (CI); Metal tests run the real kernels")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the emulator needs a C++ compiler")
    return Emulator(tmp_path_factory.mktemp("emulator"))


def _normal(seed: int, *shape: int, dtype=mx.float32) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _fmt(bits: int | None, group_size: int = 64, dtype: str = "float32") -> TreeFormat:
    return TreeFormat(dtype=dtype, bits=bits, group_size=group_size)


def _floats(cache: TreeCache) -> tuple[mx.array, mx.array]:
    keys, values = cache.dequantized()
    return keys.astype(mx.float32), values.astype(mx.float32)


# -- tree_compress ---------------------------------------------------------------------

# B = 2 segments of L = 13 tokens, 2 kv heads; 5 kept positions (fewer than a SIMD
# group); rows written out of order and apart.
KEEP = mx.array([0, 3, 6, 9, 12])
CHUNK_POS = mx.array([3, 7])
DEST = [9, 1]
CAPACITY = 16


def _segments(d: int, dtype=mx.float32) -> tuple[mx.array, mx.array]:
    return _normal(1, 2, 2, 13, d, dtype=dtype), _normal(2, 2, 2, 13, d, dtype=dtype)


def _compress_both(emulator, d, fmt, rope, dtype=mx.float32) -> tuple[TreeCache, TreeCache]:
    """The tree cache written by the emulated kernel and by the ops path."""
    keys, values = _segments(d, dtype)
    launch = kernels.compress_launch(keys, values, KEEP, CHUNK_POS, rope, fmt)
    out = emulator.run(launch)
    emulated, ops = TreeCache(2, CAPACITY, d, fmt), TreeCache(2, CAPACITY, d, fmt)
    emulated.write_stored(DEST, len(KEEP), out[: len(out) // 2], out[len(out) // 2 :])
    kernels.tree_compress_ops(keys, values, KEEP, CHUNK_POS, DEST, rope, ops)
    return emulated, ops


@pytest.mark.parametrize(
    "d, rope",
    [(64, nn.RoPE(64, base=10000.0)), (64, nn.RoPE(32, base=500.0, scale=0.25)), (8, nn.RoPE(8))],
)
def test_compress_float_matches_ops(emulator, d, rope):
    emulated, ops = _compress_both(emulator, d, _fmt(None), rope)
    for got, want, name in zip(_floats(emulated), _floats(ops), ("keys", "values")):
        assert_close(got, want, ATOL, name)


@pytest.mark.parametrize("bits, group_size", QUANT_FORMATS)
def test_compress_quantized_matches_ops(emulator, bits, group_size):
    d = max(64, group_size)
    emulated, ops = _compress_both(emulator, d, _fmt(bits, group_size), nn.RoPE(d))
    for got, want, name in zip(_floats(emulated), _floats(ops), ("keys", "values")):
        assert_close(got, want, ATOL, name)
    # Values are not rotated: the kernel stores exactly what mx.quantize stores.
    for got, want in zip(emulated.value_parts, ops.value_parts):
        assert mx.array_equal(got, want)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64)])
def test_compress_quantization_is_mx_quantize(emulator, bits, group_size):
    """The quantized kernel stores mx.quantize of the float kernel's rotated keys."""
    keys, values = _segments(64)
    rope = nn.RoPE(64)
    as_float = emulator.run(
        kernels.compress_launch(keys, values, KEEP, CHUNK_POS, rope, _fmt(None))
    )
    quant = emulator.run(
        kernels.compress_launch(keys, values, KEEP, CHUNK_POS, rope, _fmt(bits, group_size))
    )
    want = [
        *mx.quantize(as_float[0], group_size, bits),
        *mx.quantize(as_float[1], group_size, bits),
    ]
    for got, expected in zip(quant, want):
        assert mx.array_equal(got, expected)


def test_compress_half_storage_matches_ops(emulator):
    emulated, ops = _compress_both(emulator, 64, _fmt(4, 32, dtype="float16"), nn.RoPE(64))
    for got, want, name in zip(_floats(emulated), _floats(ops), ("keys", "values")):
        assert_close(got, want, ATOL, name)


def test_compress_bfloat_inputs_match_ops(emulator):
    """MLX's CPU RoPE rounds bfloat16 midway (Metal's does not): allow bfloat16 steps."""
    fmt = _fmt(None, dtype="float16")
    emulated, ops = _compress_both(emulator, 64, fmt, nn.RoPE(64), dtype=mx.bfloat16)
    for got, want, name in zip(_floats(emulated), _floats(ops), ("keys", "values")):
        assert_close(got, want, 2e-2, name)


@pytest.mark.parametrize("fmt", [_fmt(None), _fmt(None, dtype="float16"), _fmt(4, 32), _fmt(8, 64)])
def test_compress_ops_matches_model_path(fmt):
    """The ops path writes what rotate_at + TreeCache.write write."""
    keys, values = _segments(64)
    rope = nn.RoPE(64, base=10000.0)
    ours, model = TreeCache(2, 12, 64, fmt), TreeCache(2, 12, 64, fmt)
    kernels.tree_compress_ops(keys, values, KEEP, CHUNK_POS, [2, 7], rope, ours)
    rotated = rotate_at(keys[:, :, KEEP], rope, CHUNK_POS)
    model.write(2, chunk_major(rotated), chunk_major(values[:, :, KEEP]))
    for got, want in zip(ours.key_parts + ours.value_parts, model.key_parts + model.value_parts):
        assert mx.array_equal(got, want)


def test_compress_overflow_is_refused():
    keys, values = _segments(64)
    with pytest.raises(ValueError, match="overflow"):
        kernels.tree_compress(
            keys, values, KEEP, CHUNK_POS, [0, 12], nn.RoPE(64), TreeCache(2, 16, 64, _fmt(None))
        )


# -- inject_attention ------------------------------------------------------------------


def _tree(kv: int, n: int, d: int, fmt: TreeFormat) -> TreeCache:
    cache = TreeCache(kv, n, d, fmt)
    cache.write(0, _normal(3, kv, n, d), _normal(4, kv, n, d))
    return cache


def _attend_both(emulator, b, heads, length, n, kv, d, fmt, dtype=mx.float32):
    queries = _normal(5, b, heads, length, d, dtype=dtype)
    cache = _tree(kv, n, d, fmt)
    launch = kernels.inject_launch(queries, cache, d**-0.5)
    assert launch.spec.name.startswith("inject_attention_" + ("token" if length == 1 else "block"))
    return emulator.run(launch)[0], tree_attention(queries, cache, d**-0.5)


# (batch, query heads, kv heads, tree entries, head_dim, format): GQA 1, 2 and 4; trees
# shorter than the SIMD groups of a threadgroup, and not a whole number of SIMD groups.
TOKEN_CASES = [
    (1, 4, 2, 37, 64, _fmt(None)),
    (2, 8, 2, 5, 64, _fmt(4, 32)),
    (1, 4, 4, 100, 128, _fmt(8, 64)),
    (1, 2, 1, 70, 128, _fmt(4, 128)),
]


@pytest.mark.parametrize("b, heads, kv, n, d, fmt", TOKEN_CASES)
def test_inject_token_matches_ops(emulator, b, heads, kv, n, d, fmt):
    got, want = _attend_both(emulator, b, heads, 1, n, kv, d, fmt)
    assert_close(got, want, ATOL, "token")


# (batch, query heads, kv heads, query rows, tree entries, head_dim, format): row
# blocks that are not full, trees that are not a whole number of tiles.
BLOCK_CASES = [
    (1, 4, 2, 7, 70, 32, _fmt(None)),
    (2, 4, 2, 5, 37, 64, _fmt(4, 64)),
    (1, 8, 2, 3, 20, 128, _fmt(8, 32)),
    (1, 2, 2, 17, 50, 64, _fmt(8, 64)),
]


@pytest.mark.parametrize("b, heads, kv, length, n, d, fmt", BLOCK_CASES)
def test_inject_block_matches_ops(emulator, b, heads, kv, length, n, d, fmt):
    got, want = _attend_both(emulator, b, heads, length, n, kv, d, fmt)
    assert_close(got, want, ATOL, "block")


def test_inject_half_queries_bfloat_tree(emulator):
    got, want = _attend_both(emulator, 1, 4, 3, 40, 2, 64, _fmt(None, dtype="bfloat16"), mx.float16)
    assert_close(got, want, 5e-3, "half")


# -- the emulator can fail -------------------------------------------------------------


def test_broken_simd_reduction_is_caught(emulator):
    """An off-by-one in the token kernel's merge of SIMD groups gives wrong answers."""
    queries, cache = _normal(5, 1, 4, 1, 64), _tree(2, 37, 64, _fmt(None))
    launch = kernels.inject_launch(queries, cache, 0.125)
    source = launch.spec.source
    broken = source.replace("for (uint g = 0; g < NSG; ++g)", "for (uint g = 1; g < NSG; ++g)")
    assert broken != source
    want = tree_attention(queries, cache, 0.125)
    good, bad = emulator.run(launch)[0], emulator.run(launch, source=broken)[0]
    print(f"intact kernel: max diff {mx.abs(good - want).max().item():.3g}")
    print(f"broken kernel: max diff {mx.abs(bad - want).max().item():.3g}")
    assert mx.abs(good - want).max().item() <= ATOL
    assert mx.abs(bad - want).max().item() > 1e-2


def _quant_compress_launch() -> kernels.Launch:
    keys, values = _segments(64)
    return kernels.compress_launch(keys, values, KEEP, CHUNK_POS, nn.RoPE(64), _fmt(4, 64))


def test_broken_group_reduction_is_caught(emulator):
    """A quantization group reduced over half its lanes stores other words."""
    launch = _quant_compress_launch()
    broken = launch.spec.header.replace("offset < LANES;", "offset < LANES / 2;")
    assert broken != launch.spec.header
    keys, values = _segments(64)
    want = kernels.compress_entries_ops(keys, values, KEEP, CHUNK_POS, nn.RoPE(64), _fmt(4, 64))
    good, bad = emulator.run(launch), emulator.run(launch, header=broken)
    assert mx.array_equal(good[3], want[1][0])  # the values' words
    assert not mx.array_equal(bad[3], want[1][0])


def test_out_of_bounds_write_is_caught(emulator):
    """Writing past the end of an output buffer crashes the emulated dispatch."""
    launch = _quant_compress_launch()
    broken = launch.spec.source.replace("GS / PER;", "GS / PER / 2;")
    assert broken != launch.spec.source
    with pytest.raises(EmulatorError, match="crashed"):
        emulator.run(launch, source=broken)


def test_missing_barrier_is_caught(emulator):
    """Without the barrier after a tile is loaded, results depend on thread order."""
    queries, cache = _normal(5, 1, 4, 5, 64), _tree(2, 37, 64, _fmt(4, 64))
    launch = kernels.inject_launch(queries, cache, 0.125)
    source = launch.spec.source
    broken = source.replace(
        "threadgroup_barrier(mem_flags::mem_threadgroup);\n  if (active)", "if (active)", 1
    )
    assert broken != source
    with pytest.raises(EmulatorError, match="order threads run in"):
        emulator.run(launch, source=broken)


# -- the emulator itself ---------------------------------------------------------------

SHIM_CHECK = """
// Two threadgroups of 48 threads: SIMD groups of 32 and of 16 lanes.
const uint i = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint width = metal::min(32u, threads_per_threadgroup.x - simdgroup_index_in_threadgroup * 32);
const uint3 pos = thread_position_in_grid;
const float x = inp[pos.x];
threadgroup float shared[48];
shared[i] = x;
threadgroup_barrier(mem_flags::mem_threadgroup);
const float4 v = float4(x, 1.0f, 2.0f, shared[(i + 1) % 48]);
device float* o = out + pos.x * 10;
o[0] = simd_sum(x);
o[1] = simd_max(x);
o[2] = simd_min(x);
o[3] = simd_shuffle(x, (lane + 3) % width);
o[4] = simd_shuffle_xor(x, 5);
o[5] = metal::dot(v, v * 0.5f);
o[6] = static_cast<float>(static_cast<half>(x));
o[7] = static_cast<float>(static_cast<bfloat16_t>(x));
o[8] = metal::round(x * 4.0f);
o[9] = static_cast<float>(threadgroup_position_in_grid.x);
"""


def _check_launch(x: mx.array) -> kernels.Launch:
    spec = kernels.KernelSpec("shim_check", "", ("inp",), ("out",), False)
    return kernels.Launch(spec, [x], [], (x.size, 1, 1), (48, 1, 1), [(x.size, 10)], [mx.float32])


def _expected_check(x: np.ndarray) -> np.ndarray:
    want = np.zeros((x.size, 10), np.float32)
    for g in range(x.size // 48):
        block = x[48 * g : 48 * (g + 1)]
        for first, width in ((0, 32), (32, 16)):
            lanes = block[first : first + width]
            rows = want[48 * g + first : 48 * g + first + width]
            rows[:, 0], rows[:, 1], rows[:, 2] = lanes.sum(), lanes.max(), lanes.min()
            rows[:, 3] = lanes[(np.arange(width) + 3) % width]
            rows[:, 4] = lanes[np.arange(width) ^ 5]
        nxt = np.roll(block, -1)
        want[48 * g : 48 * (g + 1), 5] = 0.5 * (block**2 + 1 + 4 + nxt**2)
        want[48 * g : 48 * (g + 1), 9] = g
    want[:, 6] = x.astype(np.float16)
    want[:, 7] = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    want[:, 8] = np.sign(x) * np.floor(np.abs(4 * x) + 0.5)
    return want


def test_emulator_runs_the_msl_subset(emulator):
    x = np.array(_normal(6, 96)) * 3
    x[:4] = [0.125, -0.375, 0.625, 1e-6]  # exact halves for round(); a half subnormal
    out = emulator.run(_check_launch(mx.array(x)), source=SHIM_CHECK, header="")[0]
    want = _expected_check(x)
    np.testing.assert_allclose(np.array(out)[:, [0, 5]], want[:, [0, 5]], rtol=1e-5, atol=1e-5)
    others = [1, 2, 3, 4, 6, 7, 8, 9]
    np.testing.assert_array_equal(np.array(out)[:, others], want[:, others])


@pytest.mark.parametrize(
    "body, error",
    [
        ("if (i < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); }", "stuck"),
        ("if (i % 32 < 8) { out[i] = simd_sum(1.0f); }", "after some lanes exited"),
        ("out[i] = simd_shuffle(1.0f, 40);", "does not exist"),
        ("threadgroup float s[48]; s[i] = i; out[i] = s[47 - i];", "order threads run in"),
        ("out[i + 48] = 1.0f;", "crashed"),
    ],
)
def test_emulator_reports_broken_kernels(emulator, body, error):
    """Divergent barriers or SIMD functions, races and out-of-bounds writes all fail."""
    source = "const uint i = thread_index_in_threadgroup;\n" + body
    spec = kernels.KernelSpec("broken", "", ("inp",), ("out",), False)
    launch = kernels.Launch(spec, [mx.zeros(48)], [], (48, 1, 1), (48, 1, 1), [(48,)], [mx.float32])
    with pytest.raises(EmulatorError, match=error):
        emulator.run(launch, source=source, header="")


# -- dispatch: when kernels run --------------------------------------------------------


def test_env_flag_turns_kernels_off(monkeypatch):
    monkeypatch.setattr(kernels, "_metal_ready", lambda: True)
    monkeypatch.delenv(kernels.ENV_FLAG, raising=False)
    assert kernels.kernels_enabled()
    monkeypatch.setenv(kernels.ENV_FLAG, "0")
    assert not kernels.kernels_enabled()


def test_dispatch_matches_ops_paths():
    """inject_attention and tree_compress answer with or without Metal."""
    queries, cache = _normal(5, 1, 4, 3, 64), _tree(2, 30, 64, _fmt(4, 32))
    assert_close(
        kernels.inject_attention(queries, cache, 0.125), tree_attention(queries, cache, 0.125), ATOL
    )
    keys, values = _segments(64)
    ours, ops = TreeCache(2, CAPACITY, 64, _fmt(8, 64)), TreeCache(2, CAPACITY, 64, _fmt(8, 64))
    kernels.tree_compress(keys, values, KEEP, CHUNK_POS, DEST, nn.RoPE(64), ours)
    kernels.tree_compress_ops(keys, values, KEEP, CHUNK_POS, DEST, nn.RoPE(64), ops)
    for got, want in zip(_floats(ours), _floats(ops)):
        assert_close(got, want, ATOL)


def _broken_kernel(spec: kernels.KernelSpec):
    return mx.fast.metal_kernel(
        name="broken_" + spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source="this is not Metal;",
    )


def test_failing_kernel_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_metal_ready", lambda: True)
    monkeypatch.setattr(kernels, "_kernel", _broken_kernel)
    monkeypatch.setattr(kernels, "_failed", set())
    queries, cache = _normal(5, 1, 4, 1, 64), _tree(2, 30, 64, _fmt(4, 32))
    keys, values = _segments(64)
    tree = TreeCache(2, CAPACITY, 64, _fmt(None))
    with caplog.at_level(logging.WARNING, logger="mlx_sharedllm.kernels"):
        for _ in range(2):
            out = kernels.inject_attention(queries, cache, 0.125)
            kernels.tree_compress(keys, values, KEEP, CHUNK_POS, DEST, nn.RoPE(64), tree)
    assert mx.array_equal(out, tree_attention(queries, cache, 0.125))
    ops = TreeCache(2, CAPACITY, 64, _fmt(None))
    kernels.tree_compress_ops(keys, values, KEEP, CHUNK_POS, DEST, nn.RoPE(64), ops)
    assert mx.array_equal(tree.keys, ops.keys)
    warned = sorted(r.getMessage().split()[2] for r in caplog.records)
    assert warned == ["inject_attention_token_quant", "tree_compress_float"]


def test_unsupported_shapes_take_the_ops_path():
    for d in (8, 48, 512):
        assert (
            kernels.inject_launch(_normal(5, 1, 2, 1, d), _tree(1, 4, d, _fmt(None)), 1.0) is None
        )
    keys, values = _segments(64)
    for rope in (
        nn.RoPE(64, traditional=True),
        Llama3RoPE(
            64,
            8192,
            False,
            10000.0,
            {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ):
        assert kernels.compress_launch(keys, values, KEEP, CHUNK_POS, rope, _fmt(None)) is None


def test_kernel_sources_are_package_data():
    for spec in kernels.SPECS.values():
        assert "thread_position_in_grid" in spec.source or "simd_sum" in spec.source
        assert spec.header.startswith(f"#define TREE_QUANT {int(spec.quantized)}")


# -- on a Mac: the real kernels --------------------------------------------------------


@needs_metal
@pytest.mark.parametrize("length", [1, 9])
@pytest.mark.parametrize("fmt", [_fmt(None), _fmt(4, 32), _fmt(8, 64)])
def test_metal_inject_matches_ops(length, fmt):
    queries, cache = _normal(5, 2, 8, length, 128), _tree(2, 77, 128, fmt)
    out = kernels.run_kernel(kernels.inject_launch(queries, cache, 0.088))
    assert out is not None, "the kernel failed on Metal (see the warning)"
    assert_close(out[0], tree_attention(queries, cache, 0.088), ATOL)


@needs_metal
@pytest.mark.parametrize("fmt", [_fmt(None), _fmt(4, 32), _fmt(4, 128)])
def test_metal_compress_matches_ops(fmt):
    keys, values = _segments(128)
    launch = kernels.compress_launch(keys, values, KEEP, CHUNK_POS, nn.RoPE(128), fmt)
    out = kernels.run_kernel(launch)
    assert out is not None, "the kernel failed on Metal (see the warning)"
    ours, ops = TreeCache(2, CAPACITY, 128, fmt), TreeCache(2, CAPACITY, 128, fmt)
    ours.write_stored(DEST, len(KEEP), out[: len(out) // 2], out[len(out) // 2 :])
    kernels.tree_compress_ops(keys, values, KEEP, CHUNK_POS, DEST, nn.RoPE(128), ops)
    for got, want in zip(_floats(ours), _floats(ops)):
        assert_close(got, want, ATOL)


def test_emulator_keeps_constant_and_device_apart(emulator):
    """MLX passes inputs under 8 elements in constant memory: a device pointer won't take them."""
    header = "inline float first(const device float* p) { return p[0]; }\n"
    source = "out[thread_index_in_threadgroup] = first(inp);"
    spec = kernels.KernelSpec("spaces", "", ("inp",), ("out",), False)
    for size, compiles in ((8, True), (4, False)):
        launch = kernels.Launch(
            spec, [mx.ones(size)], [], (32, 1, 1), (32, 1, 1), [(32,)], [mx.float32]
        )
        if compiles:
            assert mx.array_equal(
                emulator.run(launch, source=source, header=header)[0], mx.ones(32)
            )
        else:
            with pytest.raises(EmulatorError, match="does not compile"):
                emulator.run(launch, source=source, header=header)


@needs_metal
@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64), (8, 128)])
def test_metal_compress_quantization_is_mx_quantize(bits, group_size):
    keys, values = _segments(128)
    rope = nn.RoPE(128)
    as_float = kernels.run_kernel(
        kernels.compress_launch(keys, values, KEEP, CHUNK_POS, rope, _fmt(None))
    )
    quant = kernels.run_kernel(
        kernels.compress_launch(keys, values, KEEP, CHUNK_POS, rope, _fmt(bits, group_size))
    )
    want = [
        *mx.quantize(as_float[0], group_size, bits),
        *mx.quantize(as_float[1], group_size, bits),
    ]
    for got, expected in zip(quant, want):
        assert mx.array_equal(got, expected)
