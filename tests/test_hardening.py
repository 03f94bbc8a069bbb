"""Every input surface refuses what would crash, hang or silently mislead: saved trees,
adapters, configs, the CLI's numbers and the planner's token counts (issue 17)."""

import json
import re
import shutil
import time

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SPM_TOKENIZER, run_cli, write_hf_llama

from mlx_sharedllm import ContextTree, load, load_context
from mlx_sharedllm.adapters import (
    ADAPTER_JSON,
    ADAPTER_WEIGHTS,
    load_adapter,
    save_adapter,
    set_trainable,
)
from mlx_sharedllm.cli.main import cli
from mlx_sharedllm.config import SharedLLMConfig
from mlx_sharedllm.plan import PlanSettings, generation_bytes, plan_for_shape, shape_config
from mlx_sharedllm.settings import read_config
from mlx_sharedllm.tree import UNCHECKED_FORMAT, checksum, token_hash

CHUNK = 32
VOCAB = 384  # conftest's TINY_LLAMA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaMA stacked into SharedLLM (chunks of 32, injection copied, so trees
    hold entries), with a tokenizer."""
    root = tmp_path_factory.mktemp("hardening")
    write_hf_llama(root / "base")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_TOKENIZER / name, root / "base" / name)
    args = ["--stack-from-one", "2", "--init", "copy", "--chunk-len", str(CHUNK)]
    assert run_cli("convert", str(root / "base"), str(root / "model"), *args).exit_code == 0
    return root / "model"


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)[0]


@pytest.fixture(scope="module")
def context_ids():
    return np.random.default_rng(0).integers(0, VOCAB, 3 * CHUNK + 5).astype(np.int32)


@pytest.fixture
def saved(model, context_ids, tmp_path):
    path = tmp_path / "t.tree"
    model.compress(mx.array(context_ids), mx.array([1, 2, 3])).save(path)
    return path


def one_line_error(result, text: str) -> None:
    """A failed command whose output has one error line, no traceback, saying `text`."""
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and text in errors[0], result.output


# -- saved trees -------------------------------------------------------------------------


def rewrite(path, change) -> None:
    """Apply change(arrays, header) to a saved tree and save it with the checksum that
    matches, as whoever edits a file on purpose can."""
    arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    mx.eval(arrays)  # read before the file is rewritten
    header = json.loads(metadata["tree"])
    change(arrays, header)
    header["checksum"] = checksum(arrays)
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata={**metadata, "tree": json.dumps(header)})


def set_id(name: str, value: int):
    def change(arrays, header):
        ids = np.array(arrays[name]).astype(np.int64)
        ids.reshape(-1)[0] = value
        arrays[name] = mx.array(ids)
        if name == "tokens":  # keep the context hash consistent, to reach the id check
            header["meta"]["context_sha256"] = token_hash(arrays[name])

    return change


@pytest.mark.parametrize("name", ["remainder", "tokens"])
@pytest.mark.parametrize("value", [10**9, 100_000, VOCAB, -1])
def test_token_ids_outside_the_vocabulary_are_refused(model, saved, name, value):
    rewrite(saved, set_id(name, value))
    with pytest.raises(ValueError, match=f"{name} holds token id {value}, outside"):
        load_context(saved, model)


def test_a_tree_read_without_the_model_is_checked_when_the_model_reads_it(model, saved):
    """ContextTree.load knows no vocabulary; the model refuses the tree's ids before its
    embedding would read past the table (a segfault)."""
    rewrite(saved, set_id("remainder", 10**9))
    tree = ContextTree.load(saved)
    with pytest.raises(ValueError, match="remainder holds token id 1000000000"):
        model(mx.array([[1, 2]]), tree=tree)


def test_prompt_ids_outside_the_vocabulary_are_refused(model):
    with pytest.raises(ValueError, match="the input holds token id 100000"):
        model(mx.array([[1, 100_000]]))
    with pytest.raises(ValueError, match="the context holds token id -4"):
        model.compress(mx.array([-4] * CHUNK), mx.array([1]))


def test_a_flipped_byte_is_refused(saved):
    data = bytearray(saved.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + header_len])["keys.0.0"]
    data[8 + header_len + entry["data_offsets"][0] + 5] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match their checksum"):
        ContextTree.load(saved)


def _resize_keys(entries: int):
    def change(arrays, header):
        keys = arrays["keys.0.0"]
        arrays["keys.0.0"] = mx.zeros((*keys.shape[:2], entries, keys.shape[3]), keys.dtype)

    return change


def _poison(value: float):
    def change(arrays, header):
        values = np.array(arrays["values.1.0"])
        values[0, 0, 3, 1] = value
        arrays["values.1.0"] = mx.array(values)

    return change


def _double_chunks(arrays, header):
    header["n_chunks"] *= 2
    header["shapes"] = [[a, b, 2 * c, d] for a, b, c, d in header["shapes"]]


def _halve_entries(arrays, header):
    """The same number of entries, counted as twice the chunks of half the entries."""
    header["n_chunks"] *= 2
    header["entries_per_chunk"] //= 2


def _set(key: str, value):
    return lambda arrays, header: header.__setitem__(key, value)


BAD_TREES = {
    "keys smaller than the header says": _resize_keys(5),
    "keys larger than the header says": _resize_keys(500),
    "n_chunks doubled with the shapes": _double_chunks,
    "n_chunks doubled, entries per chunk halved": _halve_entries,
    "query position absurd": _set("query_position", 10**12),
    "query position negative": _set("query_position", -1),
    "n_chunks a string": _set("n_chunks", "3"),
    "meta a list": _set("meta", []),
    "format a list": _set("format", ["float32"]),
    "NaN values": _poison(float("nan")),
    "inf values": _poison(float("inf")),
    "an extra array": lambda arrays, header: arrays.__setitem__("extra", mx.zeros(3)),
    "a missing array": lambda arrays, header: arrays.pop("values.1.0"),
    "tokens of another shape": lambda arrays, header: arrays.__setitem__(
        "tokens", arrays["tokens"][:2]
    ),
    "a remainder of a whole chunk": lambda arrays, header: arrays.__setitem__(
        "remainder", mx.zeros(CHUNK, mx.int32)
    ),
    "float remainder": lambda arrays, header: arrays.__setitem__(
        "remainder", arrays["remainder"].astype(mx.float32)
    ),
}


@pytest.mark.parametrize("change", BAD_TREES.values(), ids=BAD_TREES.keys())
def test_a_tree_that_disagrees_with_its_header_is_refused(model, saved, change):
    rewrite(saved, change)
    with pytest.raises(ValueError, match="not a readable context tree") as error:
        load_context(saved, model)
    assert "\n" not in str(error.value)


def test_trees_saved_before_checksums_still_load(model, saved):
    arrays, metadata = mx.load(str(saved), format="safetensors", return_metadata=True)
    mx.eval(arrays)  # read before the file is rewritten
    header = json.loads(metadata["tree"])
    del header["checksum"]
    with open(saved, "wb") as f:
        mx.save_safetensors(
            f, arrays, metadata={"format": UNCHECKED_FORMAT, "tree": json.dumps(header)}
        )
    assert load_context(saved, model).n_chunks == 3


def test_the_context_is_checked_against_the_trees_hash(model, saved, context_ids):
    assert load_context(saved, model, context=context_ids).n_chunks == 3
    other = context_ids.copy()
    other[7] = (other[7] + 1) % VOCAB
    for wrong in (other, context_ids[:-1], np.concatenate([context_ids[:-1], [0]])):
        with pytest.raises(ValueError, match="compressed from another context"):
            load_context(saved, model, context=wrong)


def test_generate_refuses_a_bad_tree_in_one_line(model_dir, saved):
    rewrite(saved, set_id("remainder", 10**9))
    result = CliRunner().invoke(
        cli, ["generate", "--model", str(model_dir), "--prompt", "Hi", "--context", str(saved)]
    )
    one_line_error(result, "remainder holds token id 1000000000")


# -- adapters ----------------------------------------------------------------------------


@pytest.fixture
def adapter(model_dir, tmp_path):
    model = load(model_dir)[0]
    set_trainable(model, ("injection",))
    save_adapter(tmp_path / "adapter", model, model.fingerprint())
    return tmp_path / "adapter"


def edit_adapter(folder, weights=None, **meta_changes) -> None:
    meta = json.loads((folder / ADAPTER_JSON).read_text())
    meta.update(meta_changes)
    if weights is not None:
        saved = mx.load(str(folder / ADAPTER_WEIGHTS))
        saved = weights(saved)
        mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), saved)
        meta["parameters"] = {name: list(w.shape) for name, w in saved.items()}
    (folder / ADAPTER_JSON).write_text(json.dumps(meta))


def _with(name: str, value):
    return lambda weights: {**weights, name: value}


Q = "model.layers.0.cross_attn.q_proj.weight"
BAD_WEIGHTS = {
    "a lower-model weight": (
        _with("model.layers.0.self_attn.q_proj.weight", mx.zeros((32, 32))),
        "not a parameter that training writes",
    ),
    "the embedding": (
        _with("model.embed_tokens.weight", mx.zeros((VOCAB, 32))),
        "not a parameter that training writes",
    ),
    "NaN": (_with(Q, mx.full((32, 32), float("nan"))), "inf or NaN"),
    "inf": (_with(Q, mx.full((32, 32), float("inf"))), "inf or NaN"),
    "an integer weight": (_with(Q, mx.zeros((32, 32), mx.int32)), "int32"),
    "a name the model lacks": (_with("model.nothing", mx.zeros(3)), "no parameter"),
}


@pytest.mark.parametrize("weights, message", BAD_WEIGHTS.values(), ids=BAD_WEIGHTS.keys())
def test_adapter_weights_training_cannot_write_are_refused(model, adapter, weights, message):
    edit_adapter(adapter, weights)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, adapter)


def test_adapter_weights_must_be_the_listed_ones(model, adapter):
    meta = json.loads((adapter / ADAPTER_JSON).read_text())
    listed = dict(meta["parameters"])
    listed["model.layers.1.cross_attn.extra"] = [3]
    edit_adapter(adapter, parameters=listed)
    with pytest.raises(ValueError, match="lack listed parameters"):
        load_adapter(model, adapter)
    del listed["model.layers.1.cross_attn.extra"], listed[Q]
    edit_adapter(adapter, parameters=listed)
    with pytest.raises(ValueError, match="does not list"):
        load_adapter(model, adapter)


def test_an_adapter_json_list_is_one_line(model, adapter):
    (adapter / ADAPTER_JSON).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold an object, not a list"):
        load_adapter(model, adapter)


@pytest.mark.parametrize(
    "setting, value", [("log_scale_entries", 1), ("select_chunks", -3), ("reread_tokens", "9")]
)
def test_fuse_refuses_bad_settings_before_writing(model_dir, adapter, tmp_path, setting, value):
    edit_adapter(adapter, **{setting: value})
    out = tmp_path / "fused"
    result = CliRunner().invoke(cli, ["fuse", str(adapter), str(out), "--model", str(model_dir)])
    one_line_error(result, setting)
    assert not out.exists() and not list(tmp_path.glob("fused*"))


# -- configs and the CLI's numbers --------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-tokens", "-5"),
        ("--max-tokens", "0"),
        ("--max-tokens", str(10**18)),
        ("--temp", "nan"),
        ("--temp", "-1"),
        ("--temp", "inf"),
        ("--top-p", "5"),
        ("--top-p", "nan"),
        ("--top-k", "-3"),
        ("--min-p", "-0.1"),
        ("--min-p", "1.5"),
        ("--repetition-penalty", "0"),
        ("--repetition-penalty", "-2"),
        ("--repetition-penalty", "inf"),
        ("--repetition-penalty", "nan"),
        ("--seed", "-1"),
    ],
)
def test_generate_refuses_numbers_out_of_range(tmp_path, option, value):
    args = ["generate", "--model", str(tmp_path / "none"), "--prompt", "Hi", option, value]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output


@pytest.mark.parametrize(
    "option, value",
    [
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--lr", "-1e-4"),
        ("--min-lr", "inf"),
        ("--weight-decay", "-0.1"),
        ("--clip-norm", "nan"),
        ("--clip-norm", "0"),
    ],
)
def test_train_refuses_numbers_out_of_range(tmp_path, option, value):
    args = ["train", "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "out")]
    args += [option, value]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "out").exists()


def tiny_config(**changes) -> dict:
    llama = {"hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 48}
    llama |= {"num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 97}
    return {"upper": llama, "lower": None, "num_injection_layers": 2, "chunk_len": 32, **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"last_p": -0.5}, "last_p"),
        ({"last_p": float("nan")}, "last_p"),
        ({"chunk_len": 2**62}, "chunk_len must be in 2..1048576"),
        ({"tree_depth": 10**12}, "tree_depth must be in 1..6"),
        ({"tree_depth": "3"}, "tree_depth must be an integer"),
        ({"chunk_len": 32.0}, "chunk_len must be an integer"),
        ({"log_scale_entries": True}, "log_scale_entries must be 0 (off) or at least 2"),
        ({"select_chunks": "2"}, "select_chunks"),
        ({"quantization": [4]}, "quantization must be an object"),
        ({"upper": [1]}, "upper must be an object"),
        ({"upper": {"hidden_size": 32}}, "upper lacks"),
        ({"upper": {**tiny_config()["upper"], "vocab_size": "97"}}, "upper.vocab_size"),
        ({"upper": {**tiny_config()["upper"], "rms_norm_eps": -1}}, "upper.rms_norm_eps"),
        (
            {"upper": {**tiny_config()["upper"], "num_hidden_layers": 10**12}},
            "upper.num_hidden_layers must be in 1..16777216",
        ),
    ],
)
def test_bad_configs_are_refused(changes, message):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(message)):
        read_config(tiny_config(**changes))
    assert time.perf_counter() - start < 1


def test_configs_lacking_fields_or_not_objects_are_refused():
    with pytest.raises(ValueError, match="the config lacks upper, num_injection_layers"):
        SharedLLMConfig.from_dict({"lower": None})
    with pytest.raises(ValueError, match="must be an object, got list"):
        SharedLLMConfig.from_dict([1])


BAD_CONFIGS = {
    "no upper": (lambda c: c.pop("upper"), "the config lacks upper"),
    "chunk_len a string": (lambda c: c.update(chunk_len="abc"), "chunk_len must be an integer"),
    "upper a list": (lambda c: c.update(upper=[1]), "upper must be an object"),
    "hidden_size a string": (
        lambda c: c["upper"].update(hidden_size="x"),
        "upper.hidden_size must be an integer",
    ),
    "quantization a list": (lambda c: c.update(quantization=[4]), "quantization must be"),
    "tree_depth huge": (lambda c: c.update(tree_depth=10**12), "tree_depth must be in"),
}


@pytest.mark.parametrize("change, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
@pytest.mark.parametrize("command", ["plan", "generate"])
def test_bad_config_files_are_one_line(model_dir, tmp_path, command, change, message):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    args = {"plan": ["--context-tokens", "100"], "generate": ["--prompt", "Hi"]}[command]
    result = CliRunner().invoke(cli, [command, "--model", str(folder), *args])
    one_line_error(result, message)


# -- the planner ---------------------------------------------------------------------------


def test_the_planners_cost_does_not_grow_with_token_counts():
    start = time.perf_counter()
    plan = plan_for_shape("llama-2-7b", 10**15, running_tokens=10**20)
    config = shape_config("llama-2-7b")
    assert generation_bytes(config, PlanSettings(0), 10**20, 1024) > 0
    assert plan.n_chunks == 10**15 // 1024 and plan.total > 10**20
    assert time.perf_counter() - start < 2
    with pytest.raises(ValueError, match="running_tokens must be >= 1"):
        PlanSettings(0, running_tokens=0)


@pytest.mark.parametrize("option", ["--running-tokens", "--context-tokens"])
def test_plan_command_takes_huge_token_counts(option):
    args = ["plan", "--shape", "llama-2-7b", "--context-tokens", "4096", option, str(10**15)]
    start = time.perf_counter()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < 5
    too_many = CliRunner().invoke(cli, args[:-1] + [str(10**30)])
    assert too_many.exit_code == 2 and f"Invalid value for '{option}'" in too_many.output


def test_generate_with_a_huge_max_tokens_is_planned_not_listed(model_dir):
    start = time.perf_counter()
    result = CliRunner().invoke(
        cli, ["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-tokens", str(10**15)]
    )
    assert result.exit_code == 1 and "does NOT fit" in result.output, result.output
    assert time.perf_counter() - start < 10
