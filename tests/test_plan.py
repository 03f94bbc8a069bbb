"""The memory planner: exact sizes against what MLX allocates, the peak against a measured
run, the refusal, and `mlx-sharedllm plan`."""

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, run_cli, write_hf_llama
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer
from test_tree import random_tokens, tiny_model

from mlx_sharedllm import load
from mlx_sharedllm.cache import TreeFormat
from mlx_sharedllm.cli.plan_cli import plan_command
from mlx_sharedllm.plan import (
    FLOAT_TREE,
    GiB,
    MemoryBudget,
    PlanSettings,
    kv_cache_bytes,
    make_plan,
    memory_budget,
    plan_for_model_dir,
    plan_for_shape,
    weight_bytes,
    wired_limit,
)
from mlx_sharedllm.plan_render import check_fits, plan_table

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_vs_measured.py"


# head_dim 32: one quantization group
TINY_GQA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=48,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=97,
    rms_norm_eps=1e-6,
)


def load_bench():
    spec = importlib.util.spec_from_file_location("plan_vs_measured", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_llama_2_7b_128k_fits_in_6_gib():
    plan = plan_for_shape("llama-2-7b", 131072, 4, tree_bits=4, kv_bits=4)
    assert plan.n_chunks == 128 and plan.tree_entries == 128 * 128
    assert plan.weights.lower == 0  # stacked from one: the lower model is shared
    # 4 layers x (keys, values) x 32 KV heads x 16384 entries x 72 B: 128 values in 4 bits,
    # and a bfloat16 scale and bias for each of the 2 groups of 64
    assert plan.tree_cache == 4 * 2 * 32 * 16384 * 72
    assert plan.total <= 6 * GiB


def test_weights_are_what_loading_allocates(tmp_path):
    """Lazily built weights equal the stored files and the loaded model, quantized or not."""
    write_hf_llama(tmp_path / "hf", hidden_size=64, intermediate_size=96)
    for name, extra in (("float", []), ("q4", ["-q", "--q-group-size", "32"])):
        out = tmp_path / name
        args = ["convert", str(tmp_path / "hf"), str(out), "--stack-from-one", "2"]
        assert run_cli(*args, "--dtype", "float32", *extra).exit_code == 0
        model, _ = load(out)
        loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        plan = plan_for_model_dir(out, 0)
        assert plan.weights.upper == loaded and plan.weights.lower == 0
        bits = 4 if extra else None
        assert weight_bytes(model.config, bits, "float32", 32).upper == loaded


def test_lower_weights_of_a_released_checkpoint(converted):
    model, _ = load(converted["n1_gqa"])
    lower = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith("encoder."))
    plan = plan_for_model_dir(converted["n1_gqa"], 0)
    assert lower > 0 and plan.weights.lower == lower


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_tree_is_what_compress_allocates(bits):
    model = tiny_model(upper=TINY_GQA, lower=None, last_p=4, chunk_len=32, compress_batch=2)
    fmt = TreeFormat("float32", bits, 32)
    stored = dataclasses.replace(model.settings, tree_format=fmt)
    tree = model.compress(random_tokens(7 * 32 + 5, 1), random_tokens(9, 2), settings=stored)
    weights = weight_bytes(model.config, None, "float32")
    settings = PlanSettings(7 * 32 + 5, "float32", bits, tree_group_size=32)
    plan = make_plan(model.config, model.settings, settings, weights)
    assert plan.tree_entries == tree.num_entries and plan.tree_cache == tree.nbytes


