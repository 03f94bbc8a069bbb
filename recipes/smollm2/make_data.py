"""Write the training data of the default model's injection adapter.

    python recipes/smollm2/make_data.py --out data/smollm2

writes into OUT:
- lm/<book>.txt: the training texts (Botchan's first 70%, the other books), for
  language modelling;
- needles_train.jsonl, needles_val.jsonl: retrieval examples {context, turns}, 3 to 6
  needles from TRAIN_TEMPLATES hidden in a haystack of 1 to --max-chunks chunks of
  training text,
  the context given as token ids of the default model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import mlx_sharedllm  # noqa: E402,F401,I001  (OpenBLAS before mlx, on Linux)
from mlx_sharedllm.default import default_base_model  # noqa: E402
from mlx_sharedllm.loading import load  # noqa: E402
from needles import (  # noqa: E402
    TRAIN_TEMPLATES,
    TRAIN_WORDS,
    VARIED_ATTRIBUTES,
    fill,
    insert,
    sentence_ends,
    varied_fill,
    varied_key,
)
from sources import training_texts  # noqa: E402

CHUNK = 1024


def haystacks(tokenizer, texts: dict[str, str]) -> list[tuple[np.ndarray, np.ndarray]]:
    streams = []
    for text in texts.values():
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
        streams.append((ids, sentence_ends(tokenizer, ids)))
    return streams


def haystack(streams, rng: np.random.Generator, max_chunks: int):
    """1 to `max_chunks` chunks of one training text and a short tail, with its sentence
    ends."""
    ids, ends = streams[int(rng.integers(len(streams)))]
    length = int(rng.integers(1, max_chunks + 1)) * CHUNK + int(rng.integers(0, 256))
    start = int(rng.integers(0, len(ids) - length))
    local_ends = ends[(ends > start) & (ends < start + length)] - start
    return ids[start : start + length], local_ends


def template_facts(rng: np.random.Generator, needles: tuple[int, int]):
    """`needles` (low, high) facts of different TRAIN_TEMPLATES: (needle, prompt, answer)."""
    for t in rng.permutation(len(TRAIN_TEMPLATES))[: int(rng.integers(needles[0], needles[1] + 1))]:
        template = TRAIN_TEMPLATES[t]
        needle, question, answer = fill(template, TRAIN_WORDS, rng, parity=0)
        yield needle, f"{question} Answer with the {template.kind} only.", answer


def varied_facts(rng: np.random.Generator, needles: tuple[int, int]):
    """`needles` (low, high) facts with distinct keys and random phrasings; the keys share
    one to three attributes, so a question is answered by its key."""
    count = int(rng.integers(needles[0], needles[1] + 1))
    attrs = rng.choice(VARIED_ATTRIBUTES, size=int(rng.integers(1, 4)), replace=False)
    keys: list[str] = []
    while len(keys) < count:
        key = varied_key(rng)
        if key.removeprefix("the ") not in {k.removeprefix("the ") for k in keys}:
            keys.append(key)
    for key in keys:
        yield varied_fill(rng, key, str(rng.choice(attrs)), parity=0)


def needle_record(
    tokenizer,
    streams,
    rng: np.random.Generator,
    max_chunks: int,
    style: str,
    needles: tuple,
    evidence: bool = False,
) -> dict:
    """One retrieval example: a haystack holding `needles` (low, high) facts, each asked
    for in its own turn, in random order; with `evidence`, each turn says where its
    answer stands in the context."""
    context, local_ends = haystack(streams, rng, max_chunks)
    facts = template_facts if style == "templates" else varied_facts
    turns, hidden = [], []
    for needle, prompt, answer in facts(rng, needles):
        needle_ids = np.asarray(tokenizer.encode(" " + needle, add_special_tokens=False))
        context, at = insert(context, local_ends, needle_ids.astype(np.int32), float(rng.random()))
        local_ends = np.where(local_ends >= at, local_ends + len(needle_ids), local_ends)
        hidden = [h + len(needle_ids) if h >= at else h for h in hidden] + [at]
        turns.append({"prompt": prompt, "response": answer})
    if evidence:
        for turn, at in zip(turns, hidden):
            span = answer_span(tokenizer, context, at, turn["response"])
            if span:  # a word spelled differently after a space has none
                turn["evidence"] = span
    order = rng.permutation(len(turns))
    return {"context": context.tolist(), "turns": [turns[i] for i in order]}


def answer_span(tokenizer, context: np.ndarray, at: int, answer: str) -> list[int] | None:
    """[start, end): where the answer's tokens stand in the needle that starts at `at`."""
    ids = tokenizer.encode(answer, add_special_tokens=False)
    for start in range(at, len(context) - len(ids) + 1):
        if context[start : start + len(ids)].tolist() == ids:
            return [start, start + len(ids)]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-examples", type=int, default=3000)
    p.add_argument("--val-examples", type=int, default=48)
    p.add_argument("--max-chunks", type=int, default=6, help="longest haystack, in chunks")
    p.add_argument(
        "--style",
        choices=("templates", "varied"),
        default="templates",
        help="templates: the eight TRAIN_TEMPLATES; varied: random phrasings and keys",
    )
    p.add_argument("--needles", default="3,6", help="needles per example: LOW,HIGH")
    p.add_argument(
        "--evidence", action="store_true", help="mark where each answer stands in the context"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    _, tokenizer = load(default_base_model())
    texts = training_texts()
    (a.out / "lm").mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (a.out / "lm" / f"{name}.txt").write_text(text, encoding="utf-8")
    streams = haystacks(tokenizer, texts)
    rng = np.random.default_rng(a.seed)
    needles = tuple(int(n) for n in a.needles.split(","))
    for name, count in (("needles_train", a.train_examples), ("needles_val", a.val_examples)):
        with open(a.out / f"{name}.jsonl", "w") as f:
            for _ in range(count):
                f.write(
                    json.dumps(
                        needle_record(
                            tokenizer, streams, rng, a.max_chunks, a.style, needles, a.evidence
                        )
                    )
                    + "\n"
                )
        print(f"wrote {count} examples to {a.out / name}.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main()
