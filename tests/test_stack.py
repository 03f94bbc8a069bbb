"""Stacking a plain LLaMA from one; Hub repos; the real SmolLM2 default."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close, run_cli, write_hf_llama
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

from mlx_sharedllm import load, load_context
from mlx_sharedllm.assets import DEFAULT_GGUF, fetch
from mlx_sharedllm.convert.gguf import read_gguf
from mlx_sharedllm.model import SharedLLM
from mlx_sharedllm.settings import STACKED_REREAD_TOKENS


def base_logits(config, weights, ids):
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(dict(weights)).items()))
    return model(mx.array([ids]))


def convert_stacked(src, out, m=2, init="zero", *extra):
    result = run_cli(
        "convert",
        str(src),
        str(out),
        "--stack-from-one",
        str(m),
        "--init",
        init,
        "--chunk-len",
        "32",
        "--last-p",
        "4",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def hf_llama(tmp_path):
    config, weights = write_hf_llama(tmp_path / "base")
    return tmp_path / "base", config, weights


def test_stacked_config_shares_the_bottom_layers(hf_llama, tmp_path):
    src, config, _ = hf_llama
    out = convert_stacked(src, tmp_path / "out", 2)
    saved = json.loads((out / "config.json").read_text())
    assert saved["lower"] is None and saved["layout"] == "paper"
    assert saved["num_injection_layers"] == 2 and saved["injection"] == "zero"
    weights = mx.load(str(out / "model.safetensors"))
    assert not any(k.startswith("encoder.") for k in weights)  # stored once
    assert mx.all(weights["model.layers.1.cross_attn.o_proj.weight"] == 0).item()


def test_a_stacked_model_rereads_unless_told_otherwise(hf_llama, tmp_path):
    src, _, _ = hf_llama
    saved = json.loads((convert_stacked(src, tmp_path / "a", 2) / "config.json").read_text())
    assert saved["reread_tokens"] == STACKED_REREAD_TOKENS
    model, _ = load(tmp_path / "a")
    assert model.settings.reread_tokens == STACKED_REREAD_TOKENS
    off = convert_stacked(src, tmp_path / "b", 2, "zero", "--reread-tokens", "0")
    assert json.loads((off / "config.json").read_text())["reread_tokens"] == 0
    result = run_cli("convert", str(src), str(tmp_path / "c"), "--stack-from-one", "2",
                     "--reread-tokens", "64")  # fmt: skip
    assert result.exit_code != 0 and "at least one passage (128)" in result.output
    assert not (tmp_path / "c").exists()


def test_zero_init_is_exactly_the_base_model(hf_llama, tmp_path):
    src, config, weights = hf_llama
    model, _ = load(convert_stacked(src, tmp_path / "out", 2))
    rng = np.random.default_rng(0)
    context, prompt = rng.integers(0, 384, 32 * 5), rng.integers(0, 384, 12).tolist()
    tree = model.compress(mx.array(context), mx.array(prompt))
    assert tree.n_chunks == 5
    expected = base_logits(config, weights, prompt)
    assert_close(model(mx.array([prompt]), tree=tree), expected, 1e-4, "zero init vs base")


def test_copy_init_reads_the_tree(hf_llama, tmp_path):
    src, config, weights = hf_llama
    model, _ = load(convert_stacked(src, tmp_path / "out", 2, "copy"))
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 384, 10).tolist()
    tree = model.compress(mx.array(rng.integers(0, 384, 64)), mx.array(prompt))
    expected = base_logits(config, weights, prompt)
    assert_close(model(mx.array([prompt])), expected, 1e-4, "copy init without a tree")
    moved = np.abs(np.array(model(mx.array([prompt]), tree=tree)) - np.array(expected)).max()
    assert moved > 1e-2


def test_copy_heads_copies_only_the_named_heads(hf_llama, tmp_path):
    src, config, weights = hf_llama
    out = convert_stacked(src, tmp_path / "out", 2, "copy", "--copy-heads", "1.2,0.0,1.3")
    saved = mx.load(str(out / "model.safetensors"))
    width = config["hidden_size"] // config["num_attention_heads"]
    for layer, heads in ((0, {0}), (1, {2, 3})):
        o_proj = np.array(weights[f"model.layers.{layer}.self_attn.o_proj.weight"])
        copied = np.array(saved[f"model.layers.{layer}.cross_attn.o_proj.weight"])
        for head in range(config["num_attention_heads"]):
            cols = slice(head * width, (head + 1) * width)
            expected = o_proj[:, cols] if head in heads else 0 * o_proj[:, cols]
            np.testing.assert_array_equal(copied[:, cols], expected)
    q_proj = saved["model.layers.1.cross_attn.q_proj.weight"]
    assert mx.array_equal(q_proj, weights["model.layers.1.self_attn.q_proj.weight"])


def test_named_heads_give_only_their_layers_an_injection(hf_llama, tmp_path):
    """Heads of layer 1 only: layer 0 gets no injection block and stores no tree, and
    the model computes what it did with layer 0's injection output all zeros."""
    src, _, _ = hf_llama
    out = convert_stacked(src, tmp_path / "out", 2, "copy", "--copy-heads", "1.2")
    model, _ = load(out)
    assert model.config.injection_layers == (1,)
    assert not hasattr(model.layers[0], "cross_attn") and hasattr(model.layers[1], "cross_attn")
    assert not any(".0.cross_attn." in k for k in mx.load(str(out / "model.safetensors")))
    rng = np.random.default_rng(2)
    prompt = mx.array([rng.integers(0, 384, 9).tolist()])
    context = mx.array(rng.integers(0, 384, 96))
    tree = model.compress(context, prompt[0])
    assert [layer.capacity for layer in tree.layers] == [tree.num_entries]
    path = tmp_path / "tree.safetensors"
    tree.save(path)
    assert_close(model(prompt, tree=load_context(path, model)), model(prompt, tree=tree), 1e-6)
    both = SharedLLM(dataclasses.replace(model.config, injection_layers=(0, 1)), model.settings)
    weights = dict(tree_flatten(model.parameters()))
    for name, value in tree_flatten(both.layers[0].cross_attn.parameters()):
        weights[f"model.layers.0.cross_attn.{name}"] = mx.zeros_like(value)
    both.load_weights(list(weights.items()))
    expected = both(prompt, tree=both.compress(context, prompt[0]))
    assert_close(model(prompt, tree=tree), expected, 1e-5, "no block vs a zero block")


