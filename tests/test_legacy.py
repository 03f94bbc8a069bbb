"""Files written by earlier versions still load and give the outputs they gave then:
tests/fixtures/legacy holds a model folder, a saved tree and an adapter written on
2026-12-04 (make_legacy.py says how), whose model has an all-zero injection layer."""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close

from mlx_sharedllm import load, load_context
from mlx_sharedllm.adapters import load_adapter
from mlx_sharedllm.generate import stream_generate
from mlx_sharedllm.plan import plan_for_model_dir
from mlx_sharedllm.settings import Settings

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def _outputs(folder: Path) -> tuple[dict, dict]:
    """The arrays and facts that make_*.py recorded beside the files in `folder`."""
    return dict(np.load(folder / "expected.npz")), json.loads(
        (folder / "expected.json").read_text()
    )


@pytest.fixture(scope="module")
def expected():
    return _outputs(LEGACY)


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


# -- settings in config.json, trees and adapters, before the settings object -----------

SETTINGS = Path(__file__).parent / "fixtures" / "settings"


@pytest.fixture(scope="module")
def settings_expected():
    return _outputs(SETTINGS)


def test_a_folders_settings_are_read_from_its_config(settings_expected):
    """last_p 0.25 is a fraction kept per node; the folder's fingerprint is unchanged."""
    arrays, meta = settings_expected
    model, _ = load(SETTINGS / "model")
    assert model.settings == Settings(tree_depth=2, keep_fraction=0.25, compress_batch=2)
    assert model.settings.keep_tokens is None
    assert model.fingerprint() == meta["fingerprint"]
    tree = model.compress(mx.array(arrays["context"]), mx.array(arrays["prompt"]))
    logits = model(mx.array(arrays["prompt"][None]), tree=tree)
    assert_close(logits, mx.array(arrays["logits"]), 1e-5, "settings model")


def test_a_tree_saved_before_settings_loads_and_answers_alike(settings_expected):
    arrays, _ = settings_expected
    model, _ = load(SETTINGS / "model")
    tree = load_context(SETTINGS / "book.tree", model, context=arrays["context"])
    assert tree.meta["config"] == model.tree_dict()
    logits = model(mx.array(arrays["prompt"][None]), tree=tree)
    assert_close(logits, mx.array(arrays["logits"]), 1e-5, "settings tree")
    with pytest.raises(ValueError, match="other tree settings"):
        other = dataclasses.replace(model.settings, tree_depth=1)
        load_context(SETTINGS / "book.tree", model, settings=other)


def test_an_adapter_carries_its_settings_onto_the_model(settings_expected):
    arrays, _ = settings_expected
    model, _ = load(SETTINGS / "model")
    config = model.config
    load_adapter(model, SETTINGS / "adapter")
    assert model.config is config and model.injection == "trained"
    expected = dict(log_scale_entries=16, chunks_per_question=2, reread_tokens=128)
    assert model.settings == Settings(
        tree_depth=2, keep_fraction=0.25, compress_batch=2, **expected
    )
    tree = model.compress(mx.array(arrays["context"]), mx.array(arrays["prompt"]))
    logits = model(mx.array(arrays["prompt"][None]), tree=tree)
    assert_close(logits, mx.array(arrays["adapted"]), 1e-5, "settings adapter")


def test_a_fused_folder_answers_as_before(settings_expected):
    """The fused folder's config.json holds the adapter's settings: the same fingerprint,
    the same greedy answers with re-reading (the default) and from the tree alone."""
    arrays, meta = settings_expected
    model, tokenizer = load(SETTINGS / "fused")
    assert model.fingerprint() == meta["fused_fingerprint"]
    assert (model.settings.chunks_per_question, model.settings.reread_tokens) == (2, 128)
    reread = list(stream_generate(model, tokenizer, "Who?", arrays["context"], max_tokens=6))
    assert [r.token for r in reread] == meta["reread_answer"]
    assert reread[-1].reread_tokens == meta["reread_tokens"]
    tree_only = dataclasses.replace(model.settings, reread_tokens=0)
    context = arrays["context"]
    answer = list(
        stream_generate(model, tokenizer, "Who?", context, max_tokens=6, settings=tree_only)
    )
    assert [r.token for r in answer] == meta["tree_answer"]
    assert answer[-1].chunks_read == meta["chunks_read"]


def test_a_written_config_reads_back_as_the_files_did(tmp_path):
    """config.json stays flat, under the keys it always had."""
    model, _ = load(SETTINGS / "fused")
    written = model.config_dict()
    on_disk = json.loads((SETTINGS / "fused" / "config.json").read_text())
    assert written == {k: v for k, v in on_disk.items() if k in written}
    assert set(on_disk) - set(written) <= {"injection_layers"}
