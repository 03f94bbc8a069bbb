"""The tree cache: storage formats, blocked attention, and what quantizing the tree costs."""

import dataclasses
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import SPM_TOKENIZER, assert_close, run_cli, write_hf_llama
from test_tree import random_tokens, tiny_model

from mlx_sharedllm import load
from mlx_sharedllm.cache import TreeCache, TreeFormat, tree_attention


def reference_attention(q, keys, values, scale):
    """Plain softmax attention with GQA, in float64 numpy."""
    q, keys, values = (np.array(a, np.float64) for a in (q, keys, values))
    rep = q.shape[1] // keys.shape[1]
    keys, values = np.repeat(keys, rep, axis=1), np.repeat(values, rep, axis=1)
    s = q @ keys.swapaxes(-1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ values


def filled_cache(kv, length, d, fmt, seed=0):
    mx.random.seed(seed)
    cache = TreeCache(kv, length, d, fmt)
    keys, values = mx.random.normal((kv, length, d)), mx.random.normal((kv, length, d))
    cache.write(0, keys[:, : length // 3], values[:, : length // 3])
    cache.write(length // 3, keys[:, length // 3 :], values[:, length // 3 :])
    return cache


@pytest.mark.parametrize("heads, kv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("length, block", [(1000, 256), (300, 7), (65, 64), (17, 1024)])
@pytest.mark.parametrize("rows", [1, 13])
def test_blocked_attention_equals_unblocked(heads, kv, length, block, rows):
    cache = filled_cache(kv, length, 32, TreeFormat("float32"))
    q = mx.random.normal((1, heads, rows, 32))
    out = tree_attention(q, cache, 0.2, block=block)
    expected = reference_attention(q, cache.keys, cache.values, 0.2)
    assert_close(out, expected, 1e-5, f"blocked {length}/{block}")


@pytest.mark.parametrize("bits, group", [(8, 32), (8, 64), (4, 32), (4, 128)])
@pytest.mark.parametrize("rows", [1, 9])
def test_quantized_attention_reads_what_was_stored(bits, group, rows):
    """Decode (quantized_matmul) and blocked paths agree with float attention over the
    dequantized tree; the stored values are mx.quantize's."""
    cache = filled_cache(2, 700, 128, TreeFormat("float32", bits, group))
    keys, values = cache.dequantized()
    q = mx.random.normal((1, 4, rows, 128))
    for block in (None, 128):
        out = tree_attention(q, cache, 0.1, block=block)
        assert_close(out, reference_attention(q, keys, values, 0.1), 1e-4, f"{bits}-bit")


def test_cache_writes_at_offsets_and_refuses_overflow():
    cache = TreeCache(2, 10, 32, TreeFormat("float32"))
    cache.write(4, mx.ones((2, 3, 32)), 2 * mx.ones((2, 3, 32)))
    keys, values = cache.dequantized()
    assert np.array(keys)[0, :, 4:7].min() == 1 and np.array(keys)[0, :, :4].max() == 0
    assert np.array(values)[0, :, 7:].max() == 0
    with pytest.raises(ValueError, match="overflow"):
        cache.write(8, mx.ones((2, 3, 32)), mx.ones((2, 3, 32)))


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="bits"):
        TreeFormat("float16", 3)
    with pytest.raises(ValueError, match="group size"):
        TreeFormat("float16", 4, 16)
    with pytest.raises(ValueError, match="multiple of group size"):
        TreeCache(2, 8, 16, TreeFormat("float32", 4, 32))


def stacked_head32_model(**overrides):
    """A tiny model stacked from one whose head_dim (32) can be quantized in groups of 32."""
    upper = dict(
        hidden_size=128,
        num_hidden_layers=3,
        intermediate_size=192,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=97,
        tie_word_embeddings=False,
    )
    return tiny_model(upper=upper, lower=None, num_injection_layers=2, **overrides)


def _logits(model, tree, prompt):
    return np.array(model(prompt[None], tree=tree)[0])


def _quantized_drift(model, context, prompt, bits, group):
    float_tree = model.compress(context, prompt)
    quantized = dataclasses.replace(model.settings, tree_format=TreeFormat("float32", bits, group))
    tree = model.compress(context, prompt, settings=quantized)
    a, b = _logits(model, float_tree, prompt), _logits(model, tree, prompt)
    diff = np.abs(a - b)
    top1 = (a.argmax(-1) == b.argmax(-1)).mean()
    print(
        f"{bits}-bit tree, group {group}: logits max diff {diff.max():.4f}, "
        f"mean {diff.mean():.5f}, top-1 agreement {top1:.3f}"
    )
    return diff, top1, tree, float_tree


@pytest.mark.parametrize("bits, max_bound, top1_bound", [(8, 0.05, 0.99), (4, 0.5, 0.9)])
def test_quantized_tree_stays_close_to_float(bits, max_bound, top1_bound, tmp_path):
    model = stacked_head32_model()
    context, prompt = random_tokens((6, 32), 3), random_tokens(24, 4)
    diff, top1, tree, float_tree = _quantized_drift(model, context, prompt, bits, 32)
    assert diff.max() > 0 and diff.max() < max_bound and top1 >= top1_bound
    tree.save(tmp_path / "q.tree")
    float_tree.save(tmp_path / "f.tree")
    tokens = tree.tokens.nbytes  # the context's token ids, the same in both files
    sizes = [(tmp_path / name).stat().st_size - tokens for name in ("q.tree", "f.tree")]
    ratio = sizes[0] / sizes[1]
    # The payload plus one float32 scale and bias per 32 values, and the header.
    assert ratio < 1.1 * (bits + 2) / 32


@pytest.mark.slow
def test_quantized_tree_on_smollm2(tmp_path):
    """The real default's weights, with copied injection weights so the tree matters."""
    from mlx_sharedllm.assets import DEFAULT_GGUF, fetch

    out = tmp_path / "smol"
    result = run_cli(
        "convert",
        str(fetch(DEFAULT_GGUF)),
        str(out),
        "--stack-from-one",
        "4",
        "--init",
        "copy",
        "--chunk-len",
        "256",
    )
    assert result.exit_code == 0, result.output
    model, tokenizer = load(out)
    text = " ".join(["The old teacher walked to the school by the river every morning."] * 80)
    context = mx.array(tokenizer.encode(text)[: 256 * 4])
    prompt = mx.array(tokenizer.encode("Where did the teacher walk every morning?"))
    drift = {bits: _quantized_drift(model, context, prompt, bits, 64)[:2] for bits in (8, 4)}
    (diff8, top8), (diff4, top4) = drift[8], drift[4]
    assert diff8.max() < 1.5 and diff8.mean() < 0.3 and top8 >= 0.95
    assert diff4.max() < 12.0 and diff4.mean() < 2.5 and top4 >= 0.6


def test_generate_with_quantized_tree_and_kv_cache(tmp_path):
    """--tree-bits and --kv-bits run end to end through `generate`."""
    write_hf_llama(tmp_path / "base", hidden_size=128, intermediate_size=192)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_TOKENIZER / name, tmp_path / "base" / name)
    out = tmp_path / "out"
    result = run_cli(
        "convert",
        str(tmp_path / "base"),
        str(out),
        "--stack-from-one",
        "2",
        "--init",
        "copy",
        "--chunk-len",
        "32",
    )
    assert result.exit_code == 0, result.output
    (tmp_path / "book.txt").write_text("the river town and the old school bell. " * 60)
    result = run_cli(
        "generate",
        "--model",
        str(out),
        "--file",
        str(tmp_path / "book.txt"),
        "--prompt",
        "Where?",
        "--max-tokens",
        "5",
        "--tree-bits",
        "8",
        "--tree-group-size",
        "32",
        "--kv-bits",
        "8",
        "--kv-group-size",
        "32",
    )
    assert result.exit_code == 0, result.output
    assert " chunks" in result.stderr.splitlines()[-1]


def test_compressing_256_chunks_grows_memory_by_the_tree_only():
    """No step concatenates into growing arrays: between 32 and 256 chunks the peak
    grows by the extra tree, not by a copy of it."""
    model = stacked_head32_model(last_p=-1)
    query = random_tokens(8, 1)

    def peak(chunks):
        context = random_tokens((chunks, 32), chunks)
        mx.eval(context, query)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        tree = model.compress(context, query)
        mx.eval([layer.keys for layer in tree.layers])
        return mx.get_peak_memory() - base, tree.nbytes

    small, small_tree = peak(32)
    large, large_tree = peak(256)
    grown = large - small
    print(
        f"peak grew {grown / 2**20:.2f} MiB for {(large_tree - small_tree) / 2**20:.2f} MiB "
        "more tree"
    )
    assert grown <= 1.15 * (large_tree - small_tree)


@pytest.mark.parametrize("capacity", [0, 40])
def test_a_tree_cache_converts_between_formats(capacity):
    float_fmt, eight = TreeFormat("float32"), TreeFormat("float32", 8, 32)
    cache = TreeCache(2, capacity, 32, float_fmt)
    if capacity:
        cache.write(0, mx.random.normal((2, capacity, 32)), mx.random.normal((2, capacity, 32)))
    small = cache.stored_as(eight)
    back = small.stored_as(float_fmt)
    assert small.fmt == eight and back.fmt == float_fmt and back.shape == cache.shape
    for a, b in zip(small.dequantized(), back.dequantized()):
        assert np.array_equal(np.array(a), np.array(b))
    if capacity:
        assert small.nbytes < cache.nbytes / 3


@pytest.mark.parametrize("bits", [None, 4])
def test_entries_are_taken_and_joined_alike_in_every_format(bits):
    cache = filled_cache(2, 40, 32, TreeFormat("float32", bits, 32))
    index = mx.array([30, 31, 32, 5, 6, 7])
    joined = TreeCache.concatenate([cache.take(slice(30, 33)), cache.take(slice(5, 8))])
    taken = cache.take(index)
    assert joined.shape == taken.shape == (1, 2, 6, 32) and joined.fmt == cache.fmt
    for a, b in zip(joined.key_parts + joined.value_parts, taken.key_parts + taken.value_parts):
        assert mx.array_equal(a, b).item()
    assert mx.array_equal(taken.keys, cache.keys[:, :, index]).item()
    with pytest.raises(ValueError, match="one format and head shape"):
        TreeCache.concatenate([cache, cache.stored_as(TreeFormat("float16", bits, 32))])
