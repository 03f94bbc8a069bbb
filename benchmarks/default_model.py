"""The default model's own speed at 8K-128K tokens of real text, against this machine's limits.

Per context length it answers one question about a real text (the demo book, Botchan,
then Paradise Lost and lcet10 where one book is too short) through `stream_generate`,
and reports the time to the first token split into tokenize, compress, select/re-read
and prefill; compress, prefill and decode tokens/s; and the peak memory. In the same
run it measures the float32 matmul peak and the copy bandwidth, and gives:
- compress efficiency: the compressor's FLOPs (19 lower layers, counted as
  long_context.py counts them) per second over the matmul peak;
- decode efficiency: the bytes one decode step reads (the weights it uses, the tree at
  the injection layers that run, the upper KV cache) per second over the copy bandwidth;
- TTFT over compress-at-peak: the time to the first token over what compression alone
  would cost at the matmul peak;
- the planner's memory estimate against the measured peak;
- the tied lm_head matrix-vector product as MLX runs it against a transposed copy.

    python benchmarks/default_model.py --quick
    python benchmarks/default_model.py   # 8K, 32K, 64K and 128K: about 8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, TextIO

import mlx_sharedllm  # noqa: F401  (first: on Linux it preloads OpenBLAS before mlx loads)

# isort: split
import mlx.core as mx
import suite_data
from long_context import compress_flops, copy_gbs, matmul_gflops
from mlx.utils import tree_flatten

import mlx_sharedllm.model as model_module
from mlx_sharedllm import SharedLLM
from mlx_sharedllm.assets import demo_book
from mlx_sharedllm.config import head_dim
from mlx_sharedllm.default import default_model
from mlx_sharedllm.generate import encode_prompt, generate, stream_generate
from mlx_sharedllm.loading import load
from mlx_sharedllm.plan import plan_for_model_dir

RESULTS = Path(__file__).parent / "results"
PROMPT = "Tell the story of this text in detail, from its beginning to its end."
QUESTION = "What is the name of the old servant who loves the narrator?"
MORE_TEXTS = ("paradise-lost", "lcet10")
STAGES = ("tokenize", "compress", "select", "prefill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=str, default="8192,32768,65536,131072")
    p.add_argument("--quick", action="store_true", help="8K only")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out", type=str, default=None, help="default: results/default_model[_quick]")
    return p.parse_args(argv)


class Log:
    """Prints lines and appends them to a log file as they come."""

    def __init__(self, path: Path):
        self.file: TextIO = path.open("w")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def corpus() -> str:
    """The demo book, then other pinned texts, joined by blank lines."""
    books = [demo_book(progress=False).read_text()]
    books += [suite_data.load_text(name) for name in MORE_TEXTS]
    return "\n\n".join(books)


def text_of(tokenizer: Any, text: str, tokens: int) -> str:
    """The start of `text` that holds about `tokens` tokens (cut at a token boundary)."""
    enc = tokenizer._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= tokens:
        raise ValueError(f"the corpus holds {len(offsets)} tokens, fewer than {tokens}")
    return text[: offsets[tokens][0]]


def run_length(model: SharedLLM, tokenizer: Any, text: str, decode_tokens: int) -> dict:
    """Answer PROMPT about `text` once; the stage times, throughputs and peak memory."""
    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "compress" and done == 0:
            marks["compress_start"] = time.perf_counter()
        if stage == "compress" and done == total:
            marks["compress_end"] = time.perf_counter()

    mx.clear_cache()
    mx.reset_peak_memory()
    tic, cpu = time.perf_counter(), time.process_time()
    responses = stream_generate(
        model, tokenizer, PROMPT, text, max_tokens=decode_tokens, progress=progress
    )
    first = next(responses)
    ttft = time.perf_counter() - tic
    last, answer = first, first.text
    for last in responses:
        answer += last.text
    prefill = first.prompt_tokens / first.prompt_tps
    stages = {
        "tokenize": marks["compress_start"] - tic,
        "compress": marks["compress_end"] - marks["compress_start"],
    }
    stages["select"] = ttft - stages["tokenize"] - stages["compress"] - prefill
    stages["prefill"] = prefill
    return {
        "context_tokens": first.context_tokens,
        "chunks": first.chunks,
        "tree_entries": first.tree_entries,
        "running_tokens": first.prompt_tokens,
        "generated_tokens": last.generation_tokens,
        "ttft_s": ttft,
        "stages_s": stages,
        "compress_tok_s": first.context_tokens / stages["compress"],
        "prefill_tok_s": first.prompt_tps,
        "decode_tok_s": last.generation_tps,
        "peak_memory_bytes": mx.get_peak_memory(),
        # Below os.cpu_count() when other processes shared the cores.
        "cpu_per_wall": (time.process_time() - cpu) / (time.perf_counter() - tic),
        "load_avg_1m": os.getloadavg()[0],
        "answer": answer,
    }


def compressor_shape(model: SharedLLM) -> Namespace:
    """The lower model's shape, as long_context.compress_flops reads it."""
    args = model.config.lower or model.config.upper
    return Namespace(
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        intermediate=args.intermediate_size,
    )


