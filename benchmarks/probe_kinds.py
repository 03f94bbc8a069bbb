"""Does the default model read needles the suite never asks about? A dev probe of other
needle kinds, phrasings and question styles, on the dev texts only.

    python benchmarks/probe_kinds.py --out benchmarks/results/probe_kinds.jsonl

The suite (`read_suite.py`) asks one family of needles ("{key} is listed with {attr}
{value}") in a few phrasings. A user's documents, and held-back suites, ask others: RULER's
own "special magic number" needles with word-pair keys, UUIDs, dates, codes with letters,
people and places named in a sentence, counts with thousands separators, e-mail addresses,
and questions phrased as requests ("Tell me ...") or with no instruction at all. Each
haystack holds one fact of every kind, spread over its depths; the haystack is compressed
once and asked about each fact, as `generate` runs the model. A fact counts as found when
its value stands in the answer (numbers without separators, case ignored). Every name,
key and value here is drawn fresh, from pools that share no word with the suite's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import mlx_sharedllm  # noqa: E402,F401,I001  (OpenBLAS before mlx, on Linux)

import suite_data as sd  # noqa: E402
from read_suite import bank, done_keys, haystack_tree, text_ids  # noqa: E402
from mlx_sharedllm.generate import stream_generate  # noqa: E402
from mlx_sharedllm.loading import load  # noqa: E402

FIRST = ("Rosalind", "Octavio", "Saoirse", "Bartholomew", "Ingrid", "Lucian", "Marisol")
LAST = ("Villanueva", "Ashcombe", "Nakagawa", "Strickland", "Oduya", "Brannigan", "Pellegrini")
TOWNS = ("Wexmoor", "Caldera Bay", "Pellingham", "Ostrava", "Tarrowby", "Kilbrennan")
ADJECTIVES = ("crimson", "hollow", "northern", "silent", "copper", "drowsy", "brisk")
NOUNS = ("heron", "lantern", "quarry", "meadow", "anvil", "thimble", "glacier")
MONTHS = ("January", "March", "April", "July", "September", "November")
# Enough for an answer that restates a UUID key before its UUID value.
MAX_TOKENS = 96
COLOURS = ("vermilion", "chartreuse", "ultramarine", "saffron", "mauve")


@dataclass(frozen=True)
class Probe:
    kind: str
    fact: str
    question: str
    want: tuple[str, ...]  # every one must stand in the answer


def _pick(rng: np.random.Generator, pool) -> str:
    return str(pool[int(rng.integers(len(pool)))])


def _name(rng) -> str:
    return f"{_pick(rng, FIRST)} {_pick(rng, LAST)}"


def _uuid(rng) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def probes(rng: np.random.Generator) -> list[Probe]:
    """One fact of every kind, with fresh keys and values."""
    a, b = _pick(rng, ADJECTIVES), _pick(rng, NOUNS)
    c, d = _pick(rng, [x for x in ADJECTIVES if x != a]), _pick(rng, [x for x in NOUNS if x != b])
    magic, key_uuid, value_uuid = str(rng.integers(10**6, 10**7)), _uuid(rng), _uuid(rng)
    day, month, year = str(rng.integers(2, 29)), _pick(rng, MONTHS), str(rng.integers(1600, 1900))
    guild, keeper, traveller, owner = _pick(rng, LAST), _name(rng), _name(rng), _name(rng)
    code = f"{chr(65 + rng.integers(26))}{chr(65 + rng.integers(26))}-{rng.integers(1000, 10000)}"
    town, home = map(str, rng.choice(TOWNS, 2, replace=False))
    orchard = _pick(rng, [x for x in LAST if x != guild])
    trees = int(rng.integers(1200, 99000))
    first, last = owner.split()
    combination = f"{rng.integers(10, 99)}-{rng.integers(10, 99)}-{rng.integers(10, 99)}"
    colour, painter = _pick(rng, COLOURS), _name(rng)
    return [
        Probe(
            "ruler-number",
            f"One of the special magic numbers for {a}-{b} is: {magic}.",
            f"What is the special magic number for {a}-{b} mentioned in the provided text?",
            (magic,),
        ),
        Probe(
            "ruler-uuid",
            f"One of the special magic uuids for {key_uuid} is: {value_uuid}.",
            f"What is the special magic uuid for {key_uuid} mentioned in the provided text?",
            (value_uuid,),
        ),
        Probe(
            "date",
            f"The charter of the {guild} guild was sealed on {day} {month} {year}.",
            f"On what date was the charter of the {guild} guild sealed?",
            (day, month, year),
        ),
        Probe(
            "code",
            f"The door code for the {c} {d} warehouse is {code}.",
            f"Which door code opens the {c} {d} warehouse?",
            (code,),
        ),
        Probe(
            "person",
            f"The keeper of the {home} lighthouse is someone named {keeper}.",
            f"Who keeps the {home} lighthouse?",
            (keeper.split()[1],),
        ),
        Probe(
            "place",
            f"{traveller} spent that whole winter in the town of {town}.",
            f"Where did {traveller} spend the winter?",
            (town,),
        ),
        Probe(
            "count",
            f"The {orchard} orchard holds exactly {trees:,} pear trees.",
            f"How many pear trees grow in the {orchard} orchard?",
            (str(trees),),
        ),
        Probe(
            "email",
            f"Letters for {owner} now go to {first.lower()}.{last.lower()}@{b}post.org.",
            f"What is the e-mail address of {owner}?",
            (f"{first}.{last}@{b}post.org".lower(),),
        ),
        Probe(
            "request",
            f"The locker combination of {owner} is {combination}.",
            f"Tell me the locker combination of {owner}.",
            (combination,),
        ),
        Probe(
            "word",
            f"{painter} painted the whole studio {colour} last spring.",
            f"What colour did {painter} paint the studio",
            (colour,),
        ),
    ]


KINDS = tuple(p.kind for p in probes(np.random.default_rng(0)))


def found(want: tuple[str, ...], answer: str) -> bool:
    """Every wanted value stands whole in the answer (no letter or digit runs on into it
    on either side: a day "24" is not found in "1724"): case ignored, thousands
    separators dropped."""
    text = answer.lower()
    return all(_whole(w.lower(), text) or _whole(w.lower(), text.replace(",", "")) for w in want)


def _whole(value: str, text: str) -> bool:
    return re.search(rf"(?<![0-9a-z]){re.escape(value)}(?![0-9a-z])", text) is not None


def check_pools() -> None:
    """The probe's words are new to the suite (its keys, attributes and values)."""
    suite = {w.lower() for pool in (sd.FIRST_NAMES, sd.SURNAMES, sd.PLACES, sd.MATERIALS,
             sd.OBJECTS, sd.WORDS) for w in pool}  # fmt: skip
    ours = {w.lower() for pool in (FIRST, LAST, TOWNS, ADJECTIVES, NOUNS, COLOURS) for w in pool}
    shared = suite & ours
    if shared:
        raise SystemExit(f"probe words also in the suite: {sorted(shared)}")


