"""The memory planner against the measured peak, on a scaled-down SharedLLM on this machine.

The shape (random weights, float32, stacked from one): hidden 256, 6 layers, 4 heads
and 4 KV heads of 64, MLP 704, vocabulary 384 (the tests' SentencePiece tokenizer);
M = 4, chunks of 1024, depth 3, last_p 32 (128 tree entries per chunk), compress batch 2.
At 8K tokens the encoder's activations (45 MiB) are most of the peak above the weights
(21 MiB); at 128K the float32 tree (128 MiB) is, so both the activation model and the
exact sizes are checked. --prompt-tokens 2000 makes the generation phase the peak.

For each length, in one process: mx.reset_peak_memory(), then stream_generate
compresses the context (query-aware policy) and generates a few tokens, and
mx.get_peak_memory() is read. The weights are resident before the reset; the plan's
total counts them too, as does the measured peak (MLX's peak is of all live memory).

    python benchmarks/plan_vs_measured.py                  # 8K, 16K, 32K, 64K and 128K
    python benchmarks/plan_vs_measured.py --lengths 8192 --json results.json

With --json, lengths already in the file (same settings) are not run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer

import mlx_sharedllm  # noqa: F401, I001  (OpenBLAS before mlx, on Linux)
from mlx_sharedllm import SharedLLM, SharedLLMConfig
from mlx_sharedllm.cache import TreeFormat
from mlx_sharedllm.generate import stream_generate
from mlx_sharedllm.plan import MemoryPlan, PlanSettings, make_plan, weight_bytes
from mlx_sharedllm.settings import Settings

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "spm_tokenizer"
LENGTHS = (8192, 16384, 32768, 65536, 131072)
SHAPE = dict(
    model_type="llama",
    hidden_size=256,
    num_hidden_layers=6,
    intermediate_size=704,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=384,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
TREE = dict(num_injection_layers=4, chunk_len=1024)
SETTINGS = Settings(tree_depth=3, keep_tokens=32, compress_batch=2)
TOLERANCE = 0.15


@dataclass
class Record:
    context_tokens: int
    tree_bits: int | None
    kv_bits: int | None
    prompt_tokens: int
    max_tokens: int
    planned: int
    measured: int
    weights: int
    peak_phase: str
    seconds: float

    @property
    def error(self) -> float:
        return (self.planned - self.measured) / self.measured

    @property
    def settings(self) -> tuple:
        return (self.tree_bits, self.kv_bits, self.prompt_tokens, self.max_tokens)


def bench_config() -> SharedLLMConfig:
    return SharedLLMConfig(upper=SHAPE, lower=None, **TREE)


def bench_model(seed: int = 0) -> SharedLLM:
    mx.random.seed(seed)
    model = SharedLLM(bench_config(), SETTINGS)
    mx.eval(model.parameters())
    return model


def plan_run(
    context_tokens: int, tree_bits: int | None, kv_bits: int | None, running_tokens: int
) -> MemoryPlan:
    config = bench_config()
    settings = PlanSettings(
        context_tokens, "float32", tree_bits, kv_bits=kv_bits, running_tokens=running_tokens
    )
    weights = weight_bytes(config, None, "float32")
    return make_plan(config, SETTINGS, settings, weights, "bench")


def measure(
    model: SharedLLM,
    tokenizer,
    context_tokens: int,
    tree_bits: int | None = None,
    kv_bits: int | None = None,
    prompt_tokens: int = 32,
    max_tokens: int = 4,
) -> Record:
    """Compress `context_tokens` random tokens and generate; the planned and measured peaks."""
    rng = np.random.default_rng(context_tokens)
    vocab = model.args.vocab_size
    context = rng.integers(3, vocab, context_tokens).astype(np.int32)
    prompt = rng.integers(3, vocab, prompt_tokens).tolist()
    running = context_tokens % model.config.chunk_len + prompt_tokens + max_tokens
    plan = plan_run(context_tokens, tree_bits, kv_bits, running)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    # Arrays that other work in this process still holds are not this run's.
    held_before = max(0, mx.get_active_memory() - weights)
    tic = time.perf_counter()
    responses = stream_generate(
        model,
        tokenizer,
        prompt,
        context,
        max_tokens=max_tokens,
        settings=dataclasses.replace(SETTINGS, tree_format=TreeFormat("float32", tree_bits)),
        kv_bits=kv_bits,
    )
    for _ in responses:
        pass
    seconds = time.perf_counter() - tic
    return Record(
        context_tokens,
        tree_bits,
        kv_bits,
        prompt_tokens,
        max_tokens,
        plan.total,
        mx.get_peak_memory() - held_before,
        weights,
        plan.peak_phase,
        seconds,
    )


def table(records: list[Record]) -> str:
    mib = 1 << 20
    lines = [
        f"{'context':>8} {'tree':>5} {'kv':>5} {'plan MiB':>9} {'measured MiB':>13} "
        f"{'error':>7}  {'peak phase':<11} {'seconds':>8}"
    ]
    for r in records:
        lines.append(
            f"{r.context_tokens:>8,} {_bits(r.tree_bits):>5} {_bits(r.kv_bits):>5} "
            f"{r.planned / mib:>9.1f} {r.measured / mib:>13.1f} {r.error:>+7.1%}  "
            f"{r.peak_phase:<11} {r.seconds:>8.1f}"
        )
    return "\n".join(lines)


def _bits(bits: int | None) -> str:
    return "f32" if bits is None else str(bits)


def _load(path: Path | None) -> list[Record]:
    if path is None or not path.exists():
        return []
    return [Record(**r) for r in json.loads(path.read_text())["records"]]


def _save(path: Path | None, records: list[Record]) -> None:
    if path is not None:
        data = {"shape": SHAPE, "tree": TREE, "records": [asdict(r) for r in records]}
        path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="context tokens")
    p.add_argument("--tree-bits", type=int, choices=(4, 8), default=None)
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--json", type=Path, default=None, help="results file (resumes from it)")
    a = p.parse_args()
    records = _load(a.json)
    settings = (a.tree_bits, a.kv_bits, a.prompt_tokens, a.max_tokens)
    done = {r.context_tokens for r in records if r.settings == settings}
    model, tokenizer = bench_model(), load_tokenizer(TOKENIZER)
    for length in (int(n) for n in a.lengths.split(",")):
        if length in done:
            continue
        records.append(measure(model, tokenizer, length, *settings))
        _save(a.json, records)
        print(table(records[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    ours = [r for r in records if r.settings == settings]
    print(table(sorted(ours, key=lambda r: r.context_tokens)))
    worst = max(abs(r.error) for r in ours)
    print(f"worst error {worst:.1%} (tolerance {TOLERANCE:.0%})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
