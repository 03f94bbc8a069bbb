"""Speed ideas for the default model that were measured and not kept (README, "The
default model's own speed"): each as a ratio against the plain code, in one process.

    python benchmarks/speed_tried.py

- `mx.compile` of a whole compressor block (a batch of 8 x 512 tokens, every lower layer);
- `mx.compile` of each layer's MLP while decoding;
- how long building one compression batch's graph takes, against evaluating it (what
  evaluating asynchronously while the next batch is built could hide).
"""

# ruff: noqa: I001  (mlx_sharedllm first: it preloads OpenBLAS before mlx, on Linux)
from __future__ import annotations

import statistics
import time

import mlx_sharedllm  # noqa: F401,I001  (OpenBLAS before mlx, on Linux)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sharedllm.default import default_model
from mlx_sharedllm.loading import load
from mlx_sharedllm.model import encode_block
from mlx_sharedllm.tree import plan_segments

ROUNDS = 6


def ab(plain, other) -> tuple[float, float, float]:
    """Median seconds of each, interleaved, and plain / other."""
    a, b = [], []
    for _ in range(ROUNDS):
        for fn, times in ((plain, a), (other, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b), statistics.median(a) / statistics.median(b)


def compressor_block(model) -> None:
    layers = model.lower.layers[: model.config.num_injection_layers]
    x = model.lower.embed_tokens(mx.array(np.random.default_rng(0).integers(100, 5000, (8, 512))))
    mx.eval(x)
    compiled = [mx.compile(lambda h, layer=layer: encode_block(layer, h)) for layer in layers]

    def run(blocks) -> None:
        h, out = x, []
        for block in blocks:
            h, k, v = block(h)
            out += [k, v]
        mx.eval(h, out)

    same = all(mx.array_equal(p, q) for p, q in zip(encode_block(layers[0], x), compiled[0](x)))
    plain = [lambda h, layer=layer: encode_block(layer, h) for layer in layers]
    a, b, ratio = ab(lambda: run(plain), lambda: run(compiled))
    print(
        f"compressor block, 8 x 512 tokens: plain {a:.2f} s, compiled {b:.2f} s: "
        f"{ratio:.2f}x (outputs equal: {same})"
    )


def decode_mlp(model) -> None:
    prompt = mx.array([list(range(100, 300))])

    def steps() -> None:
        cache = model.make_cache()
        mx.eval(model(prompt, cache=cache))
        y = mx.array([[5]])
        for _ in range(20):
            y = mx.argmax(model(y, cache=cache)[:, -1], -1)[None]
            mx.eval(y)

    mlps = [layer.mlp for layer in model.layers]

    def fused(mlp):
        return mx.compile(lambda x: mlp.down_proj(nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))

    compiled = [fused(mlp) for mlp in mlps]

    def with_mlps(chosen):
        def run() -> None:
            for layer, mlp in zip(model.layers, chosen):
                layer.mlp = mlp
            steps()
            for layer, mlp in zip(model.layers, mlps):
                layer.mlp = mlp

        return run

    a, b, ratio = ab(with_mlps(mlps), with_mlps(compiled))
    print(f"decode, 20 steps: plain MLPs {a:.2f} s, compiled {b:.2f} s: {ratio:.2f}x")


def batch_graph(model) -> None:
    s = model.settings
    chunks = mx.array(np.random.default_rng(1).integers(100, 5000, (8, model.config.chunk_len)))
    chooser = model._chooser(chunks, mx.array([1, 2, 3]), s)
    plan = plan_segments(8, model.config.chunk_len, s.tree_depth, model.config.layout, chooser)
    start = time.perf_counter()
    out = model._encode_slots(chunks, plan, np.arange(8), s)
    build = time.perf_counter() - start
    start = time.perf_counter()
    mx.eval(out)
    run = time.perf_counter() - start
    print(
        f"one compression batch: graph built in {build * 1e3:.1f} ms, evaluated in "
        f"{run:.2f} s ({build / run:.2%} to overlap)"
    )


def main() -> None:
    model, _ = load(default_model())
    mx.eval(model.parameters())
    compressor_block(model)
    decode_mlp(model)
    batch_graph(model)


if __name__ == "__main__":
    main()
