"""Data of the long-document reading suite: texts, needle tasks, insertion, matchers, statistics.

In the spirit of RULER: each haystack (a pinned real text) gets one group of facts per task
(single needle, multi-key with decoys, multi-value, several facts asked one by one), and
Botchan as a whole gets questions about the book. Nothing here runs a model.

Needles never reuse training's templates, keys or values (recipes/smollm2/needles.py):
numbers have an odd digit sum, every word list is new. `dev` texts serve only to choose
settings (training reads the two novels, not the changelog); `test` texts (or parts)
training never reads.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "smollm2"))

from needles import number  # noqa: E402
from needles import sentence_ends as token_sentence_ends  # noqa: E402
from sources import botchan_split, read_text, training_texts  # noqa: E402

from mlx_sharedllm.assets import PinnedFile  # noqa: E402

# -- texts ------------------------------------------------------------------------------


def _brotli(name: str, sha256: str, size: int) -> PinnedFile:
    """A text of the test data in the brotli 1.2.0 sdist (the Canterbury corpus)."""
    member = f"brotli-1.2.0/tests/testdata/{name}"
    return PinnedFile("brotli", "1.2.0", member, sha256, size, "sdist")


LCET10 = _brotli(
    "lcet10.txt", "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f", 426_754
)
PARADISE_LOST = _brotli(
    "plrabn12.txt", "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c", 481_861
)
AS_YOU_LIKE_IT = _brotli(
    "asyoulik.txt", "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc", 125_179
)
ASTROPY_CHANGES = PinnedFile(
    package="astropy",
    version="8.0.2",
    member="astropy-8.0.2/CHANGES.rst",
    sha256="1b68a779e793b85c5e87231b7c0b2209eacb7b10edf56202b9053ea18018f862",
    size=739_560,
    kind="sdist",
)
PIP_NEWS = PinnedFile(
    package="pip",
    version="25.1.1",
    member="pip-25.1.1/NEWS.rst",
    sha256="afe7dd814fb97cd217d9c631520c63f95bab04c3beb98a843db9949494005f1c",
    size=230_372,
    kind="sdist",
)


@dataclass(frozen=True)
class SuiteText:
    """A text of the suite; `note` says which part of it training never reads."""

    name: str
    kind: str  # 'novel' | 'nonfiction' | 'verse' | 'drama' | 'list'
    split: str  # 'dev' | 'test'
    licence: str
    note: str
    haystack: bool = True  # False: only the book questions read it


BOOK_TEXT = "botchan-full"
_GUTENBERG = "public domain (Project Gutenberg e-text)"
_DEV_NOTE = "training reads all of it: use only to choose settings"
TEXTS = {
    t.name: t
    for t in (
        SuiteText(
            "botchan-heldout",
            "novel",
            "test",
            f"{_GUTENBERG}; file from the sentencepiece 0.2.3 sdist",
            "Botchan's last 30% (sources.HELD_OUT), which training never reads",
        ),
        SuiteText(
            "lcet10",
            "nonfiction",
            "test",
            f"{_GUTENBERG}: Library of Congress, Workshop on Electronic Texts, 1992",
            "training never reads any of it",
        ),
        SuiteText(
            "paradise-lost",
            "verse",
            "test",
            f"{_GUTENBERG}: John Milton",
            "training never reads any of it",
        ),
        SuiteText(
            "as-you-like-it",
            "drama",
            "test",
            "public domain: William Shakespeare (Canterbury corpus)",
            "training never reads any of it",
        ),
        SuiteText(
            "astropy-changes",
            "list",
            "test",
            "BSD-3-Clause: the astropy 8.0.2 changelog",
            "training never reads any of it",
        ),
        SuiteText(
            BOOK_TEXT,
            "novel",
            "test",
            f"{_GUTENBERG}; file from the sentencepiece 0.2.3 sdist",
            "the whole book: its first 70% is training LM data, its last 30% held out",
            haystack=False,
        ),
        SuiteText("war-and-peace", "novel", "dev", f"{_GUTENBERG}: Leo Tolstoy", _DEV_NOTE),
        SuiteText(
            "sherlock-holmes", "novel", "dev", f"{_GUTENBERG}: Arthur Conan Doyle", _DEV_NOTE
        ),
        SuiteText(
            "pip-news",
            "list",
            "dev",
            "MIT: the pip 25.1.1 changelog",
            "training never reads it; a list-like, number-rich text to choose settings on",
        ),
    )
}


def texts(split: str) -> list[str]:
    """Names of the haystack texts of a split ('dev' or 'test')."""
    return [t.name for t in TEXTS.values() if t.split == split and t.haystack]


def _clean(text: str) -> str:
    """LF line ends, no trailing spaces, one final newline."""
    lines = text.replace("\r\n", "\n").replace("\x1a", "").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def _story(botchan: str) -> str:
    """Botchan up to its last words, without the transcriber's errata and footer."""
    end = "--(THE END)--"
    return botchan[: botchan.index(end) + len(end)]


