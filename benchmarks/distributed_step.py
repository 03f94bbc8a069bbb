"""Step time of data-parallel training, and the time of its gradient all-reduce.

A scaled-down SharedLLM (random weights, float32): hidden 256, 6 layers, 4 heads of 64,
MLP 704, vocabulary 384, M = 4 injection layers (the injection trains: 4 x 0.33M
weights), chunks of 256, depth 2; each example compresses 4 chunks and reads 128 tokens.
A step is a global batch of 8 examples, split over the processes.

    python benchmarks/distributed_step.py                                   # 1 process
    mlx.launch -n 2 --backend ring --python "$(which python)" benchmarks/distributed_step.py

Rank 0 prints one JSON line: the processes, the median step time (after a first step
that is not counted), and the median time of one all-reduce of the injection's
gradients (all processes start it together, so it is the communication alone).
"""

# ruff: noqa: I001  (mlx_sharedllm first: it loads OpenBLAS before mlx, on Linux)
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import mlx_sharedllm  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_sharedllm import SharedLLM, SharedLLMConfig
from mlx_sharedllm.adapters import set_trainable
from mlx_sharedllm.distributed import launched
from mlx_sharedllm.settings import Settings
from mlx_sharedllm.train import TrainConfig, train
from mlx_sharedllm.train_data import Example

LLAMA = dict(
    hidden_size=256,
    num_hidden_layers=6,
    intermediate_size=704,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    vocab_size=384,
    tie_word_embeddings=False,
)
CHUNK, CHUNKS, WINDOW, BATCH = 256, 4, 128, 8


class Random:
    """Language-modelling examples of random tokens."""

    split_sigma = 0.2

    def examples(self, epoch: int):
        rng = np.random.default_rng(epoch)
        while True:
            context = rng.integers(0, 384, (CHUNKS, CHUNK)).astype(np.int32)
            text = rng.integers(0, 384, WINDOW + 1).astype(np.int32)
            mask = np.ones(WINDOW, np.float32)
            yield Example(context, text[:-1], text[:-1], text[1:], mask)


def model() -> SharedLLM:
    config = SharedLLMConfig(upper=LLAMA, lower=None, num_injection_layers=4, chunk_len=CHUNK)
    mx.random.seed(0)
    shared = SharedLLM(config, Settings(tree_depth=2, keep_tokens=32))
    mx.eval(shared.parameters())
    return shared


def allreduce_seconds(world, shared: SharedLLM, repeats: int) -> float:
    """The median time of averaging a gradient the size of what trains."""
    set_trainable(shared, ("injection",), None)
    grads = {k: mx.ones_like(v) for k, v in tree_flatten(shared.trainable_parameters())}
    times = []
    for _ in range(repeats):
        world.sum([0.0], "lining up")
        start = time.perf_counter()
        mx.eval(world.average_gradients(grads))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    world = launched()
    shared = model()
    stamps: list[float] = []
    config = TrainConfig(
        steps=args.steps, grad_accum=BATCH // world.size, warmup=0, eval_every=1000
    )
    with tempfile.TemporaryDirectory() as out:
        train(
            shared, Random(), out, config, progress=False, world=world,
            callback=lambda info: stamps.append(time.perf_counter()),
        )  # fmt: skip
    steps = np.diff(stamps)  # the first step (compilation, warm-up) is not counted
    comm = allreduce_seconds(world, shared, 20)
    trainable = sum(v.size for _, v in tree_flatten(shared.trainable_parameters()))
    if world.main:
        result = {
            "processes": world.size,
            "global_batch": BATCH,
            "step_s": round(float(np.median(steps)), 3),
            "allreduce_s": round(comm, 5),
            "gradient_mb": round(trainable * 4 / 2**20, 2),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