@pytest.mark.parametrize(
    "args, message",
    [
        (("zero", "--copy-heads", "0.1"), "needs init 'copy'"),
        (("copy", "--copy-heads", "2.1"), "not below the 2 injection layers"),
        (("copy", "--copy-heads", "1.4"), "layer 1 has 4 heads, not head 4"),
        (("copy", "--copy-heads", "1-2"), "must look like '17.3,18.6'"),
    ],
)
def test_bad_copy_heads_are_one_line_errors(hf_llama, tmp_path, args, message):
    init, *extra = args
    stack = ("--stack-from-one", "2", "--init", init)
    result = run_cli("convert", str(hf_llama[0]), str(tmp_path / "o"), *stack, *extra)
    assert result.exit_code != 0 and message in result.output, result.output


def test_plain_llama_needs_stack_from_one(hf_llama, tmp_path):
    result = run_cli("convert", str(hf_llama[0]), str(tmp_path / "out"))
    assert result.exit_code != 0 and "--stack-from-one" in result.output


def test_unknown_model_is_one_line(tmp_path):
    result = run_cli("convert", "no/such-model-here", str(tmp_path / "out"))
    assert result.exit_code != 0 and "unknown model 'no/such-model-here'" in result.output
    assert "Traceback" not in result.output


def _hub_cache(root, repo, folder):
    """Lay `folder` out as huggingface_hub's cache holds a downloaded snapshot."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / revision)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)


def test_hub_repo_from_an_offline_cache(hf_llama, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE are honoured: the repo comes from the cache, no network."""
    _hub_cache(tmp_path / "hf", "tiny-org/tiny-llama", hf_llama[0])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mlx_sharedllm", "convert"]
    args = ["--stack-from-one", "1", "--chunk-len", "32"]
    done = subprocess.run(
        [*cmd, "tiny-org/tiny-llama", str(tmp_path / "out"), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    missing = subprocess.run(
        [*cmd, "tiny-org/absent", str(tmp_path / "out2"), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0
    assert "unknown model 'tiny-org/absent'" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_smollm2_stacked_from_one_gguf(tmp_path):
    """The default's source: zero init equals plain SmolLM2, and it knows Paris."""
    gguf = fetch(DEFAULT_GGUF)
    result = run_cli(
        "convert", str(gguf), str(tmp_path / "out"), "--stack-from-one", "4", "--chunk-len", "64"
    )
    assert result.exit_code == 0, result.output
    model, tokenizer = load(tmp_path / "out")
    config, weights = read_gguf(gguf)
    ids = tokenizer.encode("The capital of France is")
    context = mx.array(np.random.default_rng(0).integers(0, 49152, 64 * 3))
    tree = model.compress(context, mx.array(ids))
    expected = base_logits(config, weights, ids)
    assert_close(model(mx.array([ids]), tree=tree), expected, 1e-4, "SmolLM2 zero init")
    new = []
    for _ in range(3):
        logits = model(mx.array([ids + new]), tree=tree)
        new.append(mx.argmax(logits[0, -1]).item())
    assert tokenizer.decode(new).startswith(" Paris"), tokenizer.decode(new)
