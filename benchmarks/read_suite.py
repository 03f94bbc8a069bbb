"""Does the model read real documents? A RULER-style suite on real texts of four kinds.

    python benchmarks/read_suite.py --split test --out benchmarks/results/suite_test.jsonl
    python benchmarks/read_suite.py --quick                      # 8K, one haystack per text
    python benchmarks/read_suite.py --report benchmarks/results/suite_test.jsonl \\
        --heatmap benchmarks/results/suite_heatmap.png

Texts, tasks, needle insertion and scoring live in `suite_data.py`; this file runs the
systems and writes one JSON line per (system, question), appending, so an interrupted run
resumes where it stopped (rows already in --out are skipped).

Systems:
- `sharedllm`: the model as `generate` runs it (its own re-reading and selection settings,
  or `--reread-tokens`);
- `tree`: the tree alone, no re-reading;
- `reread+tree`: re-reading with the tree still injected (a design variant);
- `oracle`: no tree, the chunks that hold the question's facts in the window;
- `truncate`: no tree, the context's tail that fits the window. A question whose facts all
  lie before that tail is scored wrong without running (the model never sees them; the
  answers are random values), and the row says `unrun`.

Haystacks are a text's first L tokens with one group of facts per task inserted
(`suite_data.plan_haystack`); every chunk boundary stays where it was, so a text's chunks
are compressed once (a "bank", cached on disk) and only the chunks that hold facts are
compressed again for each haystack (exact for trees whose chunks depend on their own
tokens alone; other models compress every haystack whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import mlx_sharedllm  # noqa: E402,F401,I001  (OpenBLAS before mlx, on Linux)
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import trim_prompt_cache  # noqa: E402

import suite_data as sd  # noqa: E402
from eval_real import prefill  # noqa: E402
from mlx_sharedllm.assets import cache_home  # noqa: E402
from mlx_sharedllm.distractors import arrange, movable_chunks  # noqa: E402
from mlx_sharedllm.generate import (  # noqa: E402
    WithTree,
    encode_prompt,
    generate,
    reread_passages,
    stream_generate,
)
from mlx_sharedllm.loading import load, migrated_tree  # noqa: E402
from mlx_sharedllm.tree import ContextTree  # noqa: E402

# Greedy answers stop at EOS or at MAX_TOKENS per value asked (a multivalue answer lists 3).
MAX_TOKENS = 40
SYSTEMS = ("sharedllm", "tree", "reread+tree", "oracle", "truncate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--split", default="test", choices=("dev", "test"))
    p.add_argument("--texts", default=None, help="comma-separated text names (default: split's)")
    p.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    p.add_argument("--haystacks", type=int, default=2, help="haystacks per text and length")
    p.add_argument(
        "--per-cell",
        type=int,
        default=10,
        help="at least this many questions per task and length: a length that fewer texts "
        "reach gets more haystacks from each",
    )
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--systems", default="sharedllm,tree")
    p.add_argument("--book", action="store_true", help="also ask the book questions")
    p.add_argument("--no-needles", action="store_true", help="only the book questions")
    p.add_argument("--reread-tokens", type=int, default=None, help="override the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="8K only, one haystack per text")
    p.add_argument("--out", default=None, help="JSONL file of results (appended, resumed)")
    p.add_argument(
        "--report",
        nargs="+",
        default=None,
        help="summarise JSONL files and exit (FILE=LABEL names that file's system)",
    )
    p.add_argument("--heatmap", default=None, help="with --report: a PNG of sharedllm")
    p.add_argument("--markdown", default=None, help="with --report: write the tables here")
    a = p.parse_args(argv)
    if a.quick:
        a.lengths, a.haystacks, a.per_cell = "8192", 1, 0
    return a


# -- contexts -------------------------------------------------------------------------


def text_ids(tokenizer, name: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(sd.load_text(name), add_special_tokens=False), np.int32)


def bank(model, ids: np.ndarray, name: str) -> ContextTree:
    """The text's chunks compressed once (cached on disk by model and text)."""
    chunk_len = model.config.chunk_len
    n = len(ids) // chunk_len
    folder = cache_home() / "suite"
    for alias in model.aliases:  # a bank made before the model's folder was migrated
        old = folder / f"{name}-{alias}-{n}x{chunk_len}.tree"
        if old.exists():
            return migrated_tree(ContextTree.load(old), model)
    path = folder / f"{name}-{model.fingerprint()}-{n}x{chunk_len}.tree"
    if path.exists():
        return ContextTree.load(path)
    tic = time.perf_counter()
    tree = model.compress(mx.array(ids[: n * chunk_len]), mx.array(ids[:1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.save(path)
    print(f"bank {name}: {n} chunks in {time.perf_counter() - tic:.0f}s", flush=True)
    return tree


def haystack_tree(model, base: ContextTree | None, ids: np.ndarray, changed: set[int]):
    """The tree of `ids`: the bank's chunks, with the `changed` ones compressed again."""
    chunk_len = model.config.chunk_len
    n = len(ids) // chunk_len
    if base is None:
        return model.compress(mx.array(ids), mx.array(ids[:1]))
    pieces = []
    for j in range(n):
        if j in changed:
            one = model.compress(
                mx.array(ids[j * chunk_len : (j + 1) * chunk_len][None]), mx.array(ids[:1])
            )
            pieces.append((one, 0))
        else:
            pieces.append((base, j))
    return arrange(model, pieces)


# -- answering ------------------------------------------------------------------------


def greedy(
    model, tokenizer, tree, prompt: np.ndarray, cache: list, max_tokens: int = MAX_TOKENS
) -> str:
    """The greedy answer to `prompt` after what `cache` holds; the cache is left as it was."""
    before = cache[0].offset
    tokens = []
    steps = generate_step(
        mx.array(prompt), WithTree(model, tree), max_tokens=max_tokens, prompt_cache=cache
    )
    for token, _ in steps:
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    trim_prompt_cache(cache, cache[0].offset - before)
    return tokenizer.decode(tokens)


class Systems:
    """Answers one question about one context with each system."""

    def __init__(self, model, tokenizer, reread_tokens: int | None):
        self.model, self.tokenizer = model, tokenizer
        self.reread = model.settings.reread_tokens if reread_tokens is None else reread_tokens
        self.window = model.args.max_position_embeddings
        self.max_tokens = MAX_TOKENS

    def sharedllm(self, tree, ids, prompt: str, chunks) -> tuple[str, list]:
        """The answer, and the passages it re-read."""
        responses = list(
            stream_generate(
                self.model, self.tokenizer, prompt, context=tree, max_tokens=self.max_tokens,
                settings=self._settings(self.reread),
            )
        )  # fmt: skip
        return "".join(r.text for r in responses), list(responses[-1].passages)

    def tree(self, tree, ids, prompt: str, chunks) -> str:
        return generate(
            self.model, self.tokenizer, prompt, context=tree, max_tokens=self.max_tokens,
            settings=self._settings(0),
        )  # fmt: skip

    def _settings(self, reread_tokens: int):
        """The model's settings, re-reading up to `reread_tokens` tokens."""
        return dataclasses.replace(self.model.settings, reread_tokens=reread_tokens)

    def reread_tree(self, tree, ids, prompt: str, chunks) -> str:
        p = encode_prompt(self.tokenizer, prompt)
        _, running = reread_passages(self.model, self.tokenizer, tree, p, prompt, self.reread)
        return greedy(
            self.model, self.tokenizer, tree, running, self.model.make_cache(), self.max_tokens
        )

    def oracle(self, tree, ids, prompt: str, chunks) -> str:
        chunk_len = self.model.config.chunk_len
        p = oracle_window(ids, chunks, chunk_len, encode_prompt(self.tokenizer, prompt))
        return greedy(self.model, self.tokenizer, None, p, self.model.make_cache(), self.max_tokens)


def oracle_window(ids: np.ndarray, chunks, chunk_len: int, prompt: np.ndarray) -> np.ndarray:
    """The oracle's running text: the chunks that hold the answer, in document order
    (each once), then the prompt."""
    parts = [ids[c * chunk_len : (c + 1) * chunk_len] for c in sorted(set(chunks))]
    return np.concatenate([*parts, prompt]).astype(np.int32)


class Truncated:
    """SmolLM2 alone on the context's tail: the tail is prefilled once per context."""

    def __init__(self, model, tokenizer, ids: np.ndarray, room: int):
        self.model, self.tokenizer = model, tokenizer
        self.start = max(0, len(ids) - room)
        self.ids, self.cache = ids, None
        self.max_tokens = MAX_TOKENS

    def sees(self, spans) -> bool:
        return any(end > self.start for _, end in spans)

    def answer(self, prompt: str) -> str:
        if self.cache is None:
            self.cache = self.model.make_cache()
            prefill(self.model, self.ids[self.start :], self.cache)
        p = encode_prompt(self.tokenizer, prompt)
        return greedy(self.model, self.tokenizer, None, p, self.cache, self.max_tokens)


# -- the run --------------------------------------------------------------------------


def done_keys(out: Path | None) -> set[str]:
    if out is None or not out.exists():
        return set()
    return {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()}


def record(out: Path | None, row: dict) -> None:
    held = "" if row["reread_found"] is None else f", re-read held it: {row['reread_found']}"
    print(
        f"{row['system']:11s} {row['text']:16s} {row['length']:6d} {row['task']:13s} "
        f"{'OK ' if row['correct'] else 'no '} {row['answer'][:70]!r} (want {row['want']}"
        f"{held})",
        flush=True,
    )
    if out is not None:
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def answer_tokens(question) -> int:
    """The longest answer, in tokens: MAX_TOKENS per value the question asks for."""
    return MAX_TOKENS * max(1, len(getattr(question, "answers", ())))


def ask_all(
    ctx: dict, questions, systems: list[str], runner: Systems, truncated, done, out, asked=None
):
    """Every system on every question about one context (those numbered in `asked`)."""
    for qi, q in enumerate(questions):
        if asked is not None and qi not in asked:
            continue
        spans = [ctx["spans"][i] for i in q.facts] if hasattr(q, "facts") else ctx["book_spans"][qi]
        chunks = [s // runner.model.config.chunk_len for s, _ in spans]
        runner.max_tokens = truncated.max_tokens = answer_tokens(q)
        for system in systems:
            key = f"{ctx['key']}|{qi}|{system}"
            if key in done:
                continue
            tic, unrun, found = time.perf_counter(), False, None
            if system == "truncate":
                unrun = not truncated.sees(spans)
                text = "" if unrun else truncated.answer(q.prompt)
            else:
                run = getattr(runner, system.replace("+", "_"))
                text = run(ctx["tree"], ctx["ids"], q.prompt, chunks)
                if isinstance(text, tuple):  # the passages it re-read: did they hold the facts?
                    text, passages = text
                    found = all(
                        any(p.start <= s and e <= p.end for p in passages) for s, e in spans
                    )
            row = {
                "key": key, "system": system, "split": ctx["split"], "text": ctx["text"],
                "kind": ctx["kind"], "length": ctx["length"], "haystack": ctx["haystack"],
                "task": getattr(q, "task", "book"), "question": q.prompt, "answer": text,
                "unrun": unrun,
                "want": list(getattr(q, "answers", ())) or getattr(q, "reference", ""),
                "correct": bool(sd.is_correct(q, text)), "reread_found": found,
                "seconds": round(time.perf_counter() - tic, 1),
            }  # fmt: skip
            record(out, row)


def run_needles(a, model, tokenizer, runner, done, out) -> None:
    systems = a.systems.split(",")
    chunk_len, window = model.config.chunk_len, model.args.max_position_embeddings
    names = a.texts.split(",") if a.texts else sd.texts(a.split)
    lengths = [int(x) for x in a.lengths.split(",")]
    tasks = set(a.tasks.split(",")) if a.tasks else set(sd.TASKS)
    texts = {name: text_ids(tokenizer, name) for name in names}
    # Counted over the split's texts, so that a run of some texts (--texts) asks what
    # those texts ask in a run of them all.
    sizes = [
        len(texts[n]) if n in texts else len(text_ids(tokenizer, n)) for n in sd.texts(a.split)
    ]
    per_task = sd.questions_per_task(sd.plan_haystack(np.random.default_rng(a.seed), a.split))
    haystacks = sd.haystacks_per_length(lengths, sizes, a.per_cell, a.haystacks, per_task)
    for name, ids_all in texts.items():
        fits = [L for L in lengths if len(ids_all) >= L]
        if not fits:
            print(f"{name}: {len(ids_all)} tokens, shorter than every length; skipped")
            continue
        base = None
        if movable_chunks(model) and any(s != "truncate" for s in systems):
            base = bank(model, ids_all[: max(fits)], name)
        for length in fits:
            for h in range(haystacks[length]):
                key = f"{a.split}|{name}|{length}|{h}"
                seed = [a.seed, zlib.crc32(name.encode()), length, h]
                plan = sd.plan_haystack(np.random.default_rng(seed), a.split)
                asked = [qi for qi, q in enumerate(plan.questions) if q.task in tasks]
                wanted = {f"{key}|{qi}|{s}" for qi in asked for s in systems}
                if wanted <= done:
                    continue
                ids, spans = sd.insert_facts(tokenizer, ids_all[:length], plan.facts, chunk_len)
                changed = set(sd.fact_chunks(spans, chunk_len))
                tree = None
                if any(s not in ("truncate", "oracle") for s in systems):
                    tree = haystack_tree(model, base, ids, changed)
                ctx = {
                    "key": key, "split": a.split, "text": name, "kind": sd.TEXTS[name].kind,
                    "length": length, "haystack": h, "ids": ids, "spans": spans, "tree": tree,
                }  # fmt: skip
                truncated = Truncated(model, tokenizer, ids, window - 256)
                ask_all(ctx, plan.questions, systems, runner, truncated, done, out, set(asked))


# The dev book questions ask about the first DEV_BOOK_TOKENS of their text.
DEV_BOOK_TOKENS = 65536


def run_book(a, model, tokenizer, runner, done, out) -> None:
    """The book questions (test: the whole Botchan; dev: War and Peace's opening), over
    the book compressed once."""
    name = sd.BOOK_TEXT if a.split == "test" else sd.DEV_BOOK_TEXT
    questions = sd.BOOK_QUESTIONS if a.split == "test" else sd.DEV_BOOK_QUESTIONS
    text = sd.load_text(name)
    ids = text_ids(tokenizer, name)
    if a.split == "dev":
        ids = ids[:DEV_BOOK_TOKENS]
    chunk_len, window = model.config.chunk_len, model.args.max_position_embeddings
    n = len(ids) // chunk_len
    tree = bank(model, ids, name) if movable_chunks(model) else None
    if tree is None:
        tree = model.compress(mx.array(ids[: n * chunk_len]), mx.array(ids[:1]))
    else:
        tree = ContextTree(**{**vars(tree), "remainder": mx.array(ids[n * chunk_len :])})
    book_spans = []
    for q in questions:
        at = text.index(q.evidence)
        start = len(tokenizer.encode(text[:at], add_special_tokens=False))
        end = len(tokenizer.encode(text[: at + len(q.evidence)], add_special_tokens=False))
        book_spans.append([(start, end)])
    ctx = {
        "key": f"book|{name}", "split": a.split, "text": name, "kind": "novel",
        "length": len(ids), "haystack": 0, "ids": ids, "spans": [], "book_spans": book_spans,
        "tree": tree,
    }  # fmt: skip
    truncated = Truncated(model, tokenizer, ids, window - 256)
    ask_all(ctx, questions, a.systems.split(","), runner, truncated, done, out)


# -- the report -----------------------------------------------------------------------


def load_rows(paths) -> list[dict]:
    """The rows of JSONL files; "FILE=LABEL" names its rows' system LABEL (so that two runs
    of one system, e.g. another model, are told apart in the tables)."""
    rows = []
    for spec in paths:
        path, _, label = spec.partition("=")
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append({**row, "system": label} if label else row)
    return rows


def cell(rows: list[dict]) -> str:
    if not rows:
        return "-"
    k, n = sum(r["correct"] for r in rows), len(rows)
    lo, hi = sd.wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}] n={n}"


def report(paths, heatmap: str | None, markdown: str | None) -> str:
    rows = load_rows(paths)
    rows += [{**r, "task": "all needle tasks"} for r in rows if r["task"] != "book"]
    tasks = sorted({r["task"] for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    systems = [s for s in SYSTEMS if s in systems] + [s for s in systems if s not in SYSTEMS]
    lines = []
    for task in tasks:
        sub = [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in sub})
        heads = [f"{L // 1024}K" for L in lengths]
        lines += [f"**{task}**", "", "| system | " + " | ".join(heads) + " |"]
        lines.append("|---|" + "---:|" * len(lengths))
        for s in systems:
            cells = [
                cell([r for r in sub if r["system"] == s and r["length"] == L]) for L in lengths
            ]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += recall_table(
        [r for r in rows if r["task"] != "all needle tasks" and r["system"] == "sharedllm"]
    )
    text = "\n".join(lines)
    if markdown:
        Path(markdown).write_text(text + "\n")
    if heatmap:
        draw_heatmap(rows, tasks, heatmap)
    return text


def recall_table(rows: list[dict]) -> list[str]:
    """How often the re-read passages held every fact a question needs, and the accuracy
    when they did: retrieval and reading told apart."""
    rows = [r for r in rows if r.get("reread_found") is not None]
    if not rows:
        return []
    lengths = sorted({r["length"] for r in rows})
    lines = ["**re-reading (sharedllm): passages held the facts / right when they did**", ""]
    lines += ["| | " + " | ".join(f"{L // 1024}K" for L in lengths) + " |"]
    lines.append("|---|" + "---:|" * len(lengths))
    held = [[r for r in rows if r["length"] == L] for L in lengths]
    lines.append("| held | " + " | ".join(cell_of(h, "reread_found") for h in held) + " |")
    found = [[r for r in h if r["reread_found"]] for h in held]
    lines.append("| right, when held | " + " | ".join(cell(f) for f in found) + " |")
    return [*lines, ""]


def cell_of(rows: list[dict], field: str) -> str:
    return cell([{"correct": bool(r[field])} for r in rows])


def draw_heatmap(rows: list[dict], tasks: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["system"] == "sharedllm" and r["task"] != "book"]
    tasks = [t for t in tasks if t != "book"]  # "all needle tasks" is the bottom row
    lengths = sorted({r["length"] for r in rows})
    grid = np.full((len(tasks), len(lengths)), np.nan)
    for i, t in enumerate(tasks):
        for j, L in enumerate(lengths):
            hits = [r["correct"] for r in rows if r["task"] == t and r["length"] == L]
            if hits:
                grid[i, j] = np.mean(hits)
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.5 * len(tasks) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" for L in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_title("default model (sharedllm), exact match, test split")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.report:
        print(report(a.report, a.heatmap, a.markdown))
        return
    from mlx_sharedllm.default import default_model

    model, tokenizer = load(a.model or default_model())
    out = Path(a.out) if a.out else None
    done = done_keys(out)
    runner = Systems(model, tokenizer, a.reread_tokens)
    if not a.no_needles:
        run_needles(a, model, tokenizer, runner, done, out)
    if a.book or a.no_needles:
        run_book(a, model, tokenizer, runner, done, out)


if __name__ == "__main__":
    main()
