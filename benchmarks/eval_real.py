"""The default model on real text: needle in a haystack, and perplexity on held-out Botchan.

Everything reads Botchan's last 30%, which training never saw (recipes/smollm2/), with
needle templates, keys and values that training never used.

    python benchmarks/eval_real.py --json benchmarks/results/eval_real.json \\
        --heatmap benchmarks/results/needle_heatmap.png
    python benchmarks/eval_real.py --quick          # 8K only, 3 needles per cell

Needle systems: `sharedllm` (the default model), `truncate` (SmolLM2 alone with the
context's tail that fits its window beside the prompt) and `full` (SmolLM2 with the whole
context, up to its 8K window). A needle counts when the first number of the greedy
answer is the needle's number. Perplexity systems, on the same target tokens: `sharedllm`
(the preceding held-out text compressed, the running window read in full), `truncate`
(the running window alone) and `full` (full attention over 8K windows at a stride of 4K).

SmolLM2 alone is the same model without a tree: the injection only runs on a tree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "smollm2"))

import mlx_sharedllm  # noqa: E402,F401,I001  (OpenBLAS before mlx, on Linux)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import trim_prompt_cache  # noqa: E402
from needles import Template, insert, number, sentence_ends  # noqa: E402
from sources import botchan_split  # noqa: E402

from mlx_sharedllm.distractors import arrange, movable_chunks  # noqa: E402
from mlx_sharedllm.generate import WithTree, encode_prompt  # noqa: E402
from mlx_sharedllm.loading import load  # noqa: E402
from mlx_sharedllm.selection import keep_attended_chunks  # noqa: E402
from mlx_sharedllm.tree import ContextTree  # noqa: E402

# Never used in training: template, keys and (odd digit sum) values.
EVAL_TEMPLATE = Template(
    "One of the special magic numbers for {key} is: {number}.",
    "What is the special magic number for {key} mentioned in the provided text?",
    "number",
    "number",
)
ADJECTIVES = ("quiet", "amber", "brisk", "hollow", "gentle", "rusty", "velvet", "fragile")
NOUNS = ("harbor", "meadow", "violin", "compass", "orchard", "glacier", "teapot", "canyon")
PROMPT = "{question} Reply with just the number."
MAX_TOKENS = 40
PROMPT_ROOM = 64  # window tokens left for the prompt when the context is truncated


@dataclass
class Needle:
    context: np.ndarray  # the haystack with the needle, as long as the haystack
    chunk: int  # the one chunk that differs from the haystack
    prompt: np.ndarray
    answer: str


@dataclass
class NeedleRow:
    system: str
    context_tokens: int
    depth: float
    accuracy: float


@dataclass
class PplRow:
    system: str
    context_tokens: int
    ppl: float


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--needles", type=int, default=10, help="needles per cell")
    p.add_argument(
        "--baseline-needles", type=int, default=None, help="needles per cell for truncate/full"
    )
    p.add_argument("--quick", action="store_true", help="8K only, 3 needles per cell")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    p.add_argument("--no-needle", action="store_true", help="skip the needle test")
    p.add_argument("--ppl-tokens", type=int, default=None, help="score only this much text")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--systems", default="sharedllm,truncate,full", help="which systems to run")
    p.add_argument(
        "--combine", nargs="+", default=None, help="merge the JSON files of earlier runs"
    )
    p.add_argument("--json", default=None)
    p.add_argument("--heatmap", default=None)
    a = p.parse_args()
    if a.quick:
        a.lengths, a.needles = "8192", 3
    return a


# -- haystacks and needles ------------------------------------------------------------


def make_needle(tokenizer, haystack, ends, depth, chunk_len, rng) -> Needle:
    """A needle at `depth` (0..1), placed so that only its own chunk differs from the
    haystack: the chunk gives up as many tokens as the needle has, on the far side."""
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    answer = number(rng, 7, parity=1)
    fact = EVAL_TEMPLATE.needle.format(key=key, number=answer)
    question = EVAL_TEMPLATE.question.format(key=key)
    ids = np.asarray(tokenizer.encode(" " + fact, add_special_tokens=False), np.int32)
    with_needle, at = insert(haystack, ends, ids, depth)
    k = min(at // chunk_len, len(haystack) // chunk_len - 1)
    start, end = k * chunk_len, (k + 1) * chunk_len + len(ids)
    chunk = with_needle[start:end]
    chunk = chunk[len(ids) :] if at - start >= chunk_len // 2 else chunk[:chunk_len]
    context = np.concatenate([haystack[:start], chunk, haystack[start + chunk_len :]])
    prompt = encode_prompt(tokenizer, PROMPT.format(question=question))
    return Needle(context, k, prompt, answer)


def is_correct(text: str, answer: str) -> bool:
    found = re.search(r"\d[\d,]*", text)
    return bool(found) and found.group().replace(",", "") == answer


# -- generation -----------------------------------------------------------------------


def answer(model, tokenizer, tree, prompt: np.ndarray, cache: list) -> str:
    """The greedy answer to `prompt` after what `cache` already holds, up to the end of
    its first number (all that is scored); the cache is left as it was."""
    before = cache[0].offset
    tokens, digits = [], False
    steps = generate_step(
        mx.array(prompt), WithTree(model, tree), max_tokens=MAX_TOKENS, prompt_cache=cache
    )
    for token, _ in steps:
        text = tokenizer.decode([token])
        if token in tokenizer.eos_token_ids or (digits and not text.strip().strip(",").isdigit()):
            break
        digits = digits or any(c.isdigit() for c in text)
        tokens.append(token)
    trim_prompt_cache(cache, cache[0].offset - before)
    return tokenizer.decode(tokens)


def prefill(model, tokens: np.ndarray, cache: list, step: int = 2048) -> None:
    """Add tokens to the KV cache (hidden states only: no logits are needed)."""
    for i in range(0, len(tokens), step):
        model.model(mx.array(tokens[None, i : i + step]), None, cache)
        mx.eval([c.state for c in cache])


def spliced(model, base: ContextTree, needle: Needle, chunk_len: int) -> ContextTree:
    """`base` with the needle's chunk compressed again and put in its place."""
    k = needle.chunk
    one = model.compress(
        mx.array(needle.context[k * chunk_len : (k + 1) * chunk_len][None]), mx.array(needle.prompt)
    )
    pieces = [(base, j) for j in range(base.n_chunks)]
    pieces[k] = (one, 0)
    return arrange(model, pieces)