def _botchan_full() -> str:
    train, held_out = botchan_split()
    book = train + held_out
    return _story(book[book.index("BOTCHAN (MASTER DARLING)") :])


def _lcet10() -> str:
    return re.sub(r"^.*Project Gutenberg Etext.*\n", "", _clean(read_text(LCET10)), flags=re.M)


def _paradise_lost() -> str:
    """The poem, without Project Gutenberg's introduction."""
    text = _clean(read_text(PARADISE_LOST))
    return text[re.search(r"^Paradise Lost$", text, re.M).start() :]


@functools.lru_cache(maxsize=1)
def _training() -> dict[str, str]:
    return training_texts()


_LOADERS: dict[str, Callable[[], str]] = {
    "botchan-heldout": lambda: _story(botchan_split()[1]),
    "lcet10": _lcet10,
    "paradise-lost": _paradise_lost,
    "as-you-like-it": lambda: read_text(AS_YOU_LIKE_IT),
    "astropy-changes": lambda: read_text(ASTROPY_CHANGES),
    BOOK_TEXT: _botchan_full,
    "war-and-peace": lambda: _training()["war-and-peace"],
    "sherlock-holmes": lambda: _training()["sherlock-holmes"],
    "pip-news": lambda: read_text(PIP_NEWS),
}


@functools.cache
def load_text(name: str) -> str:
    """The clean text (no Gutenberg licence, LF line ends), fetched once from its pin."""
    return _clean(_LOADERS[name]())


# -- facts and questions ------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    text: str  # one sentence to insert
    depth: float  # 0..1, where in the haystack it goes


@dataclass(frozen=True)
class Question:
    task: str  # 'single-number' | 'single-word' | 'single-phrase' | 'multikey' | ...
    prompt: str  # the whole user message: question and instruction
    answers: tuple[str, ...]  # all must be found
    kind: str  # 'number' | 'word' | 'phrase'
    facts: tuple[int, ...]  # indices of the facts that hold the evidence (not decoys)


@dataclass(frozen=True)
class HaystackPlan:
    facts: tuple[Fact, ...]
    questions: tuple[Question, ...]


TASKS = ("single-number", "single-word", "single-phrase", "multikey", "multivalue", "facts")

# Key words: split in two halves, one for 'dev' plans and one for 'test' plans.
FIRST_NAMES = (
    "Wilhelmina", "Ignatius", "Persephone", "Florian", "Octavia", "Cornelius", "Philippa",
    "Leopold", "Imogen", "Thaddeus", "Cressida", "Evangeline", "Seraphina", "Lucius",
    "Marguerite", "Barnabas", "Ottilie", "Casimir", "Henrietta", "Evander", "Perpetua",
    "Ludovica", "Isolde", "Montgomery", "Anneliese", "Benedikt", "Clementine", "Dorothea",
    "Fenella", "Hortensia", "Isidore", "Jolyon", "Kasimira", "Leocadia", "Nerissa", "Quentin",
)  # fmt: skip
SURNAMES = (
    "Gruenwald", "Okafor", "Lindqvist", "Marchetti", "Abernathy", "Quennell", "Thistlewood",
    "Vasquez", "Delacroix", "Kowalczyk", "Pemberton", "Ashdown", "Fairweather", "Haverford",
    "Castellanos", "Ferreira", "Dumont", "Okonkwo", "Brightwater", "Szabo", "Mbeki", "Abubakar",
    "Ruiz", "Vanterpool", "Achterberg", "Oyelaran", "Przybylski", "Quintanilla", "Rasmussen",
    "Sandoval", "Tremblay", "Underhill", "Valdivia", "Wojcik", "Zaragoza", "Baptiste",
    "Cardenas", "Drummond", "Eskildsen", "Fonseca", "Galloway", "Hargreaves", "Ibarra",
    "Jovanovic", "Kovacs", "Lombardi", "Mwangi", "Ostrowski",
)  # fmt: skip
PLACES = (
    "planetarium", "apiary", "boathouse", "orangery", "sawmill", "tannery", "granary",
    "lighthouse", "brewery", "aviary", "foundry", "vicarage",
)  # fmt: skip
MATERIALS = (
    "pewter", "onyx", "porcelain", "bakelite", "enamel", "lacquered", "celadon", "walnut",
    "terracotta", "rosewood", "ebony", "tortoiseshell", "cloisonne", "gunmetal", "sandalwood",
    "beechwood",
)  # fmt: skip
OBJECTS = (
    "astrolabe", "sextant", "gramophone", "planisphere", "barometer", "metronome", "orrery",
    "hourglass", "kaleidoscope", "theodolite",
)  # fmt: skip

WORDS = (
    "tamarind", "obsidian", "cardamom", "kumquat", "ocelot", "tourmaline", "marzipan",
    "wombat", "bergamot", "pistachio", "axolotl", "gnocchi", "mangosteen", "sassafras",
    "toucan", "narwhal", "okapi", "quokka", "paprika", "kohlrabi", "mandolin", "gazebo",
)  # fmt: skip
PHRASE_ADJECTIVES = (
    "turquoise", "lopsided", "velveteen", "fluorescent", "bubblegum", "tangerine", "chequered",
    "sparkly", "crinkly", "paisley", "fuzzy", "neon", "corduroy", "wobbly", "tartan", "fizzy",
)  # fmt: skip
PHRASE_NOUNS = (
    "walrus", "accordion", "ukulele", "tambourine", "armadillo", "trombone", "cactus", "iceberg",
    "zeppelin", "meringue", "platypus", "sombrero", "carousel", "banjo",
)  # fmt: skip

