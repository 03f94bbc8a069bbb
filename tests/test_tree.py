"""The context tree on the paper layout, and the planning rules of SPEC section 3."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_sharedllm import SharedLLM
from mlx_sharedllm.settings import read_config
from mlx_sharedllm.tree import downsample_index, keep_count, leaf_rows, pick_halves, plan_segments

VOCAB = 97


def tiny_model(seed: int = 0, **overrides) -> SharedLLM:
    llama = dict(
        hidden_size=32,
        num_hidden_layers=3,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    params = dict(
        upper=llama,
        lower=llama,
        num_injection_layers=2,
        tree_depth=3,
        last_p=4,
        chunk_len=32,
        policy="query",
        layout="paper",
        compress_batch=3,
    )
    mx.random.seed(seed)
    model = SharedLLM(*read_config({**params, **overrides}))
    mx.eval(model.parameters())
    return model


def random_tokens(shape, seed):
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, size=shape))


def expected_entries(chunk_len, depth, last_p):
    """Entries per chunk for config.json's `last_p` (an int counts, a float is a fraction)."""
    kept = (None, last_p) if isinstance(last_p, float) else (last_p, None)
    sizes, length = [], chunk_len
    for _ in range(depth - 1):
        length //= 2
        sizes.append(len(downsample_index(length, *kept)))
    leaf = length // 2
    return 2 * len(downsample_index(leaf, *kept)) + sum(sizes)


def test_downsample_rules():
    assert list(downsample_index(512, 32)) == list(range(0, 512, 16))
    assert list(downsample_index(6, 4)) == [0, 1, 2, 3, 4, 5]  # 6 // 4 = 1 keeps all 6
    assert list(downsample_index(16, fraction=0.25)) == [0, 4, 8, 12]
    assert list(downsample_index(10, 0)) == list(range(10))
    assert keep_count(10, -1) == 10 and keep_count(10, 3) == 3
    assert keep_count(10, fraction=0.5) == 5
    assert keep_count(10, 1) == 1 and keep_count(10, fraction=1.0) == 10  # 1 is not 1.0


def test_reference_pairing_and_leaf_regrouping():
    left, right = np.array([0.1, 0.9, 0.3]), np.array([0.5, 0.2, 0.2])
    # Paper: each chunk compares its own halves.
    assert list(pick_halves(left, right, "paper")) == [1, 0, 0]
    # Reference: [0.1, 0.9, 0.3, 0.5, 0.2, 0.2] read as rows of two.
    assert list(pick_halves(left, right, "reference")) == [1, 1, 0]
    assert list(pick_halves(np.zeros(1), np.zeros(1), "paper")) == [0]  # ties keep left
    a, b = leaf_rows(3, "reference")
    assert list(a) == [0, 1, 2] and list(b) == [3, 4, 5]
    a, b = leaf_rows(3, "paper")
    assert list(a) == [0, 2, 4] and list(b) == [1, 3, 5]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    depth=st.integers(1, 5),
    leaf_node=st.integers(2, 9),
    last_p=st.one_of(st.integers(-1, 6), st.sampled_from([0.125, 0.25, 0.5, 1.0])),
    seed=st.integers(0, 2**16),
)
def test_plan_shapes_and_entry_counts(n, depth, leaf_node, last_p, seed):
    """Random n, chunk_len, depth, last_p: segment lengths per level and disjoint coverage."""
    chunk_len = leaf_node * 2 ** (depth - 1)
    rng = np.random.default_rng(seed)
    plan = plan_segments(
        n, chunk_len, depth, "paper", lambda node, half: rng.integers(0, 2, len(node))
    )
    leaf = leaf_node // 2
    assert plan.lengths == [leaf, leaf] + [chunk_len >> d for d in range(depth - 1, 0, -1)]
    assert plan.source.shape == plan.start.shape == (n, depth + 1)
    for j in range(n):
        assert (plan.source[j] == j).all()
        covered = np.zeros(chunk_len, int)
        for start, length in zip(plan.start[j], plan.lengths):
            covered[start : start + length] += 1
        assert covered.max() == 1 and covered.sum() == chunk_len - leaf_node % 2
    model = tiny_model(last_p=last_p, tree_depth=depth, chunk_len=chunk_len)
    tree = model.compress(random_tokens((n, chunk_len), seed), random_tokens(5, seed + 1))
    entries = expected_entries(chunk_len, depth, last_p)
    assert tree.entries_per_chunk == entries
    for keys, values in zip(tree.keys, tree.values):
        assert keys.shape == values.shape == (1, 2, n * entries, 8)


