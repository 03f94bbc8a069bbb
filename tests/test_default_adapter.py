"""The adapter that ships for the default model: complete, tagged, and made for its tree."""

import json

import mlx.core as mx

from mlx_sharedllm.adapters import ADAPTER_JSON, ADAPTER_WEIGHTS
from mlx_sharedllm.default import (
    ADAPTER,
    DEFAULT_HEADS,
    DEFAULT_M,
    DEFAULT_TREE,
    adapter_tag,
    adapter_version,
)

HIDDEN = 576  # SmolLM2-135M


def test_shipped_adapter_covers_the_retrieval_heads_layers():
    meta = json.loads((ADAPTER / ADAPTER_JSON).read_text())
    layers = meta["injection_layers"]
    assert layers == sorted({layer for layer, _ in DEFAULT_HEADS})
    assert all(layer < DEFAULT_M for layer in layers)
    weights = mx.load(str(ADAPTER / ADAPTER_WEIGHTS))
    expected = {}
    for i in layers:
        layer = f"model.layers.{i}.cross_attn"
        expected[f"{layer}.layernorm.weight"] = (HIDDEN,)
        expected[f"{layer}.q_proj.weight"] = (HIDDEN, HIDDEN)
        expected[f"{layer}.o_proj.weight"] = (HIDDEN, HIDDEN)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert all(mx.all(mx.isfinite(v)).item() for v in weights.values())
    # Trained: every head's output projection has moved off the init, where all but the
    # copied heads were zero.
    width = HIDDEN // 9
    for i in layers:
        o_proj = weights[f"model.layers.{i}.cross_attn.o_proj.weight"]
        for head in range(9):
            assert mx.abs(o_proj[:, head * width : (head + 1) * width]).max().item() > 0


def test_shipped_adapter_is_tagged_and_matches_the_default_tree():
    meta = json.loads((ADAPTER / ADAPTER_JSON).read_text())
    tag = adapter_tag((ADAPTER / ADAPTER_WEIGHTS).read_bytes(), meta)
    assert adapter_version() == meta["version"] == tag
    tree = {k: meta["tree"][k] for k in DEFAULT_TREE}
    assert tree == DEFAULT_TREE and meta["tree"]["num_injection_layers"] == DEFAULT_M