ATTRIBUTES = {
    "number": (
        "shelf mark", "mooring berth", "ledger folio", "herbarium sheet", "inventory tag",
        "cloakroom token", "allotment plot", "survey stake", "archive crate", "pigeonhole",
        "customs seal", "vault drawer",
    ),
    "word": ("watchword", "code word", "countersign", "signal word", "chosen word"),
    "phrase": ("motto", "painting title", "boat name", "toast", "riddle answer"),
}  # fmt: skip
NEEDLES = {
    "number": (
        "The {attr} on file for {key} is {value}.",
        "{Key} is listed with {attr} {value}.",
        "In the register, {key} appears under {attr} {value}.",
        "The clerk wrote down {attr} {value} for {key}.",
        "{Key} was given {attr} {value} at the last inventory.",
    ),
    "word": (
        'The {attr} agreed with {key} was "{value}".',
        '{Key} settled on the {attr} "{value}".',
        'At the gate, the {attr} for {key} is "{value}".',
        '{Key} picked "{value}" as the {attr}.',
    ),
    "phrase": (
        'The {attr} chosen by {key} was "{value}".',
        '{Key} announced the {attr} "{value}".',
        'Everyone soon learned that the {attr} of {key} was "{value}".',
        '{Key} settled on "{value}" as the {attr}.',
    ),
}
QUESTIONS = {
    "number": (
        "Which {attr} is on file for {key}?",
        "What {attr} is {key} listed with?",
        "Under which {attr} does {key} appear in the text?",
        "What is the {attr} recorded for {key}?",
    ),
    "word": (
        "Which {attr} did {key} settle on?",
        "What {attr} goes with {key}?",
        "What was the {attr} agreed with {key}?",
    ),
    "phrase": (
        "What {attr} did {key} choose?",
        "Which {attr} is linked to {key} in the text?",
        "Which {attr} did {key} end up with?",
    ),
}
INSTRUCTIONS = {
    "number": (
        "State the number alone.",
        "Write only that number.",
        "Answer with just the digits.",
    ),
    "word": ("Answer with that one word.", "Reply with the single word only."),
    "phrase": ("Answer with the exact phrase.", "Give the phrase only."),
}
MULTI_NEEDLES = (
    "{Key} is listed with {attr} {value}.",
    "{Key} also has {attr} {value} on file.",
    "Another {attr} on file for {key} is {value}.",
)
MULTI_QUESTION = "Which {attr}s are on file for {key}? Give every one of them, separated by commas."
CLUSTER = 0.02  # decoys and the values of one key lie within this depth of each other
GROUPS = 10  # depth bins: 3 single needles, multikey, multivalue, 4 facts and their decoy


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


class _Planner:
    """Draws distinct keys, values and attributes, and collects facts and questions."""

    def __init__(self, rng: np.random.Generator, split: str):
        if split not in ("dev", "test"):
            raise ValueError(f"split must be 'dev' or 'test', not {split!r}")
        self.rng, self.half = rng, int(split == "test")
        self.used: set[str] = set()
        self.key_words: set[str] = set()
        self.facts: list[Fact] = []
        self.questions: list[Question] = []

    def _unique(self, draw: Callable[[], str]) -> str:
        while (value := draw()) in self.used:
            pass
        self.used.add(value)
        return value

    def _pool(self, words: Sequence[str]) -> str:
        return _choice(self.rng, words[self.half :: 2])

    def key(self) -> str:
        """A person, a place or an object that shares no word with the plan's other keys."""
        while True:
            key = self._draw_key()
            words = set(key.split()) - {"the"}
            if not words & self.key_words:
                self.key_words |= words
                return key

    def _draw_key(self) -> str:
        roll = self.rng.random()
        if roll < 0.5:
            return f"{self._pool(FIRST_NAMES)} {self._pool(SURNAMES)}"
        if roll < 0.75:
            return f"the {self._pool(SURNAMES)} {self._pool(PLACES)}"
        return f"the {self._pool(MATERIALS)} {self._pool(OBJECTS)}"

    def attr(self, kind: str) -> str:
        return self._unique(lambda: _choice(self.rng, ATTRIBUTES[kind]))

    def size(self, kind: str) -> int:
        """Digits of a number (3-9), words of a phrase (2-4), 1 for a word."""
        low, high = {"number": (3, 10), "phrase": (2, 5), "word": (1, 2)}[kind]
        return int(self.rng.integers(low, high))

    def value(self, kind: str, size: int) -> str:
        """A new value of the given shape; numbers have an odd digit sum."""
        if kind == "number":
            return self._unique(lambda: number(self.rng, size, parity=1))
        if kind == "word":
            return self._unique(lambda: _choice(self.rng, WORDS))
        while True:  # no phrase is another's words in another order
            phrase = self._phrase(size)
            if (bag := " ".join(sorted(phrase.split()))) not in self.used:
                self.used.add(bag)
                return phrase

    def _phrase(self, size: int) -> str:
        adjectives = self.rng.choice(PHRASE_ADJECTIVES, size - 1, replace=False)
        return " ".join([*map(str, adjectives), _choice(self.rng, PHRASE_NOUNS)])

    def fact(self, kind: str, key: str, attr: str, value: str, depth: float) -> int:
        """Add the fact in a random phrasing; its index."""
        return self.add(_choice(self.rng, NEEDLES[kind]), key, attr, value, depth)

    def add(self, template: str, key: str, attr: str, value: str, depth: float) -> int:
        text = template.format(key=key, Key=key[0].upper() + key[1:], attr=attr, value=value)
        self.facts.append(Fact(text, float(np.clip(depth, 0.0, 1.0))))
        return len(self.facts) - 1

    def ask(
        self, task: str, kind: str, key: str, attr: str, answers: list[str], facts: list[int]
    ) -> None:
        question = _choice(self.rng, QUESTIONS[kind]).format(key=key, attr=attr)
        prompt = f"{question} {_choice(self.rng, INSTRUCTIONS[kind])}"
        self.questions.append(Question(task, prompt, tuple(answers), kind, tuple(facts)))

    def near(self, depth: float) -> float:
        return depth + float(self.rng.uniform(-CLUSTER, CLUSTER))


