"""The compressor's block-causal self-attention computes what the plain causal block does."""

import mlx_sharedllm  # noqa: F401

# isort: split
import mlx.core as mx
import pytest
from mlx_lm.models import llama

from mlx_sharedllm.model import causal_attention, encode_block

ARGS = llama.ModelArgs(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=1,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=32,
)


@pytest.mark.parametrize("length", [1, 7, 64, 130])
@pytest.mark.parametrize("blocks", [1, 3, 4])
def test_causal_attention_matches_causal_sdpa(length: int, blocks: int) -> None:
    mx.random.seed(0)
    q = mx.random.normal((2, 4, length, 16))
    k, v = mx.random.normal((2, 2, length, 16)), mx.random.normal((2, 2, length, 16))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    got = causal_attention(q, k, v, 0.25, blocks)
    assert got.shape == want.shape
    assert mx.allclose(got, want, atol=1e-5).item()


class Capture:
    offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


def test_encode_block_matches_the_layer() -> None:
    mx.random.seed(1)
    layer = llama.TransformerBlock(ARGS)
    x = mx.random.normal((3, 40, ARGS.hidden_size))
    capture = Capture()
    want = layer(x, mask="causal", cache=capture)
    got, keys, values = encode_block(layer, x)
    assert mx.allclose(got, want, atol=1e-5).item()
    assert mx.allclose(keys, capture.keys, atol=1e-6).item()
    assert mx.allclose(values, capture.values, atol=1e-6).item()
