"""How often is a needle's chunk the answer's top source? On the reading suite's haystacks
(read_suite.py), single-needle questions, the default model.

    python benchmarks/sources_relevance.py --split test --lengths 8192,16384

For each question: the rank of the needle's chunk among the sources (re-read chunks first,
then by attention share), and its rank by the injection heads' attention share alone.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_sharedllm  # noqa: E402,F401,I001  (OpenBLAS before mlx, on Linux)
import read_suite as rs  # noqa: E402
import suite_data as sd  # noqa: E402
from mlx_sharedllm.distractors import movable_chunks  # noqa: E402
from mlx_sharedllm.generate import stream_generate  # noqa: E402
from mlx_sharedllm.loading import load  # noqa: E402

SINGLE = ("single-number", "single-word", "single-phrase")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="test", choices=("dev", "test"))
    p.add_argument("--lengths", default="8192,16384")
    p.add_argument("--haystacks", type=int, default=1)
    a = p.parse_args()
    model, tokenizer = load()
    chunk_len = model.config.chunk_len
    top = heads = n = 0
    for name in sd.texts(a.split):
        ids_all = rs.text_ids(tokenizer, name)
        lengths = [int(x) for x in a.lengths.split(",") if len(ids_all) >= int(x)]
        if not lengths:
            continue
        base = rs.bank(model, ids_all[: max(lengths)], name) if movable_chunks(model) else None
        for length in lengths:
            for h in range(a.haystacks):
                seed = [0, zlib.crc32(name.encode()), length, h]
                plan = sd.plan_haystack(np.random.default_rng(seed), a.split)
                ids, spans = sd.insert_facts(tokenizer, ids_all[:length], plan.facts, chunk_len)
                tree = rs.haystack_tree(model, base, ids, set(sd.fact_chunks(spans, chunk_len)))
                for q in plan.questions:
                    if q.task not in SINGLE:
                        continue
                    chunk = spans[q.facts[0]][0] // chunk_len
                    last = list(stream_generate(
                        model, tokenizer, q.prompt, tree, max_tokens=1, sources=True
                    ))[-1]  # fmt: skip
                    order = [s.chunk for s in last.sources.sources]
                    by_heads = int(np.argmax(last.sources.profile))
                    n += 1
                    top += order[0] == chunk
                    heads += by_heads == chunk
                    print(
                        f"{name:16s} {length:6d} {q.task:13s} needle chunk {chunk:3d}: "
                        f"sources {order[:3]} heads' top {by_heads}",
                        flush=True,
                    )
    print(f"top source is the needle's chunk: {top}/{n}; heads' attention alone: {heads}/{n}")


if __name__ == "__main__":
    main()
