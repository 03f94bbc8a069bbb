"""The converter: formats, the weight table's errors, atomic output, dtypes, quantization."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import CASES, FIXTURES, case_knobs, convert_case, run_cli

from mlx_sharedllm import load


def _copy_checkpoint(tmp_path, case="n1_gqa"):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / case / "checkpoint", src)
    return src


def _edit_safetensors(src, edit):
    weights = mx.load(str(src / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(src / "model.safetensors"), weights)


def _convert_fails(src, out, match):
    result = run_cli("convert", str(src), str(out))
    assert result.exit_code != 0
    assert match in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


@pytest.mark.parametrize("case", CASES)
def test_converted_config_and_dropped_layers(converted, case):
    knobs = case_knobs(case)
    config = json.loads((converted[case] / "config.json").read_text())
    assert config["layout"] == "reference"
    assert config["num_injection_layers"] == knobs["M"]
    assert config["lower"]["num_hidden_layers"] == knobs["M"]
    assert config["tree_depth"] == knobs["depth"]
    assert config["policy"] == ("query" if knobs["retrieval"] else "right")
    weights = mx.load(str(converted[case] / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in weights.values())
    assert not any(k.startswith(f"encoder.layers.{knobs['M']}.") for k in weights)
    assert f"model.layers.{knobs['M'] - 1}.cross_attn.q_proj.weight" in weights
    assert f"model.layers.{knobs['M']}.cross_attn.q_proj.weight" not in weights


def test_unknown_key_is_an_error(tmp_path):
    src = _copy_checkpoint(tmp_path)
    _edit_safetensors(src, lambda w: w.update({"model.extra.weight": mx.zeros((3,))}))
    _convert_fails(src, tmp_path / "out", "unknown weight 'model.extra.weight'")


def test_missing_key_is_an_error(tmp_path):
    src = _copy_checkpoint(tmp_path)
    _edit_safetensors(src, lambda w: w.pop("model.layers.1.cross_attn.o_proj.weight"))
    name = "model.layers.1.cross_attn.o_proj.weight"
    _convert_fails(src, tmp_path / "out", f"missing weight '{name}'")


def test_wrong_shape_is_an_error(tmp_path):
    src = _copy_checkpoint(tmp_path)
    _edit_safetensors(src, lambda w: w.update({"encoder.norm.weight": mx.zeros((5,))}))
    _convert_fails(src, tmp_path / "out", "'encoder.norm.weight' has shape (5,)")


def test_positive_injection_count_is_refused(tmp_path):
    src = _copy_checkpoint(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["num_cross_attn_layers"] = 2
    (src / "config.json").write_text(json.dumps(config))
    _convert_fails(src, tmp_path / "out", "num_cross_attn_layers")


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    src = FIXTURES / "n1_gqa" / "checkpoint"
    result = run_cli("convert", str(src), str(out))
    assert result.exit_code != 0 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    convert_case("n1_gqa", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    from mlx_sharedllm.convert import checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_model_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.convert(FIXTURES / "n1_gqa" / "checkpoint", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


# Converts argv[1] to argv[2], pausing with a file in the temporary output folder.
PAUSED_CONVERSION = """
import sys, time
import mlx_sharedllm
from mlx_sharedllm.convert import checkpoint
from mlx_sharedllm.cli.main import cli

def paused_save(folder, model, config):
    (folder / "paused").write_text("")
    time.sleep(120)

checkpoint.save_model_folder = paused_save
cli(["convert", *sys.argv[1:]])
"""


def _paused_conversion(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-c", PAUSED_CONVERSION, str(FIXTURES / "n1_gqa" / "checkpoint")]
    # A shell that starts jobs in the background (nohup ... &) has them ignore SIGINT, and
    # Python then never raises KeyboardInterrupt: give the child the default action.
    proc = subprocess.Popen(
        [*args, str(out)],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*/paused")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, out


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path):
    proc, _ = _paused_conversion(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_killed_conversions_temporary_folder_is_removed_later(tmp_path):
    proc, out = _paused_conversion(tmp_path)
    proc.kill()
    proc.communicate()
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".out.")
    live = tmp_path / f".other.mlx-sharedllm-{os.getpid()}-abcd1234"  # this process's: kept
    live.mkdir()
    convert_case("n1_gqa", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def _prompt_logits(path, case):
    model, _ = load(path)
    io = np.load(FIXTURES / case / "io.npz")
    prompt = mx.array(io["prompt_ids"])
    tree = model.compress(mx.array(io["context_ids"]), prompt)
    return np.array(model(prompt[None], tree=tree)[0].astype(mx.float32)), io


@pytest.mark.parametrize(
    "extra, dtype, bound",
    [
        (("--dtype", "bfloat16"), mx.bfloat16, 0.5),
        (("--dtype", "float16"), mx.float16, 0.1),
        (("--dtype", "float32", "-q", "--q-bits", "4", "--q-group-size", "32"), mx.uint32, 2.0),
        (("--dtype", "float32", "-q", "--q-bits", "8", "--q-group-size", "64"), mx.uint32, 0.5),
    ],
)
def test_low_precision_models_load_and_run(tmp_path, extra, dtype, bound, record_property):
    """bf16/fp16 and quantized models run; the test records how far their logits move."""
    case = "n4_mha"
    out = convert_case(case, tmp_path / "out", *extra)
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == dtype
    logits, io = _prompt_logits(out, case)
    diff = np.abs(logits - io["prompt_logits"])
    print(f"{' '.join(extra)}: logits max diff {diff.max():.4f}, mean {diff.mean():.4f}")
    record_property("logits_max_diff", float(diff.max()))
    assert np.isfinite(logits).all()
    assert diff.max() < bound


def test_bf16_checkpoint_keeps_its_dtype_by_default(tmp_path):
    out = convert_case("n3_bf16_bin", tmp_path / "out")
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].dtype == mx.bfloat16
    logits, io = _prompt_logits(out, "n3_bf16_bin")
    # The fixture's outputs come from the same bf16 weights, computed in float32.
    assert np.abs(logits - io["prompt_logits"]).max() < 0.5


def test_module_entry_point_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_sharedllm", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "convert" in out
