"""SharedLLM against what a user would otherwise run with mlx-lm, on the same weights.

Systems, measured one after another in one process on one set of random weights:
- sharedllm: ours, end to end (compress, prompt, decode), stacked from one;
- full: mlx-lm's LLaMA over the whole text with its KVCache and mlx-lm's prefill steps;
- streaming: mlx-lm's LLaMA with RotatingKVCache(max_size=window, keep=4) (StreamingLLM);
- truncate: the last window only.

The default shape keeps the proportions of the default model, SmolLM2-135M (GQA 3:1 is
replaced by 2:1, head_dim 64, MLP 2.67x hidden, vocabulary 49152, chunk_len 1024, depth 3,
last_p 32) with a smaller width and depth: 6 layers, hidden 128, 2 heads, 1 KV head, M = 1
(SmolLM2: 30 layers; the paper's M = 4). On a CPU the full-attention baseline costs about
(layers - 1) x heads x 18 s at 32K tokens (MLX's CPU softmax runs about 30 ns per score),
and streaming costs as much again over 64K and 128K, so this is the largest shape whose
whole default run finishes in about 15 minutes on 2 CPU cores.

    python benchmarks/long_context.py --quick
    python benchmarks/long_context.py --json results.json --plot results.png
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx_sharedllm  # noqa: F401  (first: on Linux it preloads OpenBLAS before mlx loads)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.llama import Model, ModelArgs

from mlx_sharedllm import SharedLLM, SharedLLMConfig
from mlx_sharedllm.generate import WithTree
from mlx_sharedllm.settings import Settings
from mlx_sharedllm.tree import ContextTree, plan_segments

PROMPT_TOKENS = 64
DECODE_TOKENS = 64
PREFILL_STEP = 2048  # mlx-lm's default prefill step


@dataclass
class Record:
    system: str
    context_tokens: int
    ttft_s: float | None
    decode_tok_s: float | None
    peak_mem_bytes: int | None
    note: str = ""


@dataclass
class SharedRun:
    """What the sharedllm run leaves for the efficiency figures."""

    compress_s: float = 0.0
    tree: ContextTree | None = None
    running_tokens: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--m", type=int, default=1, help="injection layers")
    p.add_argument("--chunk-len", type=int, default=1024)
    p.add_argument("--window", type=int, default=4096, help="the base model's window")
    p.add_argument("--compress-batch", type=int, default=8)
    p.add_argument("--lengths", type=str, default="4096,8192,16384,32768,65536,131072")
    p.add_argument(
        "--full-max",
        type=int,
        default=32768,
        help="longest context for full attention; past it, full is reported as skipped\n"
        "(its prefill grows with the square of the length: 4x the 32K time at 64K)",
    )
    p.add_argument("--quick", action="store_true", help="4K and 16K only")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--plot", type=str, default=None)
    return p.parse_args(argv)


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
        injection="copy",
    )
    ours = SharedLLM(cfg, Settings(compress_batch=a.compress_batch))
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


def run_sharedllm(
    ours: SharedLLM, context: mx.array, prompt: mx.array, run: SharedRun
) -> tuple[float, float]:
    """Compress, then prompt and decode through mlx-lm's loop; fills `run`."""
    tic = time.perf_counter()
    tree = ours.compress(context, prompt)
    mx.eval([(layer.keys, layer.values) for layer in tree.layers])
    run.compress_s = time.perf_counter() - tic
    remainder = tree.remainder if tree.remainder is not None else mx.array([], mx.int32)
    running = mx.concatenate([remainder.astype(prompt.dtype), prompt])
    run.tree, run.running_tokens = tree, running.size
    ttft, tps = timed_generation(WithTree(ours, tree), running, ours.make_cache())
    return run.compress_s + ttft, tps


def measure(name: str, tokens: int, fn: Callable[[], tuple[float, float]]) -> Record:
    mx.clear_cache()
    mx.reset_peak_memory()
    try:
        ttft, tps = fn()
    except (MemoryError, RuntimeError) as e:
        return Record(name, tokens, None, None, None, f"OOM: {str(e).splitlines()[0][:60]}")
    return Record(name, tokens, ttft, tps, mx.get_peak_memory())


