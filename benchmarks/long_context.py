"""SharedLLM against what a user would otherwise run with mlx-lm, on the same weights.

Systems, measured one after another in one process on one set of random weights:
- sharedllm: ours, end to end (compress, prompt, decode), stacked from one;
- full: mlx-lm's LLaMA over the whole text with its KVCache;
- streaming: mlx-lm's LLaMA with RotatingKVCache(max_size=window, keep=4) (StreamingLLM);
- truncate: the last window only.

    python benchmarks/long_context.py --quick
    python benchmarks/long_context.py --json results.json --plot results.png
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx  # noqa: I001
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.llama import Model, ModelArgs

import mlx_sharedllm  # noqa: F401  (OpenBLAS before mlx, on Linux)
from mlx_sharedllm import SharedLLM, SharedLLMConfig
from mlx_sharedllm.generate import WithTree
from mlx_sharedllm.tree import downsample_index, plan_segments

PROMPT_TOKENS = 64
DECODE_TOKENS = 64
PREFILL_STEP = 2048


@dataclass
class Record:
    system: str
    context_tokens: int
    ttft_s: float | None
    decode_tok_s: float | None
    peak_mem_bytes: int | None
    note: str = ""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--m", type=int, default=4, help="injection layers")
    p.add_argument("--chunk-len", type=int, default=1024)
    p.add_argument("--window", type=int, default=4096, help="the base model's window")
    p.add_argument("--compress-batch", type=int, default=8)
    p.add_argument("--lengths", type=str, default="4096,8192,16384,32768,65536,131072")
    p.add_argument(
        "--full-max",
        type=int,
        default=32768,
        help="longest context for full attention (past it: reported as OOM/skipped)",
    )
    p.add_argument("--quick", action="store_true", help="4K and 16K only")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--plot", type=str, default=None)
    return p.parse_args()


def llama_args(a: argparse.Namespace) -> dict:
    return dict(
        model_type="llama",
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        intermediate_size=a.intermediate,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=a.vocab,
        max_position_embeddings=a.window,
        tie_word_embeddings=False,
    )


def build_models(a: argparse.Namespace) -> tuple[SharedLLM, Model]:
    """A random LLaMA, and SharedLLM stacked from it (injection copied from self-attention)."""
    mx.random.seed(0)
    base = Model(ModelArgs.from_dict(llama_args(a)))
    cfg = SharedLLMConfig(
        upper=llama_args(a),
        lower=None,
        num_injection_layers=a.m,
        chunk_len=a.chunk_len,
        layout="paper",
        compress_batch=a.compress_batch,
        injection="copy",
    )
    ours = SharedLLM(cfg)
    weights = dict(tree_flatten(base.parameters()))
    for i in range(a.m):
        attn = f"model.layers.{i}.self_attn"
        weights[f"model.layers.{i}.cross_attn.layernorm.weight"] = weights[
            f"model.layers.{i}.input_layernorm.weight"
        ]
        weights[f"model.layers.{i}.cross_attn.q_proj.weight"] = weights[f"{attn}.q_proj.weight"]
        weights[f"model.layers.{i}.cross_attn.o_proj.weight"] = weights[f"{attn}.o_proj.weight"]
    ours.load_weights(list(weights.items()))
    mx.eval(base.parameters(), ours.parameters())
    return ours, base


def timed_generation(model, prompt: mx.array, cache: list) -> tuple[float, float]:
    """(time to the first token, decode tokens/s over DECODE_TOKENS) with mlx-lm's loop."""
    tic = time.perf_counter()
    steps = generate_step(
        prompt,
        model,
        max_tokens=DECODE_TOKENS + 1,
        prompt_cache=cache,
        prefill_step_size=PREFILL_STEP,
    )
    next(steps)
    first = time.perf_counter()
    for _ in steps:
        pass
    return first - tic, DECODE_TOKENS / (time.perf_counter() - first)


def run_sharedllm(ours: SharedLLM, ids: mx.array, prompt: mx.array) -> tuple[float, float]:
    tic = time.perf_counter()
    tree = ours.compress(ids, prompt)
    remainder = tree.remainder if tree.remainder is not None else mx.array([], mx.int32)
    running = mx.concatenate([remainder.astype(prompt.dtype), prompt])
    mx.eval([layer.keys for layer in tree.layers])
    compress_s = time.perf_counter() - tic
    ttft, tps = timed_generation(WithTree(ours, tree), running, ours.make_cache())
    return compress_s + ttft, tps


def run_baseline(base: Model, ids: mx.array, cache: list) -> tuple[float, float]:
    return timed_generation(base, ids, cache)


def measure(name: str, tokens: int, fn: Callable[[], tuple[float, float]]) -> Record:
    mx.clear_cache()
    mx.reset_peak_memory()
    try:
        ttft, tps = fn()
    except (MemoryError, RuntimeError) as e:
        return Record(name, tokens, None, None, None, f"OOM: {str(e).splitlines()[0][:60]}")
    return Record(name, tokens, ttft, tps, mx.get_peak_memory())


def matmul_gflops(n: int = 2048, reps: int = 8) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    tic = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n**3 * reps / (time.perf_counter() - tic) / 1e9