def ask_haystack(model, tokenizer, base, ids_all, key: str, rng, done: set, out: Path) -> None:
    """One haystack of the text's first tokens with one fact of every kind, compressed
    once and asked about each fact; a JSON line per answer."""
    chunk_len = model.config.chunk_len
    asked = probes(rng)
    depths = rng.permutation(np.linspace(0.05, 0.95, len(asked)))
    facts = [sd.Fact(p.fact, float(d)) for p, d in zip(asked, depths)]
    ids, spans = sd.insert_facts(tokenizer, ids_all, facts, chunk_len)
    tree = haystack_tree(model, base, ids, set(sd.fact_chunks(spans, chunk_len)))
    for p, depth, (start, end) in zip(asked, depths, spans):
        if f"{key}|{p.kind}" in done:
            continue
        tic = time.perf_counter()
        responses = list(
            stream_generate(model, tokenizer, p.question, context=tree, max_tokens=MAX_TOKENS)
        )
        answer = "".join(r.text for r in responses)
        held = any(q.start <= start and end <= q.end for q in responses[-1].passages)
        row = {
            "key": f"{key}|{p.kind}", "kind": p.kind, "depth": round(float(depth), 2),
            "question": p.question, "answer": answer, "want": p.want,
            "correct": found(p.want, answer), "reread_held": held,
            "seconds": round(time.perf_counter() - tic, 1),
        }  # fmt: skip
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        mark = "OK" if row["correct"] else "no"
        print(f"{key:24} {p.kind:13} {mark} held={held!s:5} {answer[:70]!r}", flush=True)


def run(a: argparse.Namespace) -> None:
    check_pools()
    model, tokenizer = load(a.model) if a.model else load()
    out = Path(a.out)
    done = done_keys(out)
    for name in a.texts.split(","):
        ids_all = text_ids(tokenizer, name)
        lengths = [int(x) for x in a.lengths.split(",") if int(x) <= len(ids_all)]
        base = bank(model, ids_all[: max(lengths)], name)
        for length in lengths:
            for h in range(a.haystacks):
                key = f"{name}|{length}|{h}"
                if all(f"{key}|{kind}" in done for kind in KINDS):
                    continue
                rng = np.random.default_rng([a.seed, zlib.crc32(name.encode()), length, h])
                ask_haystack(model, tokenizer, base, ids_all[:length], key, rng, done, out)


def report(path: str) -> str:
    """A markdown table: right of asked, per kind and haystack length."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    length = {r["key"]: int(r["key"].split("|")[1]) for r in rows}
    lengths = sorted(set(length.values()))
    head = " | ".join(f"{n // 1024}K" for n in lengths)
    lines = [f"| kind | {head} |", "|---|" + "---:|" * len(lengths)]
    for kind in [*sorted({r["kind"] for r in rows}), None]:
        cells = []
        for n in lengths:
            these = [r for r in rows if length[r["key"]] == n and kind in (None, r["kind"])]
            cells.append(f"{sum(r['correct'] for r in these)} of {len(these)}")
        lines.append(f"| {kind or 'all'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--texts", default="sherlock-holmes,war-and-peace,pip-news")
    p.add_argument("--lengths", default="16384")
    p.add_argument("--haystacks", type=int, default=2, help="per text and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/probe_kinds.jsonl")
    p.add_argument("--report", action="store_true", help="summarise --out and exit")
    a = p.parse_args(argv)
    if not a.report:
        run(a)
    print(report(a.out))


if __name__ == "__main__":
    main()