@pytest.mark.parametrize(
    "fmt", [TreeFormat("float16"), TreeFormat("float32", 8, 32), TreeFormat("bfloat16", 4, 32)]
)
def test_the_tree_format_a_model_records_is_planned(fmt):
    """Settings whose tree_format is not the default: the plan's tree is the one compress
    builds with them, as large as that format asked for explicitly; an explicit choice
    still wins over the recorded one."""
    model = tiny_model(upper=TINY_GQA, lower=None, last_p=4, chunk_len=32, compress_batch=2)
    recorded = dataclasses.replace(model.settings, tree_format=fmt)
    tree = model.compress(random_tokens(7 * 32 + 5, 1), random_tokens(9, 2), settings=recorded)
    weights = weight_bytes(model.config, None, "float32")
    plan = make_plan(model.config, recorded, PlanSettings(7 * 32 + 5, "float32"), weights)
    assert plan.tree_format == fmt and plan.tree_cache == tree.nbytes
    explicit = PlanSettings(7 * 32 + 5, fmt.dtype, fmt.bits or FLOAT_TREE, fmt.group_size)
    assert make_plan(model.config, model.settings, explicit, weights).tree_cache == tree.nbytes
    as_float = make_plan(model.config, model.settings, PlanSettings(7 * 32 + 5, "float32"), weights)
    overridden = plan.replan(tree_bits=FLOAT_TREE)
    assert overridden.tree_format == TreeFormat("float32")
    assert overridden.tree_cache == as_float.tree_cache != plan.tree_cache


@pytest.mark.parametrize("tokens", [1, 256, 300])
def test_kv_cache_is_what_mlx_lm_allocates(tokens):
    model = tiny_model()
    cache = model.make_cache()
    model(random_tokens((1, tokens), 3), cache=cache)
    mx.eval([c.state for c in cache])
    allocated = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    assert kv_cache_bytes(model.args, tokens, TreeFormat("float32")) == allocated


def test_planned_peak_is_within_15_percent_of_measured():
    """The benchmark's shape at 4 chunks: compress, generate, and compare the peaks."""
    bench = load_bench()
    tokenizer = load_tokenizer(bench.TOKENIZER)
    record = bench.measure(bench.bench_model(), tokenizer, 4096)
    assert abs(record.error) <= 0.15, bench.table([record])


def test_refusal_has_the_table_and_what_would_fit():
    plan = plan_for_shape("llama-2-7b", 131072, 4)
    budget = MemoryBudget(plan.total - 1, "a test budget")
    refusal = check_fits(plan, budget)
    assert "upper KV cache" in refusal and "a test budget" in refusal
    assert "--tree-bits 4" in refusal and "--force" in refusal
    assert "at most" in refusal  # the longest context that fits
    assert check_fits(plan, MemoryBudget(plan.total, "enough")) is None


def test_smaller_batch_and_fewer_bits_shrink_the_plan():
    plan = plan_for_shape("llama-3-8b", 65536, 4)
    smaller = plan.replan(compress_batch=2)
    assert smaller.encoding_activations * 4 == pytest.approx(plan.encoding_activations, 1e-6)
    assert smaller.selection_activations < plan.selection_activations
    assert plan.replan(tree_bits=4).tree_cache < plan.tree_cache
    assert plan.replan(kv_bits=8).kv_cache < plan.kv_cache


def test_memory_budget_and_wired_limit():
    budget = memory_budget()
    assert budget is None or budget.bytes > 0
    with wired_limit(plan_for_shape("smollm2-135m", 8192)):
        assert float(mx.array(2.0) * 3) == 6.0


def test_plan_command():
    args = ["--shape", "llama-2-7b", "--context-tokens", "131072"]
    bits = ["--weight-bits", "4", "--tree-bits", "4", "--kv-bits", "4"]
    result = CliRunner().invoke(plan_command, args + bits)
    assert result.exit_code == 0, result.output
    for row in ("upper weights", "lower weights", "tree cache", "upper KV cache", "total"):
        assert row in result.output
    assert "fit" in result.output.splitlines()[-1]
    assert CliRunner().invoke(plan_command, ["--context-tokens", "8"]).exit_code != 0