def check_splice(model, haystack, ends, tokenizer, chunk_len) -> float:
    """Max difference between a spliced tree and compressing the whole context again."""
    rng = np.random.default_rng(0)
    context = haystack[: 4 * chunk_len]
    needle = make_needle(tokenizer, context, ends[ends < len(context)], 0.6, chunk_len, rng)
    base = model.compress(mx.array(context), mx.array(needle.prompt))
    direct = model.compress(mx.array(needle.context), mx.array(needle.prompt))
    splice = spliced(model, base, needle, chunk_len)
    diffs = [
        mx.abs(a - b).max().item()
        for a, b in zip(direct.keys + direct.values, splice.keys + splice.values)
        if a.size
    ]
    return max(diffs)


def run_sharedllm(model, tokenizer, haystack, needles: list[Needle]) -> list[bool]:
    chunk_len = model.config.chunk_len
    base = None
    if movable_chunks(model):
        base = model.compress(mx.array(haystack), mx.array(needles[0].prompt))
    results = []
    for needle in needles:
        if base is not None:
            tree = spliced(model, base, needle, chunk_len)
        else:
            tree = model.compress(mx.array(needle.context), mx.array(needle.prompt))
        keep = model.settings.chunks_per_question
        tree = keep_attended_chunks(model, tree, needle.prompt, keep)
        text = answer(model, tokenizer, tree, needle.prompt, model.make_cache())
        results.append(is_correct(text, needle.answer))
    return results