def weight_bytes_read(model: SharedLLM) -> int:
    """Bytes of the weights one decode step reads: all of them (the tied embedding is
    read whole, as the output head)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def decode_bytes(model: SharedLLM, record: dict, decode_tokens: int) -> dict[str, float]:
    """Bytes one decode step reads: weights, the tree at the injection layers that run
    (none when the answer re-reads passages: the tree is then dropped), and the upper KV
    cache at its average length over the decode."""
    args, lower = model.args, model.config.lower or model.config.upper
    itemsize = 4 if model.compute_dtype == "float32" else 2
    kv_entry = lower.num_key_value_heads * head_dim(lower) * itemsize
    reads_tree = not model.settings.reread_tokens
    tree = reads_tree * len(model.config.injection_layers) * 2 * record["tree_entries"] * kv_entry
    kv_len = record["running_tokens"] + decode_tokens / 2
    kv_cache = args.num_hidden_layers * 2 * kv_len * kv_entry
    return {"weights": weight_bytes_read(model), "tree": tree, "kv_cache": kv_cache}


def efficiencies(model: SharedLLM, record: dict, figures: dict, decode_tokens: int) -> dict:
    """Compression FLOP/s over the matmul peak; decode bytes/s over the copy bandwidth."""
    flops = compress_flops(compressor_shape(model), model, record["chunks"])
    per_token = decode_bytes(model, record, decode_tokens)
    step = sum(per_token.values())
    gflops = flops / record["stages_s"]["compress"] / 1e9
    decode_gbs = step * record["decode_tok_s"] / 1e9
    at_peak = flops / (figures["matmul_gflops"] * 1e9)
    return {
        "compress_mflop_per_token": flops / record["context_tokens"] / 1e6,
        "compress_gflops": gflops,
        "compress_efficiency": gflops / figures["matmul_gflops"],
        "decode_bytes_per_token": per_token,
        "decode_gbs": decode_gbs,
        "decode_efficiency": decode_gbs / figures["copy_gbs"],
        "compress_at_peak_s": at_peak,
        "ttft_over_compress_at_peak": record["ttft_s"] / at_peak,
    }


def planned_bytes(path: Path, model: SharedLLM, record: dict, decode_tokens: int) -> int:
    """The planner's memory estimate for this run, as `generate` asks it."""
    running = model.config.chunk_len + record["running_tokens"] + decode_tokens
    return plan_for_model_dir(path, record["context_tokens"], running_tokens=running).total


def head_matvec(model: SharedLLM, reps: int = 30) -> dict[str, float]:
    """Best seconds of a decode step's lm_head product on the tied embedding E: as MLX
    runs it (`as_linear`, h @ E^T), on a contiguous transposed copy (h @ E_T), and as
    E @ h (no copy)."""
    embed = model.model.embed_tokens
    h = mx.random.normal((1, 1, model.args.hidden_size))
    transposed = mx.contiguous(embed.weight.T)
    mx.eval(h, transposed)
    fns = {
        "as_linear": lambda: embed.as_linear(h),
        "transposed": lambda: h @ transposed,
        "weight_at_h": lambda: (embed.weight @ h.reshape(-1, 1)).reshape(1, 1, -1),
    }
    times = {}
    for name, fn in fns.items():
        mx.eval(fn())
        best = float("inf")
        for _ in range(reps):
            tic = time.perf_counter()
            mx.eval(fn())
            best = min(best, time.perf_counter() - tic)
        times[name] = best
    return times


def compress_timed(model: SharedLLM, ids: list[int], prompt: Any, blocks: int) -> tuple:
    """(seconds, tree) of one compression with the compressor's attention in `blocks`."""
    before, model_module.ENCODE_BLOCKS = model_module.ENCODE_BLOCKS, blocks
    try:
        tic = time.perf_counter()
        tree = model.compress(mx.array(ids), mx.array(prompt))
        return time.perf_counter() - tic, tree
    finally:
        model_module.ENCODE_BLOCKS = before


def encode_blocks_ab(model: SharedLLM, tokenizer: Any, text: str, reps: int = 2) -> dict:
    """One 8K compression with the compressor's attention in 1 query block (before) and
    in ENCODE_BLOCKS (after), interleaved: the best seconds of each, the trees' largest
    difference, and the greedy answers to QUESTION from each tree."""
    ids = tokenizer.encode(text_of(tokenizer, text, 8192), add_special_tokens=False)
    prompt = encode_prompt(tokenizer, QUESTION)
    arms = {"before": 1, "after": model_module.ENCODE_BLOCKS}
    seconds, trees = {arm: float("inf") for arm in arms}, {}
    for _ in range(reps):
        for arm, blocks in arms.items():
            t, trees[arm] = compress_timed(model, ids, prompt, blocks)
            seconds[arm] = min(seconds[arm], t)
    diff = max(
        mx.abs(a - b).max().item()
        for one, other in zip(trees["before"].layers, trees["after"].layers)
        for a, b in zip(one.dequantized(), other.dequantized())
    )
    answers = {
        arm: generate(model, tokenizer, QUESTION, tree, max_tokens=24)
        for arm, tree in trees.items()
    }
    return {
        "blocks": arms,
        "compress_s": seconds,
        "speedup": seconds["before"] / seconds["after"],
        "tree_max_abs_diff": diff,
        "answers": answers,
        "answers_identical": answers["before"] == answers["after"],
    }


