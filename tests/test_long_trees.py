"""Long trees: distractor chunks (moved chunks equal compressed ones, padding, training
with them) and the log-length attention scale."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from test_cache import stacked_head32_model
from test_train import (
    TEXT,
    Repeat,
    _evidence_example,
    _jsonl,
    _log,
    facts_context,
    facts_model,
    zero_model,  # noqa: F401  (a fixture)
)

from mlx_sharedllm.adapters import load_adapter
from mlx_sharedllm.cache import TreeFormat
from mlx_sharedllm.cli.train_cli import train_command
from mlx_sharedllm.distractors import Distractors, arrange
from mlx_sharedllm.model import AttentionTap, log_scale
from mlx_sharedllm.train import TrainConfig, train
from mlx_sharedllm.train_data import build_tree


def movable_model(seed: int = 0):
    return facts_model(seed, tree_depth=1, last_p=0)  # every token, one node per chunk


def _chunks(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(13, 64, (n, 64)).astype(np.int32)


def assert_same_tree(a, b, atol=1e-5):
    assert (a.n_chunks, a.query_position) == (b.n_chunks, b.query_position)
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        diff = mx.abs(x - y).max().item()
        assert x.shape == y.shape and diff < atol, (x.shape, y.shape, diff)


def test_arranged_chunks_equal_compressing_them_in_that_order():
    model = movable_model()
    a, b = _chunks(1, 2), _chunks(2, 3)
    query = mx.array([1, 2, 3])
    tree_a, tree_b = model.compress(mx.array(a), query), model.compress(mx.array(b), query)
    order = [(tree_b, 2), (tree_a, 1), (tree_b, 0), (tree_a, 0), (tree_b, 1)]
    direct = model.compress(mx.array(np.stack([b[2], a[1], b[0], a[0], b[1]])), query)
    assert_same_tree(arrange(model, order), direct)


def test_a_quantized_tree_is_arranged_as_its_float_tree_quantized():
    model = stacked_head32_model(tree_depth=1, last_p=0)  # head_dim 32: quantizable
    eight = TreeFormat("float32", 8, 32)
    tree = model.compress(mx.array(_chunks(5, 3)), mx.array([1, 2]))
    order = [(tree, 2), (tree, 0), (tree, 1)]
    small = arrange(model, [(tree.stored_as(eight), j) for _, j in order])
    want = arrange(model, order).stored_as(eight)
    assert all(layer.fmt == eight for layer in small.layers)
    assert_same_tree(small, want, atol=0.05)  # the keys are quantized twice
    for got, expected in zip(small.layers, want.layers):
        for a, b in zip(got.value_parts, expected.value_parts):
            assert mx.array_equal(a, b).item()  # values are not rotated: copied as stored


def test_padding_puts_the_example_in_order_among_distractors():
    model = movable_model()
    text = _chunks(3, 7).reshape(-1)
    distractors = Distractors(model, text, max_chunks=8)
    assert distractors.bank.n_chunks == 7
    example = _chunks(4, 2)
    tree = model.compress(mx.array(example), mx.array([1]))
    rng, totals, firsts = np.random.default_rng(0), set(), set()
    for _ in range(40):
        padded, first = distractors.pad(tree, rng)
        totals.add(padded.n_chunks)
        firsts.add(first)
        t = padded.entries_per_chunk
        own = arrange(model, [(padded, first), (padded, first + 1)])
        assert_same_tree(own, tree)  # moved back to positions 0 and 1: the example's tree
        assert padded.query_position == padded.n_chunks
    assert min(totals) == 2 and max(totals) == 8 and len(firsts) > 3
    for _ in range(10):
        padded, first = distractors.pad(tree, rng, last=True)
        assert first == padded.n_chunks - 2
    assert padded.layers[0].capacity == padded.n_chunks * t


def test_distractors_need_movable_chunks_and_enough_text():
    with pytest.raises(ValueError, match="do not depend on the query"):
        Distractors(facts_model(), _chunks(0, 4).reshape(-1), 4)
    with pytest.raises(ValueError, match="8 chunks need 448 tokens"):
        Distractors(movable_model(), _chunks(0, 4).reshape(-1), 8)
    with pytest.raises(ValueError, match="need distractor text"):
        train(movable_model(), Repeat(None), "unused", TrainConfig(distractor_chunks=4))


def _attention_in(model, example, tree, first: int, head: int) -> float:
    tap = AttentionTap(mx.array([1]))
    model.hidden_states(mx.array(example.inputs[None]), tree, tap=tap)
    entry = first * tree.chunk_len + int(example.attend[0, 1])
    return mx.exp(tap.logprobs[1][0, head, 0, entry]).item()


def test_the_attention_loss_follows_the_example_among_distractors(tmp_path):
    """Trained on padded trees, the taught head finds the evidence where padding put it."""
    model = movable_model()
    example = _evidence_example(np.random.default_rng(5))
    # Distractors full of keys: the head must tell the example's key from the rest.
    distractor_text = np.stack([facts_context(np.random.default_rng(s))[0] for s in range(4)])
    config = TrainConfig(
        steps=25,
        grad_accum=2,
        learning_rate=3e-2,
        warmup=0,
        attention_loss=1.0,
        attention_heads=((1, 2),),
        injection_layers=(1,),
        distractor_chunks=8,
    )
    train(
        model,
        Repeat(example),
        tmp_path,
        config,
        progress=False,
        distractor_text=distractor_text.reshape(-1),
    )
    logged = [r["attention_loss"] for r in _log(tmp_path)]
    assert np.mean(logged[-3:]) < 0.2 * logged[0], logged
    distractors = Distractors(model, distractor_text.reshape(-1), 8)
    tree = build_tree(model, example, 0.0, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for _ in range(3):
        padded, first = distractors.pad(tree, rng)
        assert _attention_in(model, example, padded, first, 2) > 0.7


def test_cli_distractor_options(zero_model, tmp_path):  # noqa: F811
    data, book = tmp_path / "sft.jsonl", tmp_path / "book.txt"
    data.write_text(_jsonl({"context": TEXT, "prompt": "Who?", "response": "the old man"}))
    book.write_text(TEXT * 4)
    args = [
        "--model",
        str(zero_model),
        "--data",
        str(data),
        "--steps",
        "1",
        "-o",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(train_command, [*args, "--distractors", str(book)])
    assert (
        result.exit_code == 2
        and "--distractors and --distractor-chunks go together" in result.output
    )
    result = CliRunner().invoke(
        train_command, [*args, "--distractors", str(book), "--distractor-chunks", "4"]
    )
    assert result.exit_code == 1 and "do not depend on the query" in result.output


# -- the log-length attention scale ------------------------------------------------------


def test_log_scale_is_one_up_to_its_base_then_log_ratio():
    assert log_scale(4096, 0) == 1.0 and log_scale(2048, 2048) == 1.0 and log_scale(10, 2048) == 1.0
    assert log_scale(2048**2, 2048) == pytest.approx(2.0)
    assert log_scale(65536, 2048) == pytest.approx(16 / 11)


def test_log_scale_sharpens_every_injection_by_the_trees_entries():
    model = movable_model()
    context = mx.array(_chunks(6, 2))  # 128 entries
    inputs = mx.array([[1, 2, 3, 4]])
    tree = model.compress(context, mx.array([1]))
    plain = model(inputs, tree=tree)
    sharpened = model(inputs, tree=tree, settings=_log_scaled(model, 16))
    for i in range(2):
        model.layers[i].cross_attn.scale *= log_scale(128, 16)  # 1.75
    by_hand = model(inputs, tree=tree)
    assert not mx.allclose(plain, sharpened, atol=1e-3)
    assert mx.allclose(sharpened, by_hand, atol=1e-5)
    for i in range(2):
        model.layers[i].cross_attn.scale /= log_scale(128, 16)
    at_most = model(inputs, tree=tree, settings=_log_scaled(model, 128))
    assert mx.allclose(at_most, plain, atol=1e-6)  # no sharper on trees of at most 128 entries


def _log_scaled(model, entries: int):
    return dataclasses.replace(model.settings, log_scale_entries=entries)


def test_an_adapter_keeps_the_scale_it_was_trained_with(tmp_path):
    model = movable_model()
    before = model.fingerprint()
    example = _evidence_example(np.random.default_rng(5))
    config = TrainConfig(steps=1, grad_accum=1, injection_layers=(1,), log_scale_entries=64)
    train(model, Repeat(example), tmp_path, config, progress=False)
    assert model.settings.log_scale_entries == 64 and model.fingerprint() != before  # trained
    assert json.loads((tmp_path / "adapter.json").read_text())["log_scale_entries"] == 64
    fresh = movable_model()
    assert fresh.fingerprint() == before
    load_adapter(fresh, tmp_path)  # the scale is not part of the base's fingerprint
    assert fresh.settings.log_scale_entries == 64
    with pytest.raises(ValueError, match="log_scale_entries must be 0"):
        TrainConfig(log_scale_entries=1)


def test_a_run_resumes_only_with_the_loss_it_was_trained_with(tmp_path):
    example = _evidence_example(np.random.default_rng(5))
    config = TrainConfig(steps=2, grad_accum=1, injection_layers=(1,), log_scale_entries=64)
    train(movable_model(), Repeat(example), tmp_path, config, progress=False, stop_after=1)
    other = TrainConfig(steps=2, grad_accum=1, injection_layers=(1,))
    with pytest.raises(ValueError, match="trained log_scale_entries 64, not None"):
        train(movable_model(), Repeat(example), tmp_path, other, resume=True, progress=False)
    train(movable_model(), Repeat(example), tmp_path, config, resume=True, progress=False)
    assert [r["step"] for r in _log(tmp_path)] == [1, 2]