def run_plain(model, tokenizer, haystack, needles: list[Needle], keep: int) -> list[bool]:
    """SmolLM2 alone on the last `keep` context tokens, the haystack's KV cache reused up
    to where a needle's context first differs."""
    start = len(haystack) - keep
    cache, cached = model.make_cache(), 0
    results = []
    order = sorted(range(len(needles)), key=lambda i: -needles[i].chunk)
    for i in order:
        needle = needles[i]
        if (needle.chunk + 1) * model.config.chunk_len <= start:
            # The needle lies wholly before the window: the model never sees it, and a
            # random 7-digit number is not guessed (1 in 10^7), so it scores 0 unrun.
            results.append((i, False))
            continue
        window = needle.context[start:]
        same = min(keep, max(0, needle.chunk * model.config.chunk_len - start))
        if cached > same:
            trim_prompt_cache(cache, cached - same)
            cached = same
        prefill(model, haystack[start + cached : start + same], cache)
        prefill(model, window[same:], cache)
        text = answer(model, tokenizer, None, needle.prompt, cache)
        trim_prompt_cache(cache, keep - same)
        cached = same
        results.append((i, is_correct(text, needle.answer)))
    return [ok for _, ok in sorted(results)]


def needle_eval(a, model, tokenizer, held: np.ndarray) -> list[NeedleRow]:
    chunk_len, window = model.config.chunk_len, model.args.max_position_embeddings
    rng = np.random.default_rng(a.seed)
    lengths = [int(x) for x in a.lengths.split(",")]
    depths = [int(x) / 100 for x in a.depths.split(",")]
    rows = []
    for length in lengths:
        haystack = np.resize(held, length)
        ends = sentence_ends(tokenizer, haystack)
        cells = np.repeat(depths, a.needles)
        needles = [make_needle(tokenizer, haystack, ends, d, chunk_len, rng) for d in cells]
        keep = min(length, window - PROMPT_ROOM)
        systems = {"sharedllm": (run_sharedllm, ()), "truncate": (run_plain, (keep,))}
        if length <= window:
            systems["full"] = (run_plain, (length,))
        systems = {k: v for k, v in systems.items() if k in a.systems.split(",")}
        done: dict = {}  # truncate at a length that fits its window is full attention
        for system, (run, extra) in systems.items():
            tic = time.perf_counter()
            per_cell = a.needles if system == "sharedllm" else a.baseline_needles or a.needles
            picked = np.arange(len(needles)) % a.needles < per_cell
            if extra not in done:
                chosen = [n for n, use in zip(needles, picked) if use]
                done[extra] = np.asarray(run(model, tokenizer, haystack, chosen, *extra))
            found, ran = done[extra], cells[picked]
            for depth in depths:
                accuracy = float(found[ran == depth].mean())
                rows.append(NeedleRow(system, length, depth * 100, accuracy))
            print(
                f"needle {system:9s} {length:6d} tokens: {found.mean():.2f} "
                f"by depth {[round(r.accuracy, 2) for r in rows[-len(depths) :]]} "
                f"({time.perf_counter() - tic:.0f}s)",
                flush=True,
            )
    return rows


# -- perplexity -----------------------------------------------------------------------


def chunk_nll(model, tokens: np.ndarray, tree=None) -> np.ndarray:
    """Negative log-likelihood of tokens[1:] given the tokens before them (and the tree)."""
    logits = model(mx.array(tokens[None, :-1]), tree=tree)[0].astype(mx.float32)
    nll = nn.losses.cross_entropy(logits, mx.array(tokens[1:]))
    return np.array(nll)


def ppl_eval(model, held: np.ndarray, systems: list[str]) -> list[PplRow]:
    """Perplexity of chunks 1..n-1 of the held-out text (each chunk's first token left out,
    since the running window starts there)."""
    chunk_len, window = model.config.chunk_len, model.args.max_position_embeddings
    n = len(held) // chunk_len
    chunks = held[: n * chunk_len].reshape(n, chunk_len)
    whole = None
    if "sharedllm" in systems and movable_chunks(model):
        whole = model.compress(mx.array(chunks), mx.array(chunks[-1][:1]))
    nll = {system: [] for system in systems}
    for k in range(1, n):
        if "sharedllm" in nll:
            if movable_chunks(model):
                tree = arrange(model, [(whole, j) for j in range(k)])
            else:
                tree = model.compress(mx.array(chunks[:k]), mx.array(chunks[k]))
            nll["sharedllm"].append(chunk_nll(model, chunks[k], tree))
        if "truncate" in nll:
            nll["truncate"].append(chunk_nll(model, chunks[k]))
    if "full" in nll:
        nll["full"].append(full_nll(model, held[: n * chunk_len], window, chunk_len))
    rows = []
    for system, parts in nll.items():
        ppl = float(np.exp(np.concatenate(parts).mean()))
        context = n * chunk_len if system == "sharedllm" else min(window, n * chunk_len)
        if system == "truncate":
            context = chunk_len
        rows.append(PplRow(system, context, ppl))
        print(f"ppl {system:9s}: {ppl:.3f}", flush=True)
    return rows