def matmul_gflops(n: int = 2048, reps: int = 8) -> float:
    """Float32 matmul peak: the best of `reps` n x n products."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def copy_gbs(mbytes: int = 256, reps: int = 5) -> float:
    """Memory copy bandwidth, bytes read plus written per second: the best of `reps` memcpys.

    numpy's copy is a plain memcpy; MLX's CPU elementwise ops run far below it here.
    """
    src = np.random.default_rng(0).random(mbytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        tic = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - tic)
    return 2 * src.nbytes / best / 1e9


def layer_flops(a: argparse.Namespace, tokens: int, queries: int, keys: int) -> float:
    """FLOPs of one LLaMA layer computing K/V for `tokens` and the rest for `queries` rows,
    which attend over `keys` (query, key) pairs in all."""
    hd = a.hidden // a.heads
    q_dim, kv_dim = a.heads * hd, a.kv_heads * hd
    kv_proj = 2 * a.hidden * kv_dim * tokens
    rest = (a.hidden * q_dim * 2 + 3 * a.hidden * a.intermediate) * queries
    attention = 2 * q_dim * keys  # q.k and p.v, per pair and query head
    return 2 * (kv_proj + rest + attention)


def compress_flops(a: argparse.Namespace, ours: SharedLLM, chunks: int) -> float:
    """FLOPs the compressor computes per context, as model.compress runs it.

    Selection: per level above the leaves, layer 0 on both halves, K/V for every token but
    the query, output and MLP for the last token only. Encodes: the M layers on every planned
    segment, attention over the causal half (MLX's kernel also scores the masked half;
    that work is not counted).
    """
    cfg, depth = ours.config, ours.settings.tree_depth
    plan = plan_segments(1, cfg.chunk_len, depth, "paper", lambda n, h: np.ones(1, int))
    halves = [cfg.chunk_len >> (d + 1) for d in range(depth - 1)]
    select = sum(2 * layer_flops(a, half, 1, half) for half in halves)
    if ours.settings.policy != "query":
        select = 0
    encode = sum(
        cfg.num_injection_layers * layer_flops(a, n, n, n * (n + 1) // 2) for n in plan.lengths
    )
    return chunks * (select + encode)


def decode_bytes(ours: SharedLLM, tree: ContextTree, running: int) -> float:
    """Bytes one decode step reads: every weight but the embedding table (one row of it),
    the whole tree, and the upper KV cache at its average length over the decode."""
    params = dict(tree_flatten(ours.parameters()))
    embed = params["model.embed_tokens.weight"]
    weights = sum(v.nbytes for v in params.values()) - embed.nbytes + embed[0].nbytes
    args = ours.args
    kv_dim = args.num_key_value_heads * (
        args.head_dim or args.hidden_size // args.num_attention_heads
    )
    kv_cache = args.num_hidden_layers * 2 * (running + DECODE_TOKENS / 2) * kv_dim * 4
    return weights + tree.nbytes + kv_cache


def efficiency(
    a: argparse.Namespace, ours: SharedLLM, run: SharedRun, record: Record, figures: dict
) -> dict:
    """Compression FLOP/s over the matmul peak; decode bytes/s over the copy bandwidth."""
    tree = run.tree
    flops = compress_flops(a, ours, tree.n_chunks)
    per_token = decode_bytes(ours, tree, run.running_tokens)
    return {
        "compress_gflops": flops / run.compress_s / 1e9,
        "compress_efficiency": flops / run.compress_s / 1e9 / figures["matmul_gflops"],
        "decode_gbs": per_token * record.decode_tok_s / 1e9,
        "decode_efficiency": per_token * record.decode_tok_s / 1e9 / figures["copy_gbs"],
    }


def run_length(
    a: argparse.Namespace, ours: SharedLLM, base: Model, ids: mx.array, figures: dict
) -> list[Record]:
    """Every system on one context of len(ids) tokens, the last PROMPT_TOKENS the prompt."""
    n = len(ids)
    prompt, context = ids[-PROMPT_TOKENS:], ids[:-PROMPT_TOKENS]

    def caches(make) -> list:
        return [make() for _ in base.layers]

    run = SharedRun()
    rows = [measure("sharedllm", n, lambda: run_sharedllm(ours, context, prompt, run))]
    if n == figures["efficiency_at_tokens"] and rows[0].ttft_s is not None:
        figures.update(efficiency(a, ours, run, rows[0], figures))
    run.tree = None
    if n <= a.full_max:
        rows.append(measure("full", n, lambda: timed_generation(base, ids, caches(KVCache))))
    else:
        note = f"skipped: past --full-max {a.full_max} (quadratic prefill)"
        rows.append(Record("full", n, None, None, None, note))
    rotating = lambda: RotatingKVCache(max_size=a.window, keep=4)  # noqa: E731
    rows.append(measure("streaming", n, lambda: timed_generation(base, ids, caches(rotating))))
    rows.append(
        measure("truncate", n, lambda: timed_generation(base, ids[-a.window :], caches(KVCache)))
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


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
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
