"""Chunk selection: the kept chunks are the original entries at their own positions, the
chunk the heads attend to is kept, and generate / the CLI / adapters carry the setting."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from test_cache import stacked_head32_model
from test_generate import book, invoke, loaded, spm_model  # noqa: F401  (fixtures)
from test_long_trees import movable_model
from test_train import facts_model

from mlx_sharedllm.adapters import load_adapter, save_adapter
from mlx_sharedllm.cache import TreeFormat
from mlx_sharedllm.generate import encode_prompt, generate, stream_generate
from mlx_sharedllm.selection import chunk_scores, keep_attended_chunks, keep_chunks
from mlx_sharedllm.settings import Settings

RUNNING = np.array([1, 2, 3], np.int32)


def _tree(model, n=6, seed=0, fmt=None):
    tokens = np.random.default_rng(seed).integers(13, 64, n * 64 + 5).astype(np.int32)
    settings = dataclasses.replace(model.settings, tree_format=fmt)
    return model.compress(mx.array(tokens), mx.array(RUNNING), settings=settings)


@pytest.mark.parametrize("bits", [None, 8])
def test_kept_chunks_are_the_original_entries_in_place(bits):
    model = stacked_head32_model()  # head_dim 32: a quantized tree can be made
    tree = _tree(model, fmt=TreeFormat("float32", bits, 32))
    assert tree.n_chunks >= 5 and tree.remainder is not None
    kept = keep_chunks(tree, [1, 4])
    t = tree.entries_per_chunk
    assert (kept.n_chunks, kept.query_position) == (2, tree.query_position)
    assert np.array_equal(np.array(kept.remainder), np.array(tree.remainder))
    assert kept.meta["selected_chunks"] == [1, 4]
    assert not any(k.endswith("_sha256") for k in kept.meta)
    for whole, part in zip(tree.keys + tree.values, kept.keys + kept.values):
        expected = mx.concatenate([whole[:, :, t : 2 * t], whole[:, :, 4 * t : 5 * t]], axis=2)
        assert part.shape == expected.shape and mx.array_equal(part, expected).item()
    last = tree.n_chunks - 1
    with pytest.raises(ValueError, match=rf"chunks to keep must be in 0\.\.{last}"):
        keep_chunks(tree, [last + 1])


def test_keeping_every_chunk_changes_nothing():
    model = movable_model()
    tree = _tree(model)
    same = keep_chunks(tree, range(tree.n_chunks))
    a, b = model(mx.array(RUNNING[None]), tree=tree), model(mx.array(RUNNING[None]), tree=same)
    assert mx.array_equal(a, b).item()
    assert keep_attended_chunks(model, tree, RUNNING, 0) is tree
    assert keep_attended_chunks(model, tree, RUNNING, tree.n_chunks) is tree
    with pytest.raises(ValueError, match=r"select_chunks\) must be 0"):
        keep_attended_chunks(model, tree, RUNNING, -1)


def test_selection_keeps_the_chunk_every_head_attends_to_most():
    # One injection layer, so its queries do not depend on the tree.
    model = facts_model(1, tree_depth=1, last_p=0, injection_layers=(1,))
    assert len(model.config.injection_layers) == 1
    tree = _tree(model, n=6, seed=3)
    scores = chunk_scores(model, tree, RUNNING)
    assert scores.shape == (6,) and np.all(scores > 0) and np.all(scores <= 1 + 1e-6)
    # Give chunk 4 every head's best-scoring key, in all its entries.
    layer = tree.layers[0]
    logp = _logprobs(model, tree)  # (heads, entries)
    best = np.array(logp.argmax(-1))
    t = tree.entries_per_chunk
    keys = np.array(layer.keys)
    for head, entry in enumerate(best):  # one kv head per head in this model
        keys[0, head, 4 * t : 5 * t] = keys[0, head, entry]
    layers = [type(layer).from_arrays(layer.fmt, layer.shape, mx.array(keys), layer.values)]
    layers += tree.layers[1:]
    rigged = dataclasses.replace(tree, layers=layers)
    scores = chunk_scores(model, rigged, RUNNING)
    assert scores.argmax() == 4, scores
    assert keep_attended_chunks(model, rigged, RUNNING, 1).meta["selected_chunks"] == [4]
    kept = keep_attended_chunks(model, rigged, RUNNING, 3).meta["selected_chunks"]
    assert 4 in kept and kept == sorted(kept) and len(kept) == 3


def _logprobs(model, tree):
    from mlx_sharedllm.model import AttentionTap

    tap = AttentionTap(mx.array([len(RUNNING) - 1]))
    model.model(mx.array(RUNNING[None]), tree, [None] * len(model.layers), tap)
    (logp,) = tap.logprobs
    return logp[0, :, 0]


def test_generate_answers_from_the_selected_chunks(loaded, book):  # noqa: F811
    model, tokenizer = loaded
    text = book.read_text()
    responses = list(stream_generate(model, tokenizer, "Who?", text, max_tokens=4))
    assert responses[-1].chunks_read == responses[-1].chunks > 2
    two = dataclasses.replace(model.settings, chunks_per_question=2)
    picked = list(stream_generate(model, tokenizer, "Who?", text, max_tokens=4, settings=two))
    assert picked[-1].chunks_read == 2 and picked[-1].chunks == responses[-1].chunks
    # The same as handing generate the selected tree.
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = encode_prompt(tokenizer, "Who?")
    tree = model.compress(mx.array(ids), mx.array(prompt))
    running = np.concatenate([np.array(tree.remainder), prompt])
    chosen = keep_attended_chunks(model, tree, running, 2)
    assert generate(model, tokenizer, "Who?", chosen, max_tokens=4) == "".join(
        r.text for r in picked
    )
    # The model's own setting is the default.
    before, model.settings = model.settings, two
    try:
        default = list(stream_generate(model, tokenizer, "Who?", text, max_tokens=4))
    finally:
        model.settings = before
    assert default[-1].chunks_read == 2


def test_cli_select_chunks(spm_model, book):  # noqa: F811
    args = ["--model", str(spm_model), "--file", str(book), "--prompt", "Who?"]
    result = invoke(*args, "--max-tokens", "3", "--select-chunks", "2")
    assert result.exit_code == 0, result.output
    assert "(2 read, 0 tokens re-read)" in result.stderr.strip().splitlines()[-1]
    bad = invoke(*args, "--select-chunks", "-1")
    assert bad.exit_code != 0 and "-1" in bad.output


def test_adapters_carry_the_selection_and_the_settings_check_it(tmp_path):
    model = movable_model()
    before = model.fingerprint()
    model.settings = dataclasses.replace(model.settings, chunks_per_question=8)
    assert model.fingerprint() == before  # not a property of the weights
    model.freeze()
    model.layers[0].cross_attn.unfreeze()
    save_adapter(tmp_path, model, before)
    assert json.loads((tmp_path / "adapter.json").read_text())["select_chunks"] == 8
    fresh = movable_model()
    load_adapter(fresh, tmp_path)
    assert fresh.settings.chunks_per_question == 8
    with pytest.raises(ValueError, match=r"select_chunks\) must be 0"):
        dataclasses.replace(fresh.settings, chunks_per_question=-2)
    with pytest.raises(ValueError, match=r"select_chunks\) must be 0"):
        Settings.from_dict({"select_chunks": -2})