def test_plan_command_on_a_model_folder(converted):
    folder = converted["n2_sharded_bin"]
    result = CliRunner().invoke(plan_command, ["--model", str(folder), "--context-tokens", "640"])
    assert result.exit_code == 0, result.output
    assert "float32" in result.output
    bad = CliRunner().invoke(plan_command, ["--model", str(FIXTURES), "--context-tokens", "1"])
    assert bad.exit_code != 0 and "config.json" in bad.output


def test_corrupt_weights_are_a_value_error(converted, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(converted["n1_gqa"], folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        plan_for_model_dir(folder, 0)


def test_a_model_folder_planned_with_other_weight_bits(converted):
    stored = plan_for_model_dir(converted["n4_mha"], 0)
    assert stored.weights.bits is None and stored.settings.dtype == "float32"
    assert plan_for_model_dir(converted["n4_mha"], 0, weight_bits=32).weights == stored.weights
    with pytest.raises(ValueError, match="weight bits"):
        plan_for_model_dir(converted["n4_mha"], 0, weight_bits=16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_only_injection_layers_store_a_tree(tmp_path, dtype):
    """Copying heads of layer 1 only gives layer 1 alone an injection block: the plan
    counts one tree layer of the two the compressor runs, and compress stores one."""
    write_hf_llama(tmp_path / "hf")
    stack = ("--stack-from-one", "2", "--init", "copy", "--copy-heads", "1.2", "--dtype", dtype)
    assert run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "m"), *stack).exit_code == 0
    plan = plan_for_model_dir(tmp_path / "m", 32 * 1024)
    assert plan.tree_layers == 1 and "tree cache (1 of 2 layers)" in plan_table(plan)
    model, _ = load(tmp_path / "m")
    context = mx.arange(model.config.chunk_len * 4) % 384
    tree = model.compress(context, mx.array([1, 2]))
    assert model.config.injection_layers == (1,)
    assert [layer.capacity for layer in tree.layers] == [tree.num_entries]
    four = plan_for_model_dir(tmp_path / "m", model.config.chunk_len * 4)
    assert four.tree_cache == tree.nbytes
    assert four.replan(compress_batch=1).tree_layers == 1


def test_a_model_folder_is_planned_in_the_tree_format_it_records(tmp_path):
    """A converted folder whose config.json records an 8-bit tree: `plan_for_model_dir`
    and `mlx-sharedllm plan` plan the tree that the loaded model compresses, unless
    --tree-bits says otherwise."""
    write_hf_llama(tmp_path / "hf", hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    stack = ("--stack-from-one", "2", "--dtype", "float32")
    assert run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "m"), *stack).exit_code == 0
    float_plan = plan_for_model_dir(tmp_path / "m", 32 * 1024)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["tree_format"] = {"dtype": "float32", "bits": 8, "group_size": 32}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model, _ = load(tmp_path / "m")
    assert model.settings.tree_format == TreeFormat("float32", 8, 32)
    tree = model.compress(mx.arange(model.config.chunk_len * 4) % 384, mx.array([1, 2]))
    plan = plan_for_model_dir(tmp_path / "m", model.config.chunk_len * 4)
    assert plan.tree_cache == tree.nbytes
    recorded = plan_for_model_dir(tmp_path / "m", 32 * 1024)
    explicit = plan_for_model_dir(tmp_path / "m", 32 * 1024, 8, tree_group_size=32)
    assert recorded.tree_cache == explicit.tree_cache < float_plan.tree_cache
    overridden = plan_for_model_dir(tmp_path / "m", 32 * 1024, FLOAT_TREE)
    assert overridden.tree_cache == float_plan.tree_cache
    args = ["--model", str(tmp_path / "m"), "--context-tokens", str(32 * 1024)]
    shown = CliRunner().invoke(plan_command, args)
    assert shown.exit_code == 0, shown.output
    assert "tree 8-bit" in shown.output
    floated = CliRunner().invoke(plan_command, [*args, "--tree-bits", "float"])
    assert "tree float32" in floated.output
