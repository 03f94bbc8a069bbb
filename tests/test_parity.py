"""Converted checkpoints of the released code reproduce its outputs (SPEC section 7)."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from conftest import CASES, FIXTURES, assert_close
from mlx.utils import tree_flatten

from mlx_sharedllm import SharedLLM, load
from mlx_sharedllm.kernels import rotate_at
from mlx_sharedllm.tree import chunk_positions

ATOL = 1e-4


def _inputs(case):
    io = np.load(FIXTURES / case / "io.npz")
    return io, mx.array(io["context_ids"]), mx.array(io["prompt_ids"])


def _load(converted, case, layout):
    """The converted model, as a model of `layout` with the same weights and settings."""
    loaded, tokenizer = load(converted[case])
    assert tokenizer is None
    model = SharedLLM(dataclasses.replace(loaded.config, layout=layout), loaded.settings)
    model.load_weights(tree_flatten(loaded.parameters()))
    return model


def _check_tree(model, tree, expected):
    key_pos, _ = chunk_positions(tree.n_chunks, tree.entries_per_chunk, model.config.layout)
    for i in range(model.config.num_injection_layers):
        ref_keys = rotate_at(
            mx.array(expected[f"tree_keys_{i}"]), model.chunk_rope, mx.array(key_pos)
        )
        assert_close(tree.per_chunk(tree.keys[i]), ref_keys, ATOL, f"tree keys {i}")
        assert_close(
            tree.per_chunk(tree.values[i]), expected[f"tree_values_{i}"], ATOL, f"tree values {i}"
        )


@pytest.mark.parametrize("layout", ["reference", "paper"])
@pytest.mark.parametrize("case", CASES)
def test_prompt_and_extended_logits(converted, case, layout):
    io, context, prompt = _inputs(case)
    expected = io if layout == "reference" else np.load(FIXTURES / case / "paper.npz")
    model = _load(converted, case, layout)
    tree = model.compress(context, prompt)
    _check_tree(model, tree, expected)

    logits = model(prompt[None], tree=tree)
    assert logits.shape == (1, prompt.shape[0], model.args.vocab_size)
    assert_close(logits[0], expected["prompt_logits"], ATOL, f"{case} {layout} prompt_logits")

    text = mx.concatenate([prompt, mx.array(io["continuation_ids"])])
    logits = model(text[None], tree=tree)
    assert_close(logits[0], expected["extended_logits"], ATOL, f"{case} {layout} extended_logits")


@pytest.mark.parametrize("case", CASES)
def test_incremental_decode_matches_extended_logits(converted, case):
    io, context, prompt = _inputs(case)
    model = _load(converted, case, "reference")
    tree = model.compress(context, prompt)
    cache = model.make_cache()
    steps = [model(prompt[None], tree=tree, cache=cache)[0]]
    for token in io["continuation_ids"]:
        steps.append(model(mx.array([[int(token)]]), tree=tree, cache=cache)[0])
    assert_close(mx.concatenate(steps), io["extended_logits"], ATOL, f"{case} decode")


def test_layouts_are_distinguishable(converted):
    """The two layouts differ by much more than the tolerance, so the tests tell them apart."""
    case = next(c for c in CASES if np.load(FIXTURES / c / "io.npz")["context_ids"].shape[0] > 1)
    io = np.load(FIXTURES / case / "io.npz")
    paper = np.load(FIXTURES / case / "paper.npz")
    assert np.abs(io["prompt_logits"] - paper["prompt_logits"]).max() > 100 * ATOL