@pytest.mark.parametrize("policy", ["query", "right"])
def test_paper_chunk_tree_depends_only_on_its_chunk(policy):
    model = tiny_model(policy=policy)
    context, query = random_tokens((5, 32), 1), random_tokens(7, 2)
    tree = model.compress(context, query)
    changed = mx.concatenate([random_tokens((2, 32), 3), context[2:3], random_tokens((2, 32), 4)])
    other = model.compress(changed, query)
    for a, b in zip(tree.keys + tree.values, other.keys + other.values):
        a, b = np.array(tree.per_chunk(a)), np.array(other.per_chunk(b))
        np.testing.assert_allclose(a[2], b[2], atol=1e-6)
        assert np.abs(a[0] - b[0]).max() > 1e-3


def test_query_policy_reads_the_query_and_right_policy_ignores_it():
    context = random_tokens((6, 32), 5)
    queries = [random_tokens(9, s) for s in range(6, 12)]

    def trees(model):
        return [np.array(model.compress(context, q).keys[0]) for q in queries]

    right = trees(tiny_model(policy="right"))
    assert all(np.array_equal(right[0], t) for t in right[1:])
    query = trees(tiny_model(policy="query"))
    assert any(not np.allclose(query[0], t) for t in query[1:])


def test_one_dimensional_context_keeps_the_remainder():
    model = tiny_model()
    tokens = random_tokens(32 * 3 + 5, 7)
    tree = model.compress(tokens, random_tokens(4, 8))
    assert tree.n_chunks == 3
    assert np.array_equal(np.array(tree.remainder), np.array(tokens[96:]))
    same = model.compress(tokens[:96].reshape(3, 32), random_tokens(4, 8))
    np.testing.assert_allclose(np.array(tree.keys[1]), np.array(same.keys[1]), atol=1e-6)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        model.compress(tokens[:20], random_tokens(4, 8))


def test_batching_does_not_change_the_tree():
    context, query = random_tokens((7, 32), 9), random_tokens(6, 10)
    trees = []
    for batch in (1, 3, 16):
        model = tiny_model()
        batched = dataclasses.replace(model.settings, compress_batch=batch)
        trees.append(model.compress(context, query, settings=batched))
    for t in trees[1:]:
        for a, b in zip(trees[0].keys + trees[0].values, t.keys + t.values):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="chunk_len"):
        tiny_model(chunk_len=34)  # 34 -> 17: the second split would be uneven
    with pytest.raises(ValueError, match="policy"):
        tiny_model(policy="left")
    with pytest.raises(ValueError, match="num_injection_layers"):
        tiny_model(num_injection_layers=5)
    model = tiny_model()
    with pytest.raises(ValueError, match="chunk_len"):
        model.compress(random_tokens((2, 10), 0), random_tokens(3, 0))


def test_injection_changes_only_layers_below_m_and_decoding_matches_prefill():
    model = tiny_model()
    tree = model.compress(random_tokens((4, 32), 11), random_tokens(6, 12))
    text = random_tokens((1, 10), 13)
    full = model(text, tree=tree)
    assert full.shape == (1, 10, VOCAB)
    assert np.abs(np.array(full) - np.array(model(text))).max() > 1e-3
    cache = model.make_cache()
    parts = [model(text[:, :4], tree=tree, cache=cache)]
    parts += [model(text[:, i : i + 1], tree=tree, cache=cache) for i in range(4, 10)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=1e-5)