def machine(model: SharedLLM) -> dict:
    return {
        "matmul_gflops": matmul_gflops(),
        "copy_gbs": copy_gbs(),
        "head_s": head_matvec(model),
    }


def warm_up(model: SharedLLM, tokenizer: Any, text: str) -> None:
    """One short answer, so the first measured length pays no first-call costs."""
    for _ in stream_generate(
        model, tokenizer, PROMPT, text_of(tokenizer, text, 1100), max_tokens=2
    ):
        pass


def row(r: dict) -> str:
    s, e = r["stages_s"], r["efficiency"]
    gb = r["peak_memory_bytes"] / 1e9
    return (
        f"| {r['context_tokens']:>7,} | {r['ttft_s']:7.1f} | {s['tokenize']:5.1f} | "
        f"{s['compress']:6.1f} | {s['select']:5.2f} | {s['prefill']:5.1f} | "
        f"{r['compress_tok_s']:5.0f} | {r['prefill_tok_s']:6.1f} | {r['decode_tok_s']:5.2f} | "
        f"{gb:5.2f} | {r['planned_bytes'] / 1e9:5.2f} | {e['compress_efficiency']:.2f} | "
        f"{e['decode_efficiency']:.3f} | {e['ttft_over_compress_at_peak']:.2f} | "
        f"{r['cpu_per_wall']:.2f} |"
    )


def table(records: list[dict]) -> str:
    head = (
        "| context | TTFT s | tok s | compress s | select s | prefill s | compress tok/s | "
        "prefill tok/s | decode tok/s | peak GB | planned GB | compress eff | decode eff | "
        "TTFT / compress@peak | cores used |"
    )
    return "\n".join([head, "|" + "---|" * 15, *map(row, records)])


def plot(records: list[dict], figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"{r['context_tokens'] // 1024}K" for r in records]
    bottom = [0.0] * len(records)
    for stage in STAGES:
        values = [r["stages_s"][stage] for r in records]
        left.bar(labels, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.plot(labels, [r["efficiency"]["compress_at_peak_s"] for r in records], "k--o",
              label="compress at matmul peak")  # fmt: skip
    left.set(ylabel="seconds", title="time to first token")
    left.legend()
    for key, name in (
        ("compress_tok_s", "compress"),
        ("prefill_tok_s", "prefill"),
        ("decode_tok_s", "decode"),
    ):
        right.plot(labels, [r[key] for r in records], "o-", label=name)
    right.set(yscale="log", ylabel="tokens/s", title="throughput")
    right.legend()
    fig.suptitle(
        f"default model (SmolLM2-135M, M=19) on this CPU: matmul peak "
        f"{figures['matmul_gflops']:.0f} GFLOP/s, copy {figures['copy_gbs']:.1f} GB/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    lengths = [8192] if a.quick else [int(x) for x in a.lengths.split(",")]
    out = Path(a.out or RESULTS / ("default_model_quick" if a.quick else "default_model"))
    log = Log(out.with_suffix(".log"))
    path = default_model(progress=False)
    model, tokenizer = load(path)
    text = corpus()
    figures = machine(model)
    head = figures["head_s"]
    log(f"model {path.name}; injection layers {list(model.config.injection_layers)}")
    log(
        f"matmul peak {figures['matmul_gflops']:.1f} GFLOP/s; copy {figures['copy_gbs']:.1f} "
        f"GB/s; lm_head per token: "
        + ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in head.items())
    )
    warm_up(model, tokenizer, text)
    ab = encode_blocks_ab(model, tokenizer, text)
    figures["encode_blocks_ab"] = ab
    log(
        f"compressor attention in {ab['blocks']['after']} query blocks against 1: 8K compress "
        f"{ab['compress_s']['before']:.1f} s -> {ab['compress_s']['after']:.1f} s "
        f"({ab['speedup']:.2f}x); tree max |diff| {ab['tree_max_abs_diff']:.1e}; greedy "
        f"answers identical: {ab['answers_identical']} ({ab['answers']['after']!r})"
    )
    records = []
    for tokens in lengths:
        r = run_length(model, tokenizer, text_of(tokenizer, text, tokens), a.decode_tokens)
        r["efficiency"] = efficiencies(model, r, figures, a.decode_tokens)
        r["planned_bytes"] = planned_bytes(path, model, r, a.decode_tokens)
        records.append(r)
        log(f"{tokens}: {json.dumps(r)}")
        out.with_suffix(".json").write_text(
            json.dumps({"machine": figures, "records": records}, indent=1)
        )
    log(table(records))
    plot(records, figures, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
