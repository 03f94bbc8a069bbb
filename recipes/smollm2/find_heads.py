"""Find SmolLM2's retrieval heads: the heads that, with full attention over a haystack,
look at the needle's digit while the answer writes that digit.

    python recipes/smollm2/find_heads.py --needles 9

Training data only (Sherlock Holmes, TRAIN_TEMPLATES, even digit sums). For each needle
the answer is teacher-forced after the question; a head's score is its mean attention
from the position that predicts answer digit j to the needle's digit j. The top heads
are the ones the default model's injection copies at init (default.py). The library's
`mlx_sharedllm.heads.find_heads` (`convert --copy-heads auto`) finds the same four with its
own built-in haystack and needles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import mlx_sharedllm  # noqa: E402,F401,I001  (OpenBLAS before mlx, on Linux)
from needles import TRAIN_TEMPLATES, TRAIN_WORDS, fill, insert, sentence_ends  # noqa: E402
from sources import training_texts  # noqa: E402

from mlx_sharedllm.generate import encode_prompt  # noqa: E402
from mlx_sharedllm.heads import Probe, best_heads, head_scores  # noqa: E402
from mlx_sharedllm.loading import load  # noqa: E402

NUMBER_TEMPLATES = [t for t in TRAIN_TEMPLATES if t.slot == "number"]


def needle_case(tokenizer, haystack, ends, rng, depth: float):
    template = NUMBER_TEMPLATES[int(rng.integers(len(NUMBER_TEMPLATES)))]
    fact, question, answer = fill(template, TRAIN_WORDS, rng, parity=0)
    ids = np.asarray(tokenizer.encode(" " + fact, add_special_tokens=False), np.int32)
    context, at = insert(haystack, ends, ids, depth)
    digits = [at + j for j, t in enumerate(ids) if tokenizer.decode([int(t)]).strip().isdigit()]
    answer_ids = np.asarray(tokenizer.encode(answer, add_special_tokens=False), np.int32)
    prompt = encode_prompt(tokenizer, f"{question} Answer with the number only.")
    tokens = np.concatenate([context, prompt, answer_ids])
    first = len(context) + len(prompt) - 1
    return Probe(tokens, np.arange(first, first + len(answer_ids)), np.asarray(digits))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--needles", type=int, default=9)
    p.add_argument("--haystack", type=int, default=1500, help="haystack tokens")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--seed", type=int, default=3)
    a = p.parse_args()
    from mlx_sharedllm.default import default_base_model

    model, tokenizer = load(default_base_model())
    text = training_texts()["sherlock-holmes"]
    haystack = np.asarray(tokenizer.encode(text[100_000:200_000]), np.int32)[: a.haystack]
    ends = sentence_ends(tokenizer, haystack)
    rng = np.random.default_rng(a.seed)
    total = 0
    for i in range(a.needles):
        depth = 0.05 + 0.9 * (i % 5) / 4
        probe = needle_case(tokenizer, haystack, ends, rng, depth)
        assert len(probe.rows) == len(probe.targets), "the needle's digits are not one token each"
        total = total + head_scores(model, probe, len(model.layers))
    for head in best_heads(total / a.needles, a.top):
        print(f"{head}: {head.score:.3f}")


if __name__ == "__main__":
    main()