def _single(p: _Planner, kind: str, depth: float) -> None:
    key, attr = p.key(), p.attr(kind)
    value = p.value(kind, p.size(kind))
    p.ask(f"single-{kind}", kind, key, attr, [value], [p.fact(kind, key, attr, value, depth)])


def _multikey(p: _Planner, depth: float) -> None:
    """The asked fact and two decoys: the same attribute for other keys, nearby."""
    attr, size = p.attr("number"), p.size("number")
    facts = [(p.key(), p.value("number", size)) for _ in range(3)]
    spots = [depth, p.near(depth), p.near(depth)]
    order = p.rng.permutation(3)
    indices = [p.fact("number", facts[i][0], attr, facts[i][1], spots[i]) for i in order]
    asked = indices[list(order).index(0)]
    p.ask("multikey", "number", facts[0][0], attr, [facts[0][1]], [asked])


def _multivalue(p: _Planner, depth: float) -> None:
    """One key with three values, stated in three sentences close together."""
    key, attr, size = p.key(), p.attr("number"), p.size("number")
    values = [p.value("number", size) for _ in range(3)]
    spots = sorted([depth, p.near(depth), p.near(depth)])
    indices = [p.add(t, key, attr, v, d) for t, v, d in zip(MULTI_NEEDLES, values, spots)]
    prompt = MULTI_QUESTION.format(key=key, attr=attr)
    p.questions.append(Question("multivalue", prompt, tuple(values), "number", tuple(indices)))


def _facts(p: _Planner, depths: Sequence[float]) -> None:
    """Four facts of different kinds, each asked on its own, and a decoy of one of them."""
    shapes = [("number", 7), ("number", 3), ("word", 1), ("phrase", p.size("phrase"))]
    stated = []
    for (kind, size), depth in zip(shapes, depths[:4]):
        key, attr, value = p.key(), p.attr(kind), p.value(kind, size)
        stated.append((kind, size, attr))
        p.ask("facts", kind, key, attr, [value], [p.fact(kind, key, attr, value, depth)])
    kind, size, attr = stated[int(p.rng.integers(4))]
    p.fact(kind, p.key(), attr, p.value(kind, size), depths[4])


def _group_depths(rng: np.random.Generator) -> np.ndarray:
    """One depth per group, each in its own of GROUPS equal bins (in random order), far
    enough inside its bin that a cluster around it stays there."""
    starts = rng.permutation(GROUPS) / GROUPS
    return starts + rng.uniform(CLUSTER, 1 / GROUPS - CLUSTER, GROUPS)


def plan_haystack(rng: np.random.Generator, split: str) -> HaystackPlan:
    """One group of facts per task at its own depth, with questions; all from `rng`."""
    p = _Planner(rng, split)
    depths = _group_depths(rng)
    for kind, depth in zip(("number", "word", "phrase"), depths[:3]):
        _single(p, kind, depth)
    _multikey(p, depths[3])
    _multivalue(p, depths[4])
    _facts(p, depths[5:])
    return HaystackPlan(tuple(p.facts), tuple(p.questions))


