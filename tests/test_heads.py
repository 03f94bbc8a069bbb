"""Finding retrieval heads (heads.py) and `convert --copy-heads auto`."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import SPM_TOKENIZER, assert_close, run_cli, write_hf_llama
from mlx_lm.models.base import create_attention_mask

from mlx_sharedllm import load
from mlx_sharedllm.heads import (
    STANDOUT,
    HeadScore,
    attention_weights,
    best_heads,
    copied_from,
    find_heads,
    heads_spec,
    make_probe,
    score_heads,
)

M = 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny plain LLaMA with a tokenizer (4 heads, 2 KV heads, 3 layers)."""
    root = tmp_path_factory.mktemp("heads")
    write_hf_llama(root / "base", seed=3)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_TOKENIZER / name, root / "base" / name)
    return root / "base"


def convert(base, out, *extra):
    args = ("convert", str(base), str(out), "--stack-from-one", str(M), "--chunk-len", "32")
    return run_cli(*args, *extra)


@pytest.fixture(scope="module")
def model(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero") / "m"
    assert convert(base, out).exit_code == 0
    return load(out)


def test_attention_weights_are_the_layers_own(model):
    """The weights, applied to the values, give the layer's self-attention output."""
    model, _ = model
    layer = model.layers[1]
    rng = np.random.default_rng(0)
    h = mx.array(rng.normal(size=(1, 40, model.args.hidden_size)).astype(np.float32))
    rows = mx.array([0, 17, 39])
    weights = attention_weights(layer, h, rows)
    attn, x = layer.self_attn, layer.input_layernorm(h)
    v = attn.v_proj(x).reshape(1, 40, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = mx.repeat(v, attn.n_heads // attn.n_kv_heads, axis=1)[0]
    mixed = (weights @ v).transpose(1, 0, 2).reshape(3, -1)
    expected = attn(x, create_attention_mask(h, None))[0, rows]
    assert_close(attn.o_proj(mixed), expected, 1e-5, "attention weights x values")
    assert_close(weights.sum(axis=-1), mx.ones((attn.n_heads, 3)), 1e-6, "rows sum to 1")
    assert mx.all(weights[:, 0, 1:] == 0).item()  # causal: row 0 sees only token 0


def test_copied_from_aligns_answer_tokens_with_the_value():
    assert copied_from(np.array([5, 4, 4, 8]), np.array([4, 4, 8])).tolist() == [1, 2, 3]
    # A token the value lacks: the position the same share of the way through.
    assert copied_from(np.array([7, 1, 2, 3]), np.array([9, 2, 3])).tolist() == [0, 2, 3]


def test_probe_targets_are_the_planted_number(model):
    _, tokenizer = model
    probe = make_probe(tokenizer, 60, 0.5, np.random.default_rng(1))
    assert len(probe.rows) == len(probe.targets) and probe.rows[-1] == len(probe.tokens) - 2
    answer = probe.tokens[probe.rows + 1]
    planted = tokenizer.decode(probe.tokens[probe.targets].tolist()).replace(" ", "")
    assert planted.isdigit() and planted in tokenizer.decode(answer.tolist())
    assert probe.targets.max() < probe.rows[0]


def test_scores_are_attention_shares_of_the_layers_asked(model):
    model, tokenizer = model
    scores = score_heads(model, tokenizer, M, probes=3, length=60)
    assert scores.shape == (M, model.args.num_attention_heads)
    assert np.all((scores >= 0) & (scores <= 1)) and scores.max() > 0
    again = score_heads(model, tokenizer, M, probes=3, length=60)
    np.testing.assert_array_equal(scores, again)  # deterministic for a seed


def test_find_heads_best_first_and_standout(model):
    model, tokenizer = model
    top = find_heads(model, tokenizer, M, top=3, probes=2, length=60)
    assert len(top) == 3 and len({(h.layer, h.head) for h in top}) == 3
    assert all(h.layer < M for h in top)
    assert [h.score for h in top] == sorted((h.score for h in top), reverse=True)
    standout = find_heads(model, tokenizer, M, probes=2, length=60)
    assert standout[0] == top[0]
    assert all(h.score >= STANDOUT * standout[0].score for h in standout)


def test_best_heads_and_spec():
    scores = np.array([[0.1, 0.7], [0.4, 0.2]])
    heads = best_heads(scores, 2)
    assert heads == [HeadScore(0, 1, 0.7), HeadScore(1, 0, 0.4)]
    assert heads_spec(heads) == "0.1,1.0"
    with pytest.raises(ValueError, match="top must be 1 to 4"):
        best_heads(scores, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"layers": 4}, "layers must be 1 to 3"), ({"layers": 2, "probes": 0}, "probes")],
)
def test_bad_probe_settings(model, kwargs, message):
    model, tokenizer = model
    with pytest.raises(ValueError, match=message):
        find_heads(model, tokenizer, **kwargs)


def test_convert_copy_heads_auto_keeps_only_the_found_heads(base, model, tmp_path):
    result = convert(base, tmp_path / "auto", "--init", "copy", "--copy-heads", "auto:2")
    assert result.exit_code == 0, result.output
    expected = find_heads(*model, M, top=2, length=128)
    assert f"copying heads {expected[0]} ({expected[0].score:.2f})" in result.output
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert saved["injection"] == "copy"
    weights = mx.load(str(tmp_path / "auto" / "model.safetensors"))
    width = saved["upper"]["hidden_size"] // saved["upper"]["num_attention_heads"]
    kept = set()
    for layer in range(M):
        o = np.array(weights[f"model.layers.{layer}.cross_attn.o_proj.weight"])
        for head in range(saved["upper"]["num_attention_heads"]):
            if np.abs(o[:, head * width : (head + 1) * width]).max() > 0:
                kept.add((layer, head))
    assert kept == {(h.layer, h.head) for h in expected}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--copy-heads", "auto"), "needs init 'copy'"),
        (("--init", "copy", "--copy-heads", "auto:0"), "needs a count of 1 or more"),
        (("--init", "copy", "--copy-heads", "auto:x"), "needs a count of 1 or more"),
        (("--init", "copy", "--copy-heads", "automatic"), "or 'auto' or 'auto:4'"),
    ],
)
def test_bad_copy_heads_auto(base, tmp_path, args, message):
    result = convert(base, tmp_path / "bad", *args)
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "bad").exists()


def test_copy_heads_auto_needs_a_tokenizer(tmp_path):
    write_hf_llama(tmp_path / "plain")
    result = convert(tmp_path / "plain", tmp_path / "out", "--init", "copy", "--copy-heads", "auto")
    assert result.exit_code == 1 and "has no tokenizer" in result.output
