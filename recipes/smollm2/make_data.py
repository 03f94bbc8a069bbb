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
from needles import TRAIN_TEMPLATES, TRAIN_WORDS, fill, insert, sentence_ends  # noqa: E402
from sources import training_texts  # noqa: E402

CHUNK = 1024


def haystacks(tokenizer, texts: dict[str, str]) -> list[tuple[np.ndarray, np.ndarray]]:
    streams = []
    for text in texts.values():
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
        streams.append((ids, sentence_ends(tokenizer, ids)))
    return streams


def needle_record(tokenizer, streams, rng: np.random.Generator, max_chunks: int) -> dict:
    """One retrieval example: 1 to `max_chunks` chunks of haystack and a short tail,
    holding 3-6 needles of different templates, each asked for in its own turn, in
    random order."""
    ids, ends = streams[int(rng.integers(len(streams)))]
    length = int(rng.integers(1, max_chunks + 1)) * CHUNK + int(rng.integers(0, 256))
    start = int(rng.integers(0, len(ids) - length))
    context = ids[start : start + length]
    local_ends = ends[(ends > start) & (ends < start + length)] - start
    turns = []
    for t in rng.permutation(len(TRAIN_TEMPLATES))[: int(rng.integers(3, 7))]:
        template = TRAIN_TEMPLATES[t]
        needle, question, answer = fill(template, TRAIN_WORDS, rng, parity=0)
        needle_ids = np.asarray(tokenizer.encode(" " + needle, add_special_tokens=False))
        context, at = insert(context, local_ends, needle_ids.astype(np.int32), float(rng.random()))
        local_ends = np.where(local_ends >= at, local_ends + len(needle_ids), local_ends)
        turns.append(
            {"prompt": f"{question} Answer with the {template.kind} only.", "response": answer}
        )
    order = rng.permutation(len(turns))
    return {"context": context.tolist(), "turns": [turns[i] for i in order]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-examples", type=int, default=3000)
    p.add_argument("--val-examples", type=int, default=48)
    p.add_argument("--max-chunks", type=int, default=6, help="longest haystack, in chunks")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    _, tokenizer = load(default_base_model())
    texts = training_texts()
    (a.out / "lm").mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (a.out / "lm" / f"{name}.txt").write_text(text, encoding="utf-8")
    streams = haystacks(tokenizer, texts)
    rng = np.random.default_rng(a.seed)
    for name, count in (("needles_train", a.train_examples), ("needles_val", a.val_examples)):
        with open(a.out / f"{name}.jsonl", "w") as f:
            for _ in range(count):
                f.write(json.dumps(needle_record(tokenizer, streams, rng, a.max_chunks)) + "\n")
        print(f"wrote {count} examples to {a.out / name}.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main()