def haystacks_per_length(
    lengths: Sequence[int], text_sizes: Sequence[int], per_cell: int, least: int, per_task: int
) -> dict[int, int]:
    """Haystacks per text at each length, so that every task has at least `per_cell`
    questions there (at least `least`): a length that fewer texts reach gets more
    haystacks from each. `per_task` is the fewest questions a haystack asks of a task."""
    counts = {}
    for length in lengths:
        reach = sum(size >= length for size in text_sizes)
        if reach:
            counts[length] = max(least, -(-per_cell // (per_task * reach)))
    return counts


def questions_per_task(plan: HaystackPlan) -> int:
    """The fewest questions that one haystack asks of any task."""
    return min(Counter(q.task for q in plan.questions)[t] for t in TASKS)


# -- insertion ----------------------------------------------------------------------------


def _chunk_of(position, n: int, chunk_len: int):
    """The chunk of a position (or array of positions); n belongs to the last chunk."""
    return np.minimum(position // chunk_len, (n - 1) // chunk_len)


def _chunk_size(k, n: int, chunk_len: int):
    """Tokens in chunk k (or array of chunks): chunk_len but for a shorter last one."""
    return np.minimum(chunk_len, n - k * chunk_len)


def sentence_ends(tokenizer, ids: np.ndarray) -> np.ndarray:
    """Positions right after a token that ends a sentence (".", "!" or "?") where the next
    token does not go on with a letter, a digit or "_": a fact goes between sentences,
    never inside a word, a number or a name in code ("e.|g.", "1.|5", "astropy.|units").
    Without the check, 123 of the changelog's 294 test facts stood glued to the code they
    cut (benchmarks/results/suite_test_glued.log)."""
    ids = np.asarray(ids)
    ends = token_sentence_ends(tokenizer, ids)
    inside = ends[ends < len(ids)]
    pairs = {(int(ids[e - 1]), int(ids[e])) for e in inside}
    goes_on = {pair for pair in pairs if _goes_on(tokenizer, *pair)}
    cut = np.array([(int(ids[e - 1]), int(ids[e])) in goes_on for e in inside], bool)
    return np.concatenate([inside[~cut], ends[ends >= len(ids)]])


def _goes_on(tokenizer, end: int, after: int) -> bool:
    """Whether the text goes on with a letter, a digit or "_" right after token `end`
    (decoded as a pair: a SentencePiece token's leading space shows only after another)."""
    head, both = tokenizer.decode([end]), tokenizer.decode([end, after])
    rest = both[len(head) :] if both.startswith(head) else both[len(both.rstrip()) :]
    return bool(rest) and (rest[0].isalnum() or rest[0] == "_")


def _place(ends: np.ndarray, n: int, depth: float, length: int, chunk_len: int) -> int:
    """The sentence end nearest depth * n, in a chunk that holds at least twice the fact."""
    candidates = ends if len(ends) else np.arange(n + 1)
    sizes = _chunk_size(_chunk_of(candidates, n, chunk_len), n, chunk_len)
    candidates = candidates[sizes >= 2 * length]
    if not len(candidates):
        raise ValueError(f"no chunk can take a fact of {length} tokens")
    return int(candidates[np.argmin(np.abs(candidates - depth * n))])


# Haystack tokens kept beside every fact when a chunk makes room for its facts.
MARGIN = 64


def _fill_chunk(
    chunk: np.ndarray, inserts: list[tuple[int, int, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """The chunk with facts (offset, index, ids) inserted, as long as before: each fact's
    length in haystack tokens goes from the far side (the end for a fact in the first
    half, else the start); fact tokens are never dropped. Returns (ids, fact index per
    token, -1 for haystack tokens)."""
    pieces, labels, cursor = [], [], 0
    front = back = 0
    for offset, index, ids in sorted(inserts, key=lambda item: item[:2]):
        pieces += [chunk[cursor:offset], ids]
        labels += [np.full(offset - cursor, -1), np.full(len(ids), index)]
        cursor = offset
        if offset < len(chunk) / 2:
            back += len(ids)
        else:
            front += len(ids)
    pieces.append(chunk[cursor:])
    labels.append(np.full(len(chunk) - cursor, -1))
    ids, labels = np.concatenate(pieces), np.concatenate(labels)
    haystack = np.flatnonzero(labels < 0)
    if front + back > len(haystack):
        raise ValueError("the facts of one chunk are longer than the chunk")
    keep = _kept(labels, front, back)
    return ids[keep].astype(chunk.dtype), labels[keep]


def _kept(labels: np.ndarray, front: int, back: int) -> np.ndarray:
    """Which tokens stay when `front` haystack tokens go from the start and `back` from the
    end, without cutting into the text around a fact: every fact keeps MARGIN haystack
    tokens (or all there are) on each side, a cut that would reach them goes to the other
    edge, and what neither edge has room for goes from the middle of the longest stretch
    between facts. Where the margins leave no room, they shrink. (A cut across a fact, or
    up to it, took the sentence it follows: "- Accommodate <fact>https://...".)"""
    margin = MARGIN
    while True:
        keep = _cut(labels, front, back, margin)
        if keep is not None:
            return keep
        if margin == 0:
            raise ValueError("the facts of one chunk leave no room to keep it as long")
        margin //= 2


def _cut(labels: np.ndarray, front: int, back: int, margin: int) -> np.ndarray | None:
    """_kept with `margin` tokens kept beside every fact; None when there is no room."""
    facts = np.flatnonzero(labels >= 0)
    before = max(0, int(facts[0]) - margin)
    after = max(0, int(len(labels) - 1 - facts[-1]) - margin)
    cut_front, cut_back = min(front, before), min(back, after)
    rest = front + back - cut_front - cut_back
    more = min(rest, before - cut_front)
    cut_front, rest = cut_front + more, rest - more
    more = min(rest, after - cut_back)
    cut_back, rest = cut_back + more, rest - more
    keep = np.ones(len(labels), bool)
    keep[:cut_front] = False
    keep[len(labels) - cut_back :] = False
    if rest:
        gaps = np.diff(facts) - 1 - 2 * margin
        if not len(gaps) or gaps.max() < rest:
            return None
        widest = int(np.argmax(gaps))
        start = int(facts[widest]) + 1 + margin + (int(gaps[widest]) - rest) // 2
        keep[start : start + rest] = False
    return keep


def encode_fact(tokenizer, text: str) -> np.ndarray:
    """The fact's tokens as inserted: " " + text, no special tokens."""
    return np.asarray(tokenizer.encode(" " + text, add_special_tokens=False), np.int32)


def insert_facts(
    tokenizer, ids: np.ndarray, facts: Sequence[Fact], chunk_len: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The haystack with each fact after the sentence end nearest its depth, as long as
    before and with every chunk boundary kept, so chunks without facts are unchanged;
    and each fact's token span [start, end), wholly inside one chunk."""
    ids = np.asarray(ids)
    n = len(ids)
    ends = sentence_ends(tokenizer, ids)
    by_chunk: dict[int, list[tuple[int, int, np.ndarray]]] = {}
    for index, fact in enumerate(facts):
        tokens = encode_fact(tokenizer, fact.text)
        at = _place(ends, n, fact.depth, len(tokens), chunk_len)
        k = int(_chunk_of(at, n, chunk_len))
        by_chunk.setdefault(k, []).append((at - k * chunk_len, index, tokens))
    out, spans = ids.copy(), [(0, 0)] * len(facts)
    for k, inserts in by_chunk.items():
        start = k * chunk_len
        stop = start + int(_chunk_size(k, n, chunk_len))
        out[start:stop], labels = _fill_chunk(ids[start:stop], inserts)
        for _, index, _ in inserts:
            where = np.flatnonzero(labels == index)
            spans[index] = (start + int(where[0]), start + int(where[-1]) + 1)
    return out, spans


def fact_chunks(spans: Sequence[tuple[int, int]], chunk_len: int) -> list[int]:
    """The chunk index of each fact span."""
    return [start // chunk_len for start, _ in spans]


# -- questions about the book -------------------------------------------------------------


@dataclass(frozen=True)
class BookQuestion:
    prompt: str
    accept: tuple[tuple[str, ...], ...]  # right when every group has a matching regex
    evidence: str  # an exact quote of the book that holds the answer
    reference: str  # a right answer


BOOK_QUESTIONS = (
    BookQuestion(
        "Who is the narrator, and where does he go to teach?",
        ((r"middle school|school",), (r"shikoku|country|matsuyama|provinc|backwoods",)),
        "school in Shikoku was in need of a teacher of mathematics for forty yen",
        "A young man from Tokyo who goes to teach mathematics at a middle school in a "
        "country town on Shikoku.",
    ),
    BookQuestion(
        "Who is Kiyo?",
        ((r"maid|servant|nurse|housekeeper",),),
        "But our maid Kiyo, who had been with us for ten years or so, interceded",
        "The old maid servant of the narrator's family, who dotes on him.",
    ),
    BookQuestion(
        "What nickname does the narrator give the head teacher?",
        ((r"red ?shirt",),),
        "'Badger' for the principal, 'Red Shirt' for the head-teacher",
        "Red Shirt, because he wears a red flannel shirt all the year round.",
    ),
    BookQuestion(
        "What nickname does the narrator give the principal?",
        ((r"badger",),),
        "'Badger' for the principal, 'Red Shirt' for the head-teacher",
        "Badger.",
    ),
    BookQuestion(
        "Who is the teacher the narrator calls Porcupine, and what does he teach?",
        ((r"hotta",), (r"math",)),
        "mathematics, there was one named Hotta. This was a fellow of massive",
        "Hotta, a burly teacher of mathematics.",
    ),
    BookQuestion(
        "What subject does the teacher nicknamed Hubbard Squash teach?",
        ((r"english",),),
        "'Hubbard Squash' for the teacher of English",
        "English; he is Mr. Koga, pale and fat.",
    ),
    BookQuestion(
        "Whom does the narrator nickname Clown?",
        ((r"drawing|yoshikawa|art",),),
        "of mathematics and 'Clown' for that of drawing",
        "Yoshikawa, the teacher of drawing.",
    ),
    BookQuestion(
        "Who is the Madonna?",
        ((r"toyama|beautiful|girl|lady|woman|daughter",),),
        "is so beautiful that the teachers in the school call her Madonna",
        "Miss Toyama, a beautiful young lady of the town whom Red Shirt courts.",
    ),
    BookQuestion(
        "To whom was the Madonna engaged before Red Shirt courted her?",
        ((r"koga|hubbard|squash",),),
        "was engaged to Professor Koga",
        "To Mr. Koga, Hubbard Squash.",
    ),
    BookQuestion(
        "What dish does the narrator order at the noodle shop, which the students then "
        "mock on the blackboard?",
        ((r"tempura",),),
        '"Say, fetch me some tempura," I ordered in a loud voice.',
        "Tempura noodles, four bowls of them.",
    ),
    BookQuestion(
        "What does the narrator eat in the park that the students write about next?",
        ((r"dango|dumpling",),),
        '"Two dishes of dango--7 sen."',
        "Dango, small balls of rice; two dishes for 7 sen.",
    ),
    BookQuestion(
        "What do the students put in the narrator's bed on his night duty?",
        ((r"grasshopper|locust",),),
        "blanket, and about fifty to sixty grasshoppers flew out.",
        "Grasshoppers (locusts).",
    ),
    BookQuestion(
        "Where is Hubbard Squash transferred to?",
        ((r"nobeoka|hiuga|hyuga",),),
        "To Nobeoka in Hiuga province.",
        "Nobeoka in Hiuga province.",
    ),
    BookQuestion(
        "Where does the narrator first lodge, and what is his landlord's trade?",
        ((r"antique|curio",),),
        "The boss was said to be a dealer in antique curios, called",
        "With Ikagin, a dealer in antique curios.",
    ),
    BookQuestion(
        "What is the narrator's monthly salary at the school?",
        ((r"forty|\b40\b",),),
        "I would not be in such a backwoods town for forty yen",
        "Forty yen a month.",
    ),
    BookQuestion(
        "How much money does the narrator's brother give him before leaving for Kyushu?",
        ((r"600|six hundred",),),
        "and giving me 600 yen, said that I might begin a business with it",
        "600 yen.",
    ),
    BookQuestion(
        "What does the narrator throw at Clown in the final fight?",
        ((r"\beggs?\b",),),
        "took out two and dashed them on the face of Clown. The eggs crushed",
        "Raw eggs.",
    ),
    BookQuestion(
        "Where does the narrator go back to at the end of the story?",
        ((r"tokyo|yedo|\bedo\b",),),
        "On my arrival at Tokyo, I rushed into",
        "Tokyo, to Kiyo.",
    ),
    BookQuestion(
        "What job does the narrator take at the end?",
        ((r"engineer|technician|tram|street ?car",),),
        "some one helped me to a job as assistant engineer",
        "Assistant engineer at the tram car (street car) office, for 25 yen a month.",
    ),
    BookQuestion(
        "What happens to Kiyo at the end of the book?",
        ((r"\bdie|dead|death|pneumonia|grave|buried",),),
        "So Kiyo's grave is in the Yogen temple at Kobinata.",
        "She dies of pneumonia and is buried in the Yogen temple at Kobinata.",
    ),
)

# Questions about the first 64K tokens of War and Peace (a dev text): for choosing how to
# re-read, never reported as results.
DEV_BOOK_TEXT = "war-and-peace"
DEV_BOOK_QUESTIONS = (
    BookQuestion(
        "Who is Anna Pavlovna Scherer?",
        ((r"maid of hono|favou?rite|empress",),),
        "Pavlovna Scherer, maid of honor and favorite of the Empress Marya",
        "A maid of honour and favourite of the Empress Marya Fedorovna.",
    ),
    BookQuestion(
        "Whose son is Pierre?",
        ((r"bezukhov",),),
        "young man was an illegitimate son of Count Bezukhov, a well-known",
        "The illegitimate son of Count Bezukhov.",
    ),
    BookQuestion(
        "Whom does Anna Pavlovna suggest that Prince Vasili's son Anatole should marry?",
        ((r"mary|bolkonsk",),),
        "yours, Princess Mary Bolkonskaya.",
        "Princess Mary Bolkonskaya.",
    ),
    BookQuestion(
        "What did Dolokhov bet that he would do?",
        ((r"drink|rum|bottle",), (r"window|ledge|sill",)),
        "naval officer, that he would drink a bottle of rum sitting on the",
        "Drink a bottle of rum sitting on the outer ledge of a third-floor window.",
    ),
    BookQuestion(
        "What did the young men do to the policeman when he tried to stop them?",
        ((r"\btied|\btie\b|bound",), (r"bear",)),
        "do? They tied a policeman and the bear back to back and put the bear",
        "They tied him back to back with a bear and put the bear into the Moyka Canal.",
    ),
    BookQuestion(
        "Who is Sonya?",
        ((r"niece|cousin",),),
        "son; Sonya, the count's fifteen-year-old niece, and little Petya,",
        "The count's fifteen-year-old niece.",
    ),
    BookQuestion(
        "Whose name day do the Rostovs celebrate?",
        ((r"natal|natasha|mother|daughter",),),
        "It was St. Natalia's day and the name day of two of the Rostovs--the",
        "The mother's and the youngest daughter's, both named Nataly.",
    ),
    BookQuestion(
        "What is the name of old Prince Bolkonski's estate?",
        ((r"bald hills",),),
        "At Bald Hills, Prince Nicholas Andreevich Bolkonski's estate, the",
        "Bald Hills.",
    ),
    BookQuestion(
        "What does Anna Mikhaylovna ask Prince Vasili to do for her son Boris?",
        ((r"adjutant|kutuzov|guards",),),
        "Kutuzov... recommend Boris to him as adjutant! Then I shall be at",
        "Recommend him to Kutuzov as an adjutant.",
    ),
    BookQuestion(
        "Who is Prince Vasili's daughter?",
        ((r"helene|hel[eè]ne",),),
        "Prince Vasili's daughter, the beautiful Helene, came to take her",
        "The beautiful Helene.",
    ),
    BookQuestion(
        "What illness did Anna Pavlovna say she was suffering from?",
        ((r"grippe|influenza",),),
        "she said, suffering from la grippe; grippe being then a new word in",
        "La grippe.",
    ),
    BookQuestion(
        "Where had Pierre been educated?",
        ((r"abroad",),),
        "Pierre had been educated abroad, and this reception at Anna",
        "Abroad.",
    ),
    BookQuestion(
        "What lessons does old Prince Bolkonski give his daughter?",
        ((r"algebra|geometry",),),
        "two cardinal virtues in her gave her lessons in algebra and geometry",
        "Lessons in algebra and geometry.",
    ),
    BookQuestion(
        "Who is Julie Karagina to Princess Mary?",
        ((r"friend",),),
        "her most intimate friend from childhood; that same Julie Karagina",
        "Her most intimate friend from childhood.",
    ),
    BookQuestion(
        "Where does the old count keep the paper, according to the princess?",
        ((r"portfolio|pillow",),),
        '"It\'s in the inlaid portfolio that he keeps under his pillow,"',
        "In the inlaid portfolio under his pillow.",
    ),
    BookQuestion(
        "Who is Mademoiselle Bourienne?",
        ((r"french",),),
        "came, the pretty, fair haired Frenchwoman, Mademoiselle Bourienne,",
        "A pretty, fair-haired Frenchwoman, Princess Mary's companion.",
    ),
    BookQuestion(
        "Whom is Natasha in love with, according to the countess?",
        ((r"boris",),),
        '"And she\'s in love with Boris already. Just fancy!" said the',
        "Boris.",
    ),
    BookQuestion(
        "How far is Bald Hills from Moscow?",
        ((r"hundred|\b100\b",),),
        "anyone who wanted to see him could come the hundred miles from",
        "A hundred miles.",
    ),
    BookQuestion(
        "How does old Prince Bolkonski keep himself occupied?",
        ((r"memoir|mathemat|lathe|snuff|build|garden",),),
        "solving problems in higher mathematics, turning snuffboxes on a lathe,",
        "Writing his memoirs, solving problems in higher mathematics, turning snuffboxes.",
    ),
    BookQuestion(
        "Who is Vera?",
        ((r"daughter",),),
        '"Vera," she said to her eldest daughter who was evidently not a',
        "The Rostovs' eldest daughter.",
    ),
)


# -- matchers and statistics --------------------------------------------------------------

STOP_WORDS = frozenset((
    "the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was",
    "one", "our", "out", "has", "his", "how", "its", "may", "new", "now", "old", "see", "two",
    "who", "did", "get", "him", "she", "too", "use", "with", "that", "this", "from", "they",
    "will", "have", "been", "what", "when", "were", "your", "into", "than", "then", "them",
    "there", "these", "those",
))  # fmt: skip
_GROUPED = re.compile(r"(?<!\d)\d{1,3}(?:[,\u00a0\u202f ]\d{3})+(?!\d)")


def numbers_in(text: str) -> set[str]:
    """Every whole number in the text, with digit groups also read joined: '48,213' and
    '48 213' give '48213' (as well as '48' and '213')."""
    found = set(re.findall(r"\d+", text))
    return found | {re.sub(r"\D", "", m) for m in _GROUPED.findall(text)}


def _has_word(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.I) is not None


def _has_phrase(phrase: str, text: str) -> bool:
    """All content words of the phrase (3+ letters, not stop words), in any order."""
    words = [w for w in re.findall(r"[a-z]+", phrase.lower()) if len(w) >= 3]
    content = [w for w in words if w not in STOP_WORDS] or [phrase]
    return all(_has_word(word, text) for word in content)


def is_correct(question: Question | BookQuestion, text: str) -> bool:
    """Whether an answer `text` holds every answer of the question."""
    if isinstance(question, BookQuestion):
        return all(any(re.search(p, text, re.I) for p in group) for group in question.accept)
    if question.kind == "number":
        found = numbers_in(text)
        return all(answer in found for answer in question.answers)
    match = _has_word if question.kind == "word" else _has_phrase
    return all(match(answer, text) for answer in question.answers)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate k/n (z=1.96: 95%); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    rate = k / n
    centre = rate + z * z / (2 * n)
    margin = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - margin) / scale), min(1.0, (centre + margin) / scale)