def full_nll(model, tokens: np.ndarray, window: int, chunk_len: int) -> np.ndarray:
    """Full attention over windows of `window` tokens at a stride of window/2, scoring the
    same tokens as the chunked systems (each chunk's first token left out)."""
    stride, scored = window // 2, []
    for start in range(0, len(tokens) - chunk_len, stride):
        piece = tokens[start : start + window]
        nll = chunk_nll(model, piece)
        first = chunk_len if start == 0 else stride
        positions = np.arange(first, len(piece))
        keep = positions % chunk_len != 0
        scored.append(nll[positions[keep] - 1])
        if start + window >= len(tokens):
            break
    return np.concatenate(scored)


# -- output ---------------------------------------------------------------------------


def heatmap(rows: list[NeedleRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r.system for r in rows))
    lengths = sorted({r.context_tokens for r in rows})
    depths = sorted({r.depth for r in rows})
    fig, axes = plt.subplots(1, len(systems), figsize=(4 * len(systems), 3.6), squeeze=False)
    for ax, system in zip(axes[0], systems):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in rows:
            if r.system == system:
                grid[depths.index(r.depth), lengths.index(r.context_tokens)] = r.accuracy
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0f}%" for d in depths])
        ax.set_title(system)
        ax.set_xlabel("context tokens")
        for (y, x), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(x, y, f"{v:.1f}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tables(needle: list[NeedleRow], ppl: list[PplRow]) -> str:
    lengths = sorted({r.context_tokens for r in needle})
    lines = [
        "| system | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for system in dict.fromkeys(r.system for r in needle):
        cells = []
        for n in lengths:
            acc = [r.accuracy for r in needle if r.system == system and r.context_tokens == n]
            cells.append(f"{np.mean(acc):.2f}" if acc else "-")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    if ppl:
        lines += ["", "| system | context tokens | perplexity |", "|---|---:|---:|"]
        lines += [f"| {r.system} | {r.context_tokens:,} | {r.ppl:.3f} |" for r in ppl]
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    if a.combine:
        needle, ppl = [], []
        for path in a.combine:
            record = json.loads(Path(path).read_text())
            needle += [NeedleRow(**r) for r in record["needle"]]
            ppl += [PplRow(**r) for r in record["ppl"]]
    else:
        needle, ppl = evaluate(a)
    print()
    print(tables(needle, ppl))
    if a.json:
        with open(a.json, "w") as f:
            record = {"needle": [asdict(r) for r in needle], "ppl": [asdict(r) for r in ppl]}
            json.dump({**record, "args": vars(a)}, f, indent=1)
    if a.heatmap:
        heatmap(needle, a.heatmap)


def evaluate(a: argparse.Namespace) -> tuple[list[NeedleRow], list[PplRow]]:
    from mlx_sharedllm.default import default_model

    model, tokenizer = load(a.model or default_model())
    held = np.asarray(tokenizer.encode(botchan_split()[1], add_special_tokens=False), np.int32)
    s = model.settings
    print(
        f"held-out Botchan: {len(held):,} tokens; model {model.tree_dict()}, log_scale_entries "
        f"{s.log_scale_entries}, select_chunks {s.chunks_per_question}",
        flush=True,
    )
    if movable_chunks(model) and "sharedllm" in a.systems:
        ends = sentence_ends(tokenizer, held)
        diff = check_splice(model, held, ends, tokenizer, model.config.chunk_len)
        print(f"spliced tree vs compressing again: max diff {diff:.2e}", flush=True)
        assert diff < 1e-4, "the spliced tree differs from a fresh compression"
    ppl = [] if a.no_ppl else ppl_eval(model, held[: a.ppl_tokens], a.systems.split(","))
    needle = [] if a.no_needle else needle_eval(a, model, tokenizer, held)
    return needle, ppl


if __name__ == "__main__":
    main()
