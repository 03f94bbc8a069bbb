import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mlx_sharedllm  # noqa: F401  (preloads OpenBLAS before mlx is imported)
from mlx_sharedllm.cli.main import cli

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").exists())


def assert_close(actual, expected, atol: float, name: str = "") -> float:
    """Assert max |actual - expected| <= atol; print the max and mean differences."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual - expected)
    print(f"{name}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}")
    assert diff.max() <= atol, f"{name}: max diff {diff.max():.3g} > {atol}"
    return float(diff.max())


def run_cli(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def convert_case(case: str, out: Path, *extra: str) -> Path:
    result = run_cli("convert", str(FIXTURES / case / "checkpoint"), str(out), *extra)
    assert result.exit_code == 0, result.output
    return out


def case_knobs(case: str) -> dict:
    return json.loads((FIXTURES / case / "case.json").read_text())["knobs"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Each fixture case converted once with --dtype float32."""
    root = tmp_path_factory.mktemp("converted")
    return {case: convert_case(case, root / case, "--dtype", "float32") for case in CASES}


SPM_TOKENIZER = Path(__file__).parent / "fixtures" / "spm_tokenizer"
TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=3,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=384,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def write_hf_llama(folder: Path, seed: int = 0, **overrides) -> tuple[dict, dict]:
    """A tiny random LLaMA in Hugging Face layout (config.json + model.safetensors)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    config = {**TINY_LLAMA, **overrides}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    # Norm weights away from 1, so a mis-mapped norm shows.
    for name in weights:
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.2 * mx.random.normal(weights[name].shape)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return config, weights