def copy_gbs(mbytes: int = 512, reps: int = 5) -> float:
    a = mx.random.normal((mbytes * (1 << 20) // 4,))
    mx.eval(a * 1)
    tic = time.perf_counter()
    for _ in range(reps):
        mx.eval(a * 1)
    return 2 * a.nbytes * reps / (time.perf_counter() - tic) / 1e9


def layer_flops_per_token(a: argparse.Namespace, length: int) -> float:
    """Multiply-adds x 2 of one LLaMA layer per token of a segment of `length` (causal)."""
    d, kv = a.hidden, a.hidden * a.kv_heads // a.heads
    proj = d * d * 2 + d * kv * 2 + 3 * d * a.intermediate
    return 2 * proj + 2 * d * length  # QK^T and PV over half the segment on average


def compress_flops(a: argparse.Namespace, chunks: int) -> float:
    plan = plan_segments(1, a.chunk_len, 3, "paper", lambda node, half: np.ones(1, int))
    select = sum(2 * half * layer_flops_per_token(a, half) for half in plan.lengths[2:])
    encode = sum(a.m * n * layer_flops_per_token(a, n) for n in plan.lengths)
    return chunks * (select + encode)


def decode_bytes(ours: SharedLLM, a: argparse.Namespace, chunks: int, running: int) -> float:
    weights = sum(v.nbytes for _, v in tree_flatten(ours.parameters()))
    plan_lengths = [a.chunk_len // 8] * 2 + [a.chunk_len // 4, a.chunk_len // 2]
    entries = sum(len(downsample_index(n, ours.config.last_p)) for n in plan_lengths)
    kv_dim = a.hidden * a.kv_heads // a.heads
    tree = a.m * 2 * chunks * entries * kv_dim * 4
    kv_cache = a.layers * 2 * running * kv_dim * 4
    return weights + tree + kv_cache


def efficiency(
    ours: SharedLLM,
    a: argparse.Namespace,
    context: mx.array,
    prompt: mx.array,
    record: Record,
    figures: dict,
) -> dict:
    """Compression FLOP/s over the matmul peak; decode bytes/s over the copy bandwidth."""
    chunks = len(context) // a.chunk_len
    tic = time.perf_counter()
    mx.eval([layer.keys for layer in ours.compress(context, prompt).layers])
    compress_s = time.perf_counter() - tic
    running = len(context) % a.chunk_len + PROMPT_TOKENS + DECODE_TOKENS
    per_token = decode_bytes(ours, a, chunks, running)
    return {
        "compress_efficiency": compress_flops(a, chunks)
        / compress_s
        / 1e9
        / figures["matmul_gflops"],
        "decode_efficiency": per_token * (record.decode_tok_s or 0.0) / 1e9 / figures["copy_gbs"],
        "efficiency_at_tokens": len(context) + len(prompt),
    }


def run_length(
    a: argparse.Namespace, ours: SharedLLM, base: Model, ids: mx.array, figures: dict
) -> list[Record]:
    """Every system on one context of len(ids) tokens, the last PROMPT_TOKENS the prompt."""
    n = len(ids)
    prompt, context = ids[-PROMPT_TOKENS:], ids[:-PROMPT_TOKENS]

    def caches(make) -> list:
        return [make() for _ in base.layers]

    rows = [measure("sharedllm", n, lambda: run_sharedllm(ours, context, prompt))]
    if n == figures.get("efficiency_at_tokens"):
        figures.update(efficiency(ours, a, context, prompt, rows[0], figures))
    if n <= a.full_max:
        rows.append(measure("full", n, lambda: run_baseline(base, ids, caches(KVCache))))
    else:
        rows.append(Record("full", n, None, None, None, "skipped: past --full-max"))
    rotating = lambda: RotatingKVCache(max_size=a.window, keep=4)  # noqa: E731
    rows.append(measure("streaming", n, lambda: run_baseline(base, ids, caches(rotating))))
    rows.append(
        measure("truncate", n, lambda: run_baseline(base, ids[-a.window :], caches(KVCache)))
    )
    return rows


def run_all(a: argparse.Namespace) -> tuple[list[Record], dict]:
    ours, base = build_models(a)
    lengths = [4096, 16384] if a.quick else [int(x) for x in a.lengths.split(",")]
    rng = np.random.default_rng(0)
    figures = {
        "matmul_gflops": matmul_gflops(),
        "copy_gbs": copy_gbs(),
        "efficiency_at_tokens": min(max(lengths), 32768),
    }
    records = []
    for n in lengths:
        rows = run_length(a, ours, base, mx.array(rng.integers(0, a.vocab, n), mx.int32), figures)
        for r in rows:
            print(_row(r), flush=True)
        records += rows
    return records, figures


def _row(r: Record) -> str:
    ttft = f"{r.ttft_s:.2f}" if r.ttft_s is not None else "-"
    tps = f"{r.decode_tok_s:.1f}" if r.decode_tok_s is not None else "-"
    mem = f"{r.peak_mem_bytes / 2**30:.2f}" if r.peak_mem_bytes is not None else "-"
    return f"| {r.system} | {r.context_tokens:,} | {ttft} | {tps} | {mem} | {r.note} |"


def table(records: list[Record]) -> str:
    head = (
        "| system | context tokens | TTFT (s) | decode tok/s | peak memory (GiB) | note |\n"
        "|---|---:|---:|---:|---:|---|"
    )
    return "\n".join([head, *(_row(r) for r in records)])


def plot(records: list[Record], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for system in dict.fromkeys(r.system for r in records):
        rows = [r for r in records if r.system == system and r.ttft_s is not None]
        x = [r.context_tokens for r in rows]
        axes[0].plot(x, [r.ttft_s for r in rows], marker="o", label=system)
        axes[1].plot(x, [r.peak_mem_bytes / 2**30 for r in rows], marker="o", label=system)
    for ax, label in zip(axes, ("time to first token (s)", "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    a = parse_args()
    records, figures = run_all(a)
    print()
    print(table(records))
    print()
    print(", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"records": [asdict(r) for r in records], **figures, "shape": vars(a)}, f, indent=1
            )
    if a.plot:
        plot(records, a.plot)


if __name__ == "__main__":
    main()
