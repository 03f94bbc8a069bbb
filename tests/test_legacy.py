"""Files written by earlier versions still load and give the outputs they gave then:
tests/fixtures/legacy holds a model folder, a saved tree and an adapter written on
2026-12-04 (make_legacy.py says how), whose model has an all-zero injection layer."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close

from mlx_sharedllm import load, load_context
from mlx_sharedllm.adapters import load_adapter
from mlx_sharedllm.plan import plan_for_model_dir

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(LEGACY / "expected.npz")), json.loads(
        (LEGACY / "expected.json").read_text()
    )


def test_a_legacy_model_keeps_its_fingerprint_and_outputs(expected):
    arrays, meta = expected
    model, tokenizer = load(LEGACY / "model")
    assert tokenizer is not None
    assert meta["fingerprint"] in (model.fingerprint(), *getattr(model, "aliases", ()))
    tree = model.compress(mx.array(arrays["context"]), mx.array(arrays["prompt"]))
    logits = model(mx.array(arrays["prompt"][None]), tree=tree)
    assert_close(logits, mx.array(arrays["logits"]), 1e-5, "legacy model")


def test_a_legacy_tree_loads_and_answers_alike(expected):
    arrays, _ = expected
    model, _ = load(LEGACY / "model")
    tree = load_context(LEGACY / "book.tree", model, context=arrays["context"])
    logits = model(mx.array(arrays["prompt"][None]), tree=tree)
    assert_close(logits, mx.array(arrays["logits"]), 1e-5, "legacy tree")


def test_a_legacy_adapter_loads_onto_its_base(expected):
    arrays, _ = expected
    model, _ = load(LEGACY / "model")
    load_adapter(model, LEGACY / "adapter")
    tree = model.compress(mx.array(arrays["context"]), mx.array(arrays["prompt"]))
    logits = model(mx.array(arrays["prompt"][None]), tree=tree)
    assert_close(logits, mx.array(arrays["adapted"]), 1e-5, "legacy adapter")


def test_a_legacy_model_is_planned_with_its_live_injection_layer_only():
    """Layer 0's injection adds nothing: only layer 1 stores a tree."""
    plan = plan_for_model_dir(LEGACY / "model", 32 * 64)
    assert plan.tree_layers == 1 and plan.tree_cache > 0
